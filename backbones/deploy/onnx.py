"""A deploy model as an ONNX file, run by ONNX Runtime on CPU, in float32 or static INT8.

Generic over any module whose forward maps one image batch ``(N, 3, H, W)`` to one Tensor:

- :func:`export_onnx` writes the model with a dynamic batch axis through the dynamo exporter (the
  TorchScript exporter refuses the RepMLP deploy forward: ``aten::copy`` has no symbolic), checks
  the file against the model on the example and only then moves it into place;
- :class:`OnnxModel` runs a file like the model: a torch Tensor in, a float32 torch Tensor out;
- :func:`quantize_int8` writes a QDQ INT8 copy calibrated on the given batches;
- :func:`check_onnx` measures a file against the model.

The CPU fusion pass stays out of the way: its fused kernels are not taken under export (the
exporter traces with fake tensors under a dispatch mode, see :mod:`.fused_conv`), so the file holds
plain ``Conv`` nodes. Needs the ``onnx`` extra (onnx, onnxruntime, onnxscript), imported on use.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..reparam.walker import max_relative_error
from ..weights.io import atomic_write

__all__ = ["export_onnx", "OnnxModel", "quantize_int8", "check_onnx", "onnx_precision"]

PathLike = str | os.PathLike
INSTALL_HINT = 'pip install -e ".[onnx]"'
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _require(module: str) -> Any:
    """Import ``module`` (onnx, onnxruntime, onnxscript), or say which extra provides it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(f"backbones.deploy.onnx needs {module.split('.')[0]} (the onnx extra): "
                          f"{INSTALL_HINT}") from exc


def onnx_precision(path: PathLike) -> str:
    """``"int8"`` when the file's graph holds Quantize/DequantizeLinear nodes, else ``"fp32"``."""
    onnx = _require("onnx")
    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    return "int8" if any(node.op_type in _QDQ_OPS for node in graph.node) else "fp32"


