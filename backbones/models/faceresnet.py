"""FaceResNet and RepMLP-FaceRes (paper §4.4): face embedding networks for 96x96 aligned faces.

FaceResNet: bottleneck stages of 3, 2, 2, 2 blocks with widths 128/256/512/1024 and no 1x1
reduction (the 3x3 convs are as wide as the stage), so at 96x96 the c2..c5 maps are 24, 12, 6
and 3 pixels. RepMLP-FaceRes replaces the stride-1 blocks of c2, c3 and c4 by RepMLP
Bottlenecks with h=w=6, r=2, g=4; c4's 6x6 map is a single partition, so it has no Global
Perceptron. Faces are aligned, so the embedding head keeps positions: BN → dropout → flatten
→ linear → BN1d (insightface's ``E`` output), which deploys as one linear layer.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from ..layers.repmlp import Kernels
from ..reparam.block import ReparamBlock, assign_parameter
from ..reparam.math import fuse_bn, fuse_bn_before_linear
from .helpers import FACE_MEAN, FACE_STD, check_embedding_only
from .registry import ModelCfg, register_model
from .resnet import ResNet, resnet_stages

__all__ = ["FaceEmbeddingHead", "FaceResNet", "faceresnet", "repmlp_faceres", "faceresnet_tiny", "repmlp_faceres_tiny"]


class FaceEmbeddingHead(ReparamBlock):
    """``(N, C, h, w)`` → ``(N, embedding_size)``: BN2d → dropout → flatten → linear → BN1d.

    Deploy: both BNs are folded into the linear (dropout is the identity in eval mode).
    """

    def __init__(self, in_channels: int, size: tuple[int, int], embedding_size: int, dropout: float = 0.0,
                 deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        if not deploy:
            self.bn = nn.BatchNorm2d(in_channels)
            self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels * size[0] * size[1], embedding_size, bias=deploy)
        if not deploy:
            self.features = nn.BatchNorm1d(embedding_size)

    def get_equivalent_weight_bias(self) -> tuple[Tensor, Tensor]:
        if self.deploy:
            return self.fc.weight, self.fc.bias
        weight, bias = fuse_bn_before_linear(self.fc.weight, None, self.bn)
        return fuse_bn(weight, bias, self.features)

    def _build_deploy(self) -> None:
        weight, bias = self.get_equivalent_weight_bias()
        self.fc.bias = None
        assign_parameter(self.fc, "weight", weight)
        assign_parameter(self.fc, "bias", bias)
        del self.bn, self.dropout, self.features

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.fc(x.flatten(1))
        return self.features(self.fc(self.dropout(self.bn(x)).flatten(1)))


class FaceResNet(ReparamBlock):
    """``(N, in_chans, H, W)`` aligned faces → ``(N, embedding_size)`` embeddings (not normalized).

    The trunk is :class:`backbones.models.resnet.ResNet` (7x7 stem and max-pool, c2..c5) with
    ``bottleneck_ratio=1``; see :func:`backbones.models.resnet.resnet_stages` for the RepMLP arguments.

    Args:
        layers, widths, stem_width: stage depths and widths.
        embedding_size: output dimension.
        img_size: input size (96 in the paper); the head is sized to the c5 map.
        dropout: dropout before the embedding linear (training only).
        repmlp_stages, partition, kernels, groups, bottleneck_r, fc1_reduction: RepMLP Bottlenecks
            in every block but the first of the listed stages (2..5).
        in_chans: input channels.
        num_classes: must be 0 (registry convention; the margin head belongs to the task).
        deploy: build the converted structure.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int] = (3, 2, 2, 2),
        widths: tuple[int, int, int, int] = (128, 256, 512, 1024),
        stem_width: int = 64,
        embedding_size: int = 512,
        img_size: int | tuple[int, int] = 96,
        dropout: float = 0.0,
        repmlp_stages: tuple[int, ...] = (),
        partition: int | tuple[int, int] = 6,
        kernels: Kernels = (1, 3, 5),
        groups: tuple[int, int, int, int] = (4, 4, 4, 1),
        bottleneck_r: tuple[int, int, int, int] = (2, 2, 2, 1),
        fc1_reduction: tuple[int, int, int, int] = (1, 1, 1, 1),
        in_chans: int = 3,
        num_classes: int = 0,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        check_embedding_only("FaceResNet", num_classes)
        self.deploy = deploy
        stages = resnet_stages(layers, widths, bottleneck_ratio=1, repmlp_stages=repmlp_stages, partition=partition,
                               kernels=kernels, groups=groups, bottleneck_r=bottleneck_r, fc1_reduction=fc1_reduction)
        self.body = ResNet(stages, stem_width, num_classes=0, in_chans=in_chans, img_size=img_size, deploy=deploy)
        self.img_size = self.body.img_size
        self.num_features = self.embedding_size = embedding_size
        self.head = FaceEmbeddingHead(widths[-1], self.body.stage_sizes[-1], embedding_size, dropout, deploy)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"this face network was built for {self.img_size[0]}x{self.img_size[1]} faces (img_size) but got "
                f"an input of shape {tuple(x.shape)}; its embedding head (and any RepMLP block) is tied to one "
                "size, so align/resize faces to img_size"
            )
        return self.head(self.body.forward_features(x))


# The embedding head is sized to the c5 map, so a FaceResNet works at its img_size only.
_FACERES_CFG = ModelCfg(input_size=(96, 96), fixed_size=True, num_features=512,
                        feature_channels=(128, 256, 512, 1024), feature_strides=(4, 8, 16, 32),
                        mean=FACE_MEAN, std=FACE_STD)
_FACERES_TINY_CFG = replace(_FACERES_CFG, input_size=(64, 64), num_features=128, feature_channels=(32, 64, 128, 256))
_REPMLP = dict(repmlp_stages=(2, 3, 4))


@register_model(cfg=_FACERES_CFG)
def faceresnet(**kwargs: Any) -> FaceResNet:
    """FaceResNet (paper): blocks 3,2,2,2, widths 128..1024 without 1x1 reduction, 96x96 → 512-d."""
    return FaceResNet(**kwargs)


@register_model(cfg=_FACERES_CFG)
def repmlp_faceres(**kwargs: Any) -> FaceResNet:
    """RepMLP-FaceRes (paper): RepMLP Bottlenecks (h=w=6, r=2, g=4, K=1,3,5) in the stride-1 blocks of c2..c4."""
    return FaceResNet(**{**_REPMLP, **kwargs})


# 64x64 faces: c2..c5 maps are 16, 8, 4, 2; with h=w=4, c2 has 16 partitions, c3 4 and c4 one (no
# Global Perceptron), the structure of the paper's model at 96x96 with h=w=6.
_TINY = dict(layers=(2, 2, 2, 1), widths=(32, 64, 128, 256), stem_width=16, embedding_size=128, img_size=64,
             partition=4, kernels=(1, 3), groups=(2, 2, 4, 1))


@register_model(cfg=_FACERES_TINY_CFG)
def faceresnet_tiny(**kwargs: Any) -> FaceResNet:
    """A small FaceResNet for tests and the demo: 64x64 → 128-d."""
    return FaceResNet(**{**_TINY, **kwargs})


@register_model(cfg=_FACERES_TINY_CFG)
def repmlp_faceres_tiny(**kwargs: Any) -> FaceResNet:
    """The small FaceResNet with RepMLP Bottlenecks in c2..c4 (16, 4 and 1 partitions of 4x4)."""
    return FaceResNet(**{**_TINY, **_REPMLP, **kwargs})
