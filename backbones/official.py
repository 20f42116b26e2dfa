"""Convert a published checkpoint of the family to this project's layout: official RepMLP v1
(RepMLP-ResNet), RepMLPNet, RepVGG, MobileOne, RepLKNet, and the ACNet, DBB and OREPA ResNets;
MMPretrain's RepMLPNet; timm's RepVGG/MobileOne (byobnet).

Command line::

    python -m backbones.official --arch repvgg_a0 RepVGG-A0-train.pth repvgg_a0.safetensors

The layout is detected and named; each has its module in :mod:`backbones.weights`
(:func:`backbones.weights.load_backbone` is the Python call).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from .cli_common import CLI_ERRORS, check_destination, parse_model_kwargs, report_cli_error
from .complexity import count_params
from .weights import OFFICIAL_ARCHS, load_backbone
from .weights.io import save_checkpoint

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backbones.official",
        description="Convert a published checkpoint (official RepMLP v1, RepMLPNet, RepVGG, MobileOne, RepLKNet, "
                    "ACNet, DBB and OREPA ResNets; MMPretrain's RepMLPNet; timm's RepVGG and MobileOne) to this "
                    "project's layout.",
    )
    parser.add_argument("--arch", required=True, help="registered model name (repvgg_a0) or official one (RepVGG-A0)")
    parser.add_argument("src", help="published checkpoint (.pth/.pth.tar/.pt/.safetensors/.hdf5)")
    parser.add_argument("dst", help="output file; .safetensors or torch format by extension")
    parser.add_argument("--model-kwargs", default="{}", help="JSON object of extra constructor arguments")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        check_destination(args.src, args.dst, args.overwrite)
        extra = parse_model_kwargs(args.model_kwargs)
        arch = OFFICIAL_ARCHS.get(args.arch, args.arch)
        model, weights = load_backbone(args.src, arch, **extra)
        kwargs = {k: v for k, v in {**(weights.kwargs or {}), **extra}.items() if k != "deploy"}
        kwargs["num_classes"] = model.num_classes if hasattr(model, "num_classes") else extra.get("num_classes")
        save_checkpoint(model, args.dst, arch, kwargs)
    except CLI_ERRORS as exc:
        return report_cli_error(exc)
    mode = "deploy" if getattr(model, "deploy", False) else "train-time"
    print(
        f"converted {weights.format} {args.src} -> {args.dst}: arch={arch}, {mode}, "
        f"{len(model.state_dict())} tensors, {count_params(model) / 1e6:.2f}M params, num_classes={kwargs['num_classes']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
