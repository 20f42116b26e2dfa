"""The RepVGG block (Ding et al., CVPR 2021) and its QARepVGG form (Chu et al., 2022): K×K + 1×1 + identity, one K×K conv at deploy."""
from __future__ import annotations

from torch import Tensor, nn

from ..reparam.math import add_branches, fuse_bn, identity_kernel
from .convbn import ConvBN
from .geometry import ConvGeometry
from .merged_conv import MergedConvBlock


class RepVGGBlock(MergedConvBlock):
    """``act(dense(x) + pointwise(x) + skip(x))``: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``.

    Args:
        quant_friendly: QARepVGG form: the 1x1 conv and the identity have no BN; ``post_bn``
            follows the sum.
    State dict: train ``dense.*``, ``pointwise.*``, ``skip_bn.*`` (RepVGG) or ``post_bn.*``
    (QARepVGG); deploy ``reparam_conv.weight, reparam_conv.bias``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, geometry: ConvGeometry = ConvGeometry(), act: bool = True,
        quant_friendly: bool = False, deploy: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, geometry, act, deploy)
        stride, groups = self.stride, self.groups
        self.quant_friendly = quant_friendly
        self.has_identity = in_channels == out_channels and stride == 1
        if deploy:
            return
        self.dense = ConvBN(in_channels, out_channels, self.kernel_size, stride, self.padding, self.dilation, groups,
                            padding_mode=self.padding_mode)
        if quant_friendly:
            self.pointwise: nn.Module = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups, bias=False)
            self.post_bn = nn.BatchNorm2d(out_channels)
        else:
            self.pointwise = ConvBN(in_channels, out_channels, 1, stride, 0, groups=groups)
            if self.has_identity:
                self.skip_bn = nn.BatchNorm2d(in_channels)

    def forward_branches(self, x: Tensor) -> Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.has_identity:
            out = out + (x if self.quant_friendly else self.skip_bn(x))
        return self.post_bn(out) if self.quant_friendly else out

    def merge_branches(self) -> tuple[Tensor, Tensor]:
        dense = self.dense.get_equivalent_kernel_bias()
        if self.quant_friendly:
            branches = [dense, (self.pointwise.weight, None)]
        else:
            branches = [dense, self.pointwise.get_equivalent_kernel_bias()]
        if self.has_identity:
            eye = identity_kernel(self.out_channels, self.in_channels // self.groups, 1, like=dense[0])
            branches.append((eye, None) if self.quant_friendly else fuse_bn(eye, None, self.skip_bn))
        kernel, bias = add_branches(*branches)
        return fuse_bn(kernel, bias, self.post_bn) if self.quant_friendly else (kernel, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", quant_friendly=True" if self.quant_friendly else "")
