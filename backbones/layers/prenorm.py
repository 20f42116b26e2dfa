"""Pieces of the pre-BN residual networks (RepLKNet, RepMLPNet): a pre-BN residual block, the
ConvFFN, and the BN → pool → classifier head, each with every BN folded at deploy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reparam.block import ReparamBlock, assign_parameter
from ..reparam.math import bn_scale_shift, fuse_bn_before_linear
from ..reparam.walker import convert_children
from .convbn import ConvBN
from .drop_path import DropPath

__all__ = ["PreBNResidual", "ConvFFN", "NormPoolHead"]


class PreBNResidual(ReparamBlock):
    """``x + drop_path(body(pre_bn(x)))`` where ``body`` starts with the 1x1 ConvBN ``pw1``.

    Deploy: the pre-BN is folded into ``pw1`` (a BN before a padding-free 1x1 conv is exact).
    """

    def __init__(self, channels: int, drop_path: float, deploy: bool) -> None:
        super().__init__()
        self.deploy = deploy
        if not deploy:
            self.pre_bn = nn.BatchNorm2d(channels)
        self.drop_path = DropPath(drop_path)

    def body(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.body(x if self.deploy else self.pre_bn(x)))

    def _build_deploy(self) -> None:
        convert_children(self)
        conv = self.pw1.conv
        weight, bias = fuse_bn_before_linear(conv.weight.flatten(1), conv.bias, self.pre_bn)
        assign_parameter(conv, "weight", weight.reshape_as(conv.weight))
        assign_parameter(conv, "bias", bias)
        del self.pre_bn


class ConvFFN(PreBNResidual):
    """pre-BN → 1x1 ConvBN → GELU → 1x1 ConvBN, plus the input: ``(N, C, H, W)`` → ``(N, C, H, W)``."""

    def __init__(self, channels: int, hidden: int, drop_path: float = 0.0, deploy: bool = False) -> None:
        super().__init__(channels, drop_path, deploy)
        self.pw1 = ConvBN(channels, hidden, 1, deploy=deploy)
        self.act = nn.GELU()
        self.pw2 = ConvBN(hidden, channels, 1, deploy=deploy)

    def body(self, x: Tensor) -> Tensor:
        return self.pw2(self.act(self.pw1(x)))


class NormPoolHead(ReparamBlock):
    """BN → global average pool → ``fc``: ``(N, C, H, W)`` → ``(N, num_classes)``, or the pooled,
    normalized ``(N, C)`` when headless or ``pre_logits``.

    Deploy: in eval mode the BN is a per-channel affine map, which commutes with average pooling,
    so it becomes ``scale``/``shift`` on the pooled ``(N, C)`` vector (no BN left, and ``pre_logits``
    features stay equal). A child module, not the backbone's own code, so that walkers that visit
    children only (timm's ``reparameterize_model``) convert it too.
    """

    def __init__(self, channels: int, num_classes: int, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.scale = nn.Parameter(torch.ones(channels))
            self.shift = nn.Parameter(torch.zeros(channels))
        else:
            self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

    def _build_deploy(self) -> None:
        scale, shift = bn_scale_shift(self.norm)
        assign_parameter(self, "scale", scale)
        assign_parameter(self, "shift", shift)
        del self.norm

    def forward(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        if self.deploy:
            pooled = F.adaptive_avg_pool2d(features, 1).flatten(1) * self.scale + self.shift
        else:
            pooled = F.adaptive_avg_pool2d(self.norm(features), 1).flatten(1)
        return pooled if pre_logits else self.fc(pooled)
