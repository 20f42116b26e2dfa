"""Lightning checkpoint I/O that survives a kill mid-write and explains an unreadable file.

- Saving writes a temporary file next to the target and renames it into place
  (:func:`backbones.weights.io.atomic_write`), so a process killed while saving leaves the previous
  ``last.ckpt`` intact rather than a truncated one.
- Loading (``--ckpt_path``, including ``last`` and ``best``) goes through
  :func:`backbones.weights.io.read_torch_file`: a truncated or corrupt file, or one that
  ``weights_only=True`` refuses, is an error naming the file and the reason; a weight file that is
  not a Lightning checkpoint is an error that points at ``--model.weights``.

Remote paths (``s3://`` and other fsspec URLs) keep Lightning's own behaviour.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from fsspec.utils import get_protocol
from pytorch_lightning.plugins.io import TorchCheckpointIO

from backbones.weights.io import atomic_write, is_safetensors_file, read_torch_file

__all__ = ["CheckedCheckpointIO", "is_local_path"]


def is_local_path(path: Any) -> bool:
    """A plain path or ``file://`` URL (fsspec, which Lightning reads remote paths with, says which)."""
    return get_protocol(str(path)) == "file"


class CheckedCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` with atomic local saves and clear load errors (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if not is_local_path(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        atomic_write(str(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage, weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        if not is_local_path(path):
            return super().load_checkpoint(path, map_location, weights_only)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        checkpoint = None if is_safetensors_file(str(path)) else read_torch_file(
            str(path), map_location=map_location, weights_only=weights_only is not False)
        if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
            # a backbone file, an official or mmseg checkpoint: weights, not a training state
            raise ValueError(f"--ckpt_path {path} is not a Lightning checkpoint of a task (it has no training state); "
                             f"load weights with --model.weights {path}")
        return checkpoint
