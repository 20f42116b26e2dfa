"""bf16 inference of a converted (deploy) model on a CPU with native bf16 (AVX512_BF16, AMX).

``to_bf16(model)`` casts the deploy model's parameters and buffers to bfloat16 and its 4-d weights
to channels_last, in place; the CPU fusion pass keeps working on it (its fused kernel takes bf16,
and each packed weight is rebuilt for the new dtype). Inputs then go in as bf16 channels_last,
which :class:`Bf16Inference` does, casting the outputs back to float32::

    model = Bf16Inference(to_bf16(backbones.create(name, deploy=True).eval()))
    logits = model(images)  # float32 in, float32 out

bf16 keeps 8 mantissa bits (relative rounding 2^-9 per value), so outputs differ from float32 by
about 1% of their scale, and the converted model is what to cast: its merged weights are rounded
once, where a train-time model would round every branch and BN separately and fuse nothing.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .cpu_fusion import fuse_for_cpu
from .fused_conv import _native_bf16, clear_packed_weights

__all__ = ["bf16_supported", "to_bf16", "Bf16Inference", "require_deploy"]


def bf16_supported() -> bool:
    """Whether this CPU runs bf16 natively: oneDNN's ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
    and, on x86, ``torch.cpu._is_avx512_bf16_supported()`` (oneDNN's check alone also accepts a
    plain AVX-512 CPU, which emulates bf16 slower than float32)."""
    return _native_bf16()


def require_deploy(model: nn.Module, caller: str) -> None:
    """Raise RuntimeError naming the first train-time module of ``model``: reduced precision is for
    the converted model, whose merged weights are rounded once (a train-time model would round every
    branch and BN separately, and nothing would run fused)."""
    train_time = [name or type(model).__name__ for name, m in model.named_modules() if getattr(m, "deploy", None) is False]
    if train_time:
        raise RuntimeError(
            f"{caller} takes a converted (deploy) model, but {len(train_time)} module(s) are in train-time form "
            f"(first: {train_time[0]}); convert it first with backbones.reparameterize_model(model): "
            "reduced precision would round every branch and BN separately, and nothing would run fused"
        )


def to_bf16(model: nn.Module) -> nn.Module:
    """Cast a converted model to bf16 and channels_last for CPU inference, in place; returns it.

    Applies the CPU fusion pass first (idempotent). Raises RuntimeError on a CPU without native
    bf16 and on a model with train-time (unconverted) modules.
    """
    if not bf16_supported():
        raise RuntimeError(
            "to_bf16: this CPU has no native bf16 (bf16_supported() is False: it needs oneDNN's "
            "torch.ops.mkldnn._is_mkldnn_bf16_supported() and, on x86, AVX512_BF16); emulated bf16 runs "
            "slower than float32, so keep the model in float32"
        )
    require_deploy(model, "to_bf16")
    fuse_for_cpu(model)
    clear_packed_weights(model)  # the float32 copies; the bf16 ones are packed on first use
    with torch.inference_mode(False):  # inference tensors keep no version counter: never fused
        return model.to(dtype=torch.bfloat16, memory_format=torch.channels_last)


def _to_float(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, dict):
        return {k: _to_float(v) for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(map(_to_float, output))
    return output


class Bf16Inference(nn.Module):
    """Runs a :func:`to_bf16` model on float32 inputs: ``(N, C, H, W)`` is cast to bf16 channels_last,
    and every floating tensor of the output (a tensor, or a tuple, list or dict of them) back to float32.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return _to_float(self.model(x.to(torch.bfloat16, memory_format=torch.channels_last)))
