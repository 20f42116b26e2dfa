"""What the checkpoint command lines (``backbones.convert``, ``backbones.official``) share: options and errors."""
from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["CLI_ERRORS", "parse_model_kwargs", "report_cli_error"]

# What the checkpoint command lines turn into "error: ..." and exit status 1 instead of a traceback.
CLI_ERRORS = (FileNotFoundError, IsADirectoryError, ValueError, KeyError, TypeError)


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
