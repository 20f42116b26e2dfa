"""The RepLKNet large-kernel conv (Ding et al., CVPR 2022): a large depthwise K×K conv-BN plus a small k×k conv-BN, one conv at deploy."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reparam.math import add_branches
from .convbn import ConvBN
from .geometry import ConvGeometry
from .merged_conv import MergedConvBlock

SLOW_NCHW_KERNEL = 15  # torch 2.13 CPU: from this size on, NCHW depthwise convs take a slow path


class ReparamLargeKernelConv(MergedConvBlock):
    """``act(large(x) + small(x))``: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``.

    Args:
        small_kernel: odd size of the parallel kernel (``None``: no small branch, as RepLKNet-XL).
    On CPU a depthwise block of ``kernel_size >= SLOW_NCHW_KERNEL`` runs on a channels_last copy
    of its input (its output is channels_last).
    State dict: train ``large.*``, ``small.*``; deploy ``reparam_conv.weight, reparam_conv.bias``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, geometry: ConvGeometry = ConvGeometry(31), act: bool = False,
        small_kernel: Optional[int] = 5, deploy: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, geometry, act, deploy)
        kernel_size = self.kernel_size
        if small_kernel is not None and (small_kernel % 2 == 0 or small_kernel > kernel_size):
            raise ValueError(f"ReparamLargeKernelConv: small_kernel={small_kernel} must be odd and at most "
                             f"kernel_size={kernel_size}")
        self.small_kernel = small_kernel
        if deploy:
            return
        common = dict(stride=self.stride, dilation=self.dilation, groups=self.groups, padding_mode=self.padding_mode)
        self.large = ConvBN(in_channels, out_channels, kernel_size, padding=self.padding, **common)
        if small_kernel is not None:
            self.small = ConvBN(in_channels, out_channels, small_kernel, **common)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and self.kernel_size >= SLOW_NCHW_KERNEL and self.groups == self.in_channels:
            # torch's NCHW CPU path for depthwise kernels of 15 and more is a slow fallback (README,
            # Performance: RepLKNet on CPU); the output stays channels_last, so the layers after it
            # run in that layout too
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)

    def forward_branches(self, x: Tensor) -> Tensor:
        out = self.large(x)
        return out + self.small(x) if hasattr(self, "small") else out

    def merge_branches(self) -> tuple[Tensor, Tensor]:
        branches = [self.large.get_equivalent_kernel_bias()]
        if hasattr(self, "small"):
            branches.append(self.small.get_equivalent_kernel_bias())
        return add_branches(*branches)
