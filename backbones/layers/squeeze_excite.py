"""Squeeze-and-Excitation (Hu et al., CVPR 2018) as MobileOne-S4 and RepVGG-D2se use it, and RepMLPNet's
Global Perceptron."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SqueezeExcite(nn.Module):
    """``x * sigmoid(expand(relu(reduce(mean_hw(x)))))``: ``(N, C, H, W)`` → ``(N, C, H, W)``.

    ``reduce``/``expand`` are biased 1x1 convs through ``rd_channels`` (MobileOne: ``int(C / 16)``);
    the mean is over the whole map, whatever its size.
    """

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        if rd_channels < 1:
            raise ValueError(f"SqueezeExcite: rd_channels must be at least 1, got {rd_channels} for {channels} channels")
        self.reduce = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.expand = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def gate(self, x: Tensor) -> Tensor:
        """The per-channel weights ``(N, C, 1, 1)`` in (0, 1) that :meth:`forward` multiplies by
        (RepMLPNet's Global Perceptron multiplies another branch's output by them)."""
        return torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)
