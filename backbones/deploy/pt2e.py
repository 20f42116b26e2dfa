"""Static INT8 in PyTorch: PT2E quantization compiled by Inductor, on oneDNN's int8 kernels.

:func:`quantize_pt2e` takes a converted (deploy) model and calibration batches and returns an
:class:`Int8Model`, called like the model (float32 in, float32 out):

1. the CPU fusion pass is undone on the model for the duration (:func:`.cpu_fusion.unfuse_for_cpu`):
   the quantizer matches plain ``nn.Conv2d`` calls, not the fused modules;
2. ``torch.export`` at one batch size, then torchao's ``X86InductorQuantizer`` with its default
   configuration: int8 weights per output channel (symmetric), uint8 activations per tensor
   (static, min/max observed on the calibration batches); conv, linear, conv + ReLU and conv +
   add (+ ReLU) become quantized patterns, the rest (the RepMLP partition gather and its batched
   matmul, pooling) stays float32 between them;
3. ``torch.compile`` with Inductor's ``freezing``: the quantized weights become constants, prepacked
   once, and each quantized pattern is lowered to one oneDNN int8 kernel (``qconv2d_pointwise``,
   ``qlinear_pointwise``), which uses AMX or AVX-512 VNNI where the CPU has them. Without freezing
   the int8 weights would be dequantized and the convs run in float32 on every call.

The compiled program is for one batch size (the largest calibration batch, or ``batch_size``):
smaller batches are filled up with copies of their first input and larger ones run in chunks,
which is exact because a deploy model has no cross-sample state (no batch statistics).
Compiling takes seconds to a minute per model on 2 cores and needs the C++ compiler Inductor uses.
Needs the ``int8`` extra (torchao), imported on use.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .cpu_fusion import FusedConvAct, fuse_for_cpu, unfuse_for_cpu
from .precision import require_deploy

__all__ = ["Int8Model", "convert_pt2e_int8", "quantize_pt2e"]

INSTALL_HINT = 'pip install -e ".[int8]"'


def _quantizer() -> Any:
    """torchao's ``X86InductorQuantizer`` with its default configuration, activation ranges observed
    by min/max instead of its histogram search, as ONNX Runtime's calibration does: with the
    histogram's clipped ranges the demo RepMLP kept the fp32 arg-max on fewer validation images
    (97.7% against 99.2%; README, Deploy on CPU)."""
    try:
        from torchao.quantization.pt2e import MinMaxObserver
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError as exc:
        raise ImportError(f"backbones.deploy.pt2e needs torchao (the int8 extra): {INSTALL_HINT}") from exc
    config = get_default_x86_inductor_quantization_config()
    activation = dataclasses.replace(config.input_activation,
                                     observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    return X86InductorQuantizer().set_global(config)


def _fill(x: Tensor, size: int) -> Tensor:
    """``x`` ``(n, ...)`` with ``n <= size``, filled up to ``(size, ...)`` with copies of ``x[0]``."""
    if x.shape[0] == size:
        return x
    return torch.cat([x, x[:1].expand(size - x.shape[0], *x.shape[1:])])


def _in_batches(fn: Callable[[Tensor], Tensor], x: Tensor, size: int) -> Tensor:
    """``fn`` (one batch size ``size``) over ``x`` ``(N, ...)``: chunks of ``size``, the last filled up."""
    outs = [fn(_fill(chunk, size))[: chunk.shape[0]] for chunk in x.split(size)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class Int8Model:
    """A PT2E INT8 model compiled for ``batch_size``: ``model(x)``, ``x`` ``(N, C, H, W)`` of any
    ``N`` → the float32 output of the model it came from, ``(N, ...)``. ``compile_seconds``: how
    long the first (compiling) call took."""

    def __init__(self, compiled: Callable[[Tensor], Tensor], batch_size: int, compile_seconds: float) -> None:
        self.compiled, self.batch_size, self.compile_seconds = compiled, batch_size, compile_seconds

    def _run(self, x: Tensor) -> Tensor:
        # freezing is read when Inductor compiles: kept on for a recompile (a guard failing)
        with torch._inductor.config.patch(freezing=True), torch.inference_mode(), warnings.catch_warnings():
            # Inductor's int8 lowering calls torch.tensor on a tensor, which warns
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            return self.compiled(x)

    def __call__(self, x: Tensor) -> Tensor:
        return _in_batches(self._run, x.detach().to("cpu", torch.float32).contiguous(), self.batch_size).float()

    def __repr__(self) -> str:
        return f"Int8Model(batch_size={self.batch_size}, backend='torch PT2E x86 + Inductor')"


def convert_pt2e_int8(model: nn.Module, calibration: Sequence[Tensor], batch_size: Optional[int] = None
                      ) -> tuple[torch.fx.GraphModule, int]:
    """Steps 1-2 of the module doc: the quantized program of the converted ``model`` (eval mode) for
    batches of ``batch_size``, not compiled (it runs the quantized ops in float32 emulation), and that
    batch size. Arguments as for :func:`quantize_pt2e`."""
    require_deploy(model, "quantize_pt2e")
    if not calibration:
        raise ValueError("quantize_pt2e: no calibration batches (INT8 activation ranges come from them)")
    batch_size = max(2, batch_size or max(int(b.shape[0]) for b in calibration))
    quantizer = _quantizer()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    training, fused = model.training, any(isinstance(m, FusedConvAct) for m in model.modules())
    example = _fill(calibration[0][:batch_size].float(), batch_size)
    try:
        with torch.no_grad():
            program = torch.export.export(unfuse_for_cpu(model.eval()), (example,)).module()
    finally:
        if fused:
            fuse_for_cpu(model)
        model.train(training)
    with torch.no_grad():
        prepared = prepare_pt2e(program, quantizer)
        for batch in calibration:
            _in_batches(prepared, batch.float(), batch_size)
        return convert_pt2e(prepared), batch_size


def quantize_pt2e(model: nn.Module, calibration: Sequence[Tensor], batch_size: Optional[int] = None) -> Int8Model:
    """Static INT8 of the converted ``model`` (eval mode), calibrated on ``calibration``: batches
    ``(n, C, H, W)`` drawn like the inputs it will see (activation ranges are their min/max).

    ``batch_size``: the batch the program is compiled for (default: the largest calibration batch;
    at least 2, since ``torch.export`` fixes a size-1 dimension). ``model`` is left as it was (its
    fusion undone only while it is traced). Raises ImportError without torchao, RuntimeError for a
    model in train-time form and ValueError without calibration batches.
    """
    program, batch_size = convert_pt2e_int8(model, calibration, batch_size)
    int8 = Int8Model(torch.compile(program), batch_size, 0.0)
    start = time.perf_counter()
    int8(torch.zeros(batch_size, *calibration[0].shape[1:]))  # compiles
    int8.compile_seconds = time.perf_counter() - start
    return int8
