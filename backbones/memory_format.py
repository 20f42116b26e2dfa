"""The channels_last training layout: a pass over a train-time model, not a thread through forwards.

oneDNN's convolutions on CPU run faster in channels_last (NHWC): measured here on a training step
of ``repmlp_res50_g8_224``, channels_last alone is about 1.3× NCHW, and with bf16 autocast it is what
lifts the step from about 1.8× to about 2.6× fp32 (``python -m bench.reparam --sections precision``).
A convolution whose weight is channels_last returns a channels_last output whatever its input's
layout, so converting the weights is enough: the layout then carries through the network.

The image itself and the convolutions that read it stay NCHW. In torch 2.13 (CPU, float32) the
backward of a stride-2 1×1 convolution over a 3-channel channels_last input or weight segfaults
(the RepVGG and MobileOne stems have one); leaving every 4-d tensor with ``shape[1] == 3`` (weights
that read an RGB image) contiguous keeps the stems in NCHW, and the first conv after them switches
the network to channels_last.

:func:`to_contiguous` undoes the pass; the deploy conversion and the safetensors writer work on
contiguous tensors (:meth:`tasks.base.ReparamTask.convert_to_deploy` calls it first).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["to_channels_last", "to_contiguous", "is_channels_last", "IMAGE_CHANNELS"]

IMAGE_CHANNELS = 3


def _reads_image(tensor: torch.Tensor) -> bool:
    return tensor.shape[1] == IMAGE_CHANNELS


def _convert(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor is None or tensor.ndim != 4:
                    continue
                if memory_format is torch.channels_last and _reads_image(tensor):
                    continue
                # in place (``.data``): the optimizer, DDP and EMA keep holding the same Parameter
                tensor.data = tensor.data.contiguous(memory_format=memory_format)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-d parameter and buffer of ``model`` channels_last, in place, except those that
    read the RGB image (``shape[1] == 3``: see the module doc); returns ``model``. Values and
    outputs are unchanged; only strides change."""
    return _convert(model, torch.channels_last)


def to_contiguous(model: nn.Module) -> nn.Module:
    """Undo :func:`to_channels_last`: every 4-d parameter and buffer contiguous (NCHW), in place."""
    return _convert(model, torch.contiguous_format)


def is_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` is in the :func:`to_channels_last` layout: every 4-d parameter that does not
    read the image is channels_last (a 1×1 or one-channel kernel is both layouts at once)."""
    params = [p for p in model.parameters() if p.ndim == 4 and not _reads_image(p)]
    return bool(params) and all(p.is_contiguous(memory_format=torch.channels_last) for p in params)
