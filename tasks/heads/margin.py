"""Margin-based softmax heads for face recognition: ArcFace, CosFace and AM-Softmax.

The head holds one centre per training identity, ``W: (num_classes, D)``. With normalized
embeddings and centres, ``cos θ_j = <e, W_j>``; the target class's logit gets a margin:

- ArcFace (Deng et al.): ``s · cos(θ_y + m)``, insightface's s=64, m=0.5. Past ``θ_y = π − m``,
  where ``cos(θ_y + m)`` would rise again, the logit is ``cos θ_y − m·sin m`` instead (insightface's
  ``ArcFace`` module; a step down at the switch, but never increasing in θ);
- CosFace (Wang et al.): ``s · (cos θ_y − m)``, s=64, m=0.4;
- AM-Softmax (Wang, Cheng et al.): the same additive cosine margin with the paper's s=30, m=0.35;
  the RepMLP-FaceRes recipe.

The centres are an ordinary parameter replicated on every rank (insightface's PartialFC at
sample rate 1 without the sharding). Each rank's loss is the mean over its own batch against all
centres and DDP averages the gradients, which equals the single-process gradient of the global
batch for equal per-rank batch sizes.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MarginLoss", "MarginHead", "DEFAULT_SCALE_MARGIN"]

MarginLoss = Literal["arcface", "cosface", "amsoftmax"]
DEFAULT_SCALE_MARGIN: dict[str, tuple[float, float]] = {
    "arcface": (64.0, 0.5),
    "cosface": (64.0, 0.4),
    "amsoftmax": (30.0, 0.35),
}


class MarginHead(nn.Module):
    """``(N, D)`` embeddings and ``(N,)`` labels → ``(N, num_classes)`` scaled logits with the margin.

    Args:
        embedding_size: D.
        num_classes: training identities.
        loss: ``"arcface"``, ``"cosface"`` or ``"amsoftmax"``.
        scale: s; default per loss (see the module doc).
        margin: m; default per loss.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        loss: MarginLoss = "arcface",
        scale: Optional[float] = None,
        margin: Optional[float] = None,
    ) -> None:
        super().__init__()
        if loss not in DEFAULT_SCALE_MARGIN:
            raise ValueError(f"model.loss must be one of {sorted(DEFAULT_SCALE_MARGIN)}, got {loss!r}")
        if num_classes < 2:
            raise ValueError(f"a margin head needs at least 2 identities, got num_classes={num_classes}")
        default_s, default_m = DEFAULT_SCALE_MARGIN[loss]
        self.loss = loss
        self.scale = default_s if scale is None else float(scale)
        self.margin = default_m if margin is None else float(margin)
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size).normal_(0, 0.01))

    def cosine(self, embeddings: Tensor) -> Tensor:
        """``(N, num_classes)`` cosines between the embeddings and the class centres."""
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        # float32 even under bf16 autocast: bf16's 8 mantissa bits would quantize s·cos in steps of
        # s/256 (0.25 at s = 64), coarser than the margins' effect near the target
        with torch.autocast(embeddings.device.type, enabled=False):
            return self._logits(embeddings.float(), labels)

    def _logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(embeddings).clamp(-1.0, 1.0)
        target = cos.gather(1, labels[:, None])
        if self.loss == "arcface":
            m = self.margin
            sin = (1.0 - target * target).clamp_min(1e-12).sqrt()
            with_margin = target * math.cos(m) - sin * math.sin(m)  # cos(θ + m)
            # past θ = π - m, cos(θ + m) would rise again: insightface's penalty instead
            target_logit = torch.where(target > math.cos(math.pi - m), with_margin, target - math.sin(math.pi - m) * m)
        else:
            target_logit = target - self.margin
        logits = cos.scatter(1, labels[:, None], target_logit)
        return logits * self.scale

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.num_classes}, loss={self.loss}, s={self.scale}, m={self.margin}"
