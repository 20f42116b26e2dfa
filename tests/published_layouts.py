"""Published checkpoint layouts as test data: builders that write a checkpoint in the official
RepVGG (DingXiaoH/RepVGG ``repvgg.py``) and MobileOne (apple/ml-mobileone ``mobileone.py``) layouts
from their key and shape listing, with random tensors, the renames to timm's ``byobnet`` names,
and independent functional forwards of the official networks over such files (``F.conv2d`` and
``F.batch_norm`` over the keys; no code of this project's models). Used by
tests/backbones/test_published_layouts.py and the end-to-end tests."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

BN_EPS = 1e-5


# --------------------------------------------------------------------------- official key/shape builders
class _Builder:
    """Random tensors under given keys: convs ~ N(0, 1/fan_in), BN statistics randomized (float64);
    on the meta device only shapes (``seed=None``)."""

    def __init__(self, seed: int | None) -> None:
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.sd: dict[str, Tensor] = {}

    def rand(self, *shape: int, scale: float = 1.0) -> Tensor:
        if self.gen is None:
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale

    def conv(self, key: str, cout: int, cin_per_group: int, k: int, bias: bool = False) -> None:
        self.sd[key + ".weight"] = self.rand(cout, cin_per_group, k, k, scale=(cin_per_group * k * k) ** -0.5)
        if bias:
            self.sd[key + ".bias"] = self.rand(cout, scale=0.1)

    def bn(self, key: str, c: int) -> None:
        self.sd[key + ".weight"] = 1 + 0.2 * self.rand(c)
        self.sd[key + ".bias"] = 0.1 * self.rand(c)
        self.sd[key + ".running_mean"] = 0.1 * self.rand(c)
        self.sd[key + ".running_var"] = 0.5 + self.rand(c).abs()
        self.sd[key + ".num_batches_tracked"] = torch.tensor(100)

    def conv_bn(self, key: str, cout: int, cin: int, k: int, groups: int) -> None:
        self.conv(key + ".conv", cout, cin // groups, k)
        self.bn(key + ".bn", cout)

    def linear(self, key: str, classes: int, features: int) -> None:
        self.sd[key + ".weight"] = self.rand(classes, features, scale=features ** -0.5)
        self.sd[key + ".bias"] = self.rand(classes, scale=0.1)


def official_repvgg(depths, widths, stem, groups: int = 1, deploy: bool = False, classes: int = 10,
                    seed: int | None = 0) -> dict[str, Tensor]:
    """``RepVGG(num_blocks, width_multiplier, override_groups_map)`` of DingXiaoH/RepVGG: stage0 is
    a block 3 → stem (stride 2); each stage's first block has stride 2; layer ``cur_layer_idx``
    (1 for stage1's first block) is grouped when even and at most 26 (``optional_groupwise_layers``)."""
    b = _Builder(seed)

    def block(key: str, cin: int, cout: int, stride: int, g: int) -> None:
        if deploy:
            b.conv(key + ".rbr_reparam", cout, cin // g, 3, bias=True)
            return
        b.conv_bn(key + ".rbr_dense", cout, cin, 3, g)
        b.conv_bn(key + ".rbr_1x1", cout, cin, 1, g)
        if cin == cout and stride == 1:
            b.bn(key + ".rbr_identity", cin)

    block("stage0", 3, stem, 2, 1)
    cin, layer = stem, 1
    for s, (depth, width) in enumerate(zip(depths, widths)):
        for j in range(depth):
            block(f"stage{s + 1}.{j}", cin, width, 2 if j == 0 else 1, groups if layer in range(2, 27, 2) else 1)
            cin, layer = width, layer + 1
    b.linear("linear", classes, cin)
    return b.sd


def official_mobileone(depths, widths, stem, k: int, se_blocks=(0, 0, 0, 0), deploy: bool = False, classes: int = 10,
                       seed: int | None = 0) -> dict[str, Tensor]:
    """``MobileOne`` of apple/ml-mobileone: stage0 a k=1 block 3 → stem (3x3, stride 2); per stage and
    pair a depthwise 3x3 block (stride 2 first) and a pointwise 1x1 block, both with SE in the
    last ``se_blocks`` pairs; a block has ``rbr_conv.{0..k-1}``, ``rbr_scale`` when its kernel is
    3, ``rbr_skip`` when in == out and stride 1; SE ``int(C * 0.0625)`` wide."""
    b = _Builder(seed)

    def block(key: str, cin: int, cout: int, kernel: int, stride: int, groups: int, branches: int, se: bool) -> None:
        if deploy:
            b.conv(key + ".reparam_conv", cout, cin // groups, kernel, bias=True)
        else:
            for i in range(branches):
                b.conv_bn(f"{key}.rbr_conv.{i}", cout, cin, kernel, groups)
            if kernel > 1:
                b.conv_bn(key + ".rbr_scale", cout, cin, 1, groups)
            if cin == cout and stride == 1:
                b.bn(key + ".rbr_skip", cin)
        if se:
            rd = int(cout * 0.0625)
            b.conv(key + ".se.reduce", rd, cout, 1, bias=True)
            b.conv(key + ".se.expand", cout, rd, 1, bias=True)

    block("stage0", 3, stem, 3, 2, 1, 1, False)
    cin = stem
    for s, (depth, width, n_se) in enumerate(zip(depths, widths, se_blocks)):
        for j in range(depth):
            se = j >= depth - n_se
            block(f"stage{s + 1}.{2 * j}", cin, cin, 3, 2 if j == 0 else 1, cin, k, se)
            block(f"stage{s + 1}.{2 * j + 1}", cin, width, 1, 1, 1, k, se)
            cin = width
    b.linear("linear", classes, cin)
    return b.sd


# official → timm byobnet names (timm/models/byobnet.py: ByobNet stem/stages/head.fc, RepVggBlock,
# MobileOneBlock, SEModule fc1/fc2)
TIMM_RENAMES = [
    (r"^stage0\.", "stem."), (r"^stage(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"\.rbr_dense\.", ".conv_kxk."), (r"\.rbr_1x1\.", ".conv_1x1."), (r"\.rbr_identity\.", ".identity."),
    (r"\.rbr_skip\.", ".identity."), (r"\.rbr_conv\.", ".conv_kxk."), (r"\.rbr_scale\.", ".conv_scale."),
    (r"\.rbr_reparam\.", ".reparam_conv."), (r"\.se\.reduce\.", ".attn.fc1."), (r"\.se\.expand\.", ".attn.fc2."),
    (r"^linear\.", "head.fc."),
]


def to_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, repl in TIMM_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# --------------------------------------------------------------------------- the official forwards
def _bn(sd: dict[str, Tensor], key: str, x: Tensor) -> Tensor:
    return F.batch_norm(x, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"],
                        sd[key + ".bias"], False, 0.0, BN_EPS)


def _conv(sd: dict[str, Tensor], key: str, x: Tensor, stride: int) -> Tensor:
    w = sd[key + ".weight"]
    return F.conv2d(x, w, sd.get(key + ".bias"), stride, w.shape[-1] // 2, 1, x.shape[1] // w.shape[1])


def repvgg_forward(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """DingXiaoH/RepVGG's ``RepVGGBlock.forward``: ``relu(dense + 1x1 + identity)`` (deploy
    ``relu(rbr_reparam(x))``), stages, global average pool, ``linear``."""
    def block(key: str, x: Tensor, stride: int) -> Tensor:
        if key + ".rbr_reparam.weight" in sd:
            return F.relu(_conv(sd, key + ".rbr_reparam", x, stride))
        out = _bn(sd, key + ".rbr_dense.bn", _conv(sd, key + ".rbr_dense.conv", x, stride))
        out = out + _bn(sd, key + ".rbr_1x1.bn", _conv(sd, key + ".rbr_1x1.conv", x, stride))
        if key + ".rbr_identity.weight" in sd:
            out = out + _bn(sd, key + ".rbr_identity", x)
        return F.relu(out)

    x = block("stage0", x, 2)
    for s in range(1, 5):
        j = 0
        while f"stage{s}.{j}.rbr_reparam.weight" in sd or f"stage{s}.{j}.rbr_dense.conv.weight" in sd:
            x = block(f"stage{s}.{j}", x, 2 if j == 0 else 1)
            j += 1
    return F.linear(x.mean((2, 3)), sd["linear.weight"], sd["linear.bias"])


def mobileone_forward(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """apple/ml-mobileone's ``MobileOneBlock.forward``: ``relu(se(sum of branches))`` (deploy
    ``relu(se(reparam_conv(x)))``), the stride 2 on each stage's first depthwise block."""
    def block(key: str, x: Tensor, stride: int) -> Tensor:
        if key + ".reparam_conv.weight" in sd:
            out = _conv(sd, key + ".reparam_conv", x, stride)
        else:
            out = sum(_bn(sd, f"{key}.rbr_conv.{i}.bn", _conv(sd, f"{key}.rbr_conv.{i}.conv", x, stride))
                      for i in range(sum(k.startswith(f"{key}.rbr_conv.") and k.endswith(".conv.weight") for k in sd)))
            if key + ".rbr_scale.conv.weight" in sd:
                out = out + _bn(sd, key + ".rbr_scale.bn", _conv(sd, key + ".rbr_scale.conv", x, stride))
            if key + ".rbr_skip.weight" in sd:
                out = out + _bn(sd, key + ".rbr_skip", x)
        if key + ".se.reduce.weight" in sd:
            squeeze = F.avg_pool2d(out, kernel_size=list(out.shape[-2:]))
            squeeze = _conv(sd, key + ".se.expand", F.relu(_conv(sd, key + ".se.reduce", squeeze, 1)), 1)
            out = out * torch.sigmoid(squeeze).view(-1, out.shape[1], 1, 1)
        return F.relu(out)

    x = block("stage0", x, 2)
    for s in range(1, 5):
        j = 0
        while any(k.startswith(f"stage{s}.{j}.") for k in sd):
            x = block(f"stage{s}.{j}", x, 2 if j == 0 else 1)
            j += 1
    return F.linear(x.mean((2, 3)), sd["linear.weight"], sd["linear.bias"])


# --------------------------------------------------------------------------- the published sizes
def repvgg_size(a: float, b: float, depths=(2, 4, 14, 1)) -> dict:
    """The README's definition: widths 64a, 128a, 256a, 512b; stem min(64, 64a)."""
    return dict(depths=depths, widths=[int(64 * a), int(128 * a), int(256 * a), int(512 * b)], stem=min(64, int(64 * a)))


_B = (4, 6, 16, 1)
PUBLISHED_REPVGG = {  # official name → (registered name, size, groups)
    "RepVGG-A0": ("repvgg_a0", repvgg_size(0.75, 2.5), 1), "RepVGG-A1": ("repvgg_a1", repvgg_size(1, 2.5), 1),
    "RepVGG-A2": ("repvgg_a2", repvgg_size(1.5, 2.75), 1), "RepVGG-B0": ("repvgg_b0", repvgg_size(1, 2.5, _B), 1),
    "RepVGG-B1": ("repvgg_b1", repvgg_size(2, 4, _B), 1), "RepVGG-B1g2": ("repvgg_b1g2", repvgg_size(2, 4, _B), 2),
    "RepVGG-B1g4": ("repvgg_b1g4", repvgg_size(2, 4, _B), 4), "RepVGG-B2": ("repvgg_b2", repvgg_size(2.5, 5, _B), 1),
    "RepVGG-B2g4": ("repvgg_b2g4", repvgg_size(2.5, 5, _B), 4), "RepVGG-B3": ("repvgg_b3", repvgg_size(3, 5, _B), 1),
    "RepVGG-B3g4": ("repvgg_b3g4", repvgg_size(3, 5, _B), 4),
}
PUBLISHED_MOBILEONE = {  # variant → (width multipliers, k, se_blocks), apple/ml-mobileone's PARAMS
    "s0": ((0.75, 1.0, 1.0, 2.0), 4, (0, 0, 0, 0)), "s1": ((1.5, 1.5, 2.0, 2.5), 1, (0, 0, 0, 0)),
    "s2": ((1.5, 2.0, 2.5, 4.0), 1, (0, 0, 0, 0)), "s3": ((2.0, 2.5, 3.0, 4.0), 1, (0, 0, 0, 0)),
    "s4": ((3.0, 3.5, 3.5, 4.0), 1, (0, 0, 5, 1)),
}


def mobileone_size(variant: str) -> dict:
    m, k, se = PUBLISHED_MOBILEONE[variant]
    return dict(depths=(2, 8, 10, 1), widths=[int(c * w) for c, w in zip((64, 128, 256, 512), m)],
                stem=min(64, int(64 * m[0])), k=k, se_blocks=se)


def shapes(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


