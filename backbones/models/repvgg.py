"""RepVGG (Ding et al., CVPR 2021) and its quantization-friendly variant QARepVGG (Chu et al., 2022).

RepVGG block, train time: KxK conv-BN + 1x1 conv-BN + identity BN (when in == out and stride 1),
summed, then ReLU; deploy: one KxK conv + ReLU, a plain VGG. QARepVGG drops the BNs of the 1x1
and identity branches and puts one BN after the sum, which keeps the fused kernel's range
quantizable (INT8); it converts to the same plain conv.

Sizes as DingXiaoH/RepVGG builds them: A (2, 4, 14, 1) and B (4, 6, 16, 1) blocks per stage, widths
``64a, 128a, 256a, 512b``, stem ``min(64, 64a)``; the ``g2``/``g4`` variants group the 3x3 and 1x1
convs of every second block (the official global layers 2, 4, ..., 26).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ..layers.classifier import PooledClassifier
from ..layers.geometry import ConvGeometry
from ..layers.repvgg import RepVGGBlock
from .registry import ModelCfg, register_model


class RepVGG(PooledClassifier):
    """RepVGG: a stem block and four stages of RepVGG blocks (the first of each with stride 2).

    ``(N, in_chans, H, W)`` → logits ``(N, num_classes)``, or pooled ``(N, widths[-1])`` features
    when ``num_classes=0``. Any input size works; ``img_size`` only records the training size.

    Args:
        num_blocks: blocks per stage.
        widths: output channels per stage.
        stem_width: channels of the stride-2 stem block.
        quant_friendly: build QARepVGG blocks.
        groups: groups of the convs of every second block, counted over the stages from stage 1's
            first block (1): blocks 2, 4, ..., 26, the official ``optional_groupwise_layers``.
        num_classes, in_chans, img_size, deploy: as for every registered model.
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 4, 14, 1),
        widths: tuple[int, int, int, int] = (48, 96, 192, 1280),
        stem_width: int = 48,
        quant_friendly: bool = False,
        groups: int = 1,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        deploy: bool = False,
    ) -> None:
        if len(num_blocks) != 4 or len(widths) != 4:
            raise ValueError(f"RepVGG: num_blocks and widths need one value per stage, got {num_blocks}, {widths}")
        super().__init__(widths[-1], num_classes, img_size, deploy)
        self.stem = RepVGGBlock(in_chans, stem_width, ConvGeometry(3, stride=2), quant_friendly=quant_friendly,
                                deploy=deploy)
        in_channels, index = stem_width, 1
        for i, (n, width) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                grouped = index % 2 == 0 and index <= 26
                geometry = ConvGeometry(3, stride=2 if j == 0 else 1, groups=groups if grouped else 1)
                blocks.append(RepVGGBlock(in_channels, width, geometry, quant_friendly=quant_friendly, deploy=deploy))
                in_channels, index = width, index + 1
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
        self.add_classifier()


def _widths(a: float, b: float) -> dict[str, Any]:
    """The paper's width multipliers: stages 64a, 128a, 256a, 512b; stem min(64, 64a)."""
    return dict(widths=(int(64 * a), int(128 * a), int(256 * a), int(512 * b)), stem_width=min(64, int(64 * a)))


_A_DEPTHS, _B_DEPTHS = (2, 4, 14, 1), (4, 6, 16, 1)
_A = dict(num_blocks=_A_DEPTHS, **_widths(0.75, 2.5))
_TINY = dict(num_blocks=(1, 2, 2, 1), widths=(16, 32, 64, 128), stem_width=16, img_size=64, num_classes=10)


def _cfg(size: dict[str, Any]) -> ModelCfg:
    return ModelCfg(input_size=(224, 224), fixed_size=False, num_features=size["widths"][-1],
                    feature_channels=size["widths"], feature_strides=(4, 8, 16, 32))


_A0_CFG = _cfg(_A)
_TINY_CFG = replace(_A0_CFG, input_size=(64, 64), num_features=128, feature_channels=(16, 32, 64, 128))


def _register(name: str, depths: tuple[int, ...], a: float, b: float, groups: int, doc: str) -> None:
    """Register ``name``: RepVGG of these depths, width multipliers and groups."""
    size = dict(num_blocks=depths, groups=groups, **_widths(a, b))

    def factory(**kwargs: Any) -> RepVGG:
        return RepVGG(**{**size, **kwargs})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    register_model(cfg=_cfg(size))(factory)


# name, depths, a, b, groups, ImageNet top-1 of the official release (DingXiaoH/RepVGG README)
for _name, _depths, _a, _b, _groups, _top1 in (
    ("repvgg_a0", _A_DEPTHS, 0.75, 2.5, 1, "72.41"),
    ("repvgg_a1", _A_DEPTHS, 1.0, 2.5, 1, "74.46"),
    ("repvgg_a2", _A_DEPTHS, 1.5, 2.75, 1, "76.48"),
    ("repvgg_b0", _B_DEPTHS, 1.0, 2.5, 1, "75.14"),
    ("repvgg_b1", _B_DEPTHS, 2.0, 4.0, 1, "78.37"),
    ("repvgg_b1g2", _B_DEPTHS, 2.0, 4.0, 2, "77.78"),
    ("repvgg_b1g4", _B_DEPTHS, 2.0, 4.0, 4, "77.58"),
    ("repvgg_b2", _B_DEPTHS, 2.5, 5.0, 1, "78.78"),
    ("repvgg_b2g4", _B_DEPTHS, 2.5, 5.0, 4, "78.50; 79.38 with the 200-epoch recipe"),
    ("repvgg_b3", _B_DEPTHS, 3.0, 5.0, 1, "80.52 (200-epoch recipe)"),
    ("repvgg_b3g4", _B_DEPTHS, 3.0, 5.0, 4, "80.21 (200-epoch recipe)"),
):
    _register(_name, _depths, _a, _b, _groups,
              f"RepVGG-{_name[7:].upper().replace('G', 'g')}: {_top1}% ImageNet top-1 (official release).")


@register_model(cfg=_A0_CFG)
def qarepvgg_a0(**kwargs: Any) -> RepVGG:
    """RepVGG-A0 with QARepVGG blocks (BN-free 1x1 and identity branches, BN after the sum)."""
    return RepVGG(**{**_A, "quant_friendly": True, **kwargs})


@register_model(cfg=_TINY_CFG)
def repvgg_a0_tiny(**kwargs: Any) -> RepVGG:
    """A 64x64-input RepVGG for tests and the demo (blocks 1,2,2,1; widths 16..128)."""
    return RepVGG(**{**_TINY, **kwargs})


@register_model(cfg=_TINY_CFG)
def repvgg_b0_tiny(**kwargs: Any) -> RepVGG:
    """The tiny RepVGG with B0's deeper layout scaled down (blocks 2,3,4,1)."""
    return RepVGG(**{**_TINY, "num_blocks": (2, 3, 4, 1), **kwargs})


@register_model(cfg=_TINY_CFG)
def qarepvgg_a0_tiny(**kwargs: Any) -> RepVGG:
    """The tiny RepVGG with QARepVGG blocks."""
    return RepVGG(**{**_TINY, "quant_friendly": True, **kwargs})
