"""DataModules: embedded datasets that work offline, and loaders for real datasets laid out on disk.

Also timm's preprocessing helpers, so a user builds the transform a model expects without importing timm::

    cfg = zoo.data.resolve_model_data_config(model)   # input_size, interpolation, mean, std, crop_pct, crop_mode
    transform = zoo.data.create_transform(**cfg)      # eval transform (is_training=True for the training one)

Names load on first use, so ``import zoo.data`` pulls in neither Lightning nor timm.
"""
import importlib

_LAZY = {
    "DigitsDataModule": "zoo.data.images",
    "ImageFolderDataModule": "zoo.data.images",
    "resolve_data_config": "timm.data",
    "resolve_model_data_config": "timm.data",
    "create_transform": "timm.data",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zoo.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
