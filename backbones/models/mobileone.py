"""MobileOne (Vasu et al., CVPR 2023): over-parameterized KxK branches + a 1x1 "scale" branch + skip.

MobileOne block, train time: ``num_conv_branches`` parallel KxK conv-BNs, a 1x1 conv-BN (when
K > 1) and an identity BN (when in == out and stride 1), summed, then ReLU; deploy: one KxK conv.
The network alternates a depthwise 3x3 block and a pointwise 1x1 block. Dilation and every
padding mode are exact (the official block ignores dilation).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ..layers.classifier import PooledClassifier
from ..layers.geometry import ConvGeometry
from ..layers.mobileone import MobileOneBlock
from .registry import ModelCfg, register_model


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
        self.stem = MobileOneBlock(in_chans, stem_width, ConvGeometry(3, stride=2), deploy=deploy)
        in_channels = stem_width
        for i, (n, width) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                depthwise = ConvGeometry(3, stride=2 if j == 0 else 1, groups=in_channels)
                blocks.append(MobileOneBlock(in_channels, in_channels, depthwise,
                                             num_conv_branches=num_conv_branches, deploy=deploy))
                blocks.append(MobileOneBlock(in_channels, width, ConvGeometry(1), num_conv_branches=num_conv_branches,
                                             deploy=deploy))
                in_channels = width
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
        self.add_classifier()


_S0_CFG = ModelCfg(input_size=(224, 224), fixed_size=False, num_features=1024,
                   feature_channels=(48, 128, 256, 1024), feature_strides=(4, 8, 16, 32))
_S0_TINY_CFG = replace(_S0_CFG, input_size=(64, 64), num_features=128, feature_channels=(16, 32, 64, 128))


@register_model(cfg=_S0_CFG)
def mobileone_s0(**kwargs: Any) -> MobileOne:
    """MobileOne-S0: 71.4% ImageNet top-1; 2.08M parameters deployed (5.29M at train time)."""
    return MobileOne(**kwargs)


@register_model(cfg=_S0_TINY_CFG)
def mobileone_s0_tiny(**kwargs: Any) -> MobileOne:
    """A 64x64-input MobileOne for tests (pairs 1,2,2,1; widths 16..128; k=2)."""
    return MobileOne(**{"num_blocks": (1, 2, 2, 1), "widths": (16, 32, 64, 128), "stem_width": 16,
                        "num_conv_branches": 2, "img_size": 64, "num_classes": 10, **kwargs})
