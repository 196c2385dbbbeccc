"""DataModules: embedded datasets that work offline, and loaders for real datasets laid out on disk."""
from zoo.data.images import DigitsDataModule, ImageFolderDataModule

__all__ = ["DigitsDataModule", "ImageFolderDataModule"]
