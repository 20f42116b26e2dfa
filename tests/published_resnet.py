"""Published DBB and OREPA ResNet layouts as test data.

Builders write a checkpoint of the official ResNets of DingXiaoH/DiverseBranchBlock (``resnet.py``,
``diversebranchblock.py``, ``convnet_utils.py`` @ 8d2b16b) and JUGGHM/OREPA_CVPR2022
(``models/resnet.py``, ``blocks.py``, ``basic.py`` @ 3ed037b) from their key and shape listing, with
random float64 tensors and randomized BN statistics; the deploy form is derived from the train form
by the official merge math, written here. :func:`official_forward` is an independent functional
forward of both official networks over such a file (``F.conv2d``, ``F.batch_norm`` and the
official ``weight_gen`` compositions over the keys; no code of this project's models or of
``backbones.reparam``). Used by tests/backbones/test_published_resnets.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from published_layouts import BN_EPS, _Builder

OREPA_VECTOR_INIT = (0.25, 0.25, 0.0, 0.5, 1.0, 0.5)  # blocks.py: origin, avg, prior, 1x1_kxk, 1x1, dws
OR1X1_VECTOR_INIT = (1.0, 0.5)  # blocks.py OREPA_1x1: origin, l2i
EXPAND = 8  # OREPA's depthwise-separable branch: 8 depthwise filters per input channel


# --------------------------------------------------------------------------- the official networks' keys
class _ResNetBuilder(_Builder):
    """Adds the buffers and scale vectors of the OREPA blocks to the generic builder."""

    def near(self, base: Tensor | float, *shape: int, spread: float = 0.2) -> Tensor:
        """A trained value around ``base`` (the official initialization)."""
        if self.gen is None:
            return torch.empty(*shape, device="meta")
        return torch.as_tensor(base, dtype=torch.float64).expand(*shape) + spread * self.rand(*shape)

    def constant(self, make, *shape: int) -> Tensor:
        """A buffer the official block computes (``make()``), of ``shape``."""
        return torch.empty(*shape, device="meta") if self.gen is None else make()

    # ---- DBB (diversebranchblock.py, groups 1: the 1x1 branch exists, internal width = in)
    def dbb(self, key: str, cin: int, cout: int, k: int = 3) -> None:
        self.conv_bn(key + ".dbb_origin", cout, cin, k, 1)
        self.conv(key + ".dbb_avg.conv", cout, cin, 1)
        self.bn(key + ".dbb_avg.bn.bn", cout)  # BNAndPadLayer holds its BN as .bn
        self.bn(key + ".dbb_avg.avgbn", cout)
        self.conv_bn(key + ".dbb_1x1", cout, cin, 1, 1)
        # IdentityBasedConv1x1: a learned residual on the identity (zero-initialized, trained)
        self.sd[key + ".dbb_1x1_kxk.idconv1.weight"] = self.rand(cin, cin, 1, 1, scale=0.1)
        self.bn(key + ".dbb_1x1_kxk.bn1.bn", cin)
        self.conv(key + ".dbb_1x1_kxk.conv2", cout, cin, k)
        self.bn(key + ".dbb_1x1_kxk.bn2", cout)

    # ---- OREPA (blocks.py, groups 1: internal width = in, id_tensor registered)
    def orepa(self, key: str, cin: int, cout: int, k: int = 3, weight_only: bool = False) -> None:
        sd, p = self.sd, key + "."
        for name, shape in (("origin", (cout, cin, k, k)), ("avg_conv", (cout, cin, 1, 1)),
                            ("pfir_conv", (cout, cin, 1, 1)), ("1x1", (cout, cin, 1, 1)),
                            ("1x1_kxk_conv2", (cout, cin, k, k)), ("gconv_dw", (cin * EXPAND, 1, k, k)),
                            ("gconv_pw", (cout, cin * EXPAND, 1, 1))):
            sd[p + "weight_orepa_" + name] = self.rand(*shape, scale=math.prod(shape[1:]) ** -0.5)
        sd[p + "weight_orepa_1x1_kxk_idconv1"] = self.rand(cin, cin, 1, 1, scale=0.1)
        sd[p + "vector"] = self.near(torch.tensor(OREPA_VECTOR_INIT, dtype=torch.float64)[:, None], 6, cout)
        if not weight_only:
            self.bn(p + "bn", cout)
        # buffers: the average kernel, the identity of the 1x1 -> KxK branch, the frequency prior
        f64 = torch.float64
        sd[p + "weight_orepa_avg_avg"] = self.constant(lambda: torch.full((k, k), 1.0 / (k * k), dtype=f64), k, k)
        sd[p + "id_tensor"] = self.constant(lambda: torch.eye(cin, dtype=f64)[:, :, None, None], cin, cin, 1, 1)
        sd[p + "weight_orepa_prior"] = self.constant(lambda: fre_init(cout, k), cout, k, k)

    def or1x1(self, key: str, cin: int, cout: int) -> None:
        """OREPA_1x1: origin, and two 1x1 convs of which the one on the smaller side starts as the identity."""
        p = key + "."
        self.sd[p + "weight_or1x1_origin"] = self.rand(cout, cin, 1, 1, scale=cin ** -0.5)
        if cout > cin:
            self.sd[p + "weight_or1x1_l2i_conv1"] = self.near(torch.eye(cin, dtype=torch.float64)[:, :, None, None],
                                                               cin, cin, 1, 1, spread=0.1)
            self.sd[p + "weight_or1x1_l2i_conv2"] = self.rand(cout, cin, 1, 1, scale=cin ** -0.5)
        else:
            self.sd[p + "weight_or1x1_l2i_conv1"] = self.rand(cout, cin, 1, 1, scale=cin ** -0.5)
            self.sd[p + "weight_or1x1_l2i_conv2"] = self.near(torch.eye(cout, dtype=torch.float64)[:, :, None, None],
                                                               cout, cout, 1, 1, spread=0.1)
        self.sd[p + "vector"] = self.near(torch.tensor(OR1X1_VECTOR_INIT, dtype=torch.float64)[:, None], 2, cout)
        self.bn(p + "bn", cout)

    def large(self, key: str, cin: int, cout: int, k: int = 7) -> None:
        """OREPA_LargeConv: (k-1)/2 weight-only 3x3 OREPAs ``weight{i}`` (internal width = out), one BN."""
        layers = (k - 1) // 2
        for i in range(layers):
            self.orepa(f"{key}.weight{i}", cin if i == 0 else cout, cout, 3, weight_only=True)
        self.bn(key + ".bn", cout)


def fre_init(channels: int, k: int = 3) -> Tensor:
    """OREPA's ``fre_init`` prior ``(C, k, k)`` (filled for the first 3x3, as the official loop)."""
    prior = torch.zeros(channels, k, k, dtype=torch.float64)
    half = channels / 2
    for i in range(channels):
        for h in range(3):
            for w in range(3):
                prior[i, h, w] = (math.cos(math.pi * (h + 0.5) * (i + 1) / 3) if i < half
                                  else math.cos(math.pi * (w + 0.5) * (i + 1 - half) / 3))
    return prior


