"""Checkpoints of the official RepMLPNet code (DingXiaoH/RepMLP @ 3eff13f, ``repmlpnet.py``).

Released ImageNet files (``RepMLPNet-D256-train-acc80.828.pth``...) are bare train-form state dicts;
``convert.py`` writes the official deploy form as a bare state dict too; training runs
(``main_repmlp.py``, ``utils.save_checkpoint``) save ``{"model", "optimizer", "lr_scheduler",
"max_accuracy", "epoch", "config", "amp"?, "ema"?}`` (the state dict is read from ``model``, DDP's
``module.`` is removed; their ``config`` is a yacs ``CfgNode``, which the safe loader refuses:
save ``checkpoint["model"]`` alone). The train form holds the same tensors as
:class:`backbones.models.repmlpnet.RepMLPNet` under other names:

==================================================  ==================================================
official                                            this project
==================================================  ==================================================
``conv_embedding.{conv,bn}.``                       ``stem.{conv,bn}.``
``stages.{i}.{j}.prebn1.``                          ``stage{i+1}.{2j}.pre_bn.`` (the RepMLP unit)
``stages.{i}.{j}.repmlp_block.``                    ``stage{i+1}.{2j}.mlp.``
``  gp.fc1.``, ``gp.fc2.``                          ``  gp.reduce.``, ``gp.expand.``
``  fc3.``, ``fc3_bn.``                             ``  fc3.``, ``fc3_bn.``
``  repconv{k}.{conv,bn}.``                         ``  local.{k}x{k}.{conv,bn}.``
``stages.{i}.{j}.prebn2.``                          ``stage{i+1}.{2j+1}.pre_bn.`` (the ConvFFN)
``stages.{i}.{j}.ffn_block.ffn_fc{1,2}.``           ``stage{i+1}.{2j+1}.pw{1,2}.``
``embeds.{i}.{conv,bn}.``                           ``transition{i+1}.{conv,bn}.``
``head_norm.``                                      ``head.norm.``
``head.{weight,bias}``                              ``head.fc.{weight,bias}``
==================================================  ==================================================

The official deploy form (``locality_injection``, or a model built with ``deploy=True``) differs
in content: every ``repmlp_block`` has a biased ``fc3`` and no ``fc3_bn`` or ``repconv*``, and every
other BN is kept. This project's deploy form has no BN, so such a file is converted by folding them
(:func:`deploy_to_ours`): each conv-BN into its conv, the ConvFFN's pre-BN into the ``pw1`` conv
after it, the RepMLP unit's pre-BN into ``scale``/``shift`` (its scale cannot enter an FC that
several channels share), ``head_norm`` into ``head.scale``/``head.shift``.

The files' constructor arguments that the sizes do not fix are read from the tensors when they
are not this project's defaults (:attr:`Weights.kwargs`): the Local Perceptron's ``kernels``
(``repconv{k}``; the factories use ``(1, 3)``, as the registered sizes do) and ``gp_reduction`` (4). Official names (``RepMLPNet-T224`` ...
``RepMLPNet-L256`` of ``model_map``; the ``create_RepMLPNet_*`` factories) map to the registered
``repmlpnet_t224`` ... ``repmlpnet_l256`` (:data:`OFFICIAL_ARCHS`). MMPretrain's layout of the same
network: :mod:`.mmpretrain_repmlp`.

One difference in function, not in weights: with several partitions per stage map (inputs larger
than the pre-training size, as in segmentation) and more channels than sharesets, the official
``RepMLPBlock.partition_affine`` reshapes its output as ``(N*C/S, h_parts, w_parts, S, h, w)`` while
the rows are ordered ``(N, h_parts, w_parts, C/S, S)``, which moves the result of one partition and
channel group to another; this project keeps every partition in place. At the published sizes'
own resolutions each stage map is one partition and both compute the same function.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor

from .folding import bn_to_scale_shift, fold_conv_bns, fold_pre_bns
from .formats import WeightFormat, Weights
from .io import strip_prefix
from .renamed import BN_KEYS as _BN, RenamedLayout

__all__ = ["LAYOUT", "FORMAT", "OFFICIAL_ARCHS", "deploy_to_ours", "read_repmlpnet"]

OFFICIAL_ARCHS = {
    **{f"RepMLPNet-{size}": f"repmlpnet_{size.lower()}" for size in ("T224", "B224", "T256", "B256", "D256", "L256")},
    **{f"create_RepMLPNet_{size}": f"repmlpnet_{size.lower()}"
       for size in ("T224", "B224", "T256", "B256", "D256", "L256")},
}

_UNIT = rf"(conv\.weight|bn\.{_BN})"  # conv_bn / conv_bn_relu: a bias-free conv and its BN


def unit_prefix(m: re.Match[str], offset: int) -> str:
    """``stage{i+1}.{2j+offset}.`` for a match of ``stages.{i}.{j}.``: unit ``j`` of stage ``i`` is a
    RepMLP unit here (``offset`` 0) followed by a ConvFFN (``offset`` 1)."""
    return f"stage{int(m.group(1)) + 1}.{2 * int(m.group(2)) + offset}."


LAYOUT = RenamedLayout(
    name="official RepMLPNet checkpoint (DingXiaoH/RepMLP)",
    key=(rf"conv_embedding\.{_UNIT}"
         rf"|stages\.\d+\.\d+\.(prebn[12]\.{_BN}|ffn_block\.ffn_fc[12]\.{_UNIT}"
         rf"|repmlp_block\.(gp\.fc[12]\.(weight|bias)|fc3\.(weight|bias)|fc3_bn\.{_BN}|repconv\d+\.{_UNIT}))"
         rf"|embeds\.\d+\.{_UNIT}|head_norm\.{_BN}|head\.(weight|bias)"),
    rules=(
        (r"^stages\.(\d+)\.(\d+)\.prebn1\.", lambda m: unit_prefix(m, 0) + "pre_bn."),
        (r"^stages\.(\d+)\.(\d+)\.repmlp_block\.", lambda m: unit_prefix(m, 0) + "mlp."),
        (r"^stages\.(\d+)\.(\d+)\.prebn2\.", lambda m: unit_prefix(m, 1) + "pre_bn."),
        (r"^stages\.(\d+)\.(\d+)\.ffn_block\.ffn_fc([12])\.", lambda m: unit_prefix(m, 1) + f"pw{m.group(3)}."),
        (r"\.mlp\.gp\.fc1\.", ".mlp.gp.reduce."),
        (r"\.mlp\.gp\.fc2\.", ".mlp.gp.expand."),
        (r"\.mlp\.repconv(\d+)\.", r".mlp.local.\1x\1."),
        (r"^conv_embedding\.", "stem."),
        (r"^embeds\.(\d+)\.", lambda m: f"transition{int(m.group(1)) + 1}."),
        (r"^head_norm\.", "head.norm."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ),
    signature=r"^stages\.\d+\.\d+\.prebn1\.",  # MMPretrain's files share most keys: norm1 there
)

_GP_REDUCE = re.compile(r"^(stage\d+\.\d+)\.mlp\.gp\.reduce\.weight$")
_LOCAL = re.compile(r"\.mlp\.local\.(\d+)x\1\.conv\.weight$")


def deploy_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A RepMLPNet deploy state dict with every BN but the partition FCs' kept (the official and
    MMPretrain deploy forms), renamed to this project's names, in this project's deploy form: no BN.

    ``{stem,transition*,*.pw1,*.pw2}.conv.weight`` ``(O, C, k, k)`` with ``bn.*`` ``(O,)`` →
    ``conv.weight``, ``conv.bias``; a ConvFFN's ``pre_bn.*`` ``(C,)`` folded into its ``pw1.conv``
    ``(4C, C, 1, 1)`` (exact: a 1x1 conv without padding); a RepMLP unit's ``pre_bn.*`` ``(C,)`` →
    ``scale``, ``shift`` ``(C,)``; ``head.norm.*`` → ``head.scale``, ``head.shift``. The Global
    Perceptron, the biased ``fc3`` and ``head.fc`` pass unchanged, and so do keys of no known unit, so
    that a strict load names them. Works on the meta device (shapes only).
    """
    out = fold_conv_bns(state_dict)
    for key in [k for k in state_dict if k.endswith(".pre_bn.running_mean")]:
        unit = key[: -len("pre_bn.running_mean")]
        if unit + "mlp.fc3.weight" in out:  # a RepMLP unit keeps its pre-BN as an affine map; a ConvFFN's folds
            out = bn_to_scale_shift(out, unit + "pre_bn.", unit)
    return bn_to_scale_shift(fold_pre_bns(out), "head.norm.", "head.")


