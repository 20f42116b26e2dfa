"""Random erasing with timm's semantics, as an albumentations transform on the normalized image.

timm's ``RandomErasing`` (``timm/data/random_erasing.py``; Zhong et al. 2017), applied after
Normalize:

- with probability ``probability`` an image gets ``count`` boxes, ``count`` uniform in
  ``[min_count, max_count]``;
- each box: up to 10 attempts at an area ``uniform(area) * H * W / count`` and an aspect ratio
  ``h / w = exp(uniform(log min_aspect, log max_aspect))``, ``h, w`` rounded; the first box with
  ``h < H`` and ``w < W`` is placed uniformly (``top`` in ``[0, H - h]``, ``left`` in ``[0, W - w]``);
  if none fits, that box is skipped;
- the box is filled with ``mode`` ``'pixel'``: N(0, 1) per pixel and channel; ``'rand'``: one
  N(0, 1) value per channel; ``'const'``: 0 (the mean colour, the image being normalized).

albumentations' ``A.Erasing`` is not used: its aspect ratio is uniform, not log-uniform, it shrinks
the area range to what fits instead of retrying, it erases one box only, and its random fill is
uniform on ``[0, 1]`` rather than N(0, 1) on the normalized scale.

Randomness comes only from the transform's albumentations generators (``py_random`` for the
boxes, ``random_generator`` for the fill values), seeded per sample by
:class:`~datamodules.image_folder.SeedPerStepCompose`.
"""
from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, Optional

import albumentations as A
import numpy as np

__all__ = ["ERASING_MODES", "ErasedBox", "RandomErasing"]

ERASING_MODES = ("const", "rand", "pixel")
_ATTEMPTS = 10


class ErasedBox(NamedTuple):
    """One erased box ``image[top:top + height, left:left + width]`` and its fill, shaped
    ``(height, width, C)`` (``pixel``) or ``(C,)`` (``rand``, ``const``)."""

    top: int
    left: int
    height: int
    width: int
    fill: np.ndarray


class RandomErasing(A.ImageOnlyTransform):
    """Erase random boxes of a normalized float image ``(H, W, C)`` → the same shape and dtype.

    Args:
        probability: probability that an image is erased at all (timm's ``re_prob``).
        mode: ``'pixel'`` (per-pixel N(0, 1)), ``'rand'`` (per-channel N(0, 1)) or ``'const'`` (0).
        min_count, max_count: number of boxes, uniform in ``[min_count, max_count]`` (``max_count``
            None: ``min_count``); the area range of each is divided by the count.
        area: range of a box's area as a fraction of the image.
        min_aspect, max_aspect: aspect-ratio range (``h / w``), sampled log-uniformly;
            ``max_aspect`` None: ``1 / min_aspect``.

    The boxes of the last call are ``get_applied_params()["boxes"]`` (a tuple of :class:`ErasedBox`;
    absent when the image was not selected).
    """

    def __init__(
        self,
        probability: float = 0.5,
        mode: Literal["const", "rand", "pixel"] = "const",
        min_count: int = 1,
        max_count: Optional[int] = None,
        area: tuple[float, float] = (0.02, 1 / 3),
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
    ) -> None:
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0.0 <= probability <= 1.0:
            raise ValueError(f"random erasing probability must be in [0, 1], got {probability!r}")
        super().__init__(p=float(probability))  # albumentations' own draw decides whether to erase
        if mode not in ERASING_MODES:
            raise ValueError(f"random erasing mode must be one of {ERASING_MODES}, got {mode!r}")
        max_count = min_count if max_count is None else max_count
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1 or \
                isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < min_count:
            raise ValueError(f"random erasing counts must be integers with 1 <= min_count <= max_count, "
                             f"got min_count={min_count!r}, max_count={max_count!r}")
        if not 0.0 < area[0] <= area[1] <= 1.0:
            raise ValueError(f"random erasing area must satisfy 0 < min <= max <= 1, got {area!r}")
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not (min_aspect > 0 and max_aspect is not None and max_aspect >= min_aspect):
            raise ValueError(f"random erasing aspect range must satisfy 0 < min <= max, got ({min_aspect}, {max_aspect})")
        self.probability = float(probability)
        self.mode = mode
        self.min_count, self.max_count = min_count, max_count
        self.area = (float(area[0]), float(area[1]))
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        channels = params["shape"][2] if len(params["shape"]) == 3 else 1
        rng = self.py_random
        count = self.min_count if self.min_count == self.max_count else rng.randint(self.min_count, self.max_count)
        log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        boxes = []
        for _ in range(count):
            for _ in range(_ATTEMPTS):
                target = rng.uniform(*self.area) * height * width / count
                aspect = math.exp(rng.uniform(*log_aspect))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if h < height and w < width:
                    top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                    boxes.append(ErasedBox(top, left, h, w, self._fill(h, w, channels)))
                    break
        return {"boxes": tuple(boxes)}

    def _fill(self, h: int, w: int, channels: int) -> np.ndarray:
        if self.mode == "pixel":
            return self.random_generator.standard_normal((h, w, channels), dtype=np.float32)
        if self.mode == "rand":
            return self.random_generator.standard_normal(channels, dtype=np.float32)
        return np.zeros(channels, np.float32)

    def apply(self, img: np.ndarray, boxes: tuple[ErasedBox, ...] = (), **params: Any) -> np.ndarray:
        if not np.issubdtype(img.dtype, np.floating):
            raise TypeError(f"RandomErasing runs after Normalize on a float image, got {img.dtype} {img.shape}")
        if not boxes:
            return img
        out = img.copy()
        view = out if out.ndim == 3 else out[..., None]
        for box in boxes:
            view[box.top:box.top + box.height, box.left:box.left + box.width] = box.fill
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("probability", "mode", "min_count", "max_count", "area", "min_aspect", "max_aspect")
