"""The official RepLKNet checkpoint layout as test data (DingXiaoH/RepLKNet-pytorch @ b76808a,
``replknet.py``): a builder that writes a state dict in the official train form from the official
code's key and shape listing, with random float64 tensors and randomized BN statistics; the
official deploy forms derived from it by the official merge math, written here independently
(``ReparamLargeKernelConv.merge_kernel`` via ``structural_reparam``, and ``deep_fuse_BN``); and an
independent functional forward of the official network over such a state dict (``F.conv2d``,
``F.batch_norm``; no code of this project's models). Used by tests/backbones/test_published_replknet.py.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from published_layouts import BN_EPS, _Builder

# create_RepLKNet31B / 31L / XL: official name → (registered name, RepLKNet arguments); all have
# layers [2, 2, 18, 2] and ffn_ratio 4
PUBLISHED_REPLKNET = {
    "RepLKNet-31B": ("replknet_31b", dict(kernels=(31, 29, 27, 13), channels=(128, 256, 512, 1024), small_kernel=5)),
    "RepLKNet-31L": ("replknet_31l", dict(kernels=(31, 29, 27, 13), channels=(192, 384, 768, 1536), small_kernel=5)),
    "RepLKNet-XL": ("replknet_xl", dict(kernels=(27, 27, 27, 13), channels=(256, 512, 1024, 2048), small_kernel=None,
                                        dw_ratio=1.5)),
}
# the official README's #params column (ImageNet-1K / 22K / MegData-73M tables), in millions
PUBLISHED_PARAMS_M = {"RepLKNet-31B": 79, "RepLKNet-31L": 172, "RepLKNet-XL": 335}


def official_replknet(kernels, channels, small_kernel, layers=(2, 2, 18, 2), dw_ratio: float = 1.0,
                      ffn_ratio: float = 4.0, classes: int = 10, seed: int | None = 0) -> dict[str, Tensor]:
    """The train-form state dict of the official ``RepLKNet(large_kernel_sizes, layers, channels,
    drop_path_rate, small_kernel, dw_ratio, ffn_ratio, num_classes=classes)``, keys in the order the
    official modules register them. ``seed=None``: meta tensors (shapes only)."""
    b = _Builder(seed)
    c0 = channels[0]
    for i, (cin, cout, k, groups) in enumerate([(3, c0, 3, 1), (c0, c0, 3, c0), (c0, c0, 1, 1), (c0, c0, 3, c0)]):
        b.conv_bn(f"stem.{i}", cout, cin, k, groups)
    for s, (k, n, c) in enumerate(zip(kernels, layers, channels)):
        dw, hidden = int(c * dw_ratio), int(c * ffn_ratio)
        for j in range(n):
            lk = f"stages.{s}.blocks.{2 * j}."  # RepLKBlock: pw1, pw2, large_kernel, prelkb_bn
            b.conv_bn(lk + "pw1", dw, c, 1, 1)
            b.conv_bn(lk + "pw2", c, dw, 1, 1)
            b.conv_bn(lk + "large_kernel.lkb_origin", dw, dw, k, dw)
            if small_kernel is not None:
                b.conv_bn(lk + "large_kernel.small_conv", dw, dw, small_kernel, dw)
            b.bn(lk + "prelkb_bn", c)
            ffn = f"stages.{s}.blocks.{2 * j + 1}."  # ConvFFN: preffn_bn, pw1, pw2
            b.bn(ffn + "preffn_bn", c)
            b.conv_bn(ffn + "pw1", hidden, c, 1, 1)
            b.conv_bn(ffn + "pw2", c, hidden, 1, 1)
        if s < len(layers) - 1:
            nxt = channels[s + 1]
            b.conv_bn(f"transitions.{s}.0", nxt, c, 1, 1)
            b.conv_bn(f"transitions.{s}.1", nxt, nxt, 3, nxt)
    b.bn("norm", channels[-1])
    b.linear("head", classes, channels[-1])
    return b.sd


def _fold(sd: dict[str, Tensor], prefix: str) -> tuple[Tensor, Tensor]:
    """The official ``fuse_bn(conv, bn)``: kernel * gamma/std, beta - mean * gamma/std."""
    t = sd[prefix + "bn.weight"] / (sd[prefix + "bn.running_var"] + BN_EPS).sqrt()
    return (sd[prefix + "conv.weight"] * t.reshape(-1, 1, 1, 1),
            sd[prefix + "bn.bias"] - sd[prefix + "bn.running_mean"] * t)


def official_structural_reparam(train: dict[str, Tensor]) -> dict[str, Tensor]:
    """``RepLKNet.structural_reparam()``: in every ``large_kernel``, ``lkb_origin`` (+ ``small_conv``
    zero-padded to the centre) becomes ``lkb_reparam.weight/bias``; every other tensor stays."""
    out: dict[str, Tensor] = {}
    for key, value in train.items():
        if ".large_kernel." not in key:
            out[key] = value
        elif key.endswith("lkb_origin.conv.weight"):
            lk = key[: -len("lkb_origin.conv.weight")]
            weight, bias = _fold(train, lk + "lkb_origin.")
            if lk + "small_conv.conv.weight" in train:
                small_w, small_b = _fold(train, lk + "small_conv.")
                pad = (weight.shape[-1] - small_w.shape[-1]) // 2
                weight, bias = weight + F.pad(small_w, [pad] * 4), bias + small_b
            out[lk + "lkb_reparam.weight"], out[lk + "lkb_reparam.bias"] = weight, bias
    return out


def official_deep_fuse_bn(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``RepLKNet.deep_fuse_BN()`` with plain BatchNorm2d: every ``conv``-``bn`` Sequential becomes a
    biased ``conv`` (its ``bn`` an Identity, no keys); the pre-BNs and the final ``norm`` stay."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith(".conv.weight") and key[: -len("conv.weight")] + "bn.weight" in sd:
            prefix = key[: -len("conv.weight")]
            out[prefix + "conv.weight"], out[prefix + "conv.bias"] = _fold(sd, prefix)
        elif ".bn." not in key:
            out[key] = value
    return out


# --------------------------------------------------------------------------- the official forward
def _conv_bn(sd: dict[str, Tensor], prefix: str, x: Tensor, stride: int = 1) -> Tensor:
    """``conv_bn`` of ``replknet.py``: conv (padding k//2; groups from the kernel) then BN, or the
    biased conv alone after ``deep_fuse_BN``."""
    w = sd[prefix + "conv.weight"]
    x = F.conv2d(x, w, sd.get(prefix + "conv.bias"), stride, w.shape[-1] // 2, 1, x.shape[1] // w.shape[1])
    return _bn(sd, prefix + "bn.", x) if prefix + "bn.weight" in sd else x


def _bn(sd: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], False, 0.0, BN_EPS)


def replknet_forward(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """``RepLKNet.forward`` (``num_classes`` set): stem (4 conv_bn_relu), per stage its blocks and
    the transition (1x1 conv_bn_relu, then depthwise 3x3 stride-2 conv_bn_relu), ``norm``, average
    pool, ``head``. ``RepLKBlock``: ``x + pw2(relu(large_kernel(relu(pw1(prelkb_bn(x))))))`` with
    ``large_kernel = lkb_origin + small_conv`` or ``lkb_reparam``; ``ConvFFN``:
    ``x + pw2(gelu(pw1(preffn_bn(x))))``. Drop path is the identity in eval."""
    for i, stride in enumerate((2, 1, 1, 2)):
        x = F.relu(_conv_bn(sd, f"stem.{i}.", x, stride))
    s = 0
    while f"stages.{s}.blocks.0.prelkb_bn.weight" in sd:
        j = 0
        while f"stages.{s}.blocks.{j}.pw1.conv.weight" in sd:
            p = f"stages.{s}.blocks.{j}."
            if p + "prelkb_bn.weight" in sd:
                out = F.relu(_conv_bn(sd, p + "pw1.", _bn(sd, p + "prelkb_bn.", x)))
                if p + "large_kernel.lkb_reparam.weight" in sd:
                    w = sd[p + "large_kernel.lkb_reparam.weight"]
                    lk = F.conv2d(out, w, sd[p + "large_kernel.lkb_reparam.bias"], 1, w.shape[-1] // 2, 1, w.shape[0])
                else:
                    lk = _conv_bn(sd, p + "large_kernel.lkb_origin.", out)
                    if p + "large_kernel.small_conv.conv.weight" in sd:
                        lk = lk + _conv_bn(sd, p + "large_kernel.small_conv.", out)
                x = x + _conv_bn(sd, p + "pw2.", F.relu(lk))
            else:
                x = x + _conv_bn(sd, p + "pw2.", F.gelu(_conv_bn(sd, p + "pw1.", _bn(sd, p + "preffn_bn.", x))))
            j += 1
        if f"transitions.{s}.0.conv.weight" in sd:
            x = F.relu(_conv_bn(sd, f"transitions.{s}.1.", F.relu(_conv_bn(sd, f"transitions.{s}.0.", x)), 2))
        s += 1
    return F.linear(_bn(sd, "norm.", x).mean((2, 3)), sd["head.weight"], sd["head.bias"])


def param_count(sd: dict[str, Tensor]) -> int:
    """The parameters of a state dict: every tensor but the BN running statistics."""
    return sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
