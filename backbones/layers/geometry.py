"""ConvGeometry: the geometry of a square conv, one typed value shared by every block that deploys as one conv."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

__all__ = ["ConvGeometry", "PADDING_MODES", "PaddingMode"]

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class ConvGeometry:
    """A ``kernel_size`` x ``kernel_size`` conv's arithmetic, as ``nn.Conv2d`` takes it.

    ``(N, C_in, H, W)`` → ``(N, C_out, H', W')`` with ``H' = (H + 2p - d(k-1) - 1) // stride + 1``.
    ``padding=None`` means "same": ``dilation * (kernel_size // 2)``. Written in a YAML config as a
    mapping (``{kernel_size: 3, stride: 2}``); in code ``ConvGeometry(3, stride=2)``.
    """

    kernel_size: int = 3
    stride: int = 1
    padding: Optional[int] = None
    dilation: int = 1
    groups: int = 1
    padding_mode: PaddingMode = "zeros"

    def __post_init__(self) -> None:
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"ConvGeometry: kernel_size must be an odd int, got {self.kernel_size!r}")
        for name in ("stride", "dilation", "groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvGeometry: {name} must be a positive int, got {value!r}")
        if self.padding is not None and (not isinstance(self.padding, int) or self.padding < 0):
            raise ValueError(f"ConvGeometry: padding must be None ('same') or an int >= 0, got {self.padding!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"ConvGeometry: padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")

    @property
    def same_padding(self) -> int:
        """The padding that keeps ``H' = ceil(H / stride)``: ``dilation * (kernel_size // 2)``."""
        return self.dilation * (self.kernel_size // 2)
