"""Face backbones: MobileFaceNet (insightface ``mbf``), FaceResNet and RepMLP-FaceRes (paper §4.4).

Blocks (LinearBN, FaceEmbeddingHead) and whole models convert to their deploy form within the
project tolerances (randomized BN statistics, eval mode); the paper's structure is checked.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from backbones import (
    Bottleneck,
    ReparamBlock,
    RepMLP,
    RepMLPBottleneck,
    create,
    list_models,
    max_relative_error,
    model_relative_error,
    reparameterize_model,
)
from backbones.complexity import count_macs, count_params
from backbones.models.faceresnet import (
    FaceEmbeddingHead,
    faceresnet,
    faceresnet_tiny,
    repmlp_faceres,
    repmlp_faceres_tiny,
)
from backbones.models.mobilefacenet import LinearBN, MobileFaceNet, mobilefacenet, mobilefacenet_tiny

FACE = sorted(set(list_models("*face*")) | set(list_models("mobilefacenet*")))
TINY_FACE = [n for n in FACE if n.endswith("_tiny")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """fp64 depthwise convs run as OpenMP loops over tiny per-channel work items, which stall for
    seconds per layer when the cores are shared; the models here are small, one thread is enough."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bn_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _faces(model: nn.Module, batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, *model.img_size, dtype=dtype)


def _assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- blocks
LINEAR_BN = [(16, 8, False), (8, 24, True), (5, 5, False), (1, 3, True)]


@pytest.mark.parametrize("in_f,out_f,bias", LINEAR_BN)
def test_linear_bn_equivalence_and_round_trip(in_f, out_f, bias):
    block = LinearBN(in_f, out_f, bias=bias)
    if bias:
        with torch.no_grad():
            block.linear.bias.uniform_(-1, 1)
    randomize_bn(block, seed=3).eval()
    x = torch.randn(4, in_f)
    deploy = reparameterize_model(block)
    assert deploy.deploy and not block.deploy
    assert _bn_modules(deploy) == []
    assert len(_linears(deploy)) == 1 and deploy.linear.bias is not None
    assert model_relative_error(block, deploy, x) <= 1e-5
    # fp64
    block64 = copy.deepcopy(block).double()
    deploy64 = reparameterize_model(block64)
    assert model_relative_error(block64, deploy64, x.double()) <= 1e-10
    # the fold really depends on the BN: changing its statistics changes the train output
    other = copy.deepcopy(block)
    randomize_bn(other, seed=4).eval()
    assert model_relative_error(other, deploy, x) > 1e-2
    # repeated conversion changes nothing
    before = {k: v.clone() for k, v in deploy.state_dict().items()}
    deploy.switch_to_deploy()
    _assert_state_dicts_equal(before, deploy.state_dict())
    # deploy=True round trip
    built = LinearBN(in_f, out_f, bias=bias, deploy=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in deploy.state_dict().items()}
    built.load_state_dict(deploy.state_dict(), strict=True)
    assert model_relative_error(deploy, built, x) == 0.0


HEADS = [
    # in_channels, (h, w), embedding, dropout
    (8, (3, 5), 16, 0.3),
    (16, (2, 2), 8, 0.0),
    (4, (1, 1), 12, 0.5),
    (6, (4, 3), 6, 0.1),
]


@pytest.mark.parametrize("cin,size,emb,dropout", HEADS)
def test_face_embedding_head_equivalence_and_round_trip(cin, size, emb, dropout):
    head = randomize_bn(FaceEmbeddingHead(cin, size, emb, dropout), seed=5).eval()
    x = torch.randn(3, cin, *size)
    assert head(x).shape == (3, emb)
    deploy = reparameterize_model(head)
    assert _bn_modules(deploy) == []
    assert len(_linears(deploy)) == 1
    assert not any(isinstance(m, nn.Dropout) for m in deploy.modules())
    assert deploy.fc.weight.shape == (emb, cin * size[0] * size[1]) and deploy.fc.bias.shape == (emb,)
    assert model_relative_error(head, deploy, x) <= 1e-5
    # eval mode: dropout is the identity, so the head equals itself without it
    without = copy.deepcopy(head)
    if dropout > 0:
        without.dropout = nn.Identity()
    with torch.no_grad():
        assert torch.equal(head(x), without(x))
    if dropout > 0:  # in train mode dropout is active (the head really has it)
        train_copy = copy.deepcopy(head).train()
        with torch.no_grad():
            torch.manual_seed(1)
            a = train_copy(x)
            torch.manual_seed(2)
            b = train_copy(x)
        assert not torch.allclose(a, b)
    # fp64
    head64 = copy.deepcopy(head).double()
    assert model_relative_error(head64, reparameterize_model(head64), x.double()) <= 1e-10
    # repeated conversion
    before = {k: v.clone() for k, v in deploy.state_dict().items()}
    deploy.switch_to_deploy()
    reparameterize_model(deploy, inplace=True)
    _assert_state_dicts_equal(before, deploy.state_dict())
    # deploy=True round trip
    built = FaceEmbeddingHead(cin, size, emb, dropout, deploy=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in deploy.state_dict().items()}
    built.load_state_dict(deploy.state_dict(), strict=True)
    assert model_relative_error(deploy, built, x) == 0.0


