"""BN folding on state dicts: a foreign deploy file in this project's deploy form.

Official deploy files merge only their re-parameterized branches and keep the other BNs (RepLKNet's
``structural_reparam``, RepMLPNet's ``locality_injection``, ACNet's ``acnet_fusion``), while this
project's deploy models have none. These functions fold such BNs on the file's tensors, with the
math of :mod:`backbones.reparam.math` on :class:`~backbones.reparam.math.BNStats` (no modules, so
they also work on the meta device). Each takes a state dict in this project's key names and
returns a new one; keys they do not fold pass unchanged, so that a strict load names them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional

from torch import Tensor

from ..reparam.math import BNStats, bn_scale_shift, fuse_bn, fuse_bn_before_linear

__all__ = ["pop_bn", "fold_conv_bns", "fold_pre_bns", "bn_to_scale_shift"]

_BN_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def pop_bn(sd: dict[str, Tensor], prefix: str) -> Optional[BNStats]:
    """The BN saved under ``prefix`` (``"stem.bn."``), its entries removed from ``sd``; None (and
    ``sd`` unchanged) when ``sd`` holds no running statistics there."""
    if prefix + "running_mean" not in sd or prefix + "running_var" not in sd:
        return None
    stats = BNStats.of(sd, prefix)
    for name in _BN_NAMES:
        sd.pop(prefix + name, None)
    return stats


def fold_conv_bns(state_dict: Mapping[str, Tensor], skip: Callable[[str], bool] = lambda prefix: False
                  ) -> dict[str, Tensor]:
    """Every ``P.conv.weight`` ``(O, C/g, k, k)`` (with or without ``P.conv.bias``) followed by a
    ``P.bn.*`` ``(O,)`` → ``P.conv.weight``, ``P.conv.bias``; ``skip(P)`` leaves a pair as it is."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith("conv.weight")]:
        prefix = key[: -len("conv.weight")]
        if not skip(prefix) and (stats := pop_bn(out, prefix + "bn.")) is not None:
            out[key], out[prefix + "conv.bias"] = fuse_bn(out[key], out.get(prefix + "conv.bias"), stats)
    return out


def fold_pre_bns(state_dict: Mapping[str, Tensor], conv: str = "pw1.conv.") -> dict[str, Tensor]:
    """Every ``B.pre_bn.*`` ``(C,)`` folded into the biased 1x1 conv ``B.<conv>`` ``(D, C, 1, 1)`` that
    follows it (exact: a 1x1 conv without padding sees no border). Fold the conv's own BN first."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".pre_bn.running_mean")]:
        block = key[: -len("pre_bn.running_mean")]
        weight, bias = out.get(block + conv + "weight"), out.get(block + conv + "bias")
        if weight is not None and bias is not None and (stats := pop_bn(out, block + "pre_bn.")) is not None:
            fused, out[block + conv + "bias"] = fuse_bn_before_linear(weight.flatten(1), bias, stats)
            out[block + conv + "weight"] = fused.reshape(weight.shape)
    return out


def bn_to_scale_shift(state_dict: Mapping[str, Tensor], bn: str, target: str) -> dict[str, Tensor]:
    """The BN ``bn`` (``"head.norm."``) as its eval-mode affine map ``target + "scale"``, ``target +
    "shift"`` ``(C,)`` (where a model keeps the map rather than folding it into a neighbour)."""
    out = dict(state_dict)
    if (stats := pop_bn(out, bn)) is not None:
        out[target + "scale"], out[target + "shift"] = bn_scale_shift(stats)
    return out
