"""The RepMLPNet checkpoint layouts as test data: the official one (DingXiaoH/RepMLP @ 3eff13f,
``repmlpnet.py``) and MMPretrain's (open-mmlab/mmpretrain @ ee7f2e8,
``mmpretrain/models/backbones/repmlp.py``).

- builders that write a state dict in either train form from the code's key and shape listing
  (registration order), with random float64 tensors and randomized BN statistics, or meta tensors;
- the conversion both codes apply (``RepMLPBlock.local_inject``: ``fc3`` + ``fc3_bn`` and the
  ``repconv`` branches merged into a biased ``fc3`` through the identity-matrix trick), written
  here independently of this project's math;
- an independent functional forward of the official network over the official keys (``F.conv2d``,
  ``F.batch_norm``; no code of this project's models), MMPretrain's being the same computation
  under the names :func:`mmpretrain_to_official` maps back.

Used by tests/backbones/test_published_repmlpnet.py.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

from published_layouts import BN_EPS, _Builder

_T = dict(channels=(64, 128, 256, 512), layers=(2, 2, 6, 2), sharesets=(1, 4, 16, 128))
_B = dict(channels=(96, 192, 384, 768), layers=(2, 2, 12, 2), sharesets=(1, 4, 32, 128))
_D = dict(channels=(80, 160, 320, 640), layers=(2, 2, 18, 2), sharesets=(1, 4, 16, 128))
_L = dict(channels=(96, 192, 384, 768), layers=(2, 2, 18, 2), sharesets=(1, 4, 32, 256))
_AT224, _AT256 = dict(hs=(56, 28, 14, 7)), dict(hs=(64, 32, 16, 8))

# model_map of repmlpnet.py: official name → (registered name, create_RepMLPNet_* arguments); all
# use reparam_conv_k (1, 3), globalperceptron_reduce 4, ws = hs
PUBLISHED_REPMLPNET = {
    "RepMLPNet-T224": ("repmlpnet_t224", {**_T, **_AT224}),
    "RepMLPNet-B224": ("repmlpnet_b224", {**_B, **_AT224}),
    "RepMLPNet-T256": ("repmlpnet_t256", {**_T, **_AT256}),
    "RepMLPNet-B256": ("repmlpnet_b256", {**_B, **_AT256}),
    "RepMLPNet-D256": ("repmlpnet_d256", {**_D, **_AT256}),
    "RepMLPNet-L256": ("repmlpnet_l256", {**_L, **_AT256}),
}
# MMPretrain's model zoo (configs/repmlp/metafile.yml): arch 'b' at img_size 224 and 256, the
# config's reparam_conv_kernels (1, 3), 1000 classes; Parameters 68.24M and 96.45M
PUBLISHED_MMPRETRAIN = {
    "repmlp-base_3rdparty_8xb64_in1k": ("repmlpnet_b224", dict(img_size=224), 68.24),
    "repmlp-base_3rdparty_8xb64_in1k-256px": ("repmlpnet_b256", dict(img_size=256), 96.45),
}
MMPRETRAIN_B = dict(channels=(96, 192, 384, 768), layers=(2, 2, 12, 2), sharesets=(1, 4, 32, 128))


def official_repmlpnet(channels, layers, sharesets, hs, ws=None, kernels=(1, 3), gp_reduce: int = 4,
                       classes: int = 10, seed: int | None = 0) -> dict[str, Tensor]:
    """The train-form state dict of the official ``RepMLPNet(num_class=classes, num_blocks=layers,
    channels, hs, ws, sharesets_nums=sharesets, reparam_conv_k=kernels, globalperceptron_reduce)``,
    keys in the order the official modules register them (``conv_embedding``, ``stages``,
    ``embeds``, ``head_norm``, ``head``; in a unit ``repmlp_block``, ``ffn_block``, ``prebn1``,
    ``prebn2``). ``seed=None``: meta tensors (shapes only)."""
    ws = hs if ws is None else ws
    b = _Builder(seed)
    b.conv_bn("conv_embedding", channels[0], 3, 4, 1)
    for i, (c, n, s, h, w) in enumerate(zip(channels, layers, sharesets, hs, ws)):
        for j in range(n):
            p = f"stages.{i}.{j}."
            b.conv(p + "repmlp_block.gp.fc1", c // gp_reduce, c, 1, bias=True)
            b.conv(p + "repmlp_block.gp.fc2", c, c // gp_reduce, 1, bias=True)
            b.conv(p + "repmlp_block.fc3", s * h * w, h * w, 1)  # Conv2d(S*h*w, S*h*w, 1, groups=S)
            b.bn(p + "repmlp_block.fc3_bn", s)
            for k in kernels:
                b.conv_bn(p + f"repmlp_block.repconv{k}", s, s, k, s)
            b.conv_bn(p + "ffn_block.ffn_fc1", 4 * c, c, 1, 1)
            b.conv_bn(p + "ffn_block.ffn_fc2", c, 4 * c, 1, 1)
            b.bn(p + "prebn1", c)
            b.bn(p + "prebn2", c)
    for i in range(len(channels) - 1):
        b.conv_bn(f"embeds.{i}", channels[i + 1], channels[i], 2, 1)
    b.bn("head_norm", channels[-1])
    b.linear("head", classes, channels[-1])
    return b.sd


def make_divisible(value: float, divisor: int = 8, min_ratio: float = 0.9) -> int:
    """mmpretrain.models.utils.make_divisible (min_value = divisor): the nearest multiple of
    ``divisor``, raised by one when that loses more than 10%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < min_ratio * value else new


