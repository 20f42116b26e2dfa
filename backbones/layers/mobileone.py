"""The MobileOne block (Vasu et al., CVPR 2023): k over-parameterized K×K conv-BN branches, a 1×1 conv-BN and a skip BN, one conv at deploy; optionally SE before the ReLU (S4)."""
from __future__ import annotations

from torch import Tensor, nn

from ..reparam.math import add_branches, fuse_bn, identity_kernel
from .convbn import ConvBN
from .geometry import ConvGeometry
from .merged_conv import MergedConvBlock
from .squeeze_excite import SqueezeExcite


class MobileOneBlock(MergedConvBlock):
    """``act(se(sum(convs(x)) + scale(x) + skip(x)))``: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``.

    Args:
        se: Squeeze-and-Excitation on the sum, ``int(C_out / 16)`` wide, kept at deploy (MobileOne-S4).
    State dict: train ``convs.{i}.*``, ``scale.*`` (K > 1), ``skip_bn.*`` (in == out, stride 1);
    deploy ``reparam_conv.weight, reparam_conv.bias``; with ``se`` also ``se.reduce.*``, ``se.expand.*``.
    """

    kept_modules = ("act", "se")

    def __init__(
        self, in_channels: int, out_channels: int, geometry: ConvGeometry = ConvGeometry(), act: bool = True,
        num_conv_branches: int = 1, se: bool = False, deploy: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, geometry, act, deploy)
        self.se = SqueezeExcite(out_channels, int(out_channels * 0.0625)) if se else nn.Identity()
        kernel_size, stride, groups = self.kernel_size, self.stride, self.groups
        if num_conv_branches < 1:
            raise ValueError(f"MobileOneBlock: num_conv_branches must be at least 1, got {num_conv_branches}")
        self.num_conv_branches = num_conv_branches
        if deploy:
            return
        self.convs = nn.ModuleList(
            ConvBN(in_channels, out_channels, kernel_size, stride, self.padding, self.dilation, groups,
                   padding_mode=self.padding_mode)
            for _ in range(num_conv_branches)
        )
        if kernel_size > 1:
            self.scale = ConvBN(in_channels, out_channels, 1, stride, 0, groups=groups)
        if in_channels == out_channels and stride == 1:
            self.skip_bn = nn.BatchNorm2d(in_channels)

    def forward(self, x: Tensor) -> Tensor:
        """``act(se(branches(x)))``; deploy ``act(se(reparam_conv(x)))``."""
        return self.act(self.se(self.reparam_conv(x) if self.deploy else self.forward_branches(x)))

    def forward_branches(self, x: Tensor) -> Tensor:
        out = sum(conv(x) for conv in self.convs)
        if hasattr(self, "scale"):
            out = out + self.scale(x)
        if hasattr(self, "skip_bn"):
            out = out + self.skip_bn(x)
        return out

    def merge_branches(self) -> tuple[Tensor, Tensor]:
        branches = [conv.get_equivalent_kernel_bias() for conv in self.convs]
        if hasattr(self, "scale"):
            branches.append(self.scale.get_equivalent_kernel_bias())
        if hasattr(self, "skip_bn"):
            eye = identity_kernel(self.out_channels, self.in_channels // self.groups, 1, like=branches[0][0])
            branches.append(fuse_bn(eye, None, self.skip_bn))
        return add_branches(*branches)
