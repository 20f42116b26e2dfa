"""MobileFaceNet, insightface's ``mbf`` (arcface_torch ``backbones/mobilefacenet.py``): the face baseline.

A 112x112 aligned face → a 512-d embedding. Depthwise-separable residual blocks (conv + BN +
PReLU), then a 1x1 conv to 512 channels and the Global Depthwise Conv (GDC): a depthwise conv
over the whole final map (7x7 at 112), flatten, a bias-free linear and BatchNorm1d.

Re-parameterization here is plain BN folding: every conv+BN becomes one biased conv and the final
linear+BN1d one biased linear, so the deploy model has no BatchNorm. PReLU stays.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from ..layers.convbn import ConvBN
from ..layers.helpers import to_pair
from ..reparam.block import ReparamBlock, assign_parameter
from ..reparam.math import fuse_bn
from .helpers import FACE_MEAN, FACE_STD, check_embedding_only
from .registry import ModelCfg, register_model

__all__ = ["LinearBN", "MobileFaceNet", "mobilefacenet", "mobilefacenet_tiny"]



class LinearBN(ReparamBlock):
    """``bn1d(linear(x))``: ``(N, in_features)`` → ``(N, out_features)``; deploy: one biased linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        self.linear = nn.Linear(in_features, out_features, bias=bias or deploy)
        if not deploy:
            self.bn = nn.BatchNorm1d(out_features)

    def get_equivalent_weight_bias(self) -> tuple[Tensor, Tensor]:
        if self.deploy:
            return self.linear.weight, self.linear.bias
        return fuse_bn(self.linear.weight, self.linear.bias, self.bn)

    def _build_deploy(self) -> None:
        weight, bias = self.get_equivalent_weight_bias()
        assign_parameter(self.linear, "weight", weight)
        assign_parameter(self.linear, "bias", bias)
        del self.bn

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        return x if self.deploy else self.bn(x)


def conv_bn_prelu(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, deploy: bool = False) -> nn.Sequential:
    """insightface's ConvBlock: conv → BN → PReLU (per channel)."""
    return nn.Sequential(ConvBN(cin, cout, k, stride, groups=groups, deploy=deploy), nn.PReLU(cout))


class DepthWise(nn.Module):
    """1x1 expand to ``hidden`` (PReLU) → 3x3 depthwise (stride, PReLU) → 1x1 linear projection,
    plus the identity when ``residual``: ``(N, cin, H, W)`` → ``(N, cout, H/stride, W/stride)``."""

    def __init__(self, cin: int, cout: int, hidden: int, stride: int, residual: bool, deploy: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            conv_bn_prelu(cin, hidden, deploy=deploy),
            conv_bn_prelu(hidden, hidden, 3, stride, groups=hidden, deploy=deploy),
            ConvBN(hidden, cout, 1, deploy=deploy),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class MobileFaceNet(ReparamBlock):
    """``(N, in_chans, H, W)`` aligned faces → ``(N, embedding_size)`` embeddings (not normalized).

    Args:
        blocks: residual blocks after the stem and after each of the three downsamplings
            (insightface ``mbf``: ``(1, 4, 6, 2)``; a first entry of 1 is a grouped conv, not a block).
        scale: width multiplier of the 64/128 base widths (``mbf``: 2).
        embedding_size: output dimension.
        img_size: input size; the GDC kernel covers the whole ``ceil(img_size / 16)`` final map.
        in_chans: input channels.
        num_classes: must be 0 (registry convention; the margin head belongs to the task).
        deploy: build the BN-folded structure.
    """

    def __init__(
        self,
        blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
        scale: int = 2,
        embedding_size: int = 512,
        img_size: int | tuple[int, int] = 112,
        in_chans: int = 3,
        num_classes: int = 0,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        check_embedding_only("MobileFaceNet", num_classes)
        if len(blocks) != 4:
            raise ValueError(f"MobileFaceNet: blocks needs 4 entries, got {tuple(blocks)}")
        self.deploy = deploy
        self.img_size = to_pair(img_size)
        self.num_features = self.embedding_size = embedding_size
        c1, c2 = 64 * scale, 128 * scale
        layers: list[nn.Module] = [conv_bn_prelu(in_chans, c1, 3, 2, deploy=deploy)]
        if blocks[0] == 1:
            layers.append(conv_bn_prelu(c1, c1, 3, groups=64 if c1 % 64 == 0 else 1, deploy=deploy))
        else:
            layers += [DepthWise(c1, c1, 128, 1, True, deploy) for _ in range(blocks[0])]
        # (in, out, expansion of the downsampling block, residual width) as in insightface
        for cin, cout, hidden, res_hidden, n in ((c1, c1, 128, 128, blocks[1]), (c1, c2, 256, 256, blocks[2]),
                                                  (c2, c2, 512, 256, blocks[3])):
            layers.append(DepthWise(cin, cout, hidden, 2, False, deploy))
            layers += [DepthWise(cout, cout, res_hidden, 1, True, deploy) for _ in range(n)]
        self.layers = nn.Sequential(*layers)
        self.conv_sep = conv_bn_prelu(c2, 512, deploy=deploy)
        final = tuple(math.ceil(s / 16) for s in self.img_size)  # four stride-2 convs
        self.gdc = ConvBN(512, 512, final, padding=0, groups=512, deploy=deploy)
        self.features = LinearBN(512, embedding_size, deploy=deploy)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"MobileFaceNet was built for {self.img_size[0]}x{self.img_size[1]} faces (img_size) but got "
                f"an input of shape {tuple(x.shape)}; its GDC covers the whole final map, so align/resize "
                "faces to img_size"
            )
        x = self.gdc(self.conv_sep(self.layers(x)))
        return self.features(x.flatten(1))


# The GDC covers the whole final map, so a MobileFaceNet works at its img_size only; it exposes no stage maps.
_MBF_CFG = ModelCfg(input_size=(112, 112), fixed_size=True, num_features=512, mean=FACE_MEAN, std=FACE_STD)
_MBF_TINY_CFG = replace(_MBF_CFG, input_size=(64, 64), num_features=128)


@register_model(cfg=_MBF_CFG)
def mobilefacenet(**kwargs: Any) -> MobileFaceNet:
    """insightface ``mbf`` ("mobilefacenet-0.45G"): blocks (1,4,6,2), scale 2, 112x112 → 512-d."""
    return MobileFaceNet(**kwargs)


@register_model(cfg=_MBF_TINY_CFG)
def mobilefacenet_tiny(**kwargs: Any) -> MobileFaceNet:
    """A small MobileFaceNet for tests and the demo: blocks (1,1,2,1), scale 1, 64x64 → 128-d."""
    return MobileFaceNet(**{"blocks": (1, 1, 2, 1), "scale": 1, "embedding_size": 128, "img_size": 64, **kwargs})