def test_face_embedding_head_keeps_positions():
    """The head is position-aware (no pooling): permuting spatial positions changes the embedding."""
    head = randomize_bn(FaceEmbeddingHead(4, (3, 5), 8), seed=6).eval()
    x = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        assert not torch.allclose(head(x), head(x.flip(-1)), atol=1e-3)


# --------------------------------------------------------------------------- every face factory
def test_face_factories_are_registered():
    assert FACE == ["faceresnet", "faceresnet_tiny", "mobilefacenet", "mobilefacenet_tiny",
                    "repmlp_faceres", "repmlp_faceres_tiny"]
    assert TINY_FACE == ["faceresnet_tiny", "mobilefacenet_tiny", "repmlp_faceres_tiny"]


@pytest.mark.parametrize("name", FACE)
def test_face_factory_converts(name):
    torch.manual_seed(0)
    model = randomize_bn(create(name), seed=7).eval()
    expected_emb = 128 if name.endswith("_tiny") else 512
    assert model.embedding_size == expected_emb
    x = _faces(model, batch=2)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, expected_emb)
    assert torch.isfinite(out).all() and out.std() > 0
    deploy = reparameterize_model(model)
    assert model_relative_error(model, deploy, x) <= 1e-4
    assert _bn_modules(deploy) == []
    assert all(m.deploy for m in deploy.modules() if isinstance(m, ReparamBlock))
    assert count_params(deploy) < count_params(model)
    assert count_params(deploy) == count_params(create(name, deploy=True))
    assert not model.deploy  # the walker deep-copies


@pytest.mark.parametrize("name", TINY_FACE)
def test_tiny_face_factory_fp64(name):
    model = randomize_bn(create(name), seed=8).double().eval()
    x = _faces(model, batch=2, dtype=torch.float64)
    assert model_relative_error(model, reparameterize_model(model), x) <= 1e-10


@pytest.mark.parametrize("name", TINY_FACE)
def test_repeated_conversion_and_deploy_round_trip(name):
    model = randomize_bn(create(name), seed=9).eval()
    x = _faces(model, batch=2)
    deploy = reparameterize_model(model)
    before = {k: v.clone() for k, v in deploy.state_dict().items()}
    with torch.no_grad():
        ref = deploy(x)
    deploy.switch_to_deploy()
    reparameterize_model(deploy, inplace=True)
    for m in deploy.modules():
        if isinstance(m, ReparamBlock):
            m.switch_to_deploy()
    _assert_state_dicts_equal(before, deploy.state_dict())
    with torch.no_grad():
        assert torch.equal(deploy(x), ref)
    twice = reparameterize_model(reparameterize_model(model))
    assert model_relative_error(deploy, twice, x) == 0.0

    built = create(name, deploy=True).eval()
    assert _bn_modules(built) == []
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in before.items()}
    built.load_state_dict(deploy.state_dict(), strict=True)
    assert model_relative_error(deploy, built, x) == 0.0
    assert model_relative_error(model, built, x) <= 1e-4


# --------------------------------------------------------------------------- non-square and odd sizes
def _check_converts(model: nn.Module, seed: int) -> nn.Module:
    randomize_bn(model, seed=seed).eval()
    x = _faces(model, batch=2)
    with torch.no_grad():
        assert model(x).shape == (2, model.embedding_size)
    deploy = reparameterize_model(model)
    assert model_relative_error(model, deploy, x) <= 1e-4
    assert _bn_modules(deploy) == []
    return deploy


def test_faceresnet_tiny_non_square():
    model = faceresnet_tiny(img_size=(64, 48))
    assert model.body.stage_sizes == [(16, 12), (8, 6), (4, 3), (2, 2)]
    assert model.head.fc.in_features == 256 * 2 * 2
    _check_converts(model, 10)


def test_mobilefacenet_tiny_non_square():
    model = mobilefacenet_tiny(img_size=(64, 80))
    assert model.gdc.conv.kernel_size == (4, 5) and model.gdc.conv.groups == 512
    _check_converts(model, 11)


