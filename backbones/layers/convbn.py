"""ConvBN: a conv followed by BatchNorm (and an optional ReLU), fused into one conv at deploy."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..reparam.block import ReparamBlock, assign_parameter
from ..reparam.math import fuse_bn
from .helpers import to_pair

class ConvBN(ReparamBlock):
    """``act(bn(conv(x)))``; deploy form ``act(conv'(x))`` with the BN folded into a biased conv.

    Input ``(N, C_in, H, W)`` → output ``(N, C_out, H', W')`` with the usual conv arithmetic.
    ``padding=None`` means "same" for odd kernels: ``dilation * (k // 2)``.
    State dict: train ``conv.weight, bn.*``; deploy ``conv.weight, conv.bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] = 1,
        padding: Optional[int | tuple[int, int]] = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        act: bool = False,
        padding_mode: str = "zeros",
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"ConvBN: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        kernel_size, dilation = to_pair(kernel_size), to_pair(dilation)
        if padding is None:
            padding = (dilation[0] * (kernel_size[0] // 2), dilation[1] * (kernel_size[1] // 2))
        self.deploy = deploy
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias=deploy, padding_mode=padding_mode,
        )
        if not deploy:
            self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """``(O, C/g, kh, kw)`` kernel and ``(O,)`` bias of the fused conv (differentiable)."""
        if self.deploy:
            return self.conv.weight, self.conv.bias
        return fuse_bn(self.conv.weight, self.conv.bias, self.bn)

    def _build_deploy(self) -> None:
        kernel, bias = self.get_equivalent_kernel_bias()
        self.conv.bias = None  # re-registered below; keeps the conv's geometry and padding mode
        assign_parameter(self.conv, "weight", kernel)
        assign_parameter(self.conv, "bias", bias)
        del self.bn

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.act(self.conv(x))
        return self.act(self.bn(self.conv(x)))


def conv_shortcut(in_channels: int, out_channels: int, stride: int = 1, deploy: bool = False) -> nn.Module:
    """A residual block's shortcut: identity when the shape is kept, else a 1x1 ConvBN of that stride."""
    if stride != 1 or in_channels != out_channels:
        return ConvBN(in_channels, out_channels, 1, stride, deploy=deploy)
    return nn.Identity()
