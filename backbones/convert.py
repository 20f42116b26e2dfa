"""Convert a train-time checkpoint of this project into a deploy checkpoint, with a numerical check.

    python -m backbones.convert --arch repmlp_res50_g8_224 train.ckpt deploy.safetensors

Steps: refuse a destination that is the source, or one that exists (unless ``--overwrite``);
read the checkpoint safely with :func:`backbones.weights.read_weights` (any layout it knows: a
task checkpoint's backbone, a backbone file, an official RepMLP v1 checkpoint), strip a
``backbone.``/``model.`` prefix shared by every key (or keep only ``--prefix``), build the train-time model and load it strictly, convert it with
:func:`backbones.reparameterize_model`, compare both models in eval mode on a random input of the
model's ``img_size`` (batch 2, fixed seed), refuse to write if the relative error exceeds the
tolerance, write the deploy checkpoint atomically and check that it loads strictly into
``backbones.create(arch, deploy=True, ...)`` and reproduces the converted model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .cli_common import CLI_ERRORS, check_destination, parse_model_kwargs, report_cli_error
from .complexity import count_params, input_channels
from .models.registry import create, model_input_size
from .reparam.walker import model_relative_error, reparameterize_model
from .weights import read_weights
from .weights.io import (
    TASK_PREFIXES,
    load_into,
    load_state_dict_file,
    save_checkpoint,
    select_prefix,
    strip_prefix,
)

__all__ = ["ConversionError", "convert_checkpoint", "main"]


class ConversionError(ValueError):
    """The converted model does not reproduce the train-time model within the tolerance."""


def _model_kwargs(
    state_dict: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    arch: str,
    num_classes: Optional[int],
    model_kwargs: Optional[Mapping[str, Any]],
) -> dict[str, Any]:
    """Constructor arguments: recorded ones (same arch only) < ``model_kwargs`` < ``num_classes``;
    ``num_classes`` falls back to the rows of the classifier weight (0 without a classifier)."""
    kwargs: dict[str, Any] = {}
    recorded = meta.get("model_kwargs")
    if isinstance(recorded, Mapping) and meta.get("arch") in (None, arch):
        kwargs.update(recorded)
    kwargs.update(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif "num_classes" not in kwargs:
        weight = state_dict.get("fc.weight", state_dict.get("head.fc.weight"))  # head.fc: RepLKNet
        kwargs["num_classes"] = int(weight.shape[0]) if weight is not None else 0
    kwargs.pop("deploy", None)
    return kwargs


def convert_checkpoint(
    arch: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    tolerance: float = 1e-4,
    seed: int = 0,
    prefix: Optional[str] = None,
    log: Optional[Callable[[str], None]] = None,
    overwrite: bool = False,
) -> float:
    """Convert the train-time checkpoint ``src`` of ``arch`` to a deploy checkpoint ``dst``.

    Args:
        arch: registered model name.
        src: train-time checkpoint (any layout :func:`backbones.weights.read_weights` reads).
        dst: output; ``*.safetensors`` or torch format otherwise, with arch/model_kwargs/deploy recorded.
        num_classes: classifier size; default: recorded, else the rows of ``fc.weight`` (or
            ``head.fc.weight``), else 0.
        model_kwargs: extra constructor arguments (override recorded ones).
        tolerance: largest accepted max relative error between train-time and deploy outputs.
        seed: seed of the random check input ``(2, in_chans, *img_size)``.
        prefix: keep only the keys under this prefix (e.g. ``"backbone."``) instead of stripping
            a shared task prefix automatically.
        log: called with one line per step (the CLI passes ``print``).
        overwrite: replace an existing ``dst``; without it an existing ``dst`` is refused.
    Returns:
        The max relative error of the deploy model against the train-time model (eval mode).
    Raises:
        FileNotFoundError, ValueError: unreadable input, already-deploy input, wrong arch (the
            message names the file and arch), ``dst`` naming the source file; :class:`ConversionError`
            when the error exceeds ``tolerance`` (nothing is written then).
        FileExistsError: ``dst`` exists and ``overwrite`` is false (checked before any work).
        KeyError: unknown arch.
    """
    say = log or (lambda line: None)
    src, dst = os.fspath(src), os.fspath(dst)
    check_destination(src, dst, overwrite)
    weights = read_weights(src)
    if prefix:
        state_dict = select_prefix(weights.state_dict, prefix)
    elif weights.scope == "task":
        state_dict = weights.backbone_state_dict()
    else:
        state_dict = strip_prefix(weights.state_dict, auto=True)
    if weights.deploy:
        raise ValueError(
            f"{src} is already in deploy form ({weights.describe()}); there is nothing to convert: "
            f"load it with backbones.create({arch!r}, deploy=True)"
        )
    meta = {"arch": weights.arch, "model_kwargs": weights.kwargs}
    kwargs = _model_kwargs(state_dict, meta, arch, num_classes, model_kwargs)
    recorded_arch = weights.arch
    model = create(arch, **kwargs)
    try:
        load_into(model, state_dict, src, arch, checkpoint_arch=recorded_arch)
    except ValueError as exc:
        nested = sorted({k.split(".", 1)[0] + "." for k in state_dict} & set(TASK_PREFIXES))
        if nested and not prefix:
            raise ValueError(
                f"{exc}\n  the keys under {nested[0]!r} may be the backbone of a larger model: "
                f"keep only them with --prefix {nested[0]} (prefix={nested[0]!r})"
            ) from exc
        raise
    say(f"loaded {src}: arch={arch}, {len(state_dict)} tensors, model kwargs {json.dumps(kwargs)}")

    model.eval()
    deploy = reparameterize_model(model)
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(2, input_channels(model), *model_input_size(model, default=224), generator=generator).to(dtype)
    error = model_relative_error(model, deploy, x)
    train_params, deploy_params = count_params(model), count_params(deploy)
    say(f"params: train {train_params / 1e6:.4f}M, deploy {deploy_params / 1e6:.4f}M")
    say(f"max relative error: {error:.3e} (tolerance {tolerance:.1e}, eval mode, input {tuple(x.shape)}, seed {seed})")
    if not error <= tolerance:  # also catches NaN
        raise ConversionError(
            f"converting {src} ({arch}): the deploy model differs from the train-time model by a max relative "
            f"error of {error:.3e}, above the tolerance {tolerance:.1e}; nothing was written to {dst}"
        )

    save_checkpoint(deploy, dst, arch, kwargs)
    written, _ = load_state_dict_file(dst)
    rebuilt = create(arch, deploy=True, **kwargs)
    load_into(rebuilt, written, dst, arch)
    reload_error = model_relative_error(deploy, rebuilt, x)
    if not reload_error <= tolerance:
        raise ConversionError(f"{dst} does not reproduce the converted model (relative error {reload_error:.3e})")
    say(f"wrote {dst} (deploy=True; loads strictly into backbones.create({arch!r}, deploy=True, ...))")
    return error


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backbones.convert",
        description="Convert a train-time checkpoint of any registered model (RepMLP, RepVGG, DBB, ...) into a "
                    "deploy checkpoint and verify it.",
    )
    parser.add_argument("--arch", required=True, help="registered model name, e.g. repmlp_res50_g8_224")
    parser.add_argument("src", help="train-time checkpoint (.ckpt/.pt/.pth/.safetensors)")
    parser.add_argument("dst", help="output file; .safetensors or torch format by extension")
    parser.add_argument("--num-classes", type=int, default=None, help="default: from fc.weight or head.fc.weight (0 if none)")
    parser.add_argument("--model-kwargs", default="{}", help="JSON object of extra constructor arguments")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max relative error accepted (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the check input (default 0)")
    parser.add_argument("--prefix", default=None, help="keep only keys under this prefix, e.g. backbone.")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        extra = parse_model_kwargs(args.model_kwargs)
        convert_checkpoint(
            args.arch, args.src, args.dst, num_classes=args.num_classes, model_kwargs=extra,
            tolerance=args.tolerance, seed=args.seed, prefix=args.prefix, log=print, overwrite=args.overwrite,
        )
    except CLI_ERRORS as exc:
        return report_cli_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
