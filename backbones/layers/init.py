"""Weight initialization shared by the networks."""
from __future__ import annotations

from torch import nn

from .dbb import BNAndPad


def zero_init_output_norms(module: nn.Module) -> None:
    """Zero the scale of every BN whose output ends a branch of ``module`` (its last conv, with
    every train-time branch), so a residual block ending in ``module`` starts as its shortcut.

    The BN inside DBB's BN-and-pad is not a branch's output (a conv follows it), so it is left as it is.
    """
    inner = {id(m.bn) for m in module.modules() if isinstance(m, BNAndPad)}
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d) and id(bn) not in inner:
            nn.init.zeros_(bn.weight)
