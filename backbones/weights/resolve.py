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

from . import mmseg, official_repmlp
from .formats import BACKBONE_FILE, LIGHTNING, STATE_DICT, Weights, WeightFormat
from .io import PathLike, load_state_dict_file

__all__ = ["FORMATS", "read_weights", "weights_of_checkpoint"]

# Order matters: a recorded layout before the key-pattern detections, the bare state dict last.
FORMATS: tuple[WeightFormat, ...] = (LIGHTNING, BACKBONE_FILE, mmseg.FORMAT, official_repmlp.FORMAT, STATE_DICT)


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
