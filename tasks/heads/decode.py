"""Segmentation decode heads with mmsegmentation's module names: PSPHead and the auxiliary FCNHead.

The state-dict keys equal mmseg 1.x's (``psp_modules.{i}.1.conv.weight``, ``bottleneck.bn.*``,
``conv_seg.*``, ``convs.0.conv.weight``), because ``ConvBN`` names its parts ``conv`` and ``bn``
like mmcv's ``ConvModule``; mmseg PSPNet checkpoints load without renaming the heads. The
ConvBN layers are re-parameterizable (BN folded at deploy) like the backbone's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.layers.convbn import ConvBN

__all__ = ["PSPHead", "FCNHead"]


def _classifier(channels: int, num_classes: int, dropout: float) -> tuple[nn.Module, nn.Conv2d]:
    conv_seg = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv_seg.weight, 0, 0.01)  # mmseg's init of conv_seg
    nn.init.zeros_(conv_seg.bias)
    return (nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()), conv_seg


class PSPHead(nn.Module):
    """Pyramid pooling head (PSPNet): ``(N, in_channels, h, w)`` → logits ``(N, num_classes, h, w)``.

    Each pooling branch is AdaptiveAvgPool(s) → 1x1 ConvBN-ReLU → bilinear upsampling to ``(h, w)``;
    the input and the branches are concatenated, fused by a 3x3 ConvBN-ReLU ``bottleneck``, then
    dropout and the 1x1 classifier ``conv_seg``.
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
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBN(in_channels, channels, 1, act=True, deploy=deploy))
            for s in pool_scales
        )
        self.bottleneck = ConvBN(in_channels + len(pool_scales) * channels, channels, 3, act=True, deploy=deploy)
        self.dropout, self.conv_seg = _classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        outs = [x] + [
            F.interpolate(branch(x), size=size, mode="bilinear", align_corners=self.align_corners)
            for branch in self.psp_modules
        ]
        return self.conv_seg(self.dropout(self.bottleneck(torch.cat(outs, dim=1))))


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
