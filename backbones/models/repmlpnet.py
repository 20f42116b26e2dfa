"""RepMLPNet (Ding et al., CVPR 2022, arXiv 2112.11081): a hierarchical MLP with re-parameterized locality.

A 4x4/4 patch-embedding conv, four stages joined by 2x2/2 downsampling convs, and ``head``: a
final BN, average pooling and the classifier. A stage alternates a RepMLP unit (pre-BN →
:class:`~..layers.repmlpnet.RepMLPNetBlock`, plus the input) with a ConvFFN (pre-BN → 1x1 → GELU
→ 1x1, plus the input). The partitions are fixed at build time (the whole stage map at the
pre-training size), so a larger input, as in segmentation, is cut into several of them; the
input size must make every stage map a multiple of its partition. Each partition's output stays
in place (the official code's reshape moves it to another partition when a map holds several; at
the published resolutions, one partition per map, both compute the same function).

Deploy: each RepMLP block's local convs and BNs merge into its FC (Locality Injection); the
ConvFFN's and the head's BNs fold as in RepLKNet, the convs' BNs into the convs. The pre-BN of
a RepMLP unit becomes a per-channel scale and shift: its scale cannot enter an FC shared by
several channels.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.classifier import PooledClassifier
from ..layers.convbn import ConvBN
from ..layers.drop_path import DropPath
from ..layers.helpers import to_pair
from ..layers.prenorm import ConvFFN, NormPoolHead
from ..layers.repmlpnet import RepMLPNetBlock
from ..reparam.block import ReparamBlock, assign_parameter
from ..reparam.math import bn_scale_shift
from ..reparam.walker import convert_children
from .registry import ModelCfg, register_model

Size = tuple[int, int]


class RepMLPUnit(ReparamBlock):
    """``x + drop_path(mlp(pre_bn(x)))``: ``(N, C, H, W)`` → ``(N, C, H, W)``.

    Deploy: the pre-BN becomes its eval-mode affine map, ``scale`` and ``shift`` ``(C,)``: its
    per-channel scale cannot enter an FC that several channels share.
    """

    def __init__(self, channels: int, input_size: Size, partition: Size, sharesets: int, kernels: tuple[int, ...],
                 gp_reduction: int, drop_path: float = 0.0, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.scale = nn.Parameter(torch.ones(channels))
            self.shift = nn.Parameter(torch.zeros(channels))
        else:
            self.pre_bn = nn.BatchNorm2d(channels)
        self.mlp = RepMLPNetBlock(channels, input_size, partition, sharesets, kernels, gp_reduction, deploy)
        self.drop_path = DropPath(drop_path)

    def _build_deploy(self) -> None:
        convert_children(self)
        scale, shift = bn_scale_shift(self.pre_bn)
        assign_parameter(self, "scale", scale)
        assign_parameter(self, "shift", shift)
        del self.pre_bn

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            normed = x * self.scale.reshape(1, -1, 1, 1) + self.shift.reshape(1, -1, 1, 1)
        else:
            normed = self.pre_bn(x)
        return x + self.drop_path(self.mlp(normed))


class RepMLPNet(PooledClassifier):
    """RepMLPNet: ``(N, in_chans, H, W)`` → logits ``(N, num_classes)``; headless (``num_classes=0``):
    pooled ``(N, channels[-1])`` features.

    Args:
        channels: width per stage.
        layers: (RepMLP unit, ConvFFN) pairs per stage.
        sharesets: distinct partition FCs per stage (S).
        partitions: partition ``h`` (= ``w``) or ``(h, w)`` per stage; the official models use the
            stage map at the pre-training size (56, 28, 14, 7 at 224).
        kernels: the Local Perceptron's depthwise kernel sizes.
        gp_reduction: the Global Perceptron's hidden width is ``C // gp_reduction``.
        ffn_ratio: hidden width of a ConvFFN relative to the stage width.
        drop_path_rate: stochastic depth, rising linearly to this value over the blocks (the
            official code has none: 0).
        num_classes, in_chans, deploy: as for every registered model.
        img_size: the input size it is built for: ``H/4`` ... ``H/32`` (and ``W``'s) must be
            multiples of the stage partitions.
    """

    def __init__(
        self,
        channels: tuple[int, int, int, int] = (96, 192, 384, 768),
        layers: tuple[int, int, int, int] = (2, 2, 12, 2),
        sharesets: tuple[int, int, int, int] = (1, 4, 32, 128),
        partitions: tuple[int | tuple[int, int], ...] = (56, 28, 14, 7),
        kernels: tuple[int, ...] = (1, 3),
        gp_reduction: int = 4,
        ffn_ratio: int = 4,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        deploy: bool = False,
    ) -> None:
        if not len(channels) == len(layers) == len(sharesets) == len(partitions) == 4:
            raise ValueError(f"RepMLPNet: channels, layers, sharesets and partitions need one value per stage, got "
                             f"{channels}, {layers}, {sharesets}, {partitions}")
        super().__init__(channels[-1], num_classes, img_size, deploy)
        self.widths = tuple(channels)
        self.stage_sizes = self._stage_sizes(self.img_size, [to_pair(p) for p in partitions])
        self.stem = ConvBN(in_chans, channels[0], 4, 4, padding=0, act=True, deploy=deploy)
        count = 2 * sum(layers)  # python floats, not torch.linspace: models are also built on the meta device
        rates = [drop_path_rate * i / max(count - 1, 1) for i in range(count)]
        for i, (c, n, s, p, size) in enumerate(zip(channels, layers, sharesets, partitions, self.stage_sizes)):
            blocks: list[nn.Module] = []
            for _ in range(n):
                blocks.append(RepMLPUnit(c, size, to_pair(p), s, kernels, gp_reduction, rates.pop(0), deploy))
                blocks.append(ConvFFN(c, c * ffn_ratio, rates.pop(0), deploy))
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
            if i < 3:
                self.add_module(f"transition{i + 1}",
                                ConvBN(c, channels[i + 1], 2, 2, padding=0, act=True, deploy=deploy))
        self.head = NormPoolHead(self.num_features, num_classes, deploy)

    @staticmethod
    def _stage_sizes(img_size: Size, partitions: list[Size]) -> list[Size]:
        """The four stage maps ``(H/4, W/4)`` ... ``(H/32, W/32)``; an error naming ``img_size`` when a
        map is not a whole multiple of its stage's partition."""
        need = [32, 32]  # the stem and three downsamplings need multiples of 32
        for i, partition in enumerate(partitions):
            need = [math.lcm(n, 4 * 2 ** i * p) for n, p in zip(need, partition)]
        sizes = []
        for i, (h, w) in enumerate(partitions):
            stride = 4 * 2 ** i
            size = (img_size[0] // stride, img_size[1] // stride)
            if img_size[0] % stride or img_size[1] % stride or size[0] % h or size[1] % w:
                raise ValueError(
                    f"RepMLPNet: img_size {img_size[0]}x{img_size[1]} gives a {img_size[0] / stride:g}x"
                    f"{img_size[1] / stride:g} map in stage {i + 1}, which is not a multiple of its {h}x{w} partition; "
                    f"use an img_size whose height is a multiple of {need[0]} and width a multiple of {need[1]}")
            sizes.append(size)
        return sizes

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.stage1, self.stage2, self.stage3, self.stage4]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The four stage outputs ``[(N, channels[i], H / 2**(i+2), W / 2**(i+2)) for i in 0..3]``."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"this RepMLPNet was built for {self.img_size[0]}x{self.img_size[1]} inputs (img_size) but got an "
                f"input of shape {tuple(x.shape)}; its partition FCs are tied to one map size: rebuild with img_size "
                "matching the data, or feed crops/sliding windows of that size")
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            if i:
                x = getattr(self, f"transition{i}")(x)
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map ``(N, channels[-1], H/32, W/32)`` (before the head's BN)."""
        return self.forward_stages(x)[-1]

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(features, pre_logits)


# ------------------------------------------------------------------------------- registered sizes
# The official factories (DingXiaoH/RepMLP repmlpnet.py): widths, depths and sharesets per size; the
# partitions are the stage maps at the pre-training resolution.
_T = dict(channels=(64, 128, 256, 512), layers=(2, 2, 6, 2), sharesets=(1, 4, 16, 128))
_B = dict(channels=(96, 192, 384, 768), layers=(2, 2, 12, 2), sharesets=(1, 4, 32, 128))
_D = dict(channels=(80, 160, 320, 640), layers=(2, 2, 18, 2), sharesets=(1, 4, 16, 128))
_L = dict(channels=(96, 192, 384, 768), layers=(2, 2, 18, 2), sharesets=(1, 4, 32, 256))
_AT224 = dict(partitions=(56, 28, 14, 7), img_size=224)
_AT256 = dict(partitions=(64, 32, 16, 8), img_size=256)


def _cfg(size: dict, at: dict) -> ModelCfg:
    side = at["img_size"]
    return ModelCfg(input_size=(side, side), fixed_size=True, num_features=size["channels"][-1],
                    feature_channels=size["channels"], feature_strides=(4, 8, 16, 32))


def _repmlpnet(size: dict, at: dict, kwargs: dict[str, Any]) -> RepMLPNet:
    return RepMLPNet(**{**size, **at, **kwargs})


@register_model(cfg=_cfg(_T, _AT224))
def repmlpnet_t224(**kwargs: Any) -> RepMLPNet:
    """RepMLPNet-T224: 76.62% ImageNet top-1, 38.3M parameters, 2.8G FLOPs (official README)."""
    return _repmlpnet(_T, _AT224, kwargs)


@register_model(cfg=_cfg(_B, _AT224))
def repmlpnet_b224(**kwargs: Any) -> RepMLPNet:
    """RepMLPNet-B224: 80.32% top-1, 68.2M parameters, 6.7G FLOPs."""
    return _repmlpnet(_B, _AT224, kwargs)


@register_model(cfg=_cfg(_T, _AT256))
def repmlpnet_t256(**kwargs: Any) -> RepMLPNet:
    """RepMLPNet-T256: 77.44% top-1, 58.7M parameters, 4.2G FLOPs."""
    return _repmlpnet(_T, _AT256, kwargs)


@register_model(cfg=_cfg(_B, _AT256))
def repmlpnet_b256(**kwargs: Any) -> RepMLPNet:
    """RepMLPNet-B256: 81.03% top-1, 96.5M parameters, 9.6G FLOPs."""
    return _repmlpnet(_B, _AT256, kwargs)


@register_model(cfg=_cfg(_D, _AT256))
def repmlpnet_d256(**kwargs: Any) -> RepMLPNet:
    """RepMLPNet-D256: 80.83% top-1, 86.9M parameters, 8.6G FLOPs."""
    return _repmlpnet(_D, _AT256, kwargs)


@register_model(cfg=_cfg(_L, _AT256))
def repmlpnet_l256(**kwargs: Any) -> RepMLPNet:
    """RepMLPNet-L256: 81.68% top-1, 117.7M parameters, 11.5G FLOPs."""
    return _repmlpnet(_L, _AT256, kwargs)


_TINY = dict(channels=(16, 32, 64, 128), layers=(1, 1, 1, 1), sharesets=(1, 2, 4, 8), num_classes=10)
_AT64 = dict(partitions=(8, 4, 2, 2), img_size=64)


@register_model(cfg=replace(_cfg(_TINY, _AT64), num_features=128))
def repmlpnet_tiny(**kwargs: Any) -> RepMLPNet:
    """A 64x64-input RepMLPNet for tests and the demo: one unit per stage, widths 16..128; stages 1
    to 3 are cut into 2x2 partitions (an FC shared over partitions), stage 4 is one 2x2 partition
    (its 3x3 local conv is larger than the partition)."""
    return _repmlpnet(_TINY, _AT64, kwargs)
