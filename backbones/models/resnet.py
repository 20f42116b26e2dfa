"""ResNet (torchvision-style bottleneck, stride on the 3x3) and RepMLP-ResNet.

One class covers both: the baseline ResNet-50 is a ResNet without RepMLP stages. Stages are
numbered as in the paper, c2..c5 (``layer1..layer4``). In each RepMLP stage every block but
the first (which changes resolution or width) is a RepMLP Bottleneck or Light block.

A network is a list of four :class:`StageCfg` plus the stem and head arguments of :class:`ResNet`.
Every factory takes ``num_classes`` (0: headless, ``forward`` returns pooled features) and
``deploy`` (build the converted structure directly), and as overrides any argument of
:class:`ResNet` but ``stages`` and any per-stage list of :func:`resnet_stages`.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional

from torch import Tensor, nn

from ..layers.classifier import PooledClassifier
from ..layers.conv_types import ConvType, make_conv
from ..layers.convbn import ConvBN, conv_shortcut
from ..layers.geometry import ConvGeometry
from ..layers.helpers import to_pair
from ..layers.init import zero_init_output_norms
from ..layers.repmlp import Kernels, RepMLP
from ..layers.repmlp_blocks import RepMLPBottleneck, RepMLPCfg, RepMLPLight
from ..reparam.block import ReparamBlock
from .registry import ModelCfg, register_model

Size = tuple[int, int]



def _check_partition_fits(img_size: Size, stage_sizes: list[Size], stages: Sequence[StageCfg]) -> None:
    """The error a RepMLP block would raise for its feature map, told in terms of ``img_size``."""
    checked = [(i, stage.repmlp) for i, stage in enumerate(stages) if stage.has_repmlp and not stage.repmlp.pad_input]
    # an img_size that is a multiple of partition x (total stride) fits every RepMLP stage
    multiple = [1, 1]
    for i, mlp in checked:
        total_stride = 4 * math.prod(stage.stride for stage in stages[:i + 1])
        multiple = [math.lcm(m, p * total_stride) for m, p in zip(multiple, to_pair(mlp.partition))]
    for i, mlp in checked:
        size, partition = stage_sizes[i], to_pair(mlp.partition)
        if size[0] % partition[0] or size[1] % partition[1]:
            raise ValueError(
                f"ResNet: img_size {img_size[0]}x{img_size[1]} gives a {size[0]}x{size[1]} feature map in RepMLP "
                f"stage c{i + 2}, which is not a multiple of the partition {partition[0]}x{partition[1]}; use an "
                f"img_size whose height is a multiple of {multiple[0]} and width a multiple of {multiple[1]}, "
                "or pass pad_input=True"
            )


class Bottleneck(ReparamBlock):
    """1x1 → 3x3 (stride, dilation; a ``conv_type`` conv) → 1x1, plus shortcut, then ReLU.

    ``(N, in_channels, H, W)`` → ``(N, out_channels, ceil(H/stride), ceil(W/stride))``.
    """

    last_unit = "conv3"  # the conv unit before the shortcut add (zero-initialized; fused with the add at deploy)

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        deploy: bool = False,
        conv_type: ConvType = "conv",
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.conv1 = ConvBN(in_channels, mid_channels, 1, act=True, deploy=deploy)
        self.conv2 = make_conv(conv_type, mid_channels, mid_channels, ConvGeometry(3, stride, dilation=dilation),
                               act=True, deploy=deploy)
        self.conv3 = ConvBN(mid_channels, out_channels, 1, deploy=deploy)
        self.shortcut = conv_shortcut(in_channels, out_channels, stride, deploy)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        return self.relu(self.conv3(out) + self.shortcut(x))


class BasicBlock(ReparamBlock):
    """3x3 (stride) → 3x3, both ``conv_type`` convs, plus shortcut, then ReLU (ResNet-18/34).

    ``(N, in_channels, H, W)`` → ``(N, out_channels, ceil(H/stride), ceil(W/stride))``.
    """

    last_unit = "conv2"  # the conv unit before the shortcut add (zero-initialized; fused with the add at deploy)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        deploy: bool = False,
        conv_type: ConvType = "conv",
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.conv1 = make_conv(conv_type, in_channels, out_channels, ConvGeometry(3, stride, dilation=dilation),
                               act=True, deploy=deploy)
        self.conv2 = make_conv(conv_type, out_channels, out_channels, ConvGeometry(3, dilation=dilation),
                               deploy=deploy)
        self.shortcut = conv_shortcut(in_channels, out_channels, stride, deploy)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


@dataclass(frozen=True)
class StageCfg:
    """One stage (c2..c5) of a :class:`ResNet`: ``depth`` blocks with ``width`` output channels.

    The first block changes resolution (``stride``) or width and, in a dilated stage, uses half
    the ``dilation``. ``block``: ``"bottleneck"`` (1x1 → 3x3 → 1x1, the 3x3 ``width //
    bottleneck_ratio`` wide) or ``"basic"`` (two 3x3 convs); ``conv_type`` names the 3x3 convs
    (:mod:`backbones.layers.conv_types`). With ``repmlp`` set, every block but the first is a
    RepMLP ``repmlp_block`` (``"bottleneck"``, its RepMLP block ``repmlp_r`` times narrower than
    its 3x3 convs, or ``"light"``, ``width // 8`` wide).
    """

    depth: int
    width: int
    stride: int = 1
    dilation: int = 1
    block: Literal["bottleneck", "basic"] = "bottleneck"
    conv_type: ConvType = "conv"
    bottleneck_ratio: int = 4
    repmlp: Optional[RepMLPCfg] = None
    repmlp_block: Literal["bottleneck", "light"] = "bottleneck"
    repmlp_r: int = 1

    def __post_init__(self) -> None:
        if self.block not in ("bottleneck", "basic"):
            raise ValueError(f"ResNet: block must be 'bottleneck' or 'basic', got {self.block!r}")
        if self.repmlp_block not in ("bottleneck", "light"):
            raise ValueError(f"ResNet: repmlp_block must be 'bottleneck' or 'light', got {self.repmlp_block!r}")
        if self.block == "bottleneck" and (self.bottleneck_ratio < 1 or self.width % self.bottleneck_ratio):
            raise ValueError(f"ResNet: bottleneck_ratio={self.bottleneck_ratio} must divide the stage width "
                             f"{self.width}")
        if self.block == "basic" and self.repmlp is not None:
            raise ValueError("ResNet: RepMLP stages are built from bottlenecks; use block='bottleneck'")

    @property
    def has_repmlp(self) -> bool:
        return self.repmlp is not None and self.depth > 1

    def build(self, in_channels: int, size: Size, deploy: bool) -> nn.Sequential:
        """The stage's blocks: ``(N, in_channels, H, W)`` → ``(N, width, *size)``."""
        blocks: list[nn.Module] = []
        mid = self.width // self.bottleneck_ratio
        for j in range(self.depth):
            stride, dilation = (self.stride, max(self.dilation // 2, 1)) if j == 0 else (1, self.dilation)
            if self.block == "basic":
                blocks.append(BasicBlock(in_channels, self.width, stride, dilation, deploy, self.conv_type))
            elif j == 0 or self.repmlp is None:
                blocks.append(Bottleneck(in_channels, mid, self.width, stride, dilation, deploy, self.conv_type))
            elif self.repmlp_block == "bottleneck":
                blocks.append(RepMLPBottleneck(in_channels, mid, self.width, size, self.repmlp, r=self.repmlp_r,
                                               dilation=self.dilation, deploy=deploy))
            else:
                blocks.append(RepMLPLight(in_channels, self.width // 8, self.width, size, self.repmlp, deploy=deploy))
            in_channels = self.width
        return nn.Sequential(*blocks)


class ResNet(PooledClassifier):
    """ResNet / RepMLP-ResNet: ``(N, in_chans, H, W)`` → logits ``(N, num_classes)``.

    Args:
        stages: the four stages c2..c5 (``layer1..layer4``), see :class:`StageCfg`; the registered
            factories build them from per-stage lists (:func:`resnet_stages`).
        stem_width: channels after the stem.
        deep_stem: three 3x3 convs instead of one 7x7 (ResNet-V1c, used by mmseg's PSPNet).
        num_classes: classifier outputs; 0 builds a headless backbone.
        in_chans: input channels.
        img_size: input size the RepMLP blocks are built for (the training crop).
        zero_init_last: zero the last BN(s) of each residual block (a common recipe tweak); for
            a re-parameterized last conv, the output BN of each of its branches.
        deploy: build the converted structure.
    """

    def __init__(
        self,
        stages: Sequence[StageCfg],
        stem_width: int = 64,
        deep_stem: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        zero_init_last: bool = False,
        deploy: bool = False,
    ) -> None:
        if len(stages) != 4:
            raise ValueError(f"ResNet: stages needs one StageCfg per stage c2..c5, got {len(stages)}")
        super().__init__(stages[-1].width, num_classes, img_size, deploy)
        self.widths = tuple(stage.width for stage in stages)
        if deep_stem:
            half = stem_width // 2
            self.stem = nn.Sequential(
                ConvBN(in_chans, half, 3, 2, act=True, deploy=deploy),
                ConvBN(half, half, 3, act=True, deploy=deploy),
                ConvBN(half, stem_width, 3, act=True, deploy=deploy),
            )
        else:
            self.stem = nn.Sequential(ConvBN(in_chans, stem_width, 7, 2, act=True, deploy=deploy))
        self.maxpool = nn.MaxPool2d(3, 2, 1)

        size = tuple(math.ceil(s / 4) for s in self.img_size)  # stem and maxpool halve twice (ceil)
        self.stage_sizes: list[Size] = []
        for stage in stages:
            size = tuple(math.ceil(s / stage.stride) for s in size)
            self.stage_sizes.append(size)
        _check_partition_fits(self.img_size, self.stage_sizes, stages)

        in_channels = stem_width
        for i, (stage, size) in enumerate(zip(stages, self.stage_sizes)):
            self.add_module(f"layer{i + 1}", stage.build(in_channels, size, deploy))
            in_channels = stage.width
        self.has_repmlp = any(isinstance(m, RepMLP) for m in self.modules())
        self.add_classifier()
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and ".fc3" not in f".{name}":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last and not self.deploy:
            for m in self.modules():
                if isinstance(m, (Bottleneck, BasicBlock, RepMLPBottleneck, RepMLPLight)):
                    zero_init_output_norms(getattr(m, m.last_unit))

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Feature maps of c2..c5: ``[(N, widths[i], *stage_sizes[i]) for i in 0..3]``."""
        if self.has_repmlp and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"this RepMLP-ResNet was built for {self.img_size[0]}x{self.img_size[1]} inputs (img_size) "
                f"but got an input of shape {tuple(x.shape)}; RepMLP blocks are tied to one feature-map size: "
                "rebuild with img_size matching the data, or feed crops/sliding windows of that size"
            )
        x = self.maxpool(self.stem(x))
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """The c5 map ``(N, widths[-1], H/32, W/32)`` (or /8 with dilation)."""
        return self.forward_stages(x)[-1]



# ------------------------------------------------------------------------------- default configs
# A ResNet takes any input size and records it; with RepMLP stages it works at its img_size only.
_OS32, _OS8 = (4, 8, 16, 32), (4, 8, 8, 8)  # c2..c5 strides: plain, and output stride 8 (dilated c4, c5)
_R50_CFG = ModelCfg(input_size=(224, 224), fixed_size=False, num_features=2048,
                    feature_channels=(256, 512, 1024, 2048), feature_strides=_OS32)
_REPMLP_R50_CFG = replace(_R50_CFG, fixed_size=True)
_REPMLP_R50_320_CFG = replace(_REPMLP_R50_CFG, input_size=(320, 320))
_R18_CFG = ModelCfg(input_size=(224, 224), fixed_size=False, num_features=512,
                    feature_channels=(64, 128, 256, 512), feature_strides=_OS32)
_R18_TINY_CFG = replace(_R18_CFG, input_size=(64, 64), num_features=128, feature_channels=(16, 32, 64, 128))
_TINY_CFG = ModelCfg(input_size=(64, 64), fixed_size=False, num_features=256,
                     feature_channels=(32, 64, 128, 256), feature_strides=_OS32)
_REPMLP_TINY_CFG = replace(_TINY_CFG, fixed_size=True)
_R50_D8_CFG = replace(_R50_CFG, feature_strides=_OS8)
_REPMLP_R50_D8_713_CFG = replace(_R50_D8_CFG, input_size=(713, 713), fixed_size=True)
_TINY_D8_CFG = replace(_TINY_CFG, input_size=(128, 128), feature_strides=_OS8)
_REPMLP_TINY_D8_CFG = replace(_TINY_D8_CFG, fixed_size=True)


# ------------------------------------------------------------------------------- factories
def resnet_stages(
    layers: tuple[int, int, int, int],
    widths: tuple[int, int, int, int] = (256, 512, 1024, 2048),
    block: Literal["bottleneck", "basic"] = "bottleneck",
    conv_type: ConvType = "conv",
    bottleneck_ratio: int = 4,
    strides: tuple[int, int, int, int] = (1, 2, 2, 2),
    dilations: tuple[int, int, int, int] = (1, 1, 1, 1),
    repmlp_stages: tuple[int, ...] = (),
    repmlp_block: Literal["bottleneck", "light"] = "bottleneck",
    partition: int | tuple[int, int] = 7,
    kernels: Kernels = (1, 3, 5),
    groups: tuple[int, int, int, int] = (1, 1, 1, 1),
    bottleneck_r: tuple[int, int, int, int] = (1, 1, 1, 1),
    fc1_reduction: tuple[int, int, int, int] = (1, 1, 1, 1),
    pad_input: bool = False,
) -> list[StageCfg]:
    """The four :class:`StageCfg` of a ResNet from per-stage tuples (one entry for each of c2..c5),
    the arguments every ResNet factory accepts as overrides.

    ``repmlp_stages``: stage numbers (2..5) whose blocks after the first are RepMLP blocks, all with
    one ``partition``, ``kernels`` and ``pad_input`` and the stage's ``groups`` (the paper's "g8/16"
    is ``(1, 8, 16, 1)``), ``bottleneck_r`` and ``fc1_reduction``; see :class:`StageCfg`.
    """
    per_stage = dict(layers=layers, widths=widths, strides=strides, dilations=dilations, groups=groups,
                     bottleneck_r=bottleneck_r, fc1_reduction=fc1_reduction)
    for name, value in per_stage.items():
        if len(value) != 4:
            raise ValueError(f"ResNet: {name} needs one value per stage c2..c5, got {tuple(value)}")
    if any(s not in (2, 3, 4, 5) for s in repmlp_stages):
        raise ValueError(f"ResNet: repmlp_stages must be stage numbers 2..5 (c2..c5), got {tuple(repmlp_stages)}")
    return [
        StageCfg(
            layers[i], widths[i], strides[i], dilations[i], block=block, conv_type=conv_type,
            bottleneck_ratio=bottleneck_ratio,
            repmlp=RepMLPCfg(partition, kernels, groups[i], fc1_reduction[i], pad_input) if i + 2 in repmlp_stages
            else None,
            repmlp_block=repmlp_block, repmlp_r=bottleneck_r[i],
        )
        for i in range(4)
    ]


_NETWORK_ARGS = ("stem_width", "deep_stem", "num_classes", "in_chans", "img_size", "zero_init_last", "deploy")


def _resnet(defaults: dict[str, Any], overrides: dict[str, Any]) -> ResNet:
    """A ResNet from a factory's ``defaults`` and the user's ``overrides``: the network's own
    arguments go to :class:`ResNet`, the rest to :func:`resnet_stages`."""
    kwargs = {**defaults, **overrides}
    network = {name: kwargs.pop(name) for name in _NETWORK_ARGS if name in kwargs}
    per_stage = inspect.signature(resnet_stages).parameters
    unknown = sorted(set(kwargs) - set(per_stage))
    if unknown:
        raise TypeError(f"ResNet: unknown argument(s) {', '.join(unknown)}; a ResNet factory takes "
                        f"{', '.join([*per_stage, *_NETWORK_ARGS])}")
    return ResNet(resnet_stages(**kwargs), **network)


_R50 = dict(layers=(3, 4, 6, 3))
_TINY = dict(layers=(1, 2, 2, 1), widths=(32, 64, 128, 256), stem_width=16, img_size=64)


@register_model(cfg=_R50_CFG)
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 baseline (torchvision layout, 25.6M params); ``conv_type`` as for ResNet-18."""
    return _resnet(_R50, kwargs)


@register_model(cfg=_R50_CFG)
def resnet50_v1c(**kwargs: Any) -> ResNet:
    """ResNet-50 with the deep 3x3 stem (V1c), the backbone of mmseg's PSPNet-R50."""
    return _resnet({**_R50, "deep_stem": True}, kwargs)


@register_model(cfg=_REPMLP_R50_CFG)
def repmlp_res50_light_224(**kwargs: Any) -> ResNet:
    """RepMLP-Res50 Light blocks in c3, c4 (official ``RepMLP-Res50-light-224``): h=w=7, K=1,3,5, g=4."""
    return _resnet({**_R50, "img_size": 224, "repmlp_stages": (3, 4), "repmlp_block": "light", "partition": 7,
                    "kernels": (1, 3, 5), "groups": (1, 4, 4, 1)}, kwargs)


@register_model(cfg=_REPMLP_R50_CFG)
def repmlp_res50_g8_224(**kwargs: Any) -> ResNet:
    """RepMLP-Res50 Bottleneck-224 (official): g=8, r=(2,4), K=1,3,5, h=w=7 in c3, c4."""
    return _resnet({**_R50, "img_size": 224, "repmlp_stages": (3, 4), "partition": 7, "kernels": (1, 3, 5),
                    "groups": (1, 8, 8, 1), "bottleneck_r": (1, 2, 4, 1)}, kwargs)


def _res50_320(g3: int, g4: int, kwargs: dict[str, Any]) -> ResNet:
    return _resnet({**_R50, "img_size": 320, "repmlp_stages": (3, 4), "partition": 10, "kernels": (1, 3, 5, 7),
                    "groups": (1, g3, g4, 1), "bottleneck_r": (1, 2, 4, 1)}, kwargs)


@register_model(cfg=_REPMLP_R50_320_CFG)
def repmlp_res50_g8_16_320(**kwargs: Any) -> ResNet:
    """RepMLP-Res50 at 320 (paper's "g8/16"): g=8 in c3, 16 in c4; h=w=10, K=1,3,5,7."""
    return _res50_320(8, 16, kwargs)


@register_model(cfg=_REPMLP_R50_320_CFG)
def repmlp_res50_g8_8_320(**kwargs: Any) -> ResNet:
    """RepMLP-Res50 at 320, "g8/8"."""
    return _res50_320(8, 8, kwargs)


@register_model(cfg=_REPMLP_R50_320_CFG)
def repmlp_res50_g4_8_320(**kwargs: Any) -> ResNet:
    """RepMLP-Res50 at 320, "g4/8" (the PSPNet backbone of the paper)."""
    return _res50_320(4, 8, kwargs)


_R18 = dict(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), block="basic")


@register_model(cfg=_R18_CFG)
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (11.7M params); ``conv_type`` makes its 3x3 convs ACB/DBB/OREPA blocks."""
    return _resnet(_R18, kwargs)


@register_model(cfg=_R18_TINY_CFG)
def resnet18_tiny(**kwargs: Any) -> ResNet:
    """A 64x64-input ResNet-18 layout for tests (one basic block per stage, widths 16..128)."""
    return _resnet({**_R18, "layers": (1, 1, 1, 1), "widths": (16, 32, 64, 128), "stem_width": 16,
                    "img_size": 64, "num_classes": 10}, kwargs)


@register_model(cfg=_TINY_CFG)
def resnet_tiny(**kwargs: Any) -> ResNet:
    """A 64x64-input ResNet for tests and the demo (layers 1,2,2,1; widths 32..256)."""
    return _resnet({**_TINY, "num_classes": 10}, kwargs)


_TINY_REPMLP = {**_TINY, "num_classes": 10, "repmlp_stages": (3, 4), "partition": 4, "kernels": (1, 3),
                "groups": (1, 2, 4, 1), "bottleneck_r": (1, 2, 2, 1), "fc1_reduction": (1, 2, 2, 1)}


@register_model(cfg=_REPMLP_TINY_CFG)
def repmlp_res_tiny(**kwargs: Any) -> ResNet:
    """Tiny RepMLP-ResNet (bottleneck): c3 8x8 with 4 partitions (Global Perceptron), c4 4x4 with one."""
    return _resnet(_TINY_REPMLP, kwargs)


@register_model(cfg=_REPMLP_TINY_CFG)
def repmlp_res_light_tiny(**kwargs: Any) -> ResNet:
    """Tiny RepMLP-ResNet with Light blocks."""
    return _resnet({**_TINY_REPMLP, "repmlp_block": "light"}, kwargs)


# ------------------------------------------------------------------------------- dilated (segmentation)
# Output stride 8 as in mmseg's "D8" models: c4 and c5 keep the c3 resolution through dilation 2 and 4.
_D8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), num_classes=0)


@register_model(cfg=_R50_D8_CFG)
def resnet50_v1c_d8(**kwargs: Any) -> ResNet:
    """ResNet-50 V1c, output stride 8: the backbone of mmseg's PSPNet-R50-D8 (headless)."""
    return _resnet({**_R50, **_D8, "deep_stem": True}, kwargs)


@register_model(cfg=_REPMLP_R50_D8_713_CFG)
def repmlp_res50_g4_8_d8_713(**kwargs: Any) -> ResNet:
    """RepMLP-Res50 g4/8, output stride 8, for a 713x713 crop: c3 and c4 maps are 90x90, h=w=10,
    K=1,3,5,7, Global Perceptron fc1/fc2 reduced 4x in c3 and 8x in c4 (the paper's PSPNet backbone)."""
    return _resnet({**_R50, **_D8, "img_size": 713, "repmlp_stages": (3, 4), "partition": 10,
                    "kernels": (1, 3, 5, 7), "groups": (1, 4, 8, 1), "bottleneck_r": (1, 2, 4, 1),
                    "fc1_reduction": (1, 4, 8, 1)}, kwargs)


@register_model(cfg=_TINY_D8_CFG)
def resnet_tiny_d8(**kwargs: Any) -> ResNet:
    """Tiny V1c ResNet with output stride 8 (tests and the segmentation demo; any input size)."""
    return _resnet({**_TINY, **_D8, "deep_stem": True, "img_size": 128}, kwargs)


@register_model(cfg=_REPMLP_TINY_D8_CFG)
def repmlp_res_tiny_d8(**kwargs: Any) -> ResNet:
    """Tiny RepMLP-ResNet with output stride 8 for a 128x128 crop: c3, c4 maps 16x16, h=w=8."""
    return _resnet({**_TINY_REPMLP, **_D8, "img_size": 128, "partition": 8}, kwargs)
