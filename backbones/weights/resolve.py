"""One way in for weights: :func:`read_weights` reads any file the project accepts and says what it holds.

The file is read once, without running code (safetensors, or ``torch.load(weights_only=True)``),
then the first format in :data:`FORMATS` that recognizes it converts it to this project's layout.
To accept a new layout, add a module with a ``FORMAT`` (:class:`~.formats.WeightFormat`) and list
it here, before the catch-all :data:`~.formats.STATE_DICT`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from . import (mmpretrain_repmlp, mmseg, official_acnet, official_dbb, official_mobileone, official_orepa,
               official_replknet, official_repmlp, official_repmlpnet, official_repvgg, timm_byobnet)
from .formats import BACKBONE_FILE, LIGHTNING, STATE_DICT, Weights, WeightFormat, create_loaded
from .io import PathLike, load_state_dict_file

__all__ = ["FORMATS", "OFFICIAL_ARCHS", "read_weights", "weights_of_checkpoint", "load_backbone"]

# Order matters: a recorded layout before the key-pattern detections, the bare state dict last.
FORMATS: tuple[WeightFormat, ...] = (LIGHTNING, BACKBONE_FILE, mmseg.FORMAT, official_repmlp.FORMAT,
                                     official_repmlpnet.FORMAT, mmpretrain_repmlp.FORMAT, official_repvgg.FORMAT,
                                     official_mobileone.FORMAT, timm_byobnet.FORMAT,
                                     official_replknet.FORMAT, official_acnet.FORMAT, official_dbb.FORMAT,
                                     official_orepa.FORMAT, STATE_DICT)

# the names the official repositories give their models → the registered names here
OFFICIAL_ARCHS = {**official_repmlp.OFFICIAL_ARCHS, **official_repmlpnet.OFFICIAL_ARCHS,
                  **official_repvgg.OFFICIAL_ARCHS, **official_mobileone.OFFICIAL_ARCHS,
                  **official_replknet.OFFICIAL_ARCHS, **official_acnet.OFFICIAL_ARCHS,
                  **official_dbb.OFFICIAL_ARCHS, **official_orepa.OFFICIAL_ARCHS}


def _convert(state_dict: dict, meta: dict, path: str) -> Weights:
    for fmt in FORMATS:
        if fmt.detect(state_dict, meta):
            return fmt.read(state_dict, meta, path)
    raise AssertionError("STATE_DICT accepts every file")  # pragma: no cover


def read_weights(path: PathLike) -> Weights:
    """The weights in ``path``, in this project's layout, and what they are (:class:`~.formats.Weights`).

    Raises:
        FileNotFoundError, IsADirectoryError: no file at ``path``.
        ValueError: an unreadable file, or one that a format recognizes but cannot convert; the
            message names the file.
    """
    path = os.fspath(path)
    state_dict, meta = load_state_dict_file(path)
    return _convert(state_dict, meta, path)


def weights_of_checkpoint(checkpoint: Mapping[str, Any], path: str) -> Weights:
    """:class:`~.formats.Weights` of a checkpoint dict Lightning has already read (``--ckpt_path``)."""
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    return _convert(dict(checkpoint["state_dict"]), meta, path)


def load_backbone(path: PathLike, arch: str, **model_kwargs: Any) -> tuple[nn.Module, Weights]:
    """``backbones.create(arch)`` with the weights of ``path`` loaded strictly, whatever accepted
    layout the file is in (:data:`FORMATS`; an official name such as ``RepVGG-A0`` is accepted for
    ``arch``); returns the model (train mode) and what the file held.

    ``deploy``, ``num_classes`` and ``model_kwargs`` as for :func:`~.formats.create_loaded`.

    Raises:
        KeyError: unknown ``arch``.
        ValueError: the file is unreadable, holds a task's weights (use the task's
            ``--model.weights``), or does not fit ``arch``: the message names the file, the arch,
            the layout and the first keys that differ.
    """
    weights = read_weights(path)
    if weights.scope == "task":
        raise ValueError(f"{weights.path} holds a task's weights ({weights.describe()}), not a backbone's; "
                         "give it to the task: --model.weights or --ckpt_path")
    return create_loaded(weights, OFFICIAL_ARCHS.get(arch, arch), **model_kwargs), weights
