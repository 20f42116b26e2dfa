"""backbones.memory_format: the channels_last training layout changes strides, never values, and
keeps the convolutions that read the RGB image in NCHW."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import backbones
from backbones.memory_format import is_channels_last, to_channels_last, to_contiguous
from conftest import REPO, randomize_bn

MODELS = [("repmlp_res_tiny", {}), ("repvgg_a0_tiny", {}), ("mobileone_s0_tiny", {}), ("repmlpnet_tiny", {}),
          ("resnet18_tiny", {"conv_type": "dbb"}), ("resnet18_tiny", {"conv_type": "orepa"}), ("replknet_31b_tiny", {})]


@pytest.mark.parametrize("name,kwargs", MODELS)
def test_channels_last_changes_strides_not_outputs_or_gradients(name, kwargs):
    torch.manual_seed(0)
    model = randomize_bn(backbones.create(name, **kwargs))
    x = torch.randn(2, 3, *backbones.input_size(name))
    model.train()
    reference = copy.deepcopy(model)  # a train forward moves state (BN statistics, DBB's BN padding)
    torch.manual_seed(1)  # drop-path draws, if any
    out = reference(x)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    to_channels_last(model)
    assert is_channels_last(model)
    # the tensors that read the image stay NCHW (the torch 2.13 stride-2 1x1 backward crash)
    for n, p in model.named_parameters():
        if p.ndim == 4:
            assert p.is_contiguous() == (p.shape[1] == 3) or p.is_contiguous(memory_format=torch.channels_last), n
            if p.shape[1] == 3:
                assert p.is_contiguous(), n
    torch.manual_seed(1)  # the same drop-path draws
    again = model(x)
    again.square().mean().backward()
    assert torch.allclose(again, out, rtol=1e-5, atol=1e-5)
    # other kernels sum in another order, which train-mode BN backward amplifies: compare each
    # gradient against the scale of the model's gradient, not element by element
    scale = torch.cat([g.flatten() for g in grads.values()]).norm()
    for n, p in model.named_parameters():
        if n in grads:
            assert (p.grad - grads[n]).norm() <= 1e-3 * scale, n
    to_contiguous(model)
    assert all(p.is_contiguous() for p in model.parameters())


def test_the_parameters_stay_the_same_objects():
    """The optimizer, DDP and the EMA callback hold the Parameters: the pass must not replace them."""
    model = backbones.create("repmlp_res_tiny")
    before = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    to_channels_last(model)
    assert [id(p) for p in model.parameters()] == before
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters()))


_STEM_STEP = """
import sys, torch, torch.nn.functional as F, backbones
from backbones.memory_format import to_channels_last
model = to_channels_last(backbones.create(sys.argv[1]).train())
for bf16 in (False, True):
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = model(torch.randn(4, 3, 224, 224))
    F.cross_entropy(out.float(), torch.zeros(4, dtype=torch.long)).backward()
print("trained")
"""


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_stride2_1x1_stems_train_in_channels_last(name):
    """Their stems hold a stride-2 1x1 conv over the image, whose fp32 backward crashes the process
    in torch 2.13 when the image or its weight is channels_last; in a subprocess so a crash is a
    failure, not the end of the test session."""
    proc = subprocess.run([sys.executable, "-c", _STEM_STEP, name], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "trained" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
