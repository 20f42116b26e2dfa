"""Convert an official RepMLP v1 checkpoint (RepMLP-ResNet) to this project's layout.

Command line::

    python -m backbones.official --arch repmlp_res50_g8_224 RepMLP-Res50-bottleneck-224_train.pth out.safetensors

The key mapping lives in :mod:`backbones.weights.official_repmlp`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from .cli_common import CLI_ERRORS, check_destination, parse_model_kwargs, report_cli_error
from .complexity import count_params
from .weights.io import save_checkpoint
from .weights.official_repmlp import OFFICIAL_ARCHS, load_official

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backbones.official",
        description="Convert an official RepMLP v1 (RepMLP-ResNet) checkpoint to this project's layout.",
    )
    parser.add_argument("--arch", required=True, help="registered model name, e.g. repmlp_res50_g8_224")
    parser.add_argument("src", help="official checkpoint (.pth/.pt/.safetensors)")
    parser.add_argument("dst", help="output file; .safetensors or torch format by extension")
    parser.add_argument("--model-kwargs", default="{}", help="JSON object of extra constructor arguments")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        check_destination(args.src, args.dst, args.overwrite)
        extra = parse_model_kwargs(args.model_kwargs)
        arch = OFFICIAL_ARCHS.get(args.arch, args.arch)
        model = load_official(args.src, arch, **extra)
        kwargs = {k: v for k, v in extra.items() if k != "deploy"}
        kwargs["num_classes"] = model.num_classes if hasattr(model, "num_classes") else extra.get("num_classes")
        save_checkpoint(model, args.dst, arch, kwargs)
    except CLI_ERRORS as exc:
        return report_cli_error(exc)
    mode = "deploy" if getattr(model, "deploy", False) else "train-time"
    print(
        f"converted official {args.src} -> {args.dst}: arch={arch}, {mode}, "
        f"{len(model.state_dict())} tensors, {count_params(model) / 1e6:.2f}M params, num_classes={kwargs['num_classes']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
