"""Mixup and CutMix on a training batch, with timm's semantics (``timm/data/mixup.py``, mode ``'batch'``).

One draw per batch decides what happens to the whole batch:

1. with probability ``prob`` the batch is mixed, else it is left as it is (λ = 1);
2. when both mixup and CutMix are active, CutMix is chosen with probability ``switch_prob``;
3. λ ~ Beta(α, α) with the chosen method's α;
4. the partner of image ``i`` is image ``N-1-i`` (the batch flipped), so ``N`` must be even;
   - **mixup**: ``x ← λ·x + (1-λ)·x.flip(0)``;
   - **CutMix**: a box of the image is replaced by the partner's: sides of about ``side·√(1-λ)``
     around a uniformly drawn centre, clipped to the image; with ``correct_lam`` (or ``cutmix_minmax``)
     λ becomes ``1 - box area / image area``, the share of the image that is still its own;
5. the targets are soft: ``λ·onehot(y) + (1-λ)·onehot(y.flip(0))``; each row sums to one.

Label smoothing is not applied here: ``F.cross_entropy(logits, targets, label_smoothing=ε)`` on
these targets gives ``(1-ε)·t + ε/K``, which is timm's ``mixup_target`` with ``smoothing=ε``
(``off = ε/K``, ``on = 1-ε+off``), since the mix of two smoothed one-hots is the smoothed mix.

Randomness: every draw comes from torch's global CPU generator, in the order above
(``torch.rand`` for the gate, ``torch.rand`` for the switch, a Beta sample, then ``torch.randint``
for the box: centre row, centre column; or with ``cutmix_minmax``: box height, width, top, left).
The project saves and restores that generator's state in training checkpoints
(:mod:`tasks.lightning.rng_state`), so a resumed run draws the same λ and boxes as an uninterrupted
one. Every DDP rank is seeded alike and so draws the same λ and box for its own batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MixupConfig", "Mixup", "MixParams"]

_PREFIX = "model.mixup"


@dataclass
class MixupConfig:
    """The mixup / CutMix options (YAML ``model: {mixup: {mixup_alpha: 0.8, cutmix_alpha: 1.0}}``).

    Args:
        mixup_alpha: α of mixup's Beta(α, α); mixup is active when > 0.
        cutmix_alpha: α of CutMix's Beta(α, α); CutMix is active when > 0.
        cutmix_minmax: ``(min, max)`` fractions of the image side: CutMix draws the box's height and
            width uniformly in this range instead of from λ (and is then active whatever
            ``cutmix_alpha``; λ follows the box).
        prob: probability that a batch is mixed at all.
        switch_prob: probability of CutMix rather than mixup when both are active.
        correct_lam: λ of CutMix = the unreplaced share of the image, after the box is clipped to it.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: Optional[tuple[float, float]] = None
    prob: float = 1.0
    switch_prob: float = 0.5
    correct_lam: bool = True


@dataclass(frozen=True)
class MixParams:
    """What was drawn for one batch: ``lam`` (the weight of each image's own label), ``cutmix``,
    and the box ``(top, bottom, left, right)`` replaced from the partner (bottom/right exclusive)."""

    lam: float
    cutmix: bool = False
    box: Optional[tuple[int, int, int, int]] = None


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_PREFIX}.{name} must be a finite number, got {value!r}")
    return float(value)


