"""Import checkpoints of the official RepMLP v1 code (RepMLP-ResNet, DingXiaoH/RepMLP @ 4b3e347).

The official ``RepMLPResNet`` and this project's ``ResNet`` compute the same function with the same
tensors; only module names differ, so a checkpoint converts by renaming keys:

==============================  ==============================
official                        this project
==============================  ==============================
``stage0.0.``                   ``stem.0.`` (stage0.1 is the max-pool)
``stage{1..4}.``                ``layer{1..4}.``
``linear.``                     ``fc.``
``btnk_conv{1,2,4,5}.``         ``conv{1,2,4,5}.`` (Bottleneck)
``btnk_repmlp.``                ``repmlp.``
``light_conv{1,3}.``            ``conv{1,3}.`` (Light)
``light_repmlp.``               ``repmlp.``
``<repmlp>.fc1_fc2.fc{1,2}.``   ``<repmlp>.fc{1,2}.``
``<repmlp>.avg.bn.``            ``<repmlp>.gp_bn.`` (train-time only)
``<repmlp>.repconv{k}.``        ``<repmlp>.local.{k}x{k}.`` (train-time only)
==============================  ==============================

Everything else (``conv.weight``, ``conv.bias``, ``bn.*``, ``fc3.*``, ``fc3_bn.*``, ``shortcut``,
``conv1..3`` of the plain bottleneck) keeps its name. Train-time and deploy checkpoints both
convert; the mode is detected from the keys. Official factories and their names here:
``create_RepMLPRes50_Light_224`` → ``repmlp_res50_light_224``,
``create_RepMLPRes50_Bottleneck_224`` → ``repmlp_res50_g8_224``.

Command line: ``python -m backbones.official``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor, nn

from .formats import WeightFormat, Weights, create_loaded, inferred_deploy
from .io import listing, load_state_dict_file, strip_prefix

__all__ = ["OFFICIAL_ARCHS", "FORMAT", "convert_official_state_dict", "load_official"]

FORMAT_NAME = "official RepMLP v1 checkpoint"

# Official factory name → registered name here.
OFFICIAL_ARCHS = {
    "create_RepMLPRes50_Light_224": "repmlp_res50_light_224",
    "RepMLP-Res50-light-224": "repmlp_res50_light_224",
    "create_RepMLPRes50_Bottleneck_224": "repmlp_res50_g8_224",
    "RepMLP-Res50-bottleneck-224": "repmlp_res50_g8_224",
}

# Whole-key forms the official RepMLPResNet produces (after an optional "module." prefix).
_OFFICIAL_KEY = re.compile(r"^(stage0\.0\.|stage[1-4]\.\d+\.|linear\.(weight|bias)$)")
_OURS_KEY = re.compile(r"^(stem\.|layer[1-4]\.|fc\.(weight|bias)$)")

# Ordered renames applied to every key; each pattern is anchored on module boundaries.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"^stage0\.0\.", "stem.0."),
        (r"^stage([1-4])\.", r"layer\1."),
        (r"^linear\.", "fc."),
        (r"\.btnk_conv(\d)\.", r".conv\1."),
        (r"\.btnk_repmlp\.", ".repmlp."),
        (r"\.light_conv(\d)\.", r".conv\1."),
        (r"\.light_repmlp\.", ".repmlp."),
        (r"\.repmlp\.fc1_fc2\.(fc[12])\.", r".repmlp.\1."),
        (r"\.repmlp\.avg\.bn\.", ".repmlp.gp_bn."),
        (r"\.repmlp\.repconv(\d+)\.", r".repmlp.local.\1x\1."),
    )
)


def _rename(key: str) -> str:
    for pattern, repl in _RULES:
        key = pattern.sub(repl, key)
    return key


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor],
    arch: Optional[str] = None,
    source: str = "<state dict>",
) -> dict[str, Tensor]:
    """Rename an official v1 RepMLP-ResNet state dict (train-time or deploy) to this project's keys.

    A DDP ``module.`` prefix is removed first. ``arch`` and ``source`` only appear in error
    messages; whether the result fits a model is checked when loading it
    (:func:`backbones.weights.io.load_into`, as :func:`load_official` does).

    Raises:
        ValueError: keys that the official model never produces (naming up to 5 of them), or a
            state dict already in this project's layout.
    """
    state_dict = strip_prefix(state_dict, ("module.",))
    what = f"{source}" + (f" (arch {arch!r})" if arch else "")
    foreign = [k for k in state_dict if not _OFFICIAL_KEY.match(k)]
    if foreign:
        if all(_OURS_KEY.match(k) for k in state_dict):
            raise ValueError(
                f"{what} is already in this project's layout (stem./layerN./fc.), not the official one; "
                "load it with backbones.weights.read_weights instead"
            )
        raise ValueError(
            f"{what} is not an official RepMLP-ResNet v1 checkpoint: {len(foreign)} key(s) outside "
            f"stage0.0/stage1-4/linear: {listing(foreign)}"
        )
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = _rename(key)
        if new in converted:
            raise ValueError(f"{what}: two official keys map to {new!r}")
        converted[new] = value
    return converted


def load_official(path: str | os.PathLike, arch: str, **model_kwargs: Any) -> nn.Module:
    """Build ``backbones.create(arch, ...)`` and load an official v1 checkpoint into it strictly.

    ``deploy`` defaults to the checkpoint's mode (detected from its keys) and ``num_classes`` to
    the rows of ``linear.weight``; ``model_kwargs`` override either and pass other constructor
    arguments. The file may hold a bare state dict or ``{"state_dict": ...}``/``{"model": ...}``,
    with or without the DDP ``module.`` prefix. Returns the model in train mode (call ``.eval()``
    for inference). Unlike :func:`backbones.weights.load_backbone`, which takes every layout, it
    refuses a file that is not an official RepMLP v1 checkpoint.

    Raises:
        FileNotFoundError / ValueError: unreadable file, non-official keys, or a checkpoint that does
            not fit ``arch`` (the message names the file and the arch).
        KeyError: unknown ``arch``.
    """
    source = os.fspath(path)
    arch = OFFICIAL_ARCHS.get(arch, arch)
    raw, _meta = load_state_dict_file(source)
    return create_loaded(_official_weights(raw, source, arch), arch, **model_kwargs)


def _is_official(state_dict: Mapping[str, Tensor], meta: Mapping[str, Any]) -> bool:
    keys = strip_prefix(state_dict, ("module.",))
    return bool(keys) and all(_OFFICIAL_KEY.match(k) for k in keys)


def _official_weights(state_dict: Mapping[str, Tensor], path: str, arch: Optional[str] = None) -> Weights:
    converted = convert_official_state_dict(state_dict, arch, path)
    return Weights(path=path, format=FORMAT_NAME, state_dict=converted, scope="backbone", deploy=inferred_deploy(converted))


def _read_official(state_dict: dict[str, Tensor], meta: dict[str, Any], path: str) -> Weights:
    return _official_weights(state_dict, path)


FORMAT = WeightFormat(FORMAT_NAME, _is_official, _read_official)
