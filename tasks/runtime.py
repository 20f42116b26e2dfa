"""Where and in what precision the test stage runs a task's model: ``--runtime torch|onnxruntime``
and ``--precision fp32|bf16|int8``.

What counts for a deploy choice is the task's own metric on the model as deployed, so the test
stage runs the task's forward (classification logits, the segmentation logits of one window, face
embeddings) through the chosen runtime, on the same data and with the same metric code as the fp32
test, and times those calls (``results.json``: ``runtime``, ``precision``, ``throughput``).

- ``torch fp32``: the task's own forward.
- ``torch bf16``: the converted model cast to bf16 in channels_last (:func:`backbones.deploy.to_bf16`),
  where the CPU runs bf16 natively; the fp32 weights come back when the test ends.
- ``torch int8``: the task's forward quantized by PT2E (static, per-channel weights) and compiled by
  Inductor onto oneDNN's int8 kernels (:func:`backbones.deploy.pt2e.quantize_pt2e`), calibrated on
  inputs drawn from the training images (never the test data).
- ``onnxruntime fp32``: the task's forward exported to ONNX (dynamic batch) and run by onnxruntime,
  after a check against the PyTorch model on real inputs (max relative error ≤ ``ONNX_TOLERANCE``).
- ``onnxruntime int8``: that export, statically quantized (QDQ, per-channel weights) with the same
  kind of calibration inputs: the INT8 of an ONNX deployment.

On this project's CPUs torch int8 runs about 2× faster than onnxruntime int8 at batch 8 (README,
Deploy on CPU: which INT8).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["RUNTIMES", "PRECISIONS", "SUPPORTED", "ONNX_TOLERANCE", "RuntimeSpec", "Runner", "TaskForward", "build_runner",
           "export_task", "first_inputs"]

RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")
SUPPORTED = {"torch": ("fp32", "bf16", "int8"), "onnxruntime": ("fp32", "int8")}
ONNX_TOLERANCE = 1e-4


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime and a precision, checked against :data:`SUPPORTED`.

    ``calibration_images``: how many training images calibrate INT8 (chosen with ``seed``)."""

    runtime: str = "torch"
    precision: str = "fp32"
    calibration_images: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"--runtime {self.runtime!r}: choose one of {', '.join(RUNTIMES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.precision not in SUPPORTED[self.runtime]:
            offered = "; ".join(f"{r}: {', '.join(p)}" for r, p in SUPPORTED.items())
            raise ValueError(f"--runtime {self.runtime} --precision {self.precision} is not offered ({offered})")
        if self.calibration_images < 1:
            raise ValueError(f"--calibration_images must be at least 1, got {self.calibration_images}")

    @property
    def is_default(self) -> bool:
        return (self.runtime, self.precision) == ("torch", "fp32")

    @property
    def results_file(self) -> str:
        """Where a test on it reports, in the run's log folder: ``results.json`` for torch fp32,
        ``results.<runtime>-<precision>.json`` for the others, so the tests of one run sit side by side."""
        return "results.json" if self.is_default else f"results.{self.runtime}-{self.precision}.json"

    @classmethod
    def parse(cls, text: str, **kwargs: Any) -> "RuntimeSpec":
        """``"RUNTIME/PRECISION"`` (``torch/int8``) → the spec, or ValueError naming the form and the choices."""
        runtime, sep, precision = str(text).partition("/")
        if not sep:
            raise ValueError(f"{text!r}: give RUNTIME/PRECISION, e.g. torch/int8 (runtimes: {', '.join(RUNTIMES)}; "
                             f"precisions: {', '.join(PRECISIONS)})")
        return cls(runtime.strip(), precision.strip(), **kwargs)

    @property
    def needs_calibration(self) -> bool:
        """Whether building it takes inputs from the training images: to check an export, or to
        calibrate INT8."""
        return self.runtime == "onnxruntime" or self.precision == "int8"


@dataclass
class Runner:
    """A task's forward on one runtime: ``(N, 3, H, W)`` → the forward's float32 output. Times its
    calls (``seconds``, ``calls``, ``batch_size``: the largest batch it ran) and undoes what it
    changed in the task on :meth:`close`."""

    spec: RuntimeSpec
    forward: Callable[[Tensor], Tensor]
    undo: Optional[Callable[[], None]] = None
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    calls: int = 0
    batch_size: int = 0

    def __call__(self, x: Tensor) -> Tensor:
        start = time.perf_counter()
        # the spec's precision, not the trainer's: under --trainer.precision bf16-mixed the test
        # step runs in autocast, which would turn an fp32 test into a bf16 one
        with torch.autocast(x.device.type, enabled=False):
            out = self.forward(x)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.batch_size = max(self.batch_size, int(x.shape[0]))
        return out

    def close(self) -> None:
        if self.undo is not None:
            self.undo()
            self.undo = None


