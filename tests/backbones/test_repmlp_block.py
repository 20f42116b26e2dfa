"""RepMLP block: train-time and deploy outputs agree over the whole configuration matrix."""
from __future__ import annotations

import copy

import pytest
import torch

from backbones import RepMLP, max_relative_error, reparameterize_model
from conftest import randomize_bn

# C, O, input (H, W), partition (h, w), kernels, groups, fc1_reduction, pad_input
MATRIX = [
    (8, 8, (14, 14), (7, 7), (1, 3, 5), 4, 1, False),      # the official example
    (8, 16, (14, 14), (7, 7), (1, 3, 5), 4, 1, False),     # C < O (official bug)
    (16, 8, (12, 12), (6, 6), (1, 3), 2, 2, False),        # C > O
    (8, 8, (12, 10), (6, 5), (1, 3, 5), 1, 1, False),      # h != w, odd w
    (8, 8, (15, 9), (5, 3), (1, 3), 8, 4, False),          # depthwise, odd non-square input
    (6, 12, (8, 8), (8, 8), (1, 3, 5, 7), 2, 1, False),    # one partition: no Global Perceptron
    (4, 4, (10, 12), (5, 6), (), 1, 1, False),             # no Local Perceptron
    (8, 8, (13, 11), (7, 5), (1, 3, 5), 2, 2, True),       # padding mode, non-divisible
    (8, 4, (5, 9), (4, 4), (1, 3), 4, 1, True),            # padding mode, tiny odd input
    (8, 16, (14, 10), (7, 5), (1, (3, 5), (7, 3), (1, 5)), 2, 1, False),  # non-square kernels, C < O
    (8, 8, (13, 11), (7, 5), ((5, 1), (3, 5)), 4, 2, True),  # non-square kernels, padding mode
]


def _kernels_id(kernels):
    return "_".join(str(k) if isinstance(k, int) else f"{k[0]}x{k[1]}" for k in kernels) or "none"


IDS = [f"C{c}-O{o}-{H}x{W}-p{h}x{w}-K{_kernels_id(k)}-g{g}-r{r}{'-pad' if p else ''}"
       for c, o, (H, W), (h, w), k, g, r, p in MATRIX]


def _pair(cfg, dtype=torch.float32):
    C, O, size, part, K, g, r, pad = cfg
    train = RepMLP(C, O, size, part, K, g, r, pad).to(dtype)
    randomize_bn(train).eval()
    return train, reparameterize_model(train)


@pytest.mark.parametrize("cfg", MATRIX, ids=IDS)
def test_fp32_equivalence(cfg):
    train, deploy = _pair(cfg)
    x = torch.randn(3, cfg[0], *cfg[2])
    with torch.no_grad():
        y = train(x)
        assert y.shape == (3, cfg[1], *cfg[2])
        assert max_relative_error(y, deploy(x)) <= 1e-5


@pytest.mark.parametrize("cfg", MATRIX, ids=IDS)
def test_fp64_equivalence(cfg):
    train, deploy = _pair(cfg, torch.float64)
    x = torch.randn(2, cfg[0], *cfg[2], dtype=torch.float64)
    with torch.no_grad():
        assert max_relative_error(train(x), deploy(x)) <= 1e-10


@pytest.mark.parametrize("cfg", MATRIX[:3] + MATRIX[7:8], ids=IDS[:3] + IDS[7:8])
def test_channels_last_input(cfg):
    train, deploy = _pair(cfg)
    x = torch.randn(2, cfg[0], *cfg[2]).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert max_relative_error(train(x.contiguous()), deploy(x)) <= 1e-5
        assert max_relative_error(train(x.contiguous()), train(x)) <= 1e-6


@pytest.mark.parametrize("cfg", MATRIX, ids=IDS)
def test_deploy_built_block_has_converted_state_dict(cfg):
    train, deploy = _pair(cfg)
    C, O, size, part, K, g, r, pad = cfg
    built = RepMLP(C, O, size, part, K, g, r, pad, deploy=True)
    converted = deploy.state_dict()
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in converted.items()}
    built.load_state_dict(converted, strict=True)
    x = torch.randn(2, C, *size)
    with torch.no_grad():
        assert torch.equal(built.eval()(x), deploy(x))
    # Train-time-only modules are really gone.
    assert not any(k.startswith(("gp_bn", "fc3_bn", "local")) for k in converted)


def test_switch_to_deploy_is_idempotent_and_its_alias():
    train, _ = _pair(MATRIX[1])
    x = torch.randn(2, 8, 14, 14)
    with torch.no_grad():
        ref = train(x)
        train.switch_to_deploy()
        once = copy.deepcopy(train.state_dict())
        train.switch_to_deploy()
        train.reparameterize()
        assert all(torch.equal(once[k], v) for k, v in train.state_dict().items())
        assert max_relative_error(ref, train(x)) <= 1e-5
        again = reparameterize_model(train)
        assert torch.equal(again(x), train(x))


