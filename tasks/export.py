"""Export a run's deploy model for another runtime:
``python -m tasks.export RUN_DIR --format onnx [--precision fp32|int8] [--output FILE] [--ckpt_path FILE]``.

Reads the run's ``config.yaml`` (the task is named by its ``deploy.json`` or ``results.json``) and
``deploy.ckpt`` (or ``--ckpt_path``; a train-time checkpoint is converted first, and says so), and
writes the task's forward (classification logits, the segmentation logits of one window, face
embeddings) as ONNX with a dynamic batch axis: ``deploy.onnx``, or ``deploy.int8.onnx`` (static
QDQ quantization, per-channel weights, calibrated on ``--calibration_images`` training images
chosen with the run's seed) beside the checkpoint. Before anything is written, onnxruntime runs the
fp32 export on validation inputs against the PyTorch deploy model: above a max relative error of
``tasks.runtime.ONNX_TOLERANCE`` nothing is written. Scores on the test data come from the test
stage: ``python -m tasks.<task> test ... --runtime onnxruntime --precision int8``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from backbones.cli_common import CLI_ERRORS, check_destination, report_cli_error

from .base import RESULTS_PATTERN
from .runtime import export_task

__all__ = ["export_run", "main"]

TASK_MODULES = {"classification": "tasks.classification", "segmentation": "tasks.segmentation", "face": "tasks.face"}
FORMATS = ("onnx",)
PRECISIONS = ("fp32", "int8")
# keys of a saved fit config that belong to a subcommand, not to the model, data or trainer
_RUN_ONLY = ("ckpt_path", "weights_only", "test_after_fit", "runtime", "precision", "calibration_images")
CHECK_INPUTS = 16


def _task_name(run: Path) -> str:
    for path in [run / "deploy.json", *sorted(run.glob(RESULTS_PATTERN))]:
        if path.is_file():
            task = json.loads(path.read_text()).get("task")
            if task in TASK_MODULES:
                return task
    raise FileNotFoundError(f"{run}: no deploy.json or results.json naming the task (one of {', '.join(TASK_MODULES)})")


def load_run(run: Path, ckpt: Path) -> tuple[Any, Any]:
    """The run's task (weights of ``ckpt`` loaded) and datamodule, built from its ``config.yaml``."""
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run} is not a run folder: it has no config.yaml")
    config = yaml.safe_load(config_path.read_text())
    for key in _RUN_ONLY:
        config.pop(key, None)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint (the run writes deploy.ckpt when fit ends; "
                                "or give --ckpt_path)")
    cli = importlib.import_module(TASK_MODULES[_task_name(run)]).main(["--config", yaml.safe_dump(config)], run=False)
    task, datamodule = cli.model, cli.datamodule
    weights = task.load_weights(str(ckpt), match="all")
    print(f"loaded {ckpt}: {weights.describe()}")
    return task.eval(), datamodule


def _validation_inputs(task: Any, datamodule: Any, count: int) -> torch.Tensor:
    datamodule.setup("validate")
    loaders = datamodule.val_dataloader()
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    images = []
    for batch in loader:
        if batch is not None:
            images.append(task.batch_inputs(batch))
        if sum(int(x.shape[0]) for x in images) >= count:
            break
    if not images:
        raise ValueError("the validation split has no images to check the export on")
    return torch.cat(task.inputs_from_images(images, count))


def export_run(run: Path, precision: str = "fp32", output: Optional[Path] = None, ckpt_path: Optional[Path] = None,
               calibration_images: int = 256, seed: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write the ONNX export of ``run`` (see the module doc); returns its path."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    ckpt = ckpt_path or run / "deploy.ckpt"
    output = output or ckpt.parent / ("deploy.onnx" if precision == "fp32" else f"deploy.{precision}.onnx")
    check_destination(ckpt, output, overwrite)
    task, datamodule = load_run(run, ckpt)
    check = _validation_inputs(task, datamodule, CHECK_INPUTS)
    if not task.deploy:
        print(f"{ckpt} is a train-time checkpoint: converting it to its deploy form first")
        info = task.convert_to_deploy(check)
        print(f"converted: max relative error {info['relative_error']:.2e} on {tuple(check.shape)} validation inputs")
    calibration = None
    if precision == "int8":
        seed = seed if seed is not None else int(getattr(datamodule, "seed", 0))
        print(f"INT8 calibration: {calibration_images} training images chosen with seed {seed}")
        calibration = task.inputs_from_images(datamodule.calibration_batches(calibration_images, seed), calibration_images)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as tmp:
        path = export_task(task, check, Path(tmp), precision, calibration)
        os.replace(path, output)
    print(f"wrote {output}")
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run folder (with config.yaml and deploy.ckpt)")
    parser.add_argument("--format", default="onnx", help=f"export format: {', '.join(FORMATS)}")
    parser.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)}")
    parser.add_argument("--output", type=Path, help="output file (default: deploy.onnx or deploy.int8.onnx beside the checkpoint)")
    parser.add_argument("--ckpt_path", type=Path, help="checkpoint to export (default: RUN/deploy.ckpt)")
    parser.add_argument("--calibration_images", type=int, default=256, help="int8: training images that calibrate it")
    parser.add_argument("--seed", type=int, help="int8: seed of the calibration choice (default: the run's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        if args.format not in FORMATS:
            raise ValueError(f"--format {args.format!r}: choose one of {', '.join(FORMATS)}")
        export_run(args.run, args.precision, args.output, args.ckpt_path, args.calibration_images, args.seed,
                   args.overwrite)
    except (*CLI_ERRORS, ImportError) as exc:
        return report_cli_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
