"""Model size and cost: parameter counts and multiply-adds of one forward pass."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "input_channels"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def input_channels(model: nn.Module) -> int:
    """Channels of the first convolution (3 when the model has none)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def count_macs(model: nn.Module, size: tuple[int, int], in_chans: int | None = None) -> int:
    """Multiply-adds of one forward of a ``(1, in_chans, *size)`` input.

    ``FlopCounterMode`` counts 2 flops per multiply-add. The model runs once, without gradients,
    on the device of its parameters, in its current train/eval mode.
    """
    in_chans = input_channels(model) if in_chans is None else in_chans
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, in_chans, *size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2