def test_equivalent_weights_are_differentiable():
    block = RepMLP(4, 4, (8, 8), (4, 4), (1, 3), groups=2)
    randomize_bn(block)
    w3, b3 = block.get_equivalent_fc3()
    w1, b1 = block.get_equivalent_fc1()
    (w3.square().sum() + b3.sum() + w1.sum() + b1.sum()).backward()
    assert block.local["3x3"].conv.weight.grad.abs().sum() > 0
    assert block.gp_bn.weight.grad.abs().sum() > 0
    assert block.fc3_bn.weight.grad.abs().sum() > 0


def test_training_mode_runs_and_backpropagates():
    block = RepMLP(8, 16, (13, 11), (7, 5), (1, 3), groups=2, pad_input=True)
    x = torch.randn(4, 8, 13, 11, requires_grad=True)
    block(x).square().mean().backward()
    assert x.grad.shape == x.shape and block.fc3.weight.grad.abs().sum() > 0



def test_deploy_block_backpropagates_and_matches_its_no_grad_output():
    """The deploy forward takes another path under autograd (no out= argument): same values."""
    block = reparameterize_model(randomize_bn(RepMLP(8, 16, (13, 11), (7, 5), (1, 3), groups=2, pad_input=True)))
    x = torch.randn(4, 8, 13, 11, requires_grad=True)
    out = block(x)
    with torch.no_grad():
        assert max_relative_error(out.detach(), block(x)) <= 1e-6
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0 and block.fc1.weight.grad.abs().sum() > 0 and block.fc3.weight.grad.abs().sum() > 0


def test_deploy_block_exports_with_a_dynamic_batch_under_no_grad():
    """torch.export with a dynamic batch, decomposed as the ONNX exporter does, gives the block's
    outputs at another batch size (the no-grad out= path broke the decomposition)."""
    block = reparameterize_model(randomize_bn(RepMLP(8, 16, (13, 11), (7, 5), (1, 3), groups=2, pad_input=True)))
    with torch.no_grad():
        program = torch.export.export(block, (torch.randn(2, 8, 13, 11),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},)).run_decompositions()
        x = torch.randn(3, 8, 13, 11)
        assert max_relative_error(block(x), program.module()(x)) <= 1e-6


# ---------------------------------------------------------------- bad input: clear errors
def test_wrong_input_size_names_expected_and_actual():
    block = RepMLP(8, 8, (14, 14), (7, 7))
    with pytest.raises(ValueError, match=r"\(N, 8, 14, 14\).*\(2, 8, 28, 28\)"):
        block(torch.randn(2, 8, 28, 28))
    with pytest.raises(ValueError, match=r"\(N, 8, 14, 14\).*\(2, 4, 14, 14\)"):
        block(torch.randn(2, 4, 14, 14))


def test_non_divisible_size_needs_padding_mode():
    with pytest.raises(ValueError, match=r"13x14 is not a multiple of the partition 7x7.*pad_input=True"):
        RepMLP(8, 8, (13, 14), (7, 7))


def test_kernel_larger_than_partition():
    with pytest.raises(ValueError, match=r"kernel size 7 is larger than the 5x7 partition"):
        RepMLP(8, 8, (10, 14), (5, 7), kernels=(1, 3, 7))


def test_even_kernel():
    with pytest.raises(ValueError, match=r"kernel size 4 .* odd"):
        RepMLP(8, 8, (14, 14), (7, 7), kernels=(1, 4))
    with pytest.raises(ValueError, match=r"kernel size \(3, 2\) .* odd"):
        RepMLP(8, 8, (14, 14), (7, 7), kernels=(1, (3, 2)))


@pytest.mark.parametrize("kernel,message", [
    ((3, 7), r"kernel size \(3, 7\) is larger than the 7x5 partition; .* kh <= h and kw <= w"),
    ((1, 3, 5), r"kernel size \(1, 3, 5\) .* an int k or a pair \(kh, kw\)"),
    ("x", r"kernel size 'x' .* an int k or a pair"),
])
def test_bad_non_square_kernel(kernel, message):
    with pytest.raises(ValueError, match=message):
        RepMLP(8, 8, (14, 10), (7, 5), kernels=(1, kernel))


@pytest.mark.parametrize("C,O,g", [(8, 6, 4), (6, 8, 4), (8, 8, 3)])
def test_groups_must_divide_channels(C, O, g):
    with pytest.raises(ValueError, match=rf"groups={g} must divide in_channels={C} and out_channels={O}"):
        RepMLP(C, O, (14, 14), (7, 7), groups=g)