class Mixup:
    """Mixes a training batch and returns it with soft targets (see the module doc).

    Args:
        config: the options, a :class:`MixupConfig` or a dict of its fields (as saved in hyperparameters).
        num_classes: ``K``, the width of the targets.
    """

    def __init__(self, config: Union[MixupConfig, dict[str, Any]], num_classes: int) -> None:
        if isinstance(config, dict):
            unknown = sorted(set(config) - set(MixupConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"{_PREFIX}: unknown option(s) {unknown}; known: {sorted(MixupConfig.__dataclass_fields__)}")
            config = MixupConfig(**config)
        if not isinstance(config, MixupConfig):
            raise TypeError(f"{_PREFIX} must be a MixupConfig or a dict of its fields, got {type(config).__name__}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if _number(name, getattr(config, name)) < 0:
                raise ValueError(f"{_PREFIX}.{name} must be >= 0 (0 turns it off), got {getattr(config, name)}")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= _number(name, getattr(config, name)) <= 1.0:
                raise ValueError(f"{_PREFIX}.{name} must be a probability in [0, 1], got {getattr(config, name)}")
        minmax = config.cutmix_minmax
        if minmax is not None:
            if len(minmax) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in minmax) \
                    or not 0.0 < minmax[0] < minmax[1] <= 1.0:
                raise ValueError(f"{_PREFIX}.cutmix_minmax must be two fractions of the image side, "
                                 f"0 < min < max <= 1, got {minmax!r}")
            minmax = (float(minmax[0]), float(minmax[1]))
        if config.mixup_alpha <= 0 and config.cutmix_alpha <= 0 and minmax is None:
            raise ValueError(f"{_PREFIX}: nothing to mix: set mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax "
                             f"(or leave model.mixup out), got {asdict(config)}")
        if num_classes < 2:
            raise ValueError(f"{_PREFIX}: num_classes must be at least 2, got {num_classes}")
        self.config = MixupConfig(config.mixup_alpha, config.cutmix_alpha, minmax, config.prob,
                                  config.switch_prob, bool(config.correct_lam))
        self.num_classes = num_classes

    @property
    def mixup_on(self) -> bool:
        return self.config.mixup_alpha > 0

    @property
    def cutmix_on(self) -> bool:
        return self.config.cutmix_alpha > 0 or self.config.cutmix_minmax is not None

    # ------------------------------------------------------------------ draws
    @staticmethod
    def _beta(alpha: float) -> float:
        a = torch.tensor(alpha, dtype=torch.float64)
        return float(torch.distributions.Beta(a, a).sample())

    def draw(self, height: int, width: int) -> MixParams:
        """Draw one batch's parameters for ``height × width`` images (from the global generator)."""
        cfg = self.config
        if not float(torch.rand(())) < cfg.prob:
            return MixParams(1.0)
        use_cutmix = self.cutmix_on
        if self.mixup_on and self.cutmix_on:
            use_cutmix = float(torch.rand(())) < cfg.switch_prob
        if not use_cutmix:
            return MixParams(self._beta(cfg.mixup_alpha))
        if cfg.cutmix_minmax is not None:
            box = self._box_minmax(height, width, cfg.cutmix_minmax)
            lam = None  # follows the box
        else:
            lam = self._beta(cfg.cutmix_alpha)
            box = self._box(height, width, lam)
        if lam is None or cfg.correct_lam:
            top, bottom, left, right = box
            lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
        return MixParams(lam, True, box)

    @staticmethod
    def _box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
        """timm's ``rand_bbox`` (no margin): sides ``int(side·√(1-λ))``, centre uniform over the
        image, half a side (floored) each way, clipped to the image."""
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy = int(torch.randint(0, height, ()))
        cx = int(torch.randint(0, width, ()))
        clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
        return (clip(cy - cut_h // 2, height), clip(cy + cut_h // 2, height),
                clip(cx - cut_w // 2, width), clip(cx + cut_w // 2, width))

    @staticmethod
    def _box_minmax(height: int, width: int, minmax: tuple[float, float]) -> tuple[int, int, int, int]:
        """timm's ``rand_bbox_minmax``: height and width uniform in ``[int(side·min), int(side·max))``,
        placed uniformly inside the image."""
        bounds = []
        for side in (height, width):
            low, high = int(side * minmax[0]), int(side * minmax[1])
            if high <= low:
                raise ValueError(f"{_PREFIX}.cutmix_minmax {minmax} leaves no box size to draw for an image side "
                                 f"of {side} pixels (int(side*min) = {low}, int(side*max) = {high}); widen the range")
            bounds.append((low, high))
        cut_h = int(torch.randint(*bounds[0], ()))
        cut_w = int(torch.randint(*bounds[1], ()))
        top = int(torch.randint(0, height - cut_h, ()))
        left = int(torch.randint(0, width - cut_w, ()))
        return top, top + cut_h, left, left + cut_w

    # ------------------------------------------------------------------ mixing
    def apply(self, images: Tensor, labels: Tensor, params: MixParams) -> tuple[Tensor, Tensor]:
        """Mix ``images (N, C, H, W)`` with ``params``; returns the mixed images (a new tensor) and
        the soft targets ``(N, K)`` (float32) for the hard ``labels (N,)``."""
        n = images.shape[0]
        if n % 2:
            raise ValueError(f"{_PREFIX}: the training batch has {n} images, and mixup/CutMix pairs each image with "
                             "the one at the mirrored position (the batch flipped), which needs an even batch: "
                             "set data.batch_size to an even number")
        if images.ndim != 4:
            raise ValueError(f"{_PREFIX}: expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        lam = params.lam
        if lam != 1.0:
            partner = images.flip(0)
            if params.cutmix:
                top, bottom, left, right = params.box
                images = images.clone()
                images[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
            else:
                images = images * lam + partner * (1.0 - lam)
        own = F.one_hot(labels.long(), self.num_classes).float()
        return images, own * lam + own.flip(0) * (1.0 - lam)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Draw the batch's parameters and mix: ``(N, C, H, W), (N,)`` → mixed images, targets ``(N, K)``."""
        if images.shape[0] % 2:  # before drawing: an error leaves the generator where it was
            return self.apply(images, labels, MixParams(1.0))
        return self.apply(images, labels, self.draw(images.shape[-2], images.shape[-1]))