def mmpretrain_repmlpnet(channels, layers, sharesets, img_size: int, kernels=(1, 3), classes: int = 1000,
                         seed: int | None = 0, classifier: bool = True) -> dict[str, Tensor]:
    """The train-form state dict of MMPretrain's ``RepMLPNet(arch=dict(channels, depths=layers,
    sharesets_nums=sharesets), img_size, reparam_conv_kernels=kernels)``: per stage ``h = w =
    img_size // 4 // 2**i``, the Global Perceptron (``SELayer``, ``ConvModule`` with bias)
    ``make_divisible(C // 4, 8)`` wide. ``classifier``: inside an ``ImageClassifier`` (keys under
    ``backbone.``, then ``head.fc``), else the backbone alone."""
    b = _Builder(seed)
    pre = "backbone." if classifier else ""
    b.conv(pre + "patch_embed.projection", channels[0], 3, 4)
    b.bn(pre + "patch_embed.norm", channels[0])
    for i, (c, n, s) in enumerate(zip(channels, layers, sharesets)):
        h = img_size // 4 // 2 ** i
        hidden = make_divisible(c // 4, 8)
        for j in range(n):
            p = f"{pre}stages.{i}.{j}."
            b.conv(p + "repmlp_block.gp.conv1.conv", hidden, c, 1, bias=True)
            b.conv(p + "repmlp_block.gp.conv2.conv", c, hidden, 1, bias=True)
            b.conv(p + "repmlp_block.fc3", s * h * h, h * h, 1)
            b.bn(p + "repmlp_block.fc3_bn", s)
            for k in kernels:
                b.conv_bn(p + f"repmlp_block.repconv{k}", s, s, k, s)
            b.conv_bn(p + "ffn_block.ffn_fc1", 4 * c, c, 1, 1)
            b.conv_bn(p + "ffn_block.ffn_fc2", c, 4 * c, 1, 1)
            b.bn(p + "norm1", c)
            b.bn(p + "norm2", c)
    for i in range(len(channels) - 1):
        b.conv_bn(f"{pre}downsample_layers.{i}", channels[i + 1], channels[i], 2, 1)
    b.bn(pre + "final_norm", channels[-1])
    if classifier:
        b.linear("head.fc", classes, channels[-1])
    return b.sd


# MMPretrain → official names, read from the two codes (the module under test maps both to this project's)
_MMPRETRAIN_TO_OFFICIAL = [
    (r"^backbone\.", ""), (r"^patch_embed\.projection\.", "conv_embedding.conv."),
    (r"^patch_embed\.norm\.", "conv_embedding.bn."), (r"\.norm1\.", ".prebn1."), (r"\.norm2\.", ".prebn2."),
    (r"\.gp\.conv([12])\.conv\.", r".gp.fc\1."), (r"^downsample_layers\.", "embeds."),
    (r"^final_norm\.", "head_norm."), (r"^head\.fc\.", "head."),
]


def mmpretrain_to_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, repl in _MMPRETRAIN_TO_OFFICIAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# --------------------------------------------------------------------------- the official conversion
def _fold(sd: dict[str, Tensor], conv: str, bn: str) -> tuple[Tensor, Tensor]:
    """The official ``fuse_bn(conv_or_fc, bn)``: each BN channel scales ``weight.size(0) // len(bn)``
    consecutive rows (``repeat_interleave``): fc3's ``S*h*w`` rows over the ``S`` sharesets."""
    std = (sd[bn + "running_var"] + BN_EPS).sqrt()
    t = sd[bn + "weight"] / std
    bias = sd[bn + "bias"] - sd[bn + "running_mean"] * t
    weight = sd[conv + "weight"]
    repeat = weight.shape[0] // t.numel()
    return weight * t.repeat_interleave(repeat).reshape(-1, 1, 1, 1), bias.repeat_interleave(repeat)


def locality_injection(train: dict[str, Tensor], hs, ws=None) -> dict[str, Tensor]:
    """``RepMLPNet.locality_injection()`` (official) = ``switch_to_deploy()`` (MMPretrain) on a state
    dict of either layout: in every ``repmlp_block``, ``fc3`` with ``fc3_bn`` folded plus the
    ``repconv`` branches (BN folded, zero-padded to the largest kernel, summed) turned into an FC by
    ``_convert_conv_to_fc`` (the identity ``eye(h*w)`` repeated over the ``S`` groups, convolved,
    reshaped to ``(h*w, S*h*w)`` and transposed) become ``fc3.weight/bias``; ``fc3_bn`` and the
    ``repconv``s go; every other tensor stays. ``hs``/``ws``: the partition per stage."""
    ws = hs if ws is None else ws
    out: dict[str, Tensor] = {}
    for key, value in train.items():
        if ".repmlp_block." not in key or not (key.endswith("fc3.weight") or ".fc3_bn." in key or ".repconv" in key):
            out[key] = value
        elif key.endswith("repmlp_block.fc3.weight"):
            p = key[: -len("fc3.weight")]
            stage = int(re.search(r"stages\.(\d+)\.", key).group(1))
            h, w = hs[stage], ws[stage]
            weight, bias = _fold(train, p + "fc3.", p + "fc3_bn.")
            ks = sorted(int(m.group(1)) for k in train if k.startswith(p)
                        and (m := re.fullmatch(re.escape(p) + r"repconv(\d+)\.conv\.weight", k)))
            if ks:
                kernel, kbias = _fold(train, f"{p}repconv{ks[-1]}.conv.", f"{p}repconv{ks[-1]}.bn.")
                for k in ks[:-1]:
                    small, sbias = _fold(train, f"{p}repconv{k}.conv.", f"{p}repconv{k}.bn.")
                    kernel, kbias = kernel + F.pad(small, [(ks[-1] - k) // 2] * 4), kbias + sbias
                s = kernel.shape[0]
                eye = torch.eye(h * w, dtype=kernel.dtype, device=kernel.device).repeat(1, s).reshape(h * w, s, h, w)
                fc = F.conv2d(eye, kernel, padding=(kernel.shape[2] // 2, kernel.shape[3] // 2), groups=s)
                weight = weight + fc.reshape(h * w, s * h * w).t().reshape_as(weight)
                bias = bias + kbias.repeat_interleave(h * w)
            out[p + "fc3.weight"], out[p + "fc3.bias"] = weight, bias
    return out


# --------------------------------------------------------------------------- the official forward
def _bn(sd: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], False, 0.0, BN_EPS)


def _conv_bn(sd: dict[str, Tensor], prefix: str, x: Tensor, stride: int = 1) -> Tensor:
    """``conv_bn`` of ``repmlpnet.py``: a bias-free conv (padding k//2, groups from the kernel) then BN."""
    w = sd[prefix + "conv.weight"]
    x = F.conv2d(x, w, None, stride, w.shape[-1] // 2 if stride == 1 else 0, 1, x.shape[1] // w.shape[1])
    return _bn(sd, prefix + "bn.", x)


def _repmlp_block(sd: dict[str, Tensor], p: str, x: Tensor, h: int, w: int, official_order: bool) -> Tensor:
    """``RepMLPBlock.forward``: the Global Perceptron's gate times the partition FC ``fc3`` (+
    ``fc3_bn``) plus the ``repconv`` branches over the ``h x w`` partitions, channel ``c`` through
    FC ``c mod S``. ``official_order``: reassemble the partitions as ``partition_affine`` does
    (``reshape(-1, h_parts, w_parts, S, h, w)`` of rows ordered ``(N, h_parts, w_parts, C/S, S)``);
    else put each partition back where it came from. Both are the same with one partition per map
    (``h_parts = w_parts = 1``) or one channel per shareset (``C == S``)."""
    n, c, height, width = x.shape
    gate = F.adaptive_avg_pool2d(x, 1)
    gate = F.relu(F.conv2d(gate, sd[p + "gp.fc1.weight"], sd[p + "gp.fc1.bias"]))
    gate = torch.sigmoid(F.conv2d(gate, sd[p + "gp.fc2.weight"], sd[p + "gp.fc2.bias"])).view(-1, c, 1, 1)
    fc3 = sd[p + "fc3.weight"]
    s = fc3.shape[0] // fc3.shape[1]
    hp, wp = height // h, width // w
    parts = x.reshape(n, c, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5)  # (N, hp, wp, C, h, w)
    out = F.conv2d(parts.reshape(-1, s * h * w, 1, 1), fc3, sd.get(p + "fc3.bias"), groups=s).reshape(-1, s, h, w)
    if p + "fc3_bn.weight" in sd:
        out = _bn(sd, p + "fc3_bn.", out)
    ks = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(re.escape(p) + r"repconv(\d+)\.conv\.weight", k)))
    for k in ks:
        out = out + _conv_bn(sd, f"{p}repconv{k}.", parts.reshape(-1, s, h, w))
    if official_order:
        out = out.reshape(-1, hp, wp, s, h, w).permute(0, 3, 1, 4, 2, 5)
    else:
        out = out.reshape(n, hp, wp, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(n, c, height, width) * gate


def repmlpnet_forward(sd: dict[str, Tensor], x: Tensor, hs, ws=None, official_order: bool = True) -> Tensor:
    """``RepMLPNet.forward`` (official keys, train or deploy form): ``conv_embedding`` (4x4/4
    conv_bn_relu); per stage its units, ``y = x + repmlp_block(prebn1(x))``, ``x = y +
    ffn_block(prebn2(y))`` with ``ffn_block = ffn_fc2(gelu(ffn_fc1(.)))``, then ``embeds[i]`` (2x2/2
    conv_bn_relu) but after the last; ``head_norm``, average pool, ``head`` (without one, as a
    backbone saved alone: the pooled ``(N, C)`` features). ``hs``/``ws``: the partition per stage;
    ``official_order``: see :func:`_repmlp_block`."""
    ws = hs if ws is None else ws
    x = F.relu(_conv_bn(sd, "conv_embedding.", x, 4))
    i = 0
    while f"stages.{i}.0.prebn1.weight" in sd:
        j = 0
        while f"stages.{i}.{j}.prebn1.weight" in sd:
            p = f"stages.{i}.{j}."
            x = x + _repmlp_block(sd, p + "repmlp_block.", _bn(sd, p + "prebn1.", x), hs[i], ws[i], official_order)
            ffn = F.gelu(_conv_bn(sd, p + "ffn_block.ffn_fc1.", _bn(sd, p + "prebn2.", x)))
            x = x + _conv_bn(sd, p + "ffn_block.ffn_fc2.", ffn)
            j += 1
        if f"embeds.{i}.conv.weight" in sd:
            x = F.relu(_conv_bn(sd, f"embeds.{i}.", x, 2))
        i += 1
    pooled = _bn(sd, "head_norm.", x).mean((2, 3))
    return F.linear(pooled, sd["head.weight"], sd["head.bias"]) if "head.weight" in sd else pooled


def param_count(sd: dict[str, Tensor]) -> int:
    """The parameters of a state dict: every tensor but the BN running statistics."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return sum(v.numel() for k, v in sd.items() if not k.endswith(stats))
