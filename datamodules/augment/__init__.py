"""Per-image training augmentation with timm's semantics, as albumentations transforms seeded by
the project's sampler: :class:`RandAugment` (on ``uint8`` images, before Normalize) and
:class:`RandomErasing` (on the normalized float image, after it)."""
from .rand_augment import (RAND_INCREASING_OPS, RAND_OPS, SIGNED_OPS, AppliedOp, RandAugment, RandAugmentConfig,
                           apply_op, fill_colour, op_args, parse_rand_augment)
from .random_erasing import ERASING_MODES, ErasedBox, RandomErasing

__all__ = [
    "RAND_OPS", "RAND_INCREASING_OPS", "SIGNED_OPS", "AppliedOp", "RandAugment", "RandAugmentConfig",
    "apply_op", "fill_colour", "op_args", "parse_rand_augment",
    "ERASING_MODES", "ErasedBox", "RandomErasing",
]
