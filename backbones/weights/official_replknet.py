"""Checkpoints of the official RepLKNet code (DingXiaoH/RepLKNet-pytorch @ b76808a, ``replknet.py``).

Released ImageNet files hold the train form (``lkb_origin`` and ``small_conv`` branches); training
runs save ``{"model", "optimizer", "epoch", "scaler", "args", "model_ema"?}`` (the state dict is
read from ``model``; DDP's ``module.`` is removed). The train form holds the same tensors as
:class:`backbones.models.replknet.RepLKNet` under other names:

==============================================  ==============================================
official                                        this project
==============================================  ==============================================
``stem.{0..3}.{conv,bn}.``                      ``stem.{0..3}.{conv,bn}.``
``stages.{i}.blocks.{j}.``                      ``stage{i+1}.{j}.`` (even j RepLKBlock, odd ConvFFN)
``prelkb_bn.``, ``preffn_bn.``                  ``pre_bn.``
``pw1.{conv,bn}.``, ``pw2.{conv,bn}.``          unchanged
``large_kernel.lkb_origin.{conv,bn}.``          ``large_kernel.large.{conv,bn}.``
``large_kernel.small_conv.{conv,bn}.``          ``large_kernel.small.{conv,bn}.``
``transitions.{i}.{0,1}.{conv,bn}.``            ``transition{i+1}.{0,1}.{conv,bn}.``
``norm.``                                       ``head.norm.``
``head.{weight,bias}``                          ``head.fc.{weight,bias}``
==============================================  ==============================================

The official deploy form differs in content, not only in names: ``structural_reparam`` merges the
large and small kernels into ``large_kernel.lkb_reparam.{weight,bias}`` and keeps every other BN
(``deep_fuse_BN`` would fold the conv-BN pairs into ``conv.bias``, but is a no-op with the
official default SyncBatchNorm). This project's deploy form has no BN at all, so such a file is
converted by folding what is left (:func:`official_deploy_to_ours`): each conv-BN into its conv,
each pre-BN into the ``pw1`` conv after it (exact: a 1x1 conv without padding), the final
``norm`` into ``head.scale``/``head.shift``. Official names (``RepLKNet-31B``, ``RepLKNet-31L``,
``RepLKNet-XL`` of ``main.py --model``; the ``create_RepLKNet*`` factories) map to the registered
``replknet_31b``, ``replknet_31l``, ``replknet_xl`` (:data:`OFFICIAL_ARCHS`). ``stages.{i}.norm``
(``norm_intermediate_features``, XL's downstream form) has no counterpart here and is refused.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor

from ..reparam.math import add_branches, fuse_bn
from .folding import bn_to_scale_shift, fold_conv_bns, fold_pre_bns, pop_bn
from .formats import WeightFormat, Weights
from .renamed import BN_KEYS as _BN, RenamedLayout

__all__ = ["LAYOUT", "FORMAT", "OFFICIAL_ARCHS", "official_deploy_to_ours"]

OFFICIAL_ARCHS = {
    "RepLKNet-31B": "replknet_31b", "RepLKNet-31L": "replknet_31l", "RepLKNet-XL": "replknet_xl",
    "create_RepLKNet31B": "replknet_31b", "create_RepLKNet31L": "replknet_31l", "create_RepLKNetXL": "replknet_xl",
}

_UNIT = rf"(conv\.(weight|bias)|bn\.{_BN})"  # conv_bn / conv_bn_relu; conv.bias after deep_fuse_BN
LAYOUT = RenamedLayout(
    name="official RepLKNet checkpoint (DingXiaoH/RepLKNet-pytorch)",
    key=(rf"stem\.[0-3]\.{_UNIT}"
         rf"|stages\.\d+\.blocks\.\d+\.((prelkb|preffn)_bn\.{_BN}|pw[12]\.{_UNIT}"
         rf"|large_kernel\.((lkb_origin|small_conv)\.{_UNIT}|lkb_reparam\.(weight|bias)))"
         rf"|stages\.\d+\.norm\.{_BN}|transitions\.\d+\.[01]\.{_UNIT}|norm\.{_BN}|head\.(weight|bias)"),
    rules=(
        (r"^stages\.(\d+)\.blocks\.", lambda m: f"stage{int(m.group(1)) + 1}."),
        (r"\.(prelkb|preffn)_bn\.", ".pre_bn."),
        (r"\.large_kernel\.lkb_origin\.", ".large_kernel.large."),
        (r"\.large_kernel\.small_conv\.", ".large_kernel.small."),
        (r"\.large_kernel\.lkb_reparam\.", ".large_kernel.reparam_conv."),
        (r"^transitions\.(\d+)\.", lambda m: f"transition{int(m.group(1)) + 1}."),
        (r"^norm\.", "head.norm."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ),
    signature=r"^stages\.\d+\.blocks\.\d+\.",
)

_INTERMEDIATE_NORM = re.compile(r"^stages\.\d+\.norm\.")


def _is_official_deploy(converted: Mapping[str, Tensor]) -> bool:
    """A merged large kernel (``structural_reparam``) or a BN folded into a conv (``deep_fuse_BN``)."""
    return any(k.endswith((".reparam_conv.weight", ".conv.bias")) for k in converted)


def official_deploy_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An official deploy state dict, renamed to this project's names (:data:`LAYOUT`), in this
    project's deploy form: no BN left.

    ``*.conv.weight`` ``(O, C/g, k, k)`` (+ ``conv.bias``) with ``bn.*`` ``(O,)`` → ``conv.weight``,
    ``conv.bias``; ``large_kernel.{large,small}.*`` not merged yet → ``large_kernel.reparam_conv.*``
    (the small kernel zero-padded to the centre of the large one); ``pre_bn.*`` ``(C,)`` folded into
    the following ``pw1.conv`` ``(D, C, 1, 1)``; ``head.norm.*`` ``(C,)`` → ``head.scale``,
    ``head.shift`` ``(C,)``. Keys of no known unit are kept, so that a strict load names them;
    works on the meta device (shapes only).
    """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".large_kernel.large.conv.weight")]:  # not merged yet
        lk = key[: -len("large.conv.weight")]
        branches = [_pop_conv_bn(out, lk + "large.")]
        if lk + "small.conv.weight" in out:
            branches.append(_pop_conv_bn(out, lk + "small."))
        out[lk + "reparam_conv.weight"], out[lk + "reparam_conv.bias"] = add_branches(*branches)
    return bn_to_scale_shift(fold_pre_bns(fold_conv_bns(out)), "head.norm.", "head.")


