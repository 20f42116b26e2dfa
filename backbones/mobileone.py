"""MobileOne (Vasu et al., CVPR 2023): over-parameterized KxK branches + a 1x1 "scale" branch + skip.

MobileOne block, train time: ``num_conv_branches`` parallel KxK conv-BNs, a 1x1 conv-BN (when
K > 1) and an identity BN (when in == out and stride 1), summed, then ReLU; deploy: one KxK conv.
The network alternates a depthwise 3x3 block and a pointwise 1x1 block. Dilation and every
padding mode are exact (the official block ignores dilation).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .convbn import ConvBN
from .classifier import PooledClassifier
from .registry import register_model
from .reparam import add_branches, fuse_bn, identity_kernel
from .reparam_block import MergedConvBlock


class MobileOneBlock(MergedConvBlock):
    """``act(sum(convs(x)) + scale(x) + skip(x))``: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``.

    State dict: train ``convs.{i}.*``, ``scale.*`` (K > 1), ``skip_bn.*`` (in == out, stride 1);
    deploy ``reparam_conv.weight, reparam_conv.bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: Optional[int] = None,
        dilation: int = 1,
        groups: int = 1,
        num_conv_branches: int = 1,
        padding_mode: str = "zeros",
        act: bool = True,
        deploy: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         padding_mode, act, deploy)
        if num_conv_branches < 1:
            raise ValueError(f"MobileOneBlock: num_conv_branches must be at least 1, got {num_conv_branches}")
        self.num_conv_branches = num_conv_branches
        if deploy:
            return
        self.convs = nn.ModuleList(
            ConvBN(in_channels, out_channels, kernel_size, stride, self.padding, dilation, groups,
                   padding_mode=padding_mode)
            for _ in range(num_conv_branches)
        )
        if kernel_size > 1:
            self.scale = ConvBN(in_channels, out_channels, 1, stride, 0, groups=groups)
        if in_channels == out_channels and stride == 1:
            self.skip_bn = nn.BatchNorm2d(in_channels)

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


class MobileOne(PooledClassifier):
    """MobileOne: a stride-2 stem block, then stages of (depthwise 3x3 block, pointwise 1x1 block) pairs.

    ``(N, in_chans, H, W)`` → logits ``(N, num_classes)`` (pooled ``(N, widths[-1])`` features when
    ``num_classes=0``). Any input size works; ``img_size`` only records the training size.

    Args:
        num_blocks: block pairs per stage (the first of each with stride 2).
        widths: output channels per stage.
        stem_width: channels of the stem block.
        num_conv_branches: over-parameterization ``k`` of every block but the stem.
        num_classes, in_chans, img_size, deploy: as for every registered model.
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 8, 10, 1),
        widths: tuple[int, int, int, int] = (48, 128, 256, 1024),
        stem_width: int = 48,
        num_conv_branches: int = 4,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        deploy: bool = False,
    ) -> None:
        if len(num_blocks) != 4 or len(widths) != 4:
            raise ValueError(f"MobileOne: num_blocks and widths need one value per stage, got {num_blocks}, {widths}")
        super().__init__(widths[-1], num_classes, img_size, deploy)
        self.stem = MobileOneBlock(in_chans, stem_width, 3, 2, deploy=deploy)
        in_channels = stem_width
        for i, (n, width) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                blocks.append(MobileOneBlock(in_channels, in_channels, 3, 2 if j == 0 else 1, groups=in_channels,
                                             num_conv_branches=num_conv_branches, deploy=deploy))
                blocks.append(MobileOneBlock(in_channels, width, 1, num_conv_branches=num_conv_branches,
                                             deploy=deploy))
                in_channels = width
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
        self.add_classifier()


@register_model
def mobileone_s0(**kwargs: Any) -> MobileOne:
    """MobileOne-S0: 71.4% ImageNet top-1; 2.08M parameters deployed (5.29M at train time)."""
    return MobileOne(**kwargs)


@register_model
def mobileone_s0_tiny(**kwargs: Any) -> MobileOne:
    """A 64x64-input MobileOne for tests (pairs 1,2,2,1; widths 16..128; k=2)."""
    return MobileOne(**{"num_blocks": (1, 2, 2, 1), "widths": (16, 32, 64, 128), "stem_width": 16,
                        "num_conv_branches": 2, "img_size": 64, "num_classes": 10, **kwargs})
