"""The KxK conv a backbone is built with, chosen by name: plain ConvBN or a re-parameterizable block.

``conv_type`` is a constructor argument of the ResNets (``--model.backbone_kwargs.conv_type dbb``);
all of them take a ``(N, C_in, H, W)`` map to ``(N, C_out, H', W')`` with "same" padding, and all
deploy as one conv.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

from .acb import ACBlock
from .convbn import ConvBN
from .dbb import DiverseBranchBlock
from .geometry import ConvGeometry
from .orepa import OREPA

ConvType = Literal["conv", "acb", "dbb", "orepa"]
CONV_TYPES: dict[str, type[nn.Module]] = {"conv": ConvBN, "acb": ACBlock, "dbb": DiverseBranchBlock, "orepa": OREPA}


def make_conv(
    conv_type: ConvType, in_channels: int, out_channels: int, geometry: ConvGeometry, act: bool = False,
    deploy: bool = False,
) -> nn.Module:
    """A ``conv_type`` conv of this ``geometry`` (with its BN folded at deploy), followed by ReLU when ``act``."""
    if conv_type not in CONV_TYPES:
        raise ValueError(f"conv_type must be one of {sorted(CONV_TYPES)}, got {conv_type!r}")
    if conv_type == "conv":  # ConvBN also takes non-square kernels, so it keeps nn.Conv2d's arguments
        g = geometry
        return ConvBN(in_channels, out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups, act=act,
                      padding_mode=g.padding_mode, deploy=deploy)
    return CONV_TYPES[conv_type](in_channels, out_channels, geometry, act=act, deploy=deploy)
