"""The official ACNet ImageNet ResNets (DingXiaoH/ACNet @ 748fb0c) as test data: a builder that writes
a checkpoint in their layout from the official code's key and shape listing (random float64 tensors,
randomized BN statistics), the official train → deploy conversion (``acnet/acnet_fusion.py``) written
again here, a writer of HDF5 files as the official engine writes them, and an independent functional
forward of the official networks over such files (``F.conv2d`` / ``F.batch_norm`` / ``F.relu`` over
the keys; no code of this project's models). Used by tests/backbones/test_published_acnet.py.

The official trees:

- ``sres18`` / ``sres34``: ``base_model/resnet.py:ResNet`` with ``BasicBlock``: ``conv1`` (7x7/2
  conv-BN-ReLU), ``F.max_pool2d(3, 2, 1)``, ``stage{1..4}.{j}`` with ``conv1`` (3x3, the stride;
  Conv2dBNReLU, so an ACB sits in ``Sequential(acb, relu)``), ``conv2`` (3x3 Conv2dBN: the ACB
  itself), ``shortcut`` (1x1 conv-BN when stride != 1 or in != out), ``gap`` (AvgPool2d(7, 7)),
  ``linear``; stage widths ``64 w, 128 w, 256 w, 512 w`` (``w`` = ``deps[0]``, default 1).
- ``sres50``: ``base_model/stagewise_resnet.py:SBottleneckResNet``: ``conv1``, max-pool,
  ``stage{s}.projection`` (1x1 conv-BN, the stride; on every stage), ``stage{s}.block{j}.conv1``
  (1x1 conv-BN-ReLU), ``conv2`` (3x3 Conv2dBNReLU with the stride: ``conv2.acb``), ``conv3`` (1x1
  conv-BN); ``relu(projection + block0)``, then ``relu(x + block_j(x))``; ``gap``; ``fc``.
- ``acnet/acnet_builder.py:ACNetBuilder`` makes a conv an ACBlock when 1 < k < 7 (the 3x3s);
  ``acnet/acb.py:ACBlock``: ``square_conv`` (k x k, padding p) + ``square_bn``, ``ver_conv`` (k x 1,
  padding (p, p - k//2)) + ``ver_bn``, ``hor_conv`` (1 x k, padding (p - k//2, p)) + ``hor_bn``,
  summed; deploy ``fused_conv`` (with bias). BN eps 1e-5 (``builder.py:ConvBuilder``).
"""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from published_layouts import BN_EPS, _Builder

_BRANCHES = ("square", "ver", "hor")


# --------------------------------------------------------------------------- the key/shape builder
def _acb_entries(b: _Builder, key: str, cout: int, cin: int, k: int = 3) -> None:
    """An ACBlock's train-time entries: three convs (k x k, k x 1, 1 x k) each with its BN."""
    for branch, (kh, kw) in zip(_BRANCHES, ((k, k), (k, 1), (1, k))):
        b.sd[f"{key}.{branch}_conv.weight"] = b.rand(cout, cin, kh, kw, scale=(cin * kh * kw) ** -0.5)
        b.bn(f"{key}.{branch}_bn", cout)


def official_acnet_resnet(block: str, layers, widths, stem: int, classes: int = 10, acb: bool = True,
                          deploy: bool = False, seed: int | None = 0) -> dict[str, Tensor]:
    """A checkpoint of the official ACNet ResNet: ``block="basic"`` builds ``ResNet`` (sres18/34),
    ``"bottleneck"`` ``SBottleneckResNet`` (sres50; ``widths`` are the stage outputs, the 3x3 a
    quarter as wide). ``acb=False``: the ``-b base`` baseline (plain conv-BNs). ``deploy``: the file
    :func:`convert_acnet_weights` writes from the train one. ``seed=None``: shapes only (meta)."""
    b = _Builder(seed)

    def conv3x3(key: str, cout: int, cin: int, relu_seq: bool) -> None:
        if acb:  # Conv2dBNReLU wraps the ACB in Sequential(acb, relu); Conv2dBN returns it bare
            _acb_entries(b, key + (".acb" if relu_seq else ""), cout, cin)
        else:
            b.conv_bn(key, cout, cin, 3, 1)

    b.conv_bn("conv1", stem, 3, 7, 1)
    cin = stem
    for s, (depth, width) in enumerate(zip(layers, widths), start=1):
        stride = 1 if s == 1 else 2
        if block == "basic":
            for j in range(depth):
                conv3x3(f"stage{s}.{j}.conv1", width, cin, relu_seq=True)
                conv3x3(f"stage{s}.{j}.conv2", width, width, relu_seq=False)
                if (stride if j == 0 else 1) != 1 or cin != width:
                    b.conv_bn(f"stage{s}.{j}.shortcut", width, cin, 1, 1)
                cin = width
        else:
            mid = width // 4
            b.conv_bn(f"stage{s}.projection", width, cin, 1, 1)
            for j in range(depth):
                b.conv_bn(f"stage{s}.block{j}.conv1", mid, cin, 1, 1)
                conv3x3(f"stage{s}.block{j}.conv2", mid, mid, relu_seq=True)
                b.conv_bn(f"stage{s}.block{j}.conv3", width, mid, 1, 1)
                cin = width
    b.linear("linear" if block == "basic" else "fc", classes, cin)
    return convert_acnet_weights(b.sd) if deploy and acb else b.sd