def _pop_conv_bn(sd: dict[str, Tensor], prefix: str) -> tuple[Tensor, Optional[Tensor]]:
    """``(kernel, bias)`` of the conv (and BN) saved under ``prefix``, its entries removed from ``sd``."""
    weight, bias = sd.pop(prefix + "conv.weight"), sd.pop(prefix + "conv.bias", None)
    stats = pop_bn(sd, prefix + "bn.")
    return fuse_bn(weight, bias, stats) if stats is not None else (weight, bias)


def _read(state_dict: dict[str, Tensor], meta: dict[str, Any], path: str) -> Weights:
    converted = LAYOUT.convert(state_dict, path)
    intermediate = [k for k in state_dict if _INTERMEDIATE_NORM.match(k.removeprefix("module."))]
    if intermediate:
        raise ValueError(f"{path}: an official RepLKNet built with norm_intermediate_features=True (the downstream "
                         f"form of RepLKNet-XL): its per-stage BNs ({intermediate[0]}, ...) have no counterpart in "
                         "this project's RepLKNet; use the ImageNet checkpoint")
    deploy = _is_official_deploy(converted)
    if deploy:
        converted = official_deploy_to_ours(converted)
    return Weights(path=path, format=LAYOUT.name, state_dict=converted, scope="backbone", deploy=deploy)


FORMAT = WeightFormat(LAYOUT.name, lambda state_dict, meta: LAYOUT.matches(state_dict), _read)
