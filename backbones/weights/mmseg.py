"""Read mmsegmentation checkpoints: rename mmseg's ResNetV1c keys to this project's ResNet.

The heads (``decode_head.*``, ``auxiliary_head.*``) already share mmseg's names
(:mod:`tasks.heads.decode`); only the backbone differs:

=======================================  ========================================
mmseg ``ResNetV1c``                      this project's ``ResNet``
=======================================  ========================================
``stem.0.weight`` / ``stem.1.*``         ``stem.0.conv.weight`` / ``stem.0.bn.*``
``stem.3.weight`` / ``stem.4.*``         ``stem.1.conv.weight`` / ``stem.1.bn.*``
``stem.6.weight`` / ``stem.7.*``         ``stem.2.conv.weight`` / ``stem.2.bn.*``
``layerX.Y.conv{k}.weight``              ``layerX.Y.conv{k}.conv.weight``
``layerX.Y.bn{k}.*``                     ``layerX.Y.conv{k}.bn.*``
``layerX.Y.downsample.0.weight`` / ``.1``  ``layerX.Y.shortcut.conv.weight`` / ``shortcut.bn.*``
=======================================  ========================================

An mmseg checkpoint is ``{"meta": {...}, "state_dict": {...}, "optimizer": ...}`` with keys
``backbone.*``, ``decode_head.*`` and ``auxiliary_head.*``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .formats import WeightFormat, Weights
from .io import strip_prefix

__all__ = ["FORMAT", "is_mmseg_state_dict", "convert_mmseg_state_dict"]

_STEM = {"0": ("0", "conv"), "1": ("0", "bn"), "3": ("1", "conv"), "4": ("1", "bn"), "6": ("2", "conv"), "7": ("2", "bn")}
_LEAF = r"(weight|bias|running_mean|running_var|num_batches_tracked)"  # a tensor of a conv or BN itself
_STEM_KEY = re.compile(rf"^backbone\.stem\.(\d+)\.{_LEAF}$")
_BLOCK_KEY = re.compile(rf"^backbone\.(layer\d+\.\d+)\.(conv|bn)(\d)\.{_LEAF}$")
_DOWNSAMPLE_KEY = re.compile(rf"^backbone\.(layer\d+\.\d+)\.downsample\.([01])\.{_LEAF}$")


def is_mmseg_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for mmseg's ResNet layout (``backbone.layer1.0.bn1.weight`` or a bare conv stem)."""
    return any(_BLOCK_KEY.match(k) or _STEM_KEY.match(k) for k in state_dict)


def _rename(key: str) -> str:
    m = _STEM_KEY.match(key)
    if m and m.group(1) in _STEM:
        index, part = _STEM[m.group(1)]
        rest = m.group(2)
        return f"backbone.stem.{index}.{part}.{rest}"
    m = _BLOCK_KEY.match(key)
    if m:
        block, kind, k, rest = m.groups()
        return f"backbone.{block}.conv{k}.{'conv' if kind == 'conv' else 'bn'}.{rest}"
    m = _DOWNSAMPLE_KEY.match(key)
    if m:
        block, index, rest = m.groups()
        return f"backbone.{block}.shortcut.{'conv' if index == '0' else 'bn'}.{rest}"
    return key


def convert_mmseg_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """mmseg PSPNet (EncoderDecoder) keys → this project's segmentation task keys.

    A ``module.`` prefix (DDP) is removed first. Keys outside the backbone pass unchanged.
    """
    return {_rename(key): value for key, value in strip_prefix(state_dict).items()}


def _is_mmseg(state_dict: Mapping[str, Tensor], meta: Mapping[str, Any]) -> bool:
    return is_mmseg_state_dict(state_dict)  # tried after this project's own (Lightning) checkpoints


def _read_mmseg(state_dict: dict[str, Tensor], meta: dict[str, Any], path: str) -> Weights:
    # mmseg's ResNet has BN everywhere and no deploy form
    return Weights(path=path, format="mmseg checkpoint", state_dict=convert_mmseg_state_dict(state_dict),
                   scope="task", deploy=False)


FORMAT = WeightFormat("mmseg checkpoint", _is_mmseg, _read_mmseg)
