"""MobileOne (Vasu et al., CVPR 2023): over-parameterized KxK branches + a 1x1 "scale" branch + skip.

MobileOne block, train time: ``num_conv_branches`` parallel KxK conv-BNs, a 1x1 conv-BN (when
K > 1) and an identity BN (when in == out and stride 1), summed, then ReLU; deploy: one KxK conv.
The network alternates a depthwise 3x3 block and a pointwise 1x1 block; S4 adds Squeeze-and-Excitation
to the last pairs. Dilation and every padding mode are exact (the official block ignores dilation).
Sizes S0-S4 as apple/ml-mobileone builds them: stage widths ``int(64, 128, 256, 512 x multiplier)``,
stem ``min(64, int(64 x multiplier_1))``.
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
        se_blocks: per stage, how many of its last pairs have Squeeze-and-Excitation (S4: 0, 0, 5, 1).
        num_classes, in_chans, img_size, deploy: as for every registered model.
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 8, 10, 1),
        widths: tuple[int, int, int, int] = (48, 128, 256, 1024),
        stem_width: int = 48,
        num_conv_branches: int = 4,
        se_blocks: tuple[int, int, int, int] = (0, 0, 0, 0),
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        deploy: bool = False,
    ) -> None:
        if len(num_blocks) != 4 or len(widths) != 4 or len(se_blocks) != 4:
            raise ValueError(f"MobileOne: num_blocks, widths and se_blocks need one value per stage, got {num_blocks}, "
                             f"{widths}, {se_blocks}")
        if any(not 0 <= se <= n for se, n in zip(se_blocks, num_blocks)):
            raise ValueError(f"MobileOne: se_blocks={se_blocks} must lie between 0 and num_blocks={num_blocks} per stage")
        super().__init__(widths[-1], num_classes, img_size, deploy)
        self.stem = MobileOneBlock(in_chans, stem_width, ConvGeometry(3, stride=2), deploy=deploy)
        in_channels = stem_width
        for i, (n, width, n_se) in enumerate(zip(num_blocks, widths, se_blocks)):
            blocks = []
            for j in range(n):
                depthwise = ConvGeometry(3, stride=2 if j == 0 else 1, groups=in_channels)
                se = j >= n - n_se
                blocks.append(MobileOneBlock(in_channels, in_channels, depthwise,
                                             num_conv_branches=num_conv_branches, se=se, deploy=deploy))
                blocks.append(MobileOneBlock(in_channels, width, ConvGeometry(1), num_conv_branches=num_conv_branches,
                                             se=se, deploy=deploy))
                in_channels = width
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
        self.add_classifier()


def _size(multipliers: tuple[float, float, float, float], **kwargs: Any) -> dict[str, Any]:
    widths = tuple(int(c * m) for c, m in zip((64, 128, 256, 512), multipliers))
    return dict(widths=widths, stem_width=min(64, int(64 * multipliers[0])), **kwargs)


_S0 = _size((0.75, 1.0, 1.0, 2.0), num_conv_branches=4)
_S1 = _size((1.5, 1.5, 2.0, 2.5), num_conv_branches=1)
_S2 = _size((1.5, 2.0, 2.5, 4.0), num_conv_branches=1)
_S3 = _size((2.0, 2.5, 3.0, 4.0), num_conv_branches=1)
_S4 = _size((3.0, 3.5, 3.5, 4.0), num_conv_branches=1, se_blocks=(0, 0, 5, 1))


def _cfg(size: dict[str, Any]) -> ModelCfg:
    return ModelCfg(input_size=(224, 224), fixed_size=False, num_features=size["widths"][-1],
                    feature_channels=size["widths"], feature_strides=(4, 8, 16, 32))


_S0_CFG = _cfg(_S0)
_S0_TINY_CFG = replace(_S0_CFG, input_size=(64, 64), num_features=128, feature_channels=(16, 32, 64, 128))


@register_model(cfg=_S0_CFG)
def mobileone_s0(**kwargs: Any) -> MobileOne:
    """MobileOne-S0: 71.4% ImageNet top-1; 2.08M parameters deployed (5.29M at train time)."""
    return MobileOne(**{**_S0, **kwargs})


@register_model(cfg=_cfg(_S1))
def mobileone_s1(**kwargs: Any) -> MobileOne:
    """MobileOne-S1: 75.9% ImageNet top-1 (k=1)."""
    return MobileOne(**{**_S1, **kwargs})


@register_model(cfg=_cfg(_S2))
def mobileone_s2(**kwargs: Any) -> MobileOne:
    """MobileOne-S2: 77.4% ImageNet top-1 (k=1)."""
    return MobileOne(**{**_S2, **kwargs})


@register_model(cfg=_cfg(_S3))
def mobileone_s3(**kwargs: Any) -> MobileOne:
    """MobileOne-S3: 78.1% ImageNet top-1 (k=1)."""
    return MobileOne(**{**_S3, **kwargs})


@register_model(cfg=_cfg(_S4))
def mobileone_s4(**kwargs: Any) -> MobileOne:
    """MobileOne-S4: 79.4% ImageNet top-1 (k=1; SE on the last 5 pairs of stage 3 and on stage 4)."""
    return MobileOne(**{**_S4, **kwargs})


@register_model(cfg=_S0_TINY_CFG)
def mobileone_s0_tiny(**kwargs: Any) -> MobileOne:
    """A 64x64-input MobileOne for tests (pairs 1,2,2,1; widths 16..128; k=2)."""
    return MobileOne(**{"num_blocks": (1, 2, 2, 1), "widths": (16, 32, 64, 128), "stem_width": 16,
                        "num_conv_branches": 2, "img_size": 64, "num_classes": 10, **kwargs})
