"""RepLKNet (Ding et al., CVPR 2022): depthwise 31x31 convs with a parallel small kernel.

``ReparamLargeKernelConv``: a large depthwise KxK conv-BN plus a small kxk conv-BN, summed; the
small kernel is zero-padded into the large one at deploy. ``RepLKBlock`` (pre-BN → 1x1 → large
kernel → 1x1, residual) and ``ConvFFN`` (pre-BN → 1x1 → GELU → 1x1, residual) alternate in each
stage. At deploy every BN is folded: the pre-BNs into the following 1x1 conv (exact because a
1x1 conv without padding sees no border), the final BN into a per-channel scale and shift of the
pooled features (exact because average pooling commutes with a per-channel affine map). The
official ``deep_fuse_BN`` is a silent no-op with its default SyncBatchNorm; this conversion
refuses SyncBatchNorm instead.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from torch import Tensor, nn

from ..layers.classifier import PooledClassifier
from ..layers.convbn import ConvBN
from ..layers.geometry import ConvGeometry
from ..layers.large_kernel import ReparamLargeKernelConv
from ..layers.prenorm import ConvFFN, NormPoolHead, PreBNResidual
from .registry import ModelCfg, register_model


class RepLKBlock(PreBNResidual):
    """pre-BN → 1x1 ConvBN-ReLU → large-kernel depthwise conv → ReLU → 1x1 ConvBN, plus the input.

    ``(N, C, H, W)`` → ``(N, C, H, W)``; ``dw_channels`` is the width of the depthwise conv.
    """

    def __init__(self, channels: int, dw_channels: int, kernel_size: int, small_kernel: Optional[int],
                 drop_path: float = 0.0, deploy: bool = False) -> None:
        super().__init__(channels, drop_path, deploy)
        self.pw1 = ConvBN(channels, dw_channels, 1, act=True, deploy=deploy)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, dw_channels,
                                                   ConvGeometry(kernel_size, groups=dw_channels), act=True,
                                                   small_kernel=small_kernel, deploy=deploy)
        self.pw2 = ConvBN(dw_channels, channels, 1, deploy=deploy)

    def body(self, x: Tensor) -> Tensor:
        return self.pw2(self.large_kernel(self.pw1(x)))


class RepLKNet(PooledClassifier):
    """RepLKNet: a 4-conv stem (stride 4), then four stages of (RepLKBlock, ConvFFN) pairs joined by
    stride-2 transitions, and ``head``: a final BN, average pooling and the classifier.

    ``(N, in_chans, H, W)`` → logits ``(N, num_classes)``; headless (``num_classes=0``): pooled
    ``(N, channels[-1])`` features.

    Args:
        kernels: large kernel size per stage.
        layers: (RepLKBlock, ConvFFN) pairs per stage.
        channels: width per stage.
        small_kernel: the parallel small kernel (None: none).
        dw_ratio: depthwise width of a RepLKBlock relative to the stage width.
        ffn_ratio: hidden width of a ConvFFN relative to the stage width.
        drop_path_rate: stochastic depth, rising linearly to this value over the (RepLKBlock, ConvFFN)
            pairs (both blocks of a pair share a rate).
        num_classes, in_chans, img_size, deploy: as for every registered model.
    """

    def __init__(
        self,
        kernels: tuple[int, int, int, int] = (31, 29, 27, 13),
        layers: tuple[int, int, int, int] = (2, 2, 18, 2),
        channels: tuple[int, int, int, int] = (128, 256, 512, 1024),
        small_kernel: Optional[int] = 5,
        dw_ratio: float = 1.0,
        ffn_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        deploy: bool = False,
    ) -> None:
        if not len(kernels) == len(layers) == len(channels) == 4:
            raise ValueError(f"RepLKNet: kernels, layers and channels need one value per stage, "
                             f"got {kernels}, {layers}, {channels}")
        super().__init__(channels[-1], num_classes, img_size, deploy)
        c0 = channels[0]
        self.stem = nn.Sequential(
            ConvBN(in_chans, c0, 3, 2, act=True, deploy=deploy),
            ConvBN(c0, c0, 3, groups=c0, act=True, deploy=deploy),
            ConvBN(c0, c0, 1, act=True, deploy=deploy),
            ConvBN(c0, c0, 3, 2, groups=c0, act=True, deploy=deploy),
        )
        # one rate per (RepLKBlock, ConvFFN) pair, shared by both blocks and rising linearly from 0, as the
        # official torch.linspace(0, drop_path_rate, sum(layers)); python floats: models are also built on meta
        count = sum(layers)
        rates = [drop_path_rate * i / max(count - 1, 1) for i in range(count)]
        for i, (k, n, c) in enumerate(zip(kernels, layers, channels)):
            blocks: list[nn.Module] = []
            for _ in range(n):
                rate = rates.pop(0)
                blocks.append(RepLKBlock(c, int(c * dw_ratio), k, small_kernel, rate, deploy))
                blocks.append(ConvFFN(c, int(c * ffn_ratio), rate, deploy))
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
            if i < 3:
                nxt = channels[i + 1]
                self.add_module(f"transition{i + 1}", nn.Sequential(
                    ConvBN(c, nxt, 1, act=True, deploy=deploy),
                    ConvBN(nxt, nxt, 3, 2, groups=nxt, act=True, deploy=deploy),
                ))
        self.head = NormPoolHead(self.num_features, num_classes, deploy)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map ``(N, channels[-1], H/32, W/32)`` (before the final BN)."""
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"stage{i}")(x)
            if i < 4:
                x = getattr(self, f"transition{i}")(x)
        return x

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(features, pre_logits)