def export_onnx(model: nn.Module, example: Tensor, path: PathLike, opset: Optional[int] = None,
                tolerance: Optional[float] = 1e-4) -> Path:
    """Write ``model`` (run in eval mode) to ``path`` as ONNX with a dynamic batch axis.

    ``example``: ``(N, 3, H, W)``; the file takes ``(any N, 3, H, W)`` as input ``images`` and gives
    ``output``. ``opset``: the exporter's default (20 with torch 2.13) when None. The file is
    written whole (no external data: models under 2 GB) to a temporary name, checked by the onnx
    checker and, unless ``tolerance`` is None, by :func:`check_onnx` on ``example``; a failing
    check raises and leaves ``path`` as it was.
    """
    onnx = _require("onnx")
    _require("onnxscript")  # the dynamo exporter translates through it
    path = Path(path)
    if example.shape[0] == 1:  # torch.export fixes a size-1 dimension to 1: trace at 2 to keep the batch symbolic
        example = example.expand(2, *example.shape[1:]).clone()
    training = model.training
    model.eval()

    def write(tmp: str) -> None:
        with torch.no_grad():
            torch.onnx.export(model, (example,), tmp, dynamo=True, external_data=False, optimize=True,
                              opset_version=opset, input_names=["images"], output_names=["output"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        onnx.checker.check_model(tmp, full_check=True)
        if tolerance is not None:
            check_onnx(model, tmp, example, tolerance, name=path)

    try:
        atomic_write(os.fspath(path), write)
    finally:
        model.train(training)
    return path


class OnnxModel:
    """An ONNX file in an ONNX Runtime CPU session, called like the model it came from.

    ``model(x)``: ``x`` ``(N, 3, H, W)``, any dtype castable to float32 → float32 ``(N, ...)`` torch
    Tensor. ``threads``: intra-op threads, ``torch.get_num_threads()`` by default. ``precision``:
    ``"fp32"``/``"int8"``, read from the file's nodes when not given.
    """

    def __init__(self, path: PathLike, threads: Optional[int] = None, precision: Optional[str] = None) -> None:
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"OnnxModel: no ONNX file at path={self.path}")
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        if self.threads < 1:
            raise ValueError(f"OnnxModel: threads must be >= 1, got {threads}")
        self.precision = precision or onnx_precision(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        # spinning threads keep polling for work after each run, taking the cores from torch and
        # anything else on the machine
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(os.fspath(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])

    def __repr__(self) -> str:
        return f"OnnxModel(path='{self.path}', precision='{self.precision}', threads={self.threads})"


def check_onnx(model: nn.Module, onnx_path: PathLike, inputs: Tensor, tolerance: float = 1e-4,
               name: Optional[PathLike] = None) -> float:
    """Max relative error of ONNX Runtime's output on ``inputs`` ``(N, 3, H, W)`` against ``model``'s
    (eval mode), raising ValueError naming the file (``name``, default ``onnx_path``) above ``tolerance``."""
    training = model.training
    try:
        with torch.no_grad():
            reference = model.eval()(inputs)
    finally:
        model.train(training)
    error = max_relative_error(reference, OnnxModel(onnx_path)(inputs))
    if not error <= tolerance:  # NaN fails too
        raise ValueError(f"{name or onnx_path}: ONNX Runtime's output differs from the PyTorch model's by "
                         f"{error:.3g} (max relative error), above tolerance={tolerance:g}")
    return error


class _Batches:
    """The calibration batches as ONNX Runtime's data reader: one ``{input: (N, 3, H, W)}`` each."""

    def __init__(self, input_name: str, batches: Iterable[Tensor]) -> None:
        self.input_name, self.batches = input_name, batches
        self._iter: Optional[Iterator[Tensor]] = None
        self.count = 0

    def get_next(self) -> Optional[dict[str, Any]]:
        if self._iter is None:
            self._iter = iter(self.batches)
        batch = next(self._iter, None)
        if batch is None:
            return None
        self.count += 1
        return {self.input_name: batch.detach().to("cpu", torch.float32).contiguous().numpy()}


def quantize_int8(src: PathLike, dst: PathLike, calibration: Iterable[Tensor], per_channel: bool = True) -> Path:
    """Write a static INT8 (QDQ) copy of the float ONNX file ``src`` to ``dst``, atomically.

    ``calibration``: batches ``(N, 3, H, W)`` drawn like the inputs the model will see; activation
    ranges are their min/max. Weights are quantized per output channel unless ``per_channel`` is False.
    """
    onnx = _require("onnx")
    _require("onnxruntime")
    quantization = _require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"quantize_int8: no ONNX file at src={src}")
    if onnx_precision(src) != "fp32":
        raise ValueError(f"quantize_int8: src={src} is already quantized")
    input_name = onnx.load(os.fspath(src), load_external_data=False).graph.input[0].name
    reader = _Batches(input_name, calibration)

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            prepared = os.path.join(folder, "prepared.onnx")
            # shape inference and graph cleanup that quantize_static expects (it warns without them)
            quant_pre_process(os.fspath(src), prepared)
            # quantize_static's docstring, "x86/x64 CPU with VNNI (e.g. Intel Skylake-SP ... Sapphire
            # Rapids or AMD Zen4 and later)": QUInt8 activations, QInt8 weights, reduce_range=False,
            # since VNNI accumulates 8-bit products without saturation (7-bit weights only for
            # pre-VNNI CPUs)
            quantization.quantize_static(
                prepared, tmp, reader, quant_format=quantization.QuantFormat.QDQ, per_channel=per_channel,
                reduce_range=False, activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8)
        if reader.count == 0:
            raise ValueError(f"quantize_int8: calibration gave no batch for {dst}")
        onnx.checker.check_model(tmp, full_check=True)
        if onnx_precision(tmp) != "int8":
            raise ValueError(f"quantize_int8: the quantized copy of {src} holds no QDQ nodes")

    atomic_write(os.fspath(dst), write)
    return dst
