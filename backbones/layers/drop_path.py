"""Stochastic depth (drop path): a residual branch dropped per sample at train time, a no-op in eval."""
from __future__ import annotations

from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (train mode only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        return x * x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