def official_resnet(kind: str, block: str, num_blocks, width: float = 1.0, classes: int = 1000,
                    deploy: bool = False, seed: int | None = 0) -> dict[str, Tensor]:
    """The state dict of ``ResNet(BasicBlock | Bottleneck, num_blocks, num_classes, width_multiplier)``
    built after ``switch_conv_bn_impl('DBB' | 'OREPA')`` (``kind`` "dbb" or "orepa"), train form,
    or the deploy form ``convert.py`` writes from it (:func:`official_deploy`).

    DBB: blocks only for 1 < k < 7 (the 3x3s), ConvBN elsewhere. OREPA: the 3x3s OREPA, the 1x1s
    OREPA_1x1 (bottleneck conv1/conv3/shortcut), the stem OREPA_LargeConv, ResNet-18's shortcut a
    ConvBN (``assign_type``). Stage ``s`` has ``int(64 * 2^s * width)`` planes, expansion 4 for the
    bottleneck, the stride on the first block of stages 2-4 (the bottleneck's 3x3).
    """
    b = _ResNetBuilder(seed)
    conv3 = b.dbb if kind == "dbb" else b.orepa

    def conv1x1(key: str, cin: int, cout: int, always_conv_bn: bool = False) -> None:
        if kind == "orepa" and not always_conv_bn:
            b.or1x1(key, cin, cout)
        else:
            b.conv_bn(key, cout, cin, 1, 1)

    in_planes = int(64 * width)
    if kind == "dbb":
        b.conv_bn("stage0.conv1", in_planes, 3, 7, 1)
    else:
        b.large("stage0.conv1", 3, in_planes, 7)
    expansion = 4 if block == "bottleneck" else 1
    for s, depth in enumerate(num_blocks):
        planes = int(64 * 2 ** s * width)
        for j in range(depth):
            key, stride = f"stage{s + 1}.{j}", 2 if s > 0 and j == 0 else 1
            if stride != 1 or in_planes != expansion * planes:
                conv1x1(key + ".shortcut", in_planes, expansion * planes, always_conv_bn=block == "basic")
            if block == "basic":
                conv3(key + ".conv1", in_planes, planes)
                conv3(key + ".conv2", planes, planes)
            else:
                conv1x1(key + ".conv1", in_planes, planes)
                conv3(key + ".conv2", planes, planes)
                conv1x1(key + ".conv3", planes, expansion * planes)
            in_planes = expansion * planes
    b.linear("linear", classes, in_planes)
    return official_deploy(b.sd) if deploy else b.sd