def official_size(name: str) -> dict:
    """``sres18`` / ``sres34`` / ``sres50`` as ``do_acnet.py`` builds them (``deps=None``):
    ``create_ResNet18`` / ``create_ResNet34`` (BasicBlock [2,2,2,2] / [3,4,6,3], width multiplier 1)
    and ``create_SResNet50`` (``RESNET50_ORIGIN_DEPS_FLATTENED``: stem 64; stages 256/512/1024/2048
    wide with 64/128/256/512 inside, [3,4,6,3] blocks); 1000 classes."""
    if name in ("sres18", "sres34"):
        layers = (2, 2, 2, 2) if name == "sres18" else (3, 4, 6, 3)
        return dict(block="basic", layers=layers, widths=(64, 128, 256, 512), stem=64, classes=1000)
    return dict(block="bottleneck", layers=(3, 4, 6, 3), widths=(256, 512, 1024, 2048), stem=64, classes=1000)


# --------------------------------------------------------------------------- the official conversion
def convert_acnet_weights(train: dict[str, Tensor], eps: float = BN_EPS) -> dict[str, Tensor]:
    """``acnet/acnet_fusion.py:convert_acnet_weights`` over tensors: for every ``square_conv.weight``,
    each branch's kernel times gamma/std, the 3x1 and 1x3 kernels added onto the centre column and
    row of the square one, the biases ``beta - mean * gamma / std`` summed, as ``fused_conv``; every
    key without ``hor_``/``ver_``/``square_`` copied (the other conv-BNs stay unfused)."""
    deploy: dict[str, Tensor] = {}
    for name in [k for k in train if k.endswith("square_conv.weight")]:
        prefix = name[: -len("square_conv.weight")]
        kernel, bias = None, 0
        for branch in _BRANCHES:
            w = train[f"{prefix}{branch}_conv.weight"]
            std = (train[f"{prefix}{branch}_bn.running_var"] + eps).sqrt()
            gamma, beta = train[f"{prefix}{branch}_bn.weight"], train[f"{prefix}{branch}_bn.bias"]
            w = w * (gamma / std).reshape(-1, 1, 1, 1)
            bias = bias + beta - train[f"{prefix}{branch}_bn.running_mean"] * gamma / std
            if kernel is None:
                kernel = w.clone()
            else:  # the official _add_to_square_kernel: centred on the square kernel
                sh, sw, ah, aw = *kernel.shape[2:], *w.shape[2:]
                kernel[:, :, sh // 2 - ah // 2: sh // 2 - ah // 2 + ah, sw // 2 - aw // 2: sw // 2 - aw // 2 + aw] += w
        deploy[prefix + "fused_conv.weight"] = kernel
        deploy[prefix + "fused_conv.bias"] = bias
    deploy.update({k: v for k, v in train.items() if "hor_" not in k and "ver_" not in k and "square_" not in k})
    return deploy


# --------------------------------------------------------------------------- files as the official engine writes them
def save_official_hdf5(sd: dict[str, Tensor], path, deps=None) -> str:
    """``utils/engine.py:save_hdf5`` + ``utils/misc.py:save_hdf5``: a numpy array per state-dict key
    (``module.`` removed), ``deps`` when the config sets it, one dataset each, named ``str(k)``
    with ``/`` written as ``+``."""
    import h5py

    arrays = {k[7:] if k.split(".")[0] == "module" else k: v.cpu().numpy() for k, v in sd.items()}
    if deps is not None:
        arrays["deps"] = np.asarray(deps)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(str(k).replace("/", "+"), data=v)
    return str(path)


# --------------------------------------------------------------------------- the official forward
def _bn(sd: dict[str, Tensor], key: str, x: Tensor) -> Tensor:
    return F.batch_norm(x, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"],
                        sd[key + ".bias"], False, 0.0, BN_EPS)


def _conv_bn(sd: dict[str, Tensor], key: str, x: Tensor, stride: int = 1, relu: bool = False) -> Tensor:
    """ConvBuilder's Conv2dBN(ReLU) (``key.conv``, ``key.bn``; padding k // 2), or an ACBlock under
    ``key`` when the file has one."""
    if key + ".square_conv.weight" in sd or key + ".fused_conv.weight" in sd:
        out = _acb_forward(sd, key, x, stride)
    else:
        w = sd[key + ".conv.weight"]
        out = _bn(sd, key + ".bn", F.conv2d(x, w, None, stride, w.shape[-1] // 2))
    return F.relu(out) if relu else out


def _acb_forward(sd: dict[str, Tensor], key: str, x: Tensor, stride: int) -> Tensor:
    """``ACBlock.forward`` for the ResNets' 3x3 convs (k = 3, padding 1, so ``crop == 0``)."""
    if key + ".fused_conv.weight" in sd:
        return F.conv2d(x, sd[key + ".fused_conv.weight"], sd[key + ".fused_conv.bias"], stride, 1)
    k, p = sd[key + ".square_conv.weight"].shape[-1], 1
    paddings = {"square": (p, p), "ver": (p, p - k // 2), "hor": (p - k // 2, p)}
    return sum(_bn(sd, f"{key}.{b}_bn", F.conv2d(x, sd[f"{key}.{b}_conv.weight"], None, stride, paddings[b]))
               for b in _BRANCHES)


def acnet_resnet_forward(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """The official ``ResNet.forward`` (``linear`` in the file) or ``SBottleneckResNet.forward``
    (``fc``), train-time or deploy form: logits ``(N, classes)``. ``GAP`` is the official
    ``AvgPool2d(7, stride=7)`` + flatten, so inputs must give a 7x7 c5 map (193..224 pixels)."""
    def sub(key: str) -> str:  # Conv2dBNReLU's ACB sits under ``.acb``
        return key + ".acb" if any(k.startswith(key + ".acb.") for k in sd) else key

    x = F.max_pool2d(_conv_bn(sd, "conv1", x, 2, relu=True), 3, 2, 1)
    bottleneck = "fc.weight" in sd
    for s in range(1, 5):
        stride = 1 if s == 1 else 2
        if bottleneck:
            j = 0
            while f"stage{s}.block{j}.conv1.conv.weight" in sd:
                key = f"stage{s}.block{j}"
                st = stride if j == 0 else 1
                out = _conv_bn(sd, key + ".conv1", x, relu=True)
                out = _conv_bn(sd, key + ".conv3", _conv_bn(sd, sub(key + ".conv2"), out, st, relu=True))
                x = F.relu((_conv_bn(sd, f"stage{s}.projection", x, stride) if j == 0 else x) + out)
                j += 1
        else:
            j = 0
            while any(k.startswith(f"stage{s}.{j}.") for k in sd):
                key = f"stage{s}.{j}"
                st = stride if j == 0 else 1
                out = _conv_bn(sd, key + ".conv2", _conv_bn(sd, sub(key + ".conv1"), x, st, relu=True))
                short = _conv_bn(sd, key + ".shortcut", x, st) if key + ".shortcut.conv.weight" in sd else x
                x = F.relu(out + short)
                j += 1
    if x.shape[-2:] != (7, 7):
        raise ValueError(f"the official GAP (AvgPool2d(7, 7)) needs a 7x7 c5 map, got {tuple(x.shape[-2:])}")
    x = F.avg_pool2d(x, 7, 7).flatten(1)
    head = "fc" if bottleneck else "linear"
    return F.linear(x, sd[head + ".weight"], sd[head + ".bias"])