def _bf16_runner(task: nn.Module, spec: RuntimeSpec) -> Runner:
    from backbones.deploy import Bf16Inference, to_bf16

    saved = {k: v.detach().clone() for k, v in task.state_dict().items()}
    to_bf16(task)  # raises where the CPU has no native bf16

    def undo() -> None:
        task.float()
        task.load_state_dict(saved)

    return Runner(spec, Bf16Inference(task), undo)


def _int8_torch_runner(task: nn.Module, spec: RuntimeSpec, calibration: Sequence[Tensor],
                       batch_size: Optional[int], log: Callable[[str], None]) -> Runner:
    from backbones.deploy.pt2e import quantize_pt2e
    from backbones.reparam.walker import max_relative_error

    module = TaskForward(task).eval()
    model = quantize_pt2e(module, calibration, batch_size)
    check = calibration[0]
    with torch.inference_mode():
        error = max_relative_error(module(check), model(check))
    log(f"INT8 (torch PT2E, compiled for batch {model.batch_size} in {model.compile_seconds:.0f} s): calibrated on "
        f"{sum(int(c.shape[0]) for c in calibration)} training inputs (static, per-channel weights); max relative "
        f"error {error:.2e} against the fp32 model (scored by the test stage)")
    return Runner(spec, model)


class TaskForward(nn.Module):
    """The task's forward as a plain module (what is exported): the LightningModule around it
    holds a trainer, metrics and hooks that an export does not need to see."""

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.task = task

    def forward(self, x: Tensor) -> Tensor:
        return self.task(x)


def export_task(task: nn.Module, check: Tensor, folder: Path, precision: str = "fp32",
                calibration: Optional[Sequence[Tensor]] = None, log: Callable[[str], None] = print) -> Path:
    """The task's forward as ONNX in ``folder`` (``model.onnx``, and ``model.int8.onnx`` for int8),
    returning the file for ``precision``. The fp32 export is first run by onnxruntime on ``check``
    (real inputs) against the PyTorch model: above ``ONNX_TOLERANCE`` it is a ValueError. INT8 is
    calibrated on ``calibration`` (model inputs from training images) and its error is reported."""
    from backbones.deploy.onnx import check_onnx, export_onnx, quantize_int8

    module = TaskForward(task).eval()
    path = export_onnx(module, check[:1], folder / "model.onnx")
    error = check_onnx(module, path, check, tolerance=ONNX_TOLERANCE)
    log(f"check: onnxruntime fp32 against the PyTorch model, max relative error {error:.2e} on "
        f"{tuple(check.shape)} inputs (tolerance {ONNX_TOLERANCE:g})")
    if precision == "int8":
        if not calibration:
            raise ValueError("INT8 needs calibration inputs from the training images; none were given")
        path = quantize_int8(path, folder / "model.int8.onnx", calibration)
        error = check_onnx(module, path, check, tolerance=float("inf"))
        log(f"INT8: calibrated on {sum(int(c.shape[0]) for c in calibration)} training inputs (static QDQ, "
            f"per-channel weights); max relative error {error:.2e} against the fp32 model (scored by the test stage)")
    return path


def build_runner(task: Any, spec: RuntimeSpec, calibration: Optional[Sequence[Tensor]] = None,
                 log: Callable[[str], None] = print, batch_size: Optional[int] = None) -> Runner:
    """The :class:`Runner` of ``task`` (a :class:`tasks.base.ReparamTask`, weights loaded) for
    ``spec``. onnxruntime and INT8 need ``calibration`` (model inputs from the training images): its
    first batch checks the export or the quantized model, and INT8 is calibrated on all of it.
    ``batch_size``: the batch the forward will be called with (torch int8 is compiled for it;
    default: the largest calibration batch). A train-time model is converted
    to its deploy form first (and says so): the deployed model is what runs."""
    if spec.is_default:
        return Runner(spec, task)
    if not task.deploy:
        log(f"{spec.runtime} {spec.precision}: converting the train-time model to its deploy form first")
        task.convert_to_deploy(calibration[0] if calibration else None)
    if spec.needs_calibration and not calibration:
        raise ValueError(f"--runtime {spec.runtime} --precision {spec.precision} needs inputs from the training "
                         "images (to check an export, to calibrate INT8); none were given")
    if spec.runtime == "torch":
        return _bf16_runner(task, spec) if spec.precision == "bf16" else _int8_torch_runner(task, spec, calibration, batch_size, log)
    from backbones.deploy.onnx import OnnxModel

    folder = Path(tempfile.mkdtemp(prefix="repmlp-runtime-"))
    path = export_task(task, calibration[0], folder, spec.precision, calibration, log)
    return Runner(spec, OnnxModel(path), undo=lambda: shutil.rmtree(folder, ignore_errors=True), files=[path])


def first_inputs(calibration: Sequence[Tensor], count: int) -> list[Tensor]:
    """The first ``count`` inputs of ``calibration`` batches, as batches."""
    out, left = [], count
    for batch in calibration:
        if left <= 0:
            break
        out.append(batch[:left])
        left -= int(out[-1].shape[0])
    return out