# --------------------------------------------------------------------------- the official merge math
def _bn_scale_shift(sd: dict[str, Tensor], key: str) -> tuple[Tensor, Tensor]:
    """dbb_transforms.py transI: ``bn(x) = x * gamma / std + (beta - mean * gamma / std)``."""
    std = (sd[key + ".running_var"] + BN_EPS).sqrt()
    scale = sd[key + ".weight"] / std
    return scale, sd[key + ".bias"] - sd[key + ".running_mean"] * scale


def _fuse(kernel: Tensor, sd: dict[str, Tensor], bn: str) -> tuple[Tensor, Tensor]:
    scale, shift = _bn_scale_shift(sd, bn)
    return kernel * scale.reshape(-1, 1, 1, 1), shift


def _trans_1x1_kxk(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """transIII (groups 1): ``F.conv2d(k2, k1.permute(1, 0, 2, 3))``, bias through the KxK."""
    return F.conv2d(k2, k1.permute(1, 0, 2, 3)), (k2 * b1.reshape(1, -1, 1, 1)).sum((1, 2, 3)) + b2


def _dbb_kernel_bias(sd: dict[str, Tensor], key: str) -> tuple[Tensor, Tensor]:
    """``DiverseBranchBlock.get_equivalent_kernel_bias`` (groups 1)."""
    k_origin, b_origin = _fuse(sd[key + ".dbb_origin.conv.weight"], sd, key + ".dbb_origin.bn")
    k = k_origin.shape[-1]
    k_1x1, b_1x1 = _fuse(sd[key + ".dbb_1x1.conv.weight"], sd, key + ".dbb_1x1.bn")
    k_1x1 = F.pad(k_1x1, [(k - 1) // 2] * 4)  # transVI
    first = sd[key + ".dbb_1x1_kxk.idconv1.weight"]
    first = first + torch.eye(first.shape[0], dtype=first.dtype, device=first.device)[:, :, None, None]
    k1, b1 = _fuse(first, sd, key + ".dbb_1x1_kxk.bn1.bn")
    k2, b2 = _fuse(sd[key + ".dbb_1x1_kxk.conv2.weight"], sd, key + ".dbb_1x1_kxk.bn2")
    k_kxk, b_kxk = _trans_1x1_kxk(k1, b1, k2, b2)
    out = k_origin.shape[0]
    avg = torch.zeros(out, out, k, k, dtype=k_origin.dtype, device=k_origin.device)  # transV
    avg[torch.arange(out), torch.arange(out)] = 1.0 / k ** 2
    k_avg2, b_avg2 = _fuse(avg, sd, key + ".dbb_avg.avgbn")
    k_avg1, b_avg1 = _fuse(sd[key + ".dbb_avg.conv.weight"], sd, key + ".dbb_avg.bn.bn")
    k_avg, b_avg = _trans_1x1_kxk(k_avg1, b_avg1, k_avg2, b_avg2)
    return k_origin + k_1x1 + k_kxk + k_avg, b_origin + b_1x1 + b_kxk + b_avg


def orepa_weight_gen(sd: dict[str, Tensor], key: str) -> Tensor:
    """``OREPA.weight_gen`` (groups 1), with the file's buffers."""
    p, v = key + ".", sd[key + ".vector"]

    def scaled(kernel: Tensor, row: int) -> Tensor:
        return torch.einsum("oihw,o->oihw", kernel, v[row])

    origin = scaled(sd[p + "weight_orepa_origin"], 0)
    avg = scaled(torch.einsum("oi,hw->oihw", sd[p + "weight_orepa_avg_conv"][:, :, 0, 0],
                              sd[p + "weight_orepa_avg_avg"]), 1)
    pfir = scaled(torch.einsum("oi,ohw->oihw", sd[p + "weight_orepa_pfir_conv"][:, :, 0, 0],
                               sd[p + "weight_orepa_prior"]), 2)
    conv1 = (sd[p + "weight_orepa_1x1_kxk_idconv1"] + sd[p + "id_tensor"])[:, :, 0, 0]
    kxk = scaled(torch.einsum("ti,othw->oihw", conv1, sd[p + "weight_orepa_1x1_kxk_conv2"]), 3)
    k = origin.shape[-1]
    one = scaled(F.pad(sd[p + "weight_orepa_1x1"], [(k - 1) // 2] * 4), 4)
    dw, pw = sd[p + "weight_orepa_gconv_dw"], sd[p + "weight_orepa_gconv_pw"]
    cin = dw.shape[0] // EXPAND
    # dwsc2full: depthwise row i*8+t of input i, then the pointwise column i*8+t
    gconv = scaled(torch.einsum("itxy,oit->oixy", dw.reshape(cin, EXPAND, k, k),
                                pw.reshape(pw.shape[0], cin, EXPAND)), 5)
    return origin + avg + one + kxk + pfir + gconv


def or1x1_weight_gen(sd: dict[str, Tensor], key: str) -> Tensor:
    """``OREPA_1x1.weight_gen``."""
    p, v = key + ".", sd[key + ".vector"]
    origin = torch.einsum("oihw,o->oihw", sd[p + "weight_or1x1_origin"], v[0])
    l2i = torch.einsum("tihw,othw->oihw", sd[p + "weight_or1x1_l2i_conv1"], sd[p + "weight_or1x1_l2i_conv2"])
    return origin + torch.einsum("oihw,o->oihw", l2i, v[1])


def large_weight_gen(sd: dict[str, Tensor], key: str) -> Tensor:
    """``OREPA_LargeConv.weight_gen``: the 3x3 kernels composed by ``F.conv2d(w, w_next, padding=2)``."""
    weight = orepa_weight_gen(sd, f"{key}.weight0").transpose(0, 1)
    i = 1
    while f"{key}.weight{i}.vector" in sd:
        weight = F.conv2d(weight, orepa_weight_gen(sd, f"{key}.weight{i}"), padding=2)
        i += 1
    return weight.transpose(0, 1)


def official_deploy(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """What ``convert.py`` writes: ``switch_to_deploy`` on every block (ConvBN → ``conv`` with bias,
    DBB → ``dbb_reparam``, OREPA → ``orepa_reparam``, OREPA_1x1 → ``or1x1_reparam``,
    OREPA_LargeConv → ``or_large_reparam``)."""
    out = {"linear.weight": sd["linear.weight"], "linear.bias": sd["linear.bias"]}
    units = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".running_mean")} - {"linear"})
    for bn in units:
        if bn.endswith((".dbb_avg.bn.bn", ".dbb_avg.avgbn", ".dbb_1x1_kxk.bn1.bn", ".dbb_1x1_kxk.bn2",
                        ".dbb_origin.bn", ".dbb_1x1.bn")):
            continue
        unit = bn[: -len(".bn")]
        if unit + ".weight_orepa_origin" in sd:
            (w, b), name = _fuse(orepa_weight_gen(sd, unit), sd, bn), "orepa_reparam"
        elif unit + ".weight_or1x1_origin" in sd:
            (w, b), name = _fuse(or1x1_weight_gen(sd, unit), sd, bn), "or1x1_reparam"
        elif unit + ".weight0.vector" in sd:
            (w, b), name = _fuse(large_weight_gen(sd, unit), sd, bn), "or_large_reparam"
        else:
            (w, b), name = _fuse(sd[unit + ".conv.weight"], sd, bn), "conv"
        out[f"{unit}.{name}.weight"], out[f"{unit}.{name}.bias"] = w, b
    for unit in sorted({k[: k.index(".dbb_origin.")] for k in sd if ".dbb_origin." in k}):
        out[unit + ".dbb_reparam.weight"], out[unit + ".dbb_reparam.bias"] = _dbb_kernel_bias(sd, unit)
    return out


# --------------------------------------------------------------------------- the official forward
MOMENTUM = 0.1  # nn.BatchNorm2d's


def _bn(sd: dict[str, Tensor], key: str, x: Tensor, training: bool = False) -> Tensor:
    """Eval: the running statistics; training: the batch's (the file's tensors stay as they are)."""
    if training:
        return F.batch_norm(x, None, None, sd[key + ".weight"], sd[key + ".bias"], True, 0.0, BN_EPS)
    return F.batch_norm(x, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"],
                        sd[key + ".bias"], False, 0.0, BN_EPS)


def _bn_and_pad(sd: dict[str, Tensor], key: str, x: Tensor, pad: int, training: bool = False) -> Tensor:
    """BNAndPadLayer: the BN, then a border of ``pad`` pixels set to ``bias - mean * weight / std`` of
    its running statistics, which in training the BN has just updated with the batch's (momentum 0.1,
    unbiased variance)."""
    y = _bn(sd, key, x, training)
    stats = sd
    if training:
        stats = {key + ".running_mean": (1 - MOMENTUM) * sd[key + ".running_mean"] + MOMENTUM * x.mean((0, 2, 3)),
                 key + ".running_var": (1 - MOMENTUM) * sd[key + ".running_var"] + MOMENTUM * x.var((0, 2, 3)),
                 key + ".weight": sd[key + ".weight"], key + ".bias": sd[key + ".bias"]}
    border = _bn_scale_shift(stats, key)[1].reshape(1, -1, 1, 1)
    out = border.expand(y.shape[0], -1, y.shape[2] + 2 * pad, y.shape[3] + 2 * pad).clone()
    out[:, :, pad:-pad, pad:-pad] = y
    return out


def _dbb(sd: dict[str, Tensor], key: str, x: Tensor, stride: int, t: bool) -> Tensor:
    """``DiverseBranchBlock.forward`` (train form, groups 1), each branch as the official one computes it."""
    w = sd[key + ".dbb_origin.conv.weight"]
    k = w.shape[-1]
    out = _bn(sd, key + ".dbb_origin.bn", F.conv2d(x, w, None, stride, k // 2), t)
    out = out + _bn(sd, key + ".dbb_1x1.bn", F.conv2d(x, sd[key + ".dbb_1x1.conv.weight"], None, stride), t)
    avg = _bn_and_pad(sd, key + ".dbb_avg.bn.bn", F.conv2d(x, sd[key + ".dbb_avg.conv.weight"]), k // 2, t)
    out = out + _bn(sd, key + ".dbb_avg.avgbn", F.avg_pool2d(avg, k, stride, 0), t)
    first = sd[key + ".dbb_1x1_kxk.idconv1.weight"]
    first = first + torch.eye(first.shape[0], dtype=first.dtype)[:, :, None, None]  # IdentityBasedConv1x1
    mid = _bn_and_pad(sd, key + ".dbb_1x1_kxk.bn1.bn", F.conv2d(x, first), k // 2, t)
    kxk = F.conv2d(mid, sd[key + ".dbb_1x1_kxk.conv2.weight"], None, stride, 0)
    return out + _bn(sd, key + ".dbb_1x1_kxk.bn2", kxk, t)


def _unit(sd: dict[str, Tensor], key: str, x: Tensor, stride: int, training: bool = False) -> Tensor:
    """One conv unit of either network in either form, without its ReLU; padding k // 2."""
    for deployed in ("dbb_reparam", "orepa_reparam", "or1x1_reparam", "or_large_reparam", "conv"):
        if f"{key}.{deployed}.bias" in sd:
            w = sd[f"{key}.{deployed}.weight"]
            return F.conv2d(x, w, sd[f"{key}.{deployed}.bias"], stride, w.shape[-1] // 2)
    if key + ".dbb_origin.conv.weight" in sd:
        return _dbb(sd, key, x, stride, training)
    if key + ".weight_orepa_origin" in sd:
        w = orepa_weight_gen(sd, key)
    elif key + ".weight_or1x1_origin" in sd:
        w = or1x1_weight_gen(sd, key)
    elif key + ".weight0.vector" in sd:
        w = large_weight_gen(sd, key)
    else:
        w = sd[key + ".conv.weight"]
    return _bn(sd, key + ".bn", F.conv2d(x, w, None, stride, w.shape[-1] // 2), training)


def official_forward(sd: dict[str, Tensor], x: Tensor, training: bool = False) -> Tensor:
    """``ResNet.forward`` of either repository: stem (ReLU), max-pool 3/2, BasicBlock
    ``relu(conv2(relu(conv1(x))) + shortcut(x))`` or Bottleneck ``relu(conv3(relu(conv2(relu(conv1(x)))))
    + shortcut(x))``, the stride on conv1 (basic) / conv2 (bottleneck) of stages 2-4's first block,
    global average pool, ``linear``. ``training``: BNs on the batch's statistics (``model.train()``)."""
    def unit(key: str, x: Tensor, stride: int) -> Tensor:
        return _unit(sd, key, x, stride, training)

    x = F.max_pool2d(F.relu(unit("stage0.conv1", x, 2)), 3, 2, 1)
    bottleneck = any(k.startswith("stage1.0.conv3.") for k in sd)
    for s in range(1, 5):
        j = 0
        while any(k.startswith(f"stage{s}.{j}.") for k in sd):
            key, stride = f"stage{s}.{j}", 2 if s > 1 and j == 0 else 1
            shortcut = unit(key + ".shortcut", x, stride) if any(k.startswith(key + ".shortcut.") for k in sd) else x
            if bottleneck:
                out = F.relu(unit(key + ".conv1", x, 1))
                out = unit(key + ".conv3", F.relu(unit(key + ".conv2", out, stride)), 1)
            else:
                out = unit(key + ".conv2", F.relu(unit(key + ".conv1", x, stride)), 1)
            x = F.relu(out + shortcut)
            j += 1
    return F.linear(x.mean((2, 3)), sd["linear.weight"], sd["linear.bias"])


# --------------------------------------------------------------------------- the published sizes
PUBLISHED_RESNETS = {  # official name → (registered name, block, num_blocks): convnet_utils.py build_model
    "ResNet-18": ("resnet18", "basic", (2, 2, 2, 2)),
    "ResNet-50": ("resnet50", "bottleneck", (3, 4, 6, 3)),
}
