"""Checkpoints of the official OREPA code's ImageNet ResNets (JUGGHM/OREPA_CVPR2022 @ 3ed037b).

``switch_conv_bn_impl('OREPA')`` + ``build_model('ResNet-18' | 'ResNet-50')`` (``convnet_utils.py``,
``models/resnet.py``) picks a block per kernel size (``choose_blk``): the 3x3 convs are ``OREPA``,
the 1x1 convs ``OREPA_1x1`` (ResNet-50's bottleneck 1x1s and shortcuts; ResNet-18's shortcuts are
assigned a plain ``ConvBN``) and the 7x7 stem an ``OREPA_LargeConv`` (``blocks.py``). Released
files (``.pth.tar``, Google Drive) are ``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer',
'scheduler'}`` saved from DDP (keys carry ``module.``), unwrapped on reading; ``convert.py`` writes
the deploy form (``switch_to_deploy`` on every block). Every file builds this project's
``resnet18`` / ``resnet50`` with ``conv_type="orepa"`` (:attr:`Weights.kwargs`), whose 3x3 OREPA
holds the official block's tensors:

==================================================  ==============================================
official                                            this project
==================================================  ==============================================
``stage0.conv1.`` (7x7 stem)                        ``stem.0.``
``stage{1..4}.{j}.``                                ``layer{1..4}.{j}.``
``weight_orepa_origin``                             ``weight_origin``
``weight_orepa_avg_conv``                           ``weight_avg``
``weight_orepa_pfir_conv``                          ``weight_prior``
``weight_orepa_prior`` (buffer)                     ``prior``
``weight_orepa_1x1_kxk_idconv1``                    ``weight_1x1_kxk_idconv``
``weight_orepa_1x1_kxk_conv2``                      ``weight_1x1_kxk_conv``
``weight_orepa_1x1``                                ``weight_1x1``
``weight_orepa_gconv_dw``, ``weight_orepa_gconv_pw``  ``weight_dw``, ``weight_pw``
``vector`` (6, O), ``bn.``                          ``vector``, ``bn.`` (rows origin, avg, prior,
                                                    1x1-KxK, 1x1, depthwise-separable in both)
``weight_orepa_avg_avg``, ``id_tensor`` (buffers)   checked to be the constants (1/K², identity)
                                                    this project's block computes, then dropped
``orepa_reparam.`` (deploy)                         ``reparam_conv.``
``or1x1_reparam.``, ``or_large_reparam.`` (deploy)  ``conv.`` (a ConvBN in deploy form)
``shortcut.{conv,bn}.`` (ResNet-18), ``linear.``    ``shortcut.{conv,bn}.``, ``fc.``
==================================================  ==============================================

**The trade.** This project's ResNet builds the 1x1 convs and the stem as plain ConvBN. A train-time
file's ``OREPA_1x1`` (``weight_or1x1_origin``, ``weight_or1x1_l2i_conv1/2``, ``vector`` (2, O))
and ``OREPA_LargeConv`` (``weight{0,1,2}``: three weight-only 3x3 OREPAs) are converted exactly
into the kernel their official ``weight_gen`` composes, which becomes the ConvBN's ``conv.weight``
(their BN stays a BN): the model computes the official function, in train and eval mode, but
fine-tuning trains those layers as plain conv-BN, not in their over-parameterized form (the
OREPA README warns that the composed stem's weights are distributed unlike a plain conv's and
suggests adjusting its learning rate). The 3x3 OREPAs stay OREPAs. Kernels are composed in the
file's dtype.

Same function otherwise: stem 7x7/2 (padding 3) + ReLU, max-pool 3/2 (padding 1), the stride on
each stage's first block (the bottleneck's on its 3x3 and its shortcut), ReLU after the add, global
mean, ``linear``. Official names ``ResNet-18`` / ``ResNet-50`` map to ``resnet18`` / ``resnet50``
(:data:`OFFICIAL_ARCHS`); ``ResNet-34`` and ``ResNet-101`` are ``resnet18`` with ``layers=(3, 4, 6,
3)`` and ``resnet50`` with ``layers=(3, 4, 23, 3)``. The grouped OREPAs of ``ResNeXt-50`` and the
``RepVGG-A*`` (``OREPA_VGG``) trees are not read by this layout.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..layers.geometry import ConvGeometry
from ..layers.orepa import OREPA
from ..reparam.math import chain_kernels, identity_kernel, merge_1x1_kxk, scaled_sum
from .formats import WeightFormat, Weights, inferred_deploy
from .io import strip_prefix
from .renamed import BN_KEYS as _BN, RenamedLayout

__all__ = ["LAYOUT", "FORMAT", "OFFICIAL_ARCHS", "NAME", "convert"]

NAME = "official OREPA ResNet checkpoint (JUGGHM/OREPA_CVPR2022)"
OFFICIAL_ARCHS = {"ResNet-18": "resnet18", "ResNet-50": "resnet50"}  # convnet_utils.py:build_model

_OREPA_TENSORS = (r"weight_orepa_(origin|avg_conv|pfir_conv|avg_avg|prior|1x1|1x1_kxk_idconv1|1x1_kxk_conv2"
                  r"|gconv_dw|gconv_pw)")
_OREPA = rf"({_OREPA_TENSORS}|id_tensor|vector|bn\.{_BN}|orepa_reparam\.(weight|bias))"  # the 3x3 OREPA
_OR1X1 = rf"(weight_or1x1_(origin|l2i_conv1|l2i_conv2)|vector|bn\.{_BN}|or1x1_reparam\.(weight|bias))"
_CONV_BN = rf"(conv\.(weight|bias)|bn\.{_BN})"
# the stem's OREPA_LargeConv; conv.weight is what its three weight-only OREPAs compose to here
_STEM = (rf"stage0\.conv1\.(weight\d+\.({_OREPA_TENSORS}|id_tensor|vector)|bn\.{_BN}|or_large_reparam\.(weight|bias)"
         r"|conv\.weight)")
LAYOUT = RenamedLayout(
    name=NAME,
    key=rf"{_STEM}|stage[1-4]\.\d+\.(conv[1-3]|shortcut)\.({_OREPA}|{_OR1X1}|{_CONV_BN})|linear\.(weight|bias)",
    rules=(
        (r"^stage0\.conv1\.", "stem.0."),
        (r"^stage([1-4])\.", r"layer\1."),
        (r"\.(or1x1_reparam|or_large_reparam)\.", ".conv."),
        (r"\.orepa_reparam\.", ".reparam_conv."),
        (r"\.weight_orepa_origin$", ".weight_origin"),
        (r"\.weight_orepa_avg_conv$", ".weight_avg"),
        (r"\.weight_orepa_pfir_conv$", ".weight_prior"),
        (r"\.weight_orepa_prior$", ".prior"),
        (r"\.weight_orepa_1x1_kxk_idconv1$", ".weight_1x1_kxk_idconv"),
        (r"\.weight_orepa_1x1_kxk_conv2$", ".weight_1x1_kxk_conv"),
        (r"\.weight_orepa_1x1$", ".weight_1x1"),
        (r"\.weight_orepa_gconv_dw$", ".weight_dw"),
        (r"\.weight_orepa_gconv_pw$", ".weight_pw"),
        (r"^linear\.", "fc."),
    ),
    signature=r"(weight_orepa_origin|orepa_reparam\.weight)$",  # a 3x3 OREPA in either form
    model_kwargs={"conv_type": "orepa"},
)

# the tensors of one official 3x3 OREPA (the buffers avg_avg and id_tensor are constants, checked and dropped)
_OREPA_NAMES = ("weight_orepa_origin", "weight_orepa_avg_conv", "weight_orepa_pfir_conv", "weight_orepa_prior",
                "weight_orepa_1x1_kxk_idconv1", "weight_orepa_1x1_kxk_conv2", "weight_orepa_1x1",
                "weight_orepa_gconv_dw", "weight_orepa_gconv_pw", "vector")
_OR1X1_NAMES = ("weight_or1x1_origin", "weight_or1x1_l2i_conv1", "weight_or1x1_l2i_conv2", "vector")


def _check_constants(sd: Mapping[str, Tensor], prefix: str, source: str) -> None:
    """The buffers an official 3x3 OREPA saves but never trains must hold the constants this
    project's OREPA computes instead (``weight_orepa_avg_avg`` = 1/K², ``id_tensor`` the identity);
    a file that changed them would compute another function."""
    k = sd[prefix + "weight_orepa_origin"].shape[-1]
    expected = {"weight_orepa_avg_avg": ("1/K^2", lambda v: torch.full((k, k), 1.0 / (k * k), dtype=v.dtype)),
                "id_tensor": ("the identity", lambda v: identity_kernel(*v.shape[:2], like=v))}
    for name, (what, make) in expected.items():
        value = sd.get(prefix + name)
        if value is None or value.is_meta:  # absent (the strict load names it) or shapes only
            continue
        value = value.cpu()
        constant = make(value)
        if value.shape != constant.shape or not torch.allclose(value, constant, rtol=1e-6, atol=0.0):
            raise ValueError(f"{source}: {prefix}{name} is not the constant the official OREPA registers ({what}); "
                             "this project's OREPA computes that constant, so the file would not load as the "
                             "same function")


def _orepa_kernel(sd: Mapping[str, Tensor], prefix: str, source: str) -> Tensor:
    """``(O, I, 3, 3)``: the kernel the official 3x3 OREPA at ``prefix`` composes (its ``weight_gen``),
    computed by this project's OREPA block built around the file's tensors (meta device, no copy)."""
    _check_constants(sd, prefix, source)
    tensors = {LAYOUT.rename("." + name)[1:]: sd[prefix + name] for name in _OREPA_NAMES}
    out_channels, in_channels, k = tensors["weight_origin"].shape[:3]
    internal = tensors["weight_1x1_kxk_idconv"].shape[0]
    if internal != in_channels:  # official groups > 4 only: its 1x1 then adds a non-square identity
        raise ValueError(f"{source}: {prefix}weight_orepa_1x1_kxk_idconv1 has {internal} rows for {in_channels} "
                         "input channels; the official ResNets' OREPAs have as many (groups 1)")
    with torch.device("meta"):
        block = OREPA(in_channels, out_channels, ConvGeometry(k), internal_channels=internal,
                      dw_multiplier=tensors["weight_dw"].shape[0] // in_channels)
    result = block.load_state_dict(tensors, strict=False, assign=True)
    missing = [name for name in result.missing_keys if not name.startswith("bn.")]
    if missing or result.unexpected_keys:  # pragma: no cover - the names above are the block's
        raise AssertionError(f"OREPA tensors do not match the block: {missing} {result.unexpected_keys}")
    return block.weight_gen()


def _or1x1_kernel(sd: Mapping[str, Tensor], prefix: str) -> Tensor:
    """``(O, I, 1, 1)``: the official ``OREPA_1x1.weight_gen`` (``vector[0]`` * origin + ``vector[1]`` *
    the product of its two 1x1 convs, ``l2i_conv1`` then ``l2i_conv2``)."""
    origin, first, second, vector = (sd[prefix + name] for name in _OR1X1_NAMES)
    return scaled_sum([origin, merge_1x1_kxk(first, None, second, None)[0]], vector)


def _composed(sd: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """``sd`` with each complete ``OREPA_LargeConv`` and ``OREPA_1x1`` replaced by a ConvBN's
    ``conv.weight`` (their ``bn.*`` stay) and the 3x3 OREPAs' constant buffers checked and dropped.
    An incomplete block is left as it is, so that loading names its keys."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".weight0.weight_orepa_origin")]:
        prefix = key[: -len("weight0.weight_orepa_origin")]
        layers = []
        while f"{prefix}weight{len(layers)}.weight_orepa_origin" in sd:
            layers.append(f"{prefix}weight{len(layers)}.")
        if not all(p + name in sd for p in layers for name in _OREPA_NAMES):
            continue
        try:
            kernel = chain_kernels([_orepa_kernel(sd, p, source) for p in layers])
        except RuntimeError as exc:  # shapes that do not chain: not an official file
            raise ValueError(f"{source}: the OREPA_LargeConv {prefix[:-1]} does not compose: {exc}") from exc
        for name in [k for k in out if any(k.startswith(p) for p in layers)]:
            del out[name]
        out[prefix + "conv.weight"] = kernel
    for key in [k for k in sd if k.endswith(".weight_or1x1_origin")]:
        prefix = key[: -len("weight_or1x1_origin")]
        if not all(prefix + name in sd for name in _OR1X1_NAMES):
            continue
        try:
            kernel = _or1x1_kernel(sd, prefix)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{source}: the OREPA_1x1 {prefix[:-1]} does not compose: {exc}") from exc
        for name in _OR1X1_NAMES:
            del out[prefix + name]
        out[prefix + "conv.weight"] = kernel
    for key in [k for k in out if k.endswith(".weight_orepa_origin")]:
        prefix = key[: -len("weight_orepa_origin")]
        _check_constants(out, prefix, source)
        out.pop(prefix + "weight_orepa_avg_avg", None)
        out.pop(prefix + "id_tensor", None)
    return out


def convert(state_dict: Mapping[str, Tensor], source: str = "<state dict>") -> dict[str, Tensor]:
    """An official OREPA ResNet state dict (train or deploy form, ``module.`` removed) in this
    project's ``resnet18``/``resnet50`` (``conv_type="orepa"``) layout; a key outside the layout
    keeps its name, so that loading it names it as the file does.

    Raises:
        ValueError: a block whose tensors do not compose, or constant buffers that were changed;
            the message names ``source`` and the block.
    """
    return LAYOUT.convert(_composed(strip_prefix(state_dict, ("module.",)), source), source)


def _read(state_dict: dict[str, Tensor], meta: dict[str, Any], path: str) -> Weights:
    converted = convert(state_dict, path)
    return Weights(path=path, format=NAME, state_dict=converted, scope="backbone", deploy=inferred_deploy(converted),
                   kwargs=dict(LAYOUT.model_kwargs))


FORMAT = WeightFormat(NAME, lambda state_dict, meta: LAYOUT.matches(state_dict), _read)