def test_repmlp_faceres_tiny_non_square_partitions():
    model = repmlp_faceres_tiny(img_size=(64, 96), partition=(4, 6))
    assert model.body.stage_sizes == [(16, 24), (8, 12), (4, 6), (2, 3)]
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, RepMLP)}
    by_stage = {stage: [m for n, m in blocks.items() if n.startswith(f"body.{stage}.")]
                for stage in ("layer1", "layer2", "layer3", "layer4")}
    assert [len(v) for v in by_stage.values()] == [1, 1, 1, 0]
    assert {m.partition for m in blocks.values()} == {(4, 6)}
    assert [m.input_size for m in by_stage["layer1"] + by_stage["layer2"] + by_stage["layer3"]] == \
        [(16, 24), (8, 12), (4, 6)]
    assert [m.num_partitions for m in by_stage["layer1"] + by_stage["layer2"] + by_stage["layer3"]] == \
        [(4, 4), (2, 2), (1, 1)]
    assert [m.has_global_perceptron for m in by_stage["layer1"] + by_stage["layer2"] + by_stage["layer3"]] == \
        [True, True, False]
    deploy = _check_converts(model, 12)
    # the deploy RepMLP is one FC per partition (fc3) with no local convs
    for m in deploy.modules():
        if isinstance(m, RepMLP):
            assert not hasattr(m, "local") and m.fc3.bias is not None


def test_mobilefacenet_tiny_gdc_kernel_is_ceil_of_size_over_16():
    model = mobilefacenet_tiny(img_size=72)
    assert model.gdc.conv.kernel_size == (5, 5)  # 72 -> 36 -> 18 -> 9 -> 5
    _check_converts(model, 13)
    odd = mobilefacenet_tiny(img_size=(70, 65))  # 70 -> 35 -> 18 -> 9 -> 5; 65 -> 33 -> 17 -> 9 -> 5
    assert odd.gdc.conv.kernel_size == (5, 5)
    _check_converts(odd, 14)
    small = mobilefacenet_tiny(img_size=(49, 33))  # 49 -> 25 -> 13 -> 7 -> 4; 33 -> 17 -> 9 -> 5 -> 3
    assert small.gdc.conv.kernel_size == (4, 3)
    _check_converts(small, 15)


def test_faceresnet_tiny_odd_size():
    model = faceresnet_tiny(img_size=(60, 68))
    assert model.body.stage_sizes == [(15, 17), (8, 9), (4, 5), (2, 3)]
    assert model.head.fc.in_features == 256 * 2 * 3
    _check_converts(model, 16)


# --------------------------------------------------------------------------- the paper's structure
def test_repmlp_faceres_structure_matches_paper():
    model = repmlp_faceres()
    body = model.body
    assert model.img_size == (96, 96)
    assert body.stage_sizes == [(24, 24), (12, 12), (6, 6), (3, 3)]
    widths = [128, 256, 512, 1024]
    assert [len(stage) for stage in body.stages] == [3, 2, 2, 2]
    repmlp_blocks = {name: m for name, m in model.named_modules() if isinstance(m, RepMLPBottleneck)}
    assert sorted(repmlp_blocks) == ["body.layer1.1", "body.layer1.2", "body.layer2.1", "body.layer3.1"]
    assert len([m for m in model.modules() if isinstance(m, RepMLP)]) == 4
    for i, stage in enumerate(body.stages):
        assert type(stage[0]) is Bottleneck  # the first block changes resolution/width: plain
        for block in stage:
            assert block.conv1.conv.out_channels == widths[i]  # no 1x1 reduction
            last = block.conv5 if isinstance(block, RepMLPBottleneck) else block.conv3
            assert last.conv.out_channels == widths[i]
    assert all(type(b) is Bottleneck for b in body.layer4)
    expected = {  # stage index: (partitions, global perceptron)
        0: ((4, 4), True),
        1: ((2, 2), True),
        2: ((1, 1), False),
    }
    for name, block in repmlp_blocks.items():
        i = int(name.split(".")[1][-1]) - 1
        rep = block.repmlp
        assert rep.in_channels == rep.out_channels == widths[i] // 2  # r = 2
        assert block.conv2.conv.out_channels == widths[i] // 2
        assert rep.partition == (6, 6) and rep.groups == 4 and rep.kernels == (1, 3, 5)
        assert rep.input_size == body.stage_sizes[i]
        assert (rep.num_partitions, rep.has_global_perceptron) == expected[i]
        assert hasattr(rep, "fc1") == expected[i][1]
        # fc3: one grouped FC over a flattened 6x6 partition
        assert rep.fc3.in_channels == rep.fc3.out_channels == widths[i] // 2 * 36 and rep.fc3.groups == 4
    assert model.head.fc.in_features == 1024 * 3 * 3 and model.head.fc.out_features == 512


