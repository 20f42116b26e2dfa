"""bf16 inference of converted models on CPU: float32's outputs within bf16's rounding, the fused
kernel taken in bf16 on the same convs as in float32, packed weights rebuilt for the new dtype, and
clear refusals (train-time models, CPUs without native bf16)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_params, randomize_bn
from torch import nn

import backbones
import backbones.deploy.fused_conv as fused_conv
import backbones.deploy.precision as precision
from backbones import max_relative_error, reparameterize_model
from backbones.deploy import Bf16Inference, bf16_supported, to_bf16
from backbones.deploy.fused_conv import conv_act

needs_bf16 = pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16 (bf16_supported() is False)")

MODELS = ["repmlp_res_tiny", "resnet_tiny", "repvgg_a0_tiny", "mobileone_s0_tiny", "replknet_31b_tiny"]
# bf16 keeps 8 significant bits: each layer rounds its input and weights by up to u = 2^-8 (oneDNN
# accumulates in float32), and over the ~10-30 layers of these models the roundings add up like a
# random walk to a few u; measured 0.4-1.2% of the output scale, so 3e-2 (~8u) leaves 2-3x margin
BF16_BOUND = 3e-2


@pytest.fixture
def dtypes(monkeypatch) -> list[torch.dtype]:
    """Records the input dtype of each call of the fused kernel and runs it."""
    made: list[torch.dtype] = []
    op = fused_conv._POINTWISE

    class Recorder:
        def __call__(self, *args):
            made.append(args[0].dtype)
            return op(*args)

        def binary(self, *args):
            made.append(args[0].dtype)
            return op.binary(*args)

    monkeypatch.setattr(fused_conv, "_POINTWISE", Recorder())
    return made


def converted(name: str) -> nn.Module:
    torch.manual_seed(0)
    return reparameterize_model(perturb_params(randomize_bn(backbones.create(name))).eval())


@needs_bf16
@pytest.mark.parametrize("name", MODELS)
def test_bf16_deploy_model_matches_float32_on_the_fused_kernels(dtypes, name):
    model = converted(name)
    x = torch.randn(8, 3, *model.img_size)
    with torch.inference_mode():
        reference = model(x)
        fp32_calls = len(dtypes)
        bf16 = Bf16Inference(to_bf16(model))
        out = bf16(x)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert fp32_calls > 0 and dtypes[:fp32_calls] == [torch.float32] * fp32_calls
    assert dtypes[fp32_calls:] == [torch.bfloat16] * fp32_calls  # the same convs fused in bf16
    assert out.dtype == torch.float32 and out.shape == reference.shape
    error = max_relative_error(reference, out)
    assert 0 < error <= BF16_BOUND  # 0 would mean bf16 never ran
    # the class agrees wherever float32's top-2 margin exceeds what bf16's rounding can move
    top2 = reference.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_BOUND * reference.abs().max()
    assert clear.any() and torch.equal(reference.argmax(1)[clear], out.argmax(1)[clear])


@needs_bf16
@pytest.mark.parametrize("relu, with_residual", [(True, False), (True, True), (False, True), (False, False)])
def test_fused_kernel_in_bf16_equals_the_plain_bf16_ops(dtypes, monkeypatch, relu, with_residual):
    monkeypatch.setattr(fused_conv, "MIN_FUSED_OUTPUT", 0)
    conv = nn.Conv2d(16, 24, 3, 2, 1, bias=True).eval().bfloat16()
    x = torch.randn(2, 16, 13, 10, dtype=torch.bfloat16)
    residual = torch.randn(2, 24, 7, 5, dtype=torch.bfloat16) if with_residual else None
    act = nn.ReLU() if relu else nn.Identity()
    with torch.inference_mode():
        fused = conv_act(conv, x, act, residual)
        y = conv(x).float() + (0 if residual is None else residual.float())
        expected = F.relu(y) if relu else y
    assert dtypes == [torch.bfloat16] and fused.dtype == torch.bfloat16
    # one bf16 rounding of the output (2^-8), plus the plain path's rounding of conv(x) before the add
    assert max_relative_error(expected, fused) <= 2 * 2**-8


@needs_bf16
def test_packed_weight_follows_a_cast(dtypes, monkeypatch):
    monkeypatch.setattr(fused_conv, "MIN_FUSED_OUTPUT", 0)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        conv_act(conv, x, nn.ReLU())
        conv.bfloat16().float()  # back to float32 with no call in between: another storage, same version
        assert max_relative_error(F.relu(conv(x)), conv_act(conv, x, nn.ReLU())) <= 1e-6
        conv.bfloat16()
        conv_act(conv, x.bfloat16(), nn.ReLU())
    assert fused_conv._PACKED[conv][-1].dtype == torch.bfloat16
    assert dtypes == [torch.float32, torch.float32, torch.bfloat16]


@needs_bf16
def test_mixed_dtypes_take_the_plain_path(dtypes, monkeypatch):
    monkeypatch.setattr(fused_conv, "MIN_FUSED_OUTPUT", 0)
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(2, 4, 7, 5, dtype=torch.bfloat16)
    conv.weight.data = conv.weight.data.bfloat16()  # float32 bias: oneDNN's bf16 add would refuse it
    with torch.no_grad(), pytest.raises(RuntimeError):  # the plain conv refuses it too, with its message
        conv_act(conv, x, nn.ReLU(), torch.randn(2, 6, 7, 5, dtype=torch.bfloat16))
    assert dtypes == []


def test_to_bf16_refuses_a_train_time_model(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda: True)
    model = backbones.create("repmlp_res_tiny").eval()
    with pytest.raises(RuntimeError, match="converted .deploy. model.*reparameterize_model"):
        to_bf16(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # left as it was


def test_to_bf16_refuses_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda: False)
    model = backbones.create("resnet_tiny", deploy=True)
    with pytest.raises(RuntimeError, match=r"no native bf16 \(bf16_supported\(\) is False.*_is_mkldnn_bf16_supported"):
        to_bf16(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_inference_casts_nested_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return {"x": x, "both": (x * 2, x.argmax(1))}

    out = Bf16Inference(Pair())(torch.randn(2, 3, 4, 5))
    assert out["x"].dtype == out["both"][0].dtype == torch.float32 and out["both"][1].dtype == torch.int64
    assert out["x"].is_contiguous(memory_format=torch.channels_last)  # the model saw channels_last bf16
