"""Segmentation decode heads with mmsegmentation's module names: PSPHead, UPerHead and the auxiliary FCNHead.

The state-dict keys equal mmseg 1.x's (``psp_modules.{i}.1.conv.weight``, ``bottleneck.bn.*``,
``lateral_convs.{i}.conv.weight``, ``fpn_convs.{i}.bn.*``, ``fpn_bottleneck.conv.weight``,
``conv_seg.*``, ``convs.0.conv.weight``), because ``ConvBN`` names its parts ``conv`` and ``bn``
like mmcv's ``ConvModule``; mmseg PSPNet and UPerNet checkpoints load without renaming the heads.
The ConvBN layers are re-parameterizable (BN folded at deploy) like the backbone's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.layers.convbn import ConvBN

__all__ = ["PPM", "PSPHead", "UPerHead", "FCNHead"]


def _classifier(channels: int, num_classes: int, dropout: float) -> tuple[nn.Module, nn.Conv2d]:
    conv_seg = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv_seg.weight, 0, 0.01)  # mmseg's init of conv_seg
    nn.init.zeros_(conv_seg.bias)
    return (nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()), conv_seg


class PPM(nn.ModuleList):
    """Pyramid pooling module (mmseg's ``PPM``), shared by PSPHead and UPerHead.

    ``(N, in_channels, h, w)`` → a list of ``len(pool_scales)`` maps ``(N, channels, h, w)``: per
    scale ``s``, AdaptiveAvgPool(s) → 1x1 ConvBN-ReLU → bilinear upsampling back to ``(h, w)``.
    A ``ModuleList`` of ``Sequential(pool, ConvBN)`` so that the keys are mmseg's
    (``psp_modules.{i}.1.conv.weight``).
    """

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int], align_corners: bool = False,
                 deploy: bool = False) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBN(in_channels, channels, 1, act=True, deploy=deploy))
            for s in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> list[Tensor]:
        size = x.shape[-2:]
        return [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=self.align_corners)
                for branch in self]


def _pyramid_pool(psp_modules: PPM, bottleneck: nn.Module, x: Tensor) -> Tensor:
    """``bottleneck(cat([x, *psp_modules(x)]))``: the PSP context of ``x`` ``(N, C, h, w)`` →
    ``(N, channels, h, w)``; PSPHead's body and UPerHead's top level alike."""
    return bottleneck(torch.cat([x, *psp_modules(x)], dim=1))


class PSPHead(nn.Module):
    """Pyramid pooling head (PSPNet): ``(N, in_channels, h, w)`` → logits ``(N, num_classes, h, w)``.

    Each pooling branch (:class:`PPM`) is AdaptiveAvgPool(s) → 1x1 ConvBN-ReLU → bilinear
    upsampling to ``(h, w)``; the input and the branches are concatenated, fused by a 3x3
    ConvBN-ReLU ``bottleneck``, then dropout and the 1x1 classifier ``conv_seg``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        align_corners: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.psp_modules = PPM(in_channels, channels, pool_scales, align_corners, deploy)
        self.bottleneck = ConvBN(in_channels + len(pool_scales) * channels, channels, 3, act=True, deploy=deploy)
        self.dropout, self.conv_seg = _classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(_pyramid_pool(self.psp_modules, self.bottleneck, x)))


class UPerHead(nn.Module):
    """UPerNet's head (Xiao et al., ECCV 2018; mmseg's ``UPerHead``): a PPM on the last map and an FPN.

    Input: the list of ``L`` stage maps ``[(N, in_channels[i], h_i, w_i)]``, finest first (the
    backbone's ``forward_stages``); output: logits ``(N, num_classes, h_0, w_0)`` at the finest
    map's size (stride 4 for the ResNets and RepMLPNet).

    - top level: :class:`PPM` on the last map, concatenated with it, 3x3 ConvBN-ReLU ``bottleneck``;
    - lower levels ``i < L - 1``: 1x1 ConvBN-ReLU ``lateral_convs[i]``; top-down, each level adds
      the level above it bilinearly resized to its size;
    - ``fpn_convs[i]``: 3x3 ConvBN-ReLU on each lower level (the top level is used as it is);
    - fusion: every level resized to ``(h_0, w_0)``, concatenated (``L * channels``), 3x3
      ConvBN-ReLU ``fpn_bottleneck``, Dropout2d and the 1x1 classifier ``conv_seg``.

    Defaults are mmseg's ``upernet_r50`` (channels 512, pool scales (1, 2, 3, 6), dropout 0.1,
    ``align_corners=False``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        align_corners: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("UPerHead: in_channels must name the channels of at least one feature map")
        self.in_channels = tuple(in_channels)
        self.align_corners = align_corners
        top = self.in_channels[-1]
        self.psp_modules = PPM(top, channels, pool_scales, align_corners, deploy)
        self.bottleneck = ConvBN(top + len(pool_scales) * channels, channels, 3, act=True, deploy=deploy)
        self.lateral_convs = nn.ModuleList(
            ConvBN(c, channels, 1, act=True, deploy=deploy) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            ConvBN(channels, channels, 3, act=True, deploy=deploy) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvBN(len(self.in_channels) * channels, channels, 3, act=True, deploy=deploy)
        self.dropout, self.conv_seg = _classifier(channels, num_classes, dropout)

    def _resize(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=self.align_corners)

    def _check(self, inputs: Sequence[Tensor]) -> None:
        got = [tuple(x.shape) for x in inputs]
        if len(inputs) != len(self.in_channels) or any(
                x.dim() != 4 or x.shape[1] != c for x, c in zip(inputs, self.in_channels)):
            raise ValueError(f"UPerHead built for {len(self.in_channels)} maps (N, C, h, w) with C = "
                             f"{list(self.in_channels)}, got shapes {got}")

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        self._check(inputs)
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(_pyramid_pool(self.psp_modules, self.bottleneck, inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse context into each finer level
            laterals[i - 1] = laterals[i - 1] + self._resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        # mmseg resizes every level above the finest, even one already of its size (an identity)
        outs = [outs[0]] + [self._resize(x, size) for x in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """Auxiliary FCN head: ``num_convs`` 3x3 ConvBN-ReLU, dropout, 1x1 classifier.

    ``(N, in_channels, h, w)`` → ``(N, num_classes, h, w)``. mmseg's ``concat_input=False`` form.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        dropout: float = 0.1,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(
            ConvBN(in_channels if i == 0 else channels, channels, 3, act=True, deploy=deploy)
            for i in range(num_convs)
        ))
        self.dropout, self.conv_seg = _classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))
