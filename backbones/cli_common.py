"""What the checkpoint command lines (``backbones.convert``, ``backbones.official``) share: options and errors."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["CLI_ERRORS", "check_destination", "parse_model_kwargs", "report_cli_error"]

# What the checkpoint command lines turn into "error: ..." and exit status 1 instead of a traceback
# (ImportError: an optional extra a file needs, e.g. h5py for HDF5 weights, named with its install line).
CLI_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError, KeyError, TypeError, ImportError)


def check_destination(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write ``dst`` when it is ``src`` (by :func:`os.path.samefile` when both exist,
    so another spelling or a link is caught; by resolved path otherwise), or when it exists and
    ``overwrite`` is false.

    Raises:
        ValueError: ``dst`` is the source (never allowed: a failed write would lose the input).
        FileExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    same = (os.path.samefile(src, dst) if os.path.exists(src) and os.path.exists(dst)
            else Path(src).resolve() == Path(dst).resolve())
    if same:
        raise ValueError(f"the destination {dst} is the source {src}; write the output to another file")
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"the destination {dst} already exists; pass --overwrite (overwrite=True) to replace it")


def parse_model_kwargs(text: str) -> dict[str, Any]:
    """The ``--model-kwargs`` option: a JSON object of extra constructor arguments."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {text!r}")
    return value


def report_cli_error(exc: BaseException) -> int:
    """Print ``error: <message>`` to stderr (a KeyError without its quotes) and return exit status 1."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    print(f"error: {message}", file=sys.stderr)
    return 1
