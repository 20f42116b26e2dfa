"""Shared test helpers: randomized BN statistics make every fusion test meaningful."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters (identity BNs hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                dtype = m.running_mean.dtype
                m.running_mean.copy_((torch.rand(n, generator=gen) - 0.5).to(dtype))
                m.running_var.copy_((torch.rand(n, generator=gen) + 0.5).to(dtype))
                if m.affine:
                    m.weight.copy_((torch.rand(n, generator=gen) + 0.5).to(dtype))
                    m.bias.copy_((torch.rand(n, generator=gen) - 0.5).to(dtype))
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
