"""Batch-level training augmentation that the task applies (the datamodules augment single images)."""
from .mixup import MixParams, Mixup, MixupConfig

__all__ = ["MixParams", "Mixup", "MixupConfig"]