def test_faceresnet_structure_has_no_repmlp_and_full_width_3x3():
    model = faceresnet()
    assert model.body.stage_sizes == [(24, 24), (12, 12), (6, 6), (3, 3)]
    assert not any(isinstance(m, RepMLP | RepMLPBottleneck) for m in model.modules())
    assert not model.body.has_repmlp
    widths = [128, 256, 512, 1024]
    assert [len(stage) for stage in model.body.stages] == [3, 2, 2, 2]
    for i, stage in enumerate(model.body.stages):
        for j, block in enumerate(stage):
            assert type(block) is Bottleneck
            conv2 = block.conv2.conv
            assert conv2.kernel_size == (3, 3)
            assert conv2.in_channels == conv2.out_channels == widths[i]
            assert conv2.stride == ((2, 2) if (j == 0 and i > 0) else (1, 1))
    assert model.head.fc.in_features == 1024 * 3 * 3


def test_face_complexity():
    """Actual numbers (CPU FlopCounter, BN not counted): FaceResNet 1.003 GMACs / 35.58M params,
    RepMLP-FaceRes 1.175 GMACs (train) / 1.093 GMACs (deploy), 70.33M / 69.50M params."""
    fres, fres_d = faceresnet().eval(), faceresnet(deploy=True).eval()
    rep, rep_d = repmlp_faceres().eval(), repmlp_faceres(deploy=True).eval()
    macs = {n: count_macs(m, (96, 96)) for n, m in
            (("fres", fres), ("fres_d", fres_d), ("rep", rep), ("rep_d", rep_d))}
    assert 0.95e9 < macs["fres"] < 1.05e9
    assert macs["fres_d"] == macs["fres"]  # BN folding changes no conv
    assert 1.12e9 < macs["rep"] < 1.23e9
    assert 1.05e9 < macs["rep_d"] < 1.14e9
    assert macs["rep_d"] < macs["rep"]  # the local convs are folded into fc3
    assert macs["rep_d"] > macs["fres_d"]  # RepMLP-FaceRes costs more than FaceResNet
    assert 35.0e6 < count_params(fres) < 36.2e6
    assert 69.0e6 < count_params(rep_d) < count_params(rep) < 71.0e6


def test_mobilefacenet_structure_and_cost():
    model = mobilefacenet().eval()
    assert model.img_size == (112, 112) and model.embedding_size == 512
    gdc = model.gdc.conv
    assert gdc.kernel_size == (7, 7) and gdc.groups == gdc.in_channels == gdc.out_channels == 512
    assert gdc.padding == (0, 0)
    assert isinstance(model.features, LinearBN) and model.features.linear.in_features == 512
    assert model.features.linear.bias is None  # insightface: bias-free linear + BatchNorm1d
    # mbf: width scale 2 -> 128/256 channels, blocks (1, 4, 6, 2), PReLU activations
    assert model.conv_sep[0].conv.in_channels == 256 and model.conv_sep[0].conv.out_channels == 512
    assert sum(isinstance(m, nn.PReLU) for m in model.modules()) > 10
    with torch.no_grad():
        assert model(torch.randn(1, 3, 112, 112)).shape == (1, 512)
    macs = count_macs(model, (112, 112))
    assert 0.40e9 < macs < 0.48e9  # "mobilefacenet-0.45G"; measured 0.4375e9
    assert count_macs(mobilefacenet(deploy=True).eval(), (112, 112)) == macs
    assert 1.9e6 < count_params(model) < 2.2e6  # measured 2.06M
    tiny = mobilefacenet_tiny()
    assert tiny.img_size == (64, 64) and tiny.gdc.conv.kernel_size == (4, 4)
    assert isinstance(tiny, MobileFaceNet)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", FACE)
def test_face_backbone_refuses_num_classes(name):
    with pytest.raises(ValueError, match="num_classes must be 0.*got 10"):
        create(name, num_classes=10)
    assert create(name, num_classes=0).embedding_size in (128, 512)


@pytest.mark.parametrize("name,size,expected", [
    ("faceresnet_tiny", (64, 48), "64x64"),
    ("repmlp_faceres_tiny", (96, 96), "64x64"),
    ("mobilefacenet_tiny", (112, 112), "64x64"),
    ("faceresnet", (112, 112), "96x96"),
    ("mobilefacenet", (96, 96), "112x112"),
])
def test_wrong_input_size_names_expected_size(name, size, expected):
    model = create(name).eval()
    with pytest.raises(ValueError, match=rf"built for {expected} faces.*\(1, 3, {size[0]}, {size[1]}\)"):
        with torch.no_grad():
            model(torch.randn(1, 3, *size))
    deploy = create(name, deploy=True).eval()
    with pytest.raises(ValueError, match=rf"built for {expected} faces"):
        with torch.no_grad():
            deploy(torch.randn(1, 3, *size))


def test_max_relative_error_sanity():
    """The comparisons above are meaningful: different models give a large error."""
    a = randomize_bn(faceresnet_tiny(), seed=1).eval()
    b = randomize_bn(faceresnet_tiny(), seed=2).eval()
    x = _faces(a)
    with torch.no_grad():
        assert max_relative_error(a(x), b(x)) > 1e-2
