"""ACB, the Asymmetric Convolution Block of ACNet (Ding et al., ICCV 2019).

Train time: a KxK conv-BN, a Kx1 conv-BN and a 1xK conv-BN in parallel, summed. The asymmetric
kernels add onto the centre column and row of the square one, so the deploy form is one KxK conv.
Dilation and every padding mode are exact (the official block fails with dilation > 1).
"""
from __future__ import annotations

from torch import Tensor

from ..reparam.math import add_branches
from .convbn import ConvBN
from .geometry import ConvGeometry
from .merged_conv import MergedConvBlock


class ACBlock(MergedConvBlock):
    """``act(square(x) + ver(x) + hor(x))``: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``.

    State dict: train ``square.*``, ``ver.*``, ``hor.*`` (each ``conv.weight`` and ``bn.*``);
    deploy ``reparam_conv.weight, reparam_conv.bias``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, geometry: ConvGeometry = ConvGeometry(), act: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, geometry, act, deploy)
        if deploy:
            return
        k, p = self.kernel_size, self.padding
        common = dict(stride=self.stride, dilation=self.dilation, groups=self.groups, padding_mode=self.padding_mode)
        self.square = ConvBN(in_channels, out_channels, k, padding=p, **common)
        self.ver = ConvBN(in_channels, out_channels, (k, 1), padding=(p, 0), **common)
        self.hor = ConvBN(in_channels, out_channels, (1, k), padding=(0, p), **common)

    def forward_branches(self, x: Tensor) -> Tensor:
        return self.square(x) + self.ver(x) + self.hor(x)

    def merge_branches(self) -> tuple[Tensor, Tensor]:
        return add_branches(*(b.get_equivalent_kernel_bias() for b in (self.square, self.ver, self.hor)))