def _gp_reduction(converted: Mapping[str, Tensor], original: Mapping[str, str], path: str, layout: str) -> int:
    """The ``gp_reduction`` r with ``hidden == C // r`` in every Global Perceptron of the file (4 when
    that fits, as the official code and the registered sizes use), or a ValueError naming the file
    and the widths that no single r gives."""
    widths: dict[tuple[int, int], str] = {}  # (hidden, C) of a gp.reduce weight (hidden, C, 1, 1) → its first key
    for key, value in converted.items():
        if _GP_REDUCE.match(key) and value.dim() == 4:
            widths.setdefault((int(value.shape[0]), int(value.shape[1])), original.get(key, key))
    candidates: Optional[set[int]] = None
    for hidden, channels in widths:
        fits = {r for r in range(1, channels + 1) if channels // r == hidden} if hidden > 0 else set()
        candidates = fits if candidates is None else candidates & fits
    if candidates is None or 4 in candidates:
        return 4
    if candidates:
        return min(candidates)
    shown = ", ".join(f"{key} ({hidden} of {channels} channels)" for (hidden, channels), key in widths.items())
    raise ValueError(
        f"{path}: the Global Perceptron widths of this {layout} are not C // r for one r, as this project's "
        f"RepMLPNet builds them (gp_reduction): {shown}; MMPretrain rounds "
        "C / 4 to a multiple of 8 (make_divisible), which differs from the official C // 4 for stage widths such "
        "as 80 (RepMLPNet-D256) or 16: a file with such widths cannot be loaded into this project's RepMLPNet")


def read_repmlpnet(layout: RenamedLayout, state_dict: Mapping[str, Tensor], path: str) -> Weights:
    """A RepMLPNet file of ``layout`` (the official or MMPretrain names) as this project's
    :class:`Weights`: renamed; a deploy file (a biased ``fc3``) folded to this project's deploy form
    (:func:`deploy_to_ours`); the Local Perceptron's kernels of a train file other than (1, 3) and a
    Global Perceptron reduction other than 4 as constructor defaults (``kwargs``)."""
    converted = layout.convert(state_dict, path)
    original = {layout.rename(k) if re.fullmatch(layout.key, k) else k: k
                for k in strip_prefix(state_dict, ("module.",))}
    kwargs: dict[str, Any] = {}
    gp_reduction = _gp_reduction(converted, original, path, layout.name)
    if gp_reduction != 4:
        kwargs["gp_reduction"] = gp_reduction
    deploy = any(k.endswith(".mlp.fc3.bias") for k in converted)
    if deploy:
        converted = deploy_to_ours(converted)
    elif (kernels := sorted({int(m.group(1)) for k in converted if (m := _LOCAL.search(k))})) != [1, 3]:
        kwargs["kernels"] = kernels  # a list, as a recorded argument reads back (the default: 1x1 and 3x3)
    return Weights(path=path, format=layout.name, state_dict=converted, scope="backbone", deploy=deploy,
                   kwargs=kwargs)


FORMAT = WeightFormat(LAYOUT.name, lambda state_dict, meta: LAYOUT.matches(state_dict),
                      lambda state_dict, meta, path: read_repmlpnet(LAYOUT, state_dict, path))
