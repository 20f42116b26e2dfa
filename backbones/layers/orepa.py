"""OREPA, Online Convolutional Re-parameterization (Hu et al., CVPR 2022).

DBB's branches made linear (their BNs replaced by per-channel scales, ``vector``) and squeezed:
every step composes the branch kernels into one KxK kernel (:meth:`OREPA.weight_gen`), and the
block runs one conv and one BN. Training then costs about a plain conv-BN instead of six branches
with their activations (see ``python -m bench.reparam --sections train``). Deploy: the composed
kernel with the BN folded in. Because training already runs one conv, every padding, dilation
and padding mode is exact.

Branches (scale initialisation as the official code): KxK (0.25); 1x1 ⊗ average (0.25);
1x1 ⊗ a fixed frequency prior (0); 1x1 → KxK, its 1x1 starting as the identity (0.5); 1x1
padded to KxK (1.0); depthwise KxK → 1x1 (0.5).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..reparam.math import fuse_bn, identity_kernel, merge_1x1_kxk, merge_depthwise_pointwise, pad_kernel, scaled_sum
from .geometry import ConvGeometry
from .merged_conv import MergedConvBlock

BRANCHES = ("origin", "avg", "prior", "1x1_kxk", "1x1", "dws")
_SCALE_INIT = (0.25, 0.25, 0.0, 0.5, 1.0, 0.5)


def frequency_prior(channels: int, kernel_size: int) -> Tensor:
    """``(C, K, K)`` cosine bases: the first half of the channels vary along rows, the rest along
    columns, with frequency ``i + 1``. (The official ``fre_init`` fills only 3x3 of it.)"""
    pos = (torch.arange(kernel_size, dtype=torch.float64) + 0.5) * math.pi / kernel_size
    index = torch.arange(channels)
    half = channels // 2
    freq = torch.where(index < half, index + 1, index + 1 - half).to(torch.float64)
    wave = torch.cos(freq[:, None] * pos[None, :])                       # (C, K)
    rows = wave[:, :, None].expand(-1, -1, kernel_size)
    cols = wave[:, None, :].expand(-1, kernel_size, -1)
    return torch.where((index < half)[:, None, None], rows, cols).float()


class OREPA(MergedConvBlock):
    """``act(bn(conv(x, weight_gen())))``: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``.

    Args:
        internal_channels: width inside the 1x1 → KxK branch (default ``in_channels``).
        dw_multiplier: depthwise filters per input channel in the depthwise-separable branch.
    State dict: train ``weight_*``, ``vector`` (6, out), ``prior`` and ``bn.*``; deploy ``reparam_conv.*``.
    """

    any_padding = True

    def __init__(
        self, in_channels: int, out_channels: int, geometry: ConvGeometry = ConvGeometry(), act: bool = False,
        internal_channels: Optional[int] = None, dw_multiplier: int = 8, deploy: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, geometry, act, deploy)
        groups = self.groups
        internal = internal_channels or in_channels
        if internal % groups:
            raise ValueError(f"OREPA: groups={groups} must divide internal_channels={internal}")
        self.internal_channels, self.dw_multiplier = internal, dw_multiplier
        self.identity_based = internal == in_channels  # the 1x1 -> KxK branch's 1x1 starts as the identity
        if deploy:
            return
        k, cg = self.kernel_size, in_channels // groups

        def param(*shape: int) -> nn.Parameter:
            weight = nn.Parameter(torch.empty(*shape))
            nn.init.kaiming_uniform_(weight, a=0.0)
            return weight

        self.weight_origin = param(out_channels, cg, k, k)
        self.weight_avg = param(out_channels, cg, 1, 1)
        self.weight_prior = param(out_channels, cg, 1, 1)
        # persistent (a train-time key): meta-device init + load_state_dict must restore it
        self.register_buffer("prior", frequency_prior(out_channels, k))
        self.weight_1x1_kxk_idconv = nn.Parameter(torch.zeros(internal, cg, 1, 1))
        if not self.identity_based:
            nn.init.kaiming_uniform_(self.weight_1x1_kxk_idconv, a=0.0)
        self.weight_1x1_kxk_conv = param(out_channels, internal // groups, k, k)
        self.weight_1x1 = param(out_channels, cg, 1, 1)
        self.weight_dw = param(in_channels * dw_multiplier, 1, k, k)
        self.weight_pw = param(out_channels, in_channels * dw_multiplier // groups, 1, 1)
        self.vector = nn.Parameter(torch.tensor(_SCALE_INIT).unsqueeze(1).repeat(1, out_channels))
        self.bn = nn.BatchNorm2d(out_channels)

    def branch_kernels(self) -> list[Tensor]:
        """The six unscaled ``(O, C/g, K, K)`` branch kernels, in the order of ``BRANCHES``."""
        k, g = self.kernel_size, self.groups
        ones = self.weight_avg.new_full((k, k), 1.0 / (k * k))
        idconv = self.weight_1x1_kxk_idconv
        if self.identity_based:  # made on the fly, as DBB's (no uninitialized buffer after to_empty)
            idconv = idconv + identity_kernel(*idconv.shape[:2], like=idconv)
        return [
            self.weight_origin,
            self.weight_avg * ones,
            self.weight_prior * self.prior.unsqueeze(1),
            merge_1x1_kxk(idconv, None, self.weight_1x1_kxk_conv, None, g)[0],
            pad_kernel(self.weight_1x1, k),
            merge_depthwise_pointwise(self.weight_dw, self.weight_pw, self.in_channels, g),
        ]

    def weight_gen(self) -> Tensor:
        """The composed kernel ``(O, C/g, K, K)``: branch kernels scaled per output channel, summed."""
        return scaled_sum(self.branch_kernels(), self.vector)

    def forward_branches(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x, self.weight_gen()))

    def merge_branches(self) -> tuple[Tensor, Tensor]:
        return fuse_bn(self.weight_gen(), None, self.bn)