_31B_CFG = ModelCfg(input_size=(224, 224), fixed_size=False, num_features=1024,
                    feature_channels=(128, 256, 512, 1024), feature_strides=(4, 8, 16, 32))
_31B_TINY_CFG = replace(_31B_CFG, input_size=(64, 64), num_features=128, feature_channels=(16, 32, 64, 128))
# the published 31L is the ImageNet-22K model fine-tuned at 384; XL is pretrained on MegData-73M and fine-tuned
# at 320 with mean = std = 0.5 per channel (timm's IMAGENET_INCEPTION_MEAN/STD), as the official README says
_31L_CFG = replace(_31B_CFG, input_size=(384, 384), num_features=1536, feature_channels=(192, 384, 768, 1536))
_XL_CFG = replace(_31B_CFG, input_size=(320, 320), num_features=2048, feature_channels=(256, 512, 1024, 2048),
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@register_model(cfg=_31B_CFG)
def replknet_31b(**kwargs: Any) -> RepLKNet:
    """RepLKNet-31B: kernels 31/29/27/13 with a parallel 5x5; 83.5% ImageNet top-1 at 224, 79M parameters."""
    return RepLKNet(**kwargs)


@register_model(cfg=_31L_CFG)
def replknet_31l(**kwargs: Any) -> RepLKNet:
    """RepLKNet-31L: 31B's kernels, 1.5x its widths; 86.6% ImageNet top-1 at 384 (ImageNet-22K pretrained), 172M parameters."""
    return RepLKNet(**{"channels": (192, 384, 768, 1536), "img_size": 384, **kwargs})


@register_model(cfg=_XL_CFG)
def replknet_xl(**kwargs: Any) -> RepLKNet:
    """RepLKNet-XL: kernels 27/27/27/13 without a small kernel, depthwise 1.5x wide; 87.8% ImageNet top-1 at
    320 (MegData-73M pretrained; inputs normalized with mean = std = 0.5), 335M parameters."""
    return RepLKNet(**{"kernels": (27, 27, 27, 13), "channels": (256, 512, 1024, 2048), "small_kernel": None,
                       "dw_ratio": 1.5, "img_size": 320, **kwargs})


@register_model(cfg=_31B_TINY_CFG)
def replknet_31b_tiny(**kwargs: Any) -> RepLKNet:
    """A 64x64-input RepLKNet for tests: kernels 13/11/7/5 with a parallel 3x3, one pair per stage."""
    return RepLKNet(**{"kernels": (13, 11, 7, 5), "layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128),
                       "small_kernel": 3, "drop_path_rate": 0.1, "img_size": 64, "num_classes": 10, **kwargs})
