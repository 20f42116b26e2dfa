"""INT8 in PyTorch (backbones.deploy.pt2e): every conv of every registered model is quantized by
PT2E, the compiled model runs oneDNN's int8 kernels, keeps the fp32 arg-max, takes any batch size
exactly, leaves the source model as it was, and bad input is named."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import perturb_params, randomize_bn

pytest.importorskip("torchao", reason='needs the int8 extra: pip install -e ".[int8]"')

import backbones  # noqa: E402
from backbones.deploy import FusedConvAct, unfuse_for_cpu  # noqa: E402
from backbones.deploy.pt2e import convert_pt2e_int8, quantize_pt2e  # noqa: E402
from backbones.reparam.walker import max_relative_error  # noqa: E402

# as tests/backbones/test_onnx_deploy.py: random-init tiny models separate classes weakly, so 8-bit
# rounding flips near-ties; a broken quantization falls towards chance
MIN_INT8_AGREEMENT, MAX_FLIPPED_GAP = 0.8, 0.1
TINY = [n for n in backbones.list_models() if n.endswith("_tiny")]


def _deploy(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # a small perturbation: it moves zero-initialized branches, but keeps untrained deep residual stacks
    # (RepMLPNet's partition FCs) from growing their activations by orders of magnitude
    return backbones.reparameterize_model(perturb_params(randomize_bn(backbones.create(name)), scale=0.05)).eval()


def _inputs(name: str, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, *backbones.input_size(name), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_every_conv_and_linear_of_every_model_is_quantized(name):
    """A module the quantizer does not match (a fused conv, an activation module called twice)
    stays float32 silently: here each conv and linear must read a dequantized int8 weight."""
    model = _deploy(name)
    program, batch = convert_pt2e_int8(model, [_inputs(name, 3, 1)])
    assert batch == 3
    nodes = list(program.graph.nodes)
    layers = [n for n in nodes if n.op == "call_function" and n.target in (torch.ops.aten.conv2d.default,
                                                                            torch.ops.aten.linear.default)]
    assert layers
    for node in layers:
        weight = node.args[1]
        assert "dequantize_per_channel" in str(weight.target), f"{name}: {node.name} reads {weight.target}"
        assert "dequantize_per_tensor" in str(node.args[0].target), f"{name}: {node.name}'s input is not quantized"
    with torch.no_grad():
        x = _inputs(name, 3, 2)
        assert max_relative_error(model(x), program(x)) < 0.1


@pytest.fixture(scope="module")
def int8_model():
    name = "repmlp_res_tiny"
    model = _deploy(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = [_inputs(name, 8, seed) for seed in range(4)]
    return name, model, before, quantize_pt2e(model, calibration)


def test_the_compiled_model_runs_int8_kernels_and_keeps_the_arg_max(int8_model):
    name, model, _, int8 = int8_model
    assert int8.batch_size == 8 and int8.compile_seconds > 0
    x = _inputs(name, 64, 5)
    with torch.profiler.profile() as prof:
        out = int8(x[:8])
    kernels = {e.name for e in prof.events()}
    assert any("qconv" in k for k in kernels), sorted(kernels)  # lowered by Inductor's freezing, not emulated
    assert out.dtype == torch.float32
    with torch.no_grad():
        expected = model(x)
    out = int8(x)
    error = max_relative_error(expected, out)
    assert 0 < error < 0.1  # quantized, and close
    kept = expected.argmax(1) == out.argmax(1)
    assert kept.float().mean() >= MIN_INT8_AGREEMENT
    top2 = expected.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]) / expected.abs().max()
    assert (gap[~kept] < MAX_FLIPPED_GAP).all()


def test_any_batch_size_gives_each_input_its_own_output(int8_model):
    name, _, _, int8 = int8_model
    x = _inputs(name, 11, 6)  # one chunk of 8, one of 3 filled up to 8
    whole = int8(x)
    assert whole.shape[0] == 11
    for i in (0, 7, 8, 10):
        assert torch.equal(whole[i], int8(x[i:i + 1])[0])
    assert repr(int8) == "Int8Model(batch_size=8, backend='torch PT2E x86 + Inductor')"


def test_the_source_model_is_left_as_it_was(int8_model):
    name, model, before, _ = int8_model
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert any(isinstance(m, FusedConvAct) for m in model.modules())  # fused again after tracing
    assert not model.training
    plain = unfuse_for_cpu(backbones.create(name, deploy=True)).eval()  # not fused: quantizing does not fuse it
    convert_pt2e_int8(plain, [_inputs(name, 2, 0)])
    assert not any(isinstance(m, FusedConvAct) for m in plain.modules())


def test_bad_input_is_named(monkeypatch):
    with pytest.raises(RuntimeError, match=r"quantize_pt2e takes a converted \(deploy\) model.*reparameterize_model"):
        quantize_pt2e(backbones.create("resnet_tiny").eval(), [torch.randn(2, 3, 32, 32)])
    model = backbones.create("resnet_tiny", deploy=True).eval()
    with pytest.raises(ValueError, match="no calibration batches"):
        quantize_pt2e(model, [])
    for module in [m for m in sys.modules if m.startswith("torchao")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import torchao...` raise ImportError
    with pytest.raises(ImportError, match=r'torchao \(the int8 extra\): pip install -e "\.\[int8\]"'):
        quantize_pt2e(model, [torch.randn(2, 3, 32, 32)])
