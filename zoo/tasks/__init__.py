"""LightningModules, one per task. Each wraps any registered zoo model by name."""
from zoo.tasks.classification import ImageClassification

__all__ = ["ImageClassification"]
