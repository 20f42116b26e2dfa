"""Published DBB and OREPA ResNet checkpoints (DingXiaoH/DiverseBranchBlock, JUGGHM/OREPA_CVPR2022)
load into this project's ``resnet18`` / ``resnet50`` with ``conv_type="dbb"`` / ``"orepa"``.

No file can be downloaded here, so each test writes a checkpoint in the published layout from the
official code's key and shape listing (tests/published_resnet.py), with random float64 tensors,
and checks that it converts, loads strictly and computes what an independent functional forward
of the official network computes on the same file.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import backbones
from backbones.reparam.math import chain_kernels, scaled_sum
from backbones.weights import load_backbone, read_weights
from backbones.weights.formats import create_loaded
from backbones.weights.io import load_state_dict_file
from backbones.weights.resolve import OFFICIAL_ARCHS, _convert
from conftest import REPO
from published_layouts import official_repvgg, repvgg_size, shapes
from published_resnet import PUBLISHED_RESNETS, large_weight_gen, official_forward, official_resnet

DBB = "official DBB ResNet checkpoint (DingXiaoH/DiverseBranchBlock)"
OREPA = "official OREPA ResNet checkpoint (JUGGHM/OREPA_CVPR2022)"
LAYOUTS = {"dbb": DBB, "orepa": OREPA}

# the tiny official configs: ResNet(block, num_blocks, width_multiplier) and the registered model that
# has the same structure (resnet18_tiny is ResNet-18's layout at width 0.25, one block per stage;
# resnet_tiny with stem_width 8 is a ResNet-50 layout at width 0.125, blocks 1, 2, 2, 1)
TINY = {
    "basic": ("resnet18_tiny", dict(num_blocks=(1, 1, 1, 1), width=0.25), {}),
    "bottleneck": ("resnet_tiny", dict(num_blocks=(1, 2, 2, 1), width=0.125), {"stem_width": 8}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 ops: thread start-up dominates them on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _ddp_training_file(sd: dict[str, Tensor], path, arch: str = "ResNet-18"):
    """What both repositories' train.py save (from DDP: keys carry ``module.``), ``.pth.tar``."""
    torch.save({"epoch": 120, "arch": arch, "state_dict": {"module." + k: v for k, v in sd.items()},
                "best_acc1": torch.tensor(72.13),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0]}]},
                "scheduler": {"last_epoch": 120, "base_lrs": [0.1]}}, path)
    return path


def _save(sd: dict[str, Tensor], path):
    torch.save(sd, path)
    return path


# --------------------------------------------------------------------------- keys and shapes
@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("kind", ["dbb", "orepa"])
@pytest.mark.parametrize("official", list(PUBLISHED_RESNETS))
def test_every_published_resnet_is_registered_key_for_key(official, kind, deploy):
    """Each published ResNet's keys and shapes, converted, are exactly the registered model's with the
    layout's conv_type (built on the meta device: only shapes), in both forms."""
    arch, block, num_blocks = PUBLISHED_RESNETS[official]
    sd = official_resnet(kind, block, num_blocks, deploy=deploy, seed=None)
    weights = _convert(dict(sd), {}, "<published>")
    assert (weights.format, weights.deploy, weights.scope) == (LAYOUTS[kind], deploy, "backbone")
    assert weights.kwargs == {"conv_type": kind} and OFFICIAL_ARCHS[official] == arch
    with torch.device("meta"):
        model = backbones.create(arch, conv_type=kind, deploy=deploy)
    assert shapes(weights.state_dict) == shapes(model.state_dict())


def test_the_builders_follow_the_reference_key_listing():
    """Key names the reference listing (next_capabilities.md 3.6, 3.7) gives for the official files."""
    dbb = official_resnet("dbb", "basic", (2, 2, 2, 2), seed=None)
    for key in ("stage0.conv1.conv.weight", "stage1.0.conv1.dbb_origin.conv.weight", "stage2.0.shortcut.conv.weight",
                "stage1.0.conv1.dbb_avg.bn.bn.running_var", "stage1.0.conv1.dbb_1x1_kxk.idconv1.weight",
                "linear.weight"):
        assert key in dbb
    r50 = official_resnet("orepa", "bottleneck", (3, 4, 6, 3), seed=None)
    assert r50["stage1.0.conv2.vector"].shape == (6, 64) and r50["stage1.0.conv1.vector"].shape == (2, 64)
    assert r50["stage1.0.conv2.weight_orepa_gconv_dw"].shape == (512, 1, 3, 3)
    assert {"stage0.conv1.weight2.weight_orepa_origin", "stage0.conv1.bn.weight",
            "stage2.0.shortcut.weight_or1x1_origin"} <= set(r50)
    deploy = official_resnet("orepa", "bottleneck", (3, 4, 6, 3), deploy=True, seed=None)
    assert {"stage0.conv1.or_large_reparam.weight", "stage1.0.conv2.orepa_reparam.bias",
            "stage1.0.conv3.or1x1_reparam.weight"} <= set(deploy)


# --------------------------------------------------------------------------- numeric parity
@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("block", list(TINY))
@pytest.mark.parametrize("kind", ["dbb", "orepa"])
def test_an_official_file_computes_the_official_forward(tmp_path, kind, block, deploy):
    """A train file (DDP training dict, ``module.``) or deploy file (bare, as convert.py writes it)
    loads strictly into this project's model, which computes the official network's function in
    float64 to 1e-10 (the deploy file is derived from the train file by the official merge math);
    the train form converted by ``reparameterize_model``, and a ``deploy=True`` model loaded from
    its state dict, compute it too."""
    arch, size, overrides = TINY[block]
    train_sd = official_resnet(kind, block, **size, classes=10, seed=3)
    sd = official_resnet(kind, block, **size, classes=10, seed=3, deploy=True) if deploy else train_sd
    file = _save(sd, tmp_path / "deploy.pth") if deploy else _ddp_training_file(sd, tmp_path / "best.pth.tar")
    weights = read_weights(file)
    assert (weights.format, weights.deploy, weights.kwargs) == (LAYOUTS[kind], deploy, {"conv_type": kind})
    model = backbones.create(arch, conv_type=kind, deploy=deploy, **overrides).double().eval()
    model.load_state_dict(weights.state_dict, strict=True)
    x = torch.randn(2, 3, 35, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected = official_forward(train_sd, x)
    with torch.no_grad():
        assert _relative_error(model(x), expected) <= 1e-10
        if deploy:
            assert _relative_error(official_forward(sd, x), expected) <= 1e-10  # the official merge itself
            return
        converted = backbones.reparameterize_model(model)
        assert _relative_error(converted(x), expected) <= 1e-10
        again = backbones.create(arch, conv_type=kind, deploy=True, **overrides).double().eval()
        again.load_state_dict(converted.state_dict(), strict=True)  # the deploy=True round trip
        assert _relative_error(again(x), expected) <= 1e-10


@pytest.mark.parametrize("block", list(TINY))
@pytest.mark.parametrize("kind", ["dbb", "orepa"])
def test_fine_tuning_starts_from_the_official_function(tmp_path, kind, block):
    """In train mode too (BNs on the batch's statistics; DBB's BN-and-pad borders from the running
    statistics its BN has just updated), the loaded model computes what the official one does: the
    OREPA_1x1 and stem kernels composed into ConvBNs included."""
    arch, size, overrides = TINY[block]
    sd = official_resnet(kind, block, **size, classes=10, seed=5)
    weights = read_weights(_ddp_training_file(sd, tmp_path / "best.pth.tar"))
    model = backbones.create(arch, conv_type=kind, **overrides).double().train()
    model.load_state_dict(weights.state_dict, strict=True)
    x = torch.randn(4, 3, 35, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _relative_error(model(x), official_forward(sd, x, training=True)) <= 1e-10


def test_a_training_dict_is_read_as_the_layout_not_as_a_backbone_file(tmp_path):
    """Both train.py save the official model name as ``arch`` next to the state dict; that is not
    this project's backbone file (which records ``deploy`` too)."""
    sd = official_resnet("orepa", "basic", **TINY["basic"][1], classes=10, seed=1)
    file = _ddp_training_file(sd, tmp_path / "r18.pth.tar")
    state_dict, meta = load_state_dict_file(file)
    assert meta["arch"] == "ResNet-18" and meta["epoch"] == 120 and all(k.startswith("module.") for k in state_dict)
    weights = read_weights(file)
    assert weights.format == OREPA and weights.arch is None
    assert not any(k.startswith("module.") for k in weights.state_dict)
    model, weights = load_backbone(file, "ResNet-18", layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16)
    assert model.num_classes == 10 and isinstance(model.layer1[0].conv1, backbones.layers.OREPA)
    # the released DBB files: a bare state dict, or one under "state_dict" (test.py and convert.py take both)
    dbb = official_resnet("dbb", "basic", **TINY["basic"][1], classes=10, seed=1)
    for container in (dbb, {"state_dict": dbb}):
        torch.save(container, tmp_path / "ResNet-18_DBB_7101.pth")
        weights = read_weights(tmp_path / "ResNet-18_DBB_7101.pth")
        assert (weights.format, weights.deploy, weights.kwargs) == (DBB, False, {"conv_type": "dbb"})


def test_orepa_1x1_and_stem_are_composed_into_plain_conv_bns(tmp_path):
    """The OREPA_LargeConv stem and the OREPA_1x1 convs become ConvBNs whose conv.weight is the official
    composed kernel (their BN stays), in train mode too: the same batch statistics."""
    sd = official_resnet("orepa", "bottleneck", **TINY["bottleneck"][1], classes=10, seed=2)
    weights = read_weights(_save(sd, tmp_path / "r50.pth"))
    assert weights.state_dict["stem.0.conv.weight"].shape == (8, 3, 7, 7)
    assert weights.state_dict["layer1.0.conv1.conv.weight"].shape == (8, 8, 1, 1)
    assert not any("weight_or1x1" in k or "avg_avg" in k or "id_tensor" in k for k in weights.state_dict)
    model = backbones.create("resnet_tiny", conv_type="orepa", stem_width=8).double().train()
    model.load_state_dict(weights.state_dict, strict=True)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    stem = F.batch_norm(F.conv2d(x, large_weight_gen(sd, "stage0.conv1"), None, 2, 3), None, None,
                        sd["stage0.conv1.bn.weight"], sd["stage0.conv1.bn.bias"], True)
    assert _relative_error(model.stem[0].bn(model.stem[0].conv(x)), stem) <= 1e-10


# --------------------------------------------------------------------------- the math it uses
def test_chain_kernels_is_the_official_composition_of_stacked_convs_with_flipped_kernels():
    gen = torch.Generator().manual_seed(0)
    k0, k1, k2 = (torch.randn(shape, dtype=torch.float64, generator=gen) for shape in
                  ((4, 3, 3, 3), (5, 4, 3, 3), (6, 5, 3, 3)))
    kernel = chain_kernels([k0, k1, k2])
    assert kernel.shape == (6, 3, 7, 7)
    x = torch.randn(2, 3, 15, 13, dtype=torch.float64, generator=gen)
    stacked = F.conv2d(F.conv2d(F.conv2d(x, k0), k1.flip(-1, -2)), k2.flip(-1, -2))  # unpadded
    assert _relative_error(F.conv2d(x, kernel), stacked) <= 1e-12
    vector = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    assert torch.allclose(scaled_sum([kernel, 2 * kernel, kernel], vector),
                          kernel * (vector[0] + 2 * vector[1] + vector[2]).reshape(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="does not take the 4 channels"):
        chain_kernels([k0, k2])


# --------------------------------------------------------------------------- files that do not fit
def test_resnet50_weights_for_resnet18_name_the_keys_that_differ():
    """Published sizes on the meta device: the strict load's message names the file, the arch, the
    layout and the first keys that differ."""
    for kind in ("dbb", "orepa"):
        weights = _convert(official_resnet(kind, "bottleneck", (3, 4, 6, 3), seed=None), {}, "ResNet-50_best.pth.tar")
        with torch.device("meta"), pytest.raises(ValueError) as err:
            create_loaded(weights, OFFICIAL_ARCHS["ResNet-18"])
        text = str(err.value)
        assert "ResNet-50_best.pth.tar does not fit model 'resnet18'" in text
        assert f"the file was read as: {LAYOUTS[kind]}" in text
        assert "missing key(s)" in text and "unexpected key(s)" in text
        assert "layer2.0.shortcut.conv.weight: checkpoint (512, 256, 1, 1) vs model (128, 64, 1, 1)" in text


def test_a_file_that_does_not_fit_is_named_with_the_keys_that_differ(tmp_path):
    sd = official_resnet("dbb", "basic", **TINY["basic"][1], classes=10, seed=0)
    partial = _save({k: v for k, v in sd.items() if not k.startswith("stage4.")}, tmp_path / "partial.pth")
    fits = r"(?s)partial\.pth does not fit model 'resnet18_tiny'.*missing key\(s\): layer4\.0\."
    with pytest.raises(ValueError, match=fits):
        load_backbone(partial, "resnet18_tiny")
    unknown = _save({**sd, "stage1.0.conv1.dbb_origin.attention.weight": torch.zeros(1)}, tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match=r"(?s)unexpected key\(s\): stage1\.0\.conv1\.dbb_origin\.attention\.weight"):
        load_backbone(unknown, "resnet18_tiny")
    # a DBB file for an OREPA model: read as DBB, it does not fit conv_type="orepa"
    with pytest.raises(ValueError) as err:
        load_backbone(_save(sd, tmp_path / "ResNet-18_DBB.pth"), "resnet18_tiny", conv_type="orepa")
    text = str(err.value)
    assert f"the file was read as: {DBB}" in text and "missing key(s): layer1.0.conv1.weight_origin" in text
    assert "the file's model arguments {'conv_type': 'dbb'} differ from those asked for {'conv_type': 'orepa'}" in text
    assert "unexpected key(s): layer1.0.conv1.origin.conv.weight" in text
    # another family's layout
    repvgg = _save(official_repvgg(**repvgg_size(0.75, 2.5), classes=10, seed=0), tmp_path / "RepVGG-A0-train.pth")
    with pytest.raises(ValueError, match=r"(?s)does not fit model 'resnet18'.*missing key\(s\): stem\.0\.conv\.weight"):
        load_backbone(repvgg, "ResNet-18", conv_type="dbb")


def test_an_incomplete_or_altered_orepa_block_is_named(tmp_path):
    sd = official_resnet("orepa", "bottleneck", **TINY["bottleneck"][1], classes=10, seed=0)
    partial = {k: v for k, v in sd.items() if k != "stage1.0.conv1.weight_or1x1_l2i_conv2"}
    with pytest.raises(ValueError) as err:  # left as it is, the strict load names its keys
        load_backbone(_save(partial, tmp_path / "partial.pth"), "resnet_tiny", stem_width=8)
    text = str(err.value)
    assert "missing key(s): layer1.0.conv1.conv.weight" in text and "layer1.0.conv1.weight_or1x1_origin" in text
    stem = {k: v for k, v in sd.items() if k != "stage0.conv1.weight1.vector"}
    with pytest.raises(ValueError, match=r"missing key\(s\): stem\.0\.conv\.weight"):
        load_backbone(_save(stem, tmp_path / "stem.pth"), "resnet_tiny", stem_width=8)
    altered = {**sd, "stage1.0.conv2.weight_orepa_avg_avg": torch.full((3, 3), 0.2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"altered\.pth: stage1\.0\.conv2\.weight_orepa_avg_avg is not the constant"):
        read_weights(_save(altered, tmp_path / "altered.pth"))


# --------------------------------------------------------------------------- the command
@pytest.mark.parametrize("kind", ["dbb", "orepa"])
def test_the_command_converts_detecting_the_layout_and_recording_conv_type(tmp_path, kind):
    """``python -m backbones.official --arch ResNet-18 IN OUT`` (a one-block-per-stage ResNet-18 at
    width 0.25 through --model-kwargs); the output is this project's backbone file with conv_type."""
    sd = official_resnet(kind, "basic", **TINY["basic"][1], classes=10, seed=0)
    src = _ddp_training_file(sd, tmp_path / f"ResNet-18_{kind}.pth.tar")
    dst = tmp_path / "r18.safetensors"
    kwargs = '{"layers": [1, 1, 1, 1], "widths": [16, 32, 64, 128], "stem_width": 16}'
    proc = subprocess.run([sys.executable, "-m", "backbones.official", "--arch", "ResNet-18", str(src), str(dst),
                           "--model-kwargs", kwargs], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"converted {LAYOUTS[kind]}" in proc.stdout and "arch=resnet18, train-time" in proc.stdout
    weights = read_weights(dst)
    assert (weights.arch, weights.deploy, weights.format) == ("resnet18", False, "this project's backbone file")
    assert weights.kwargs["conv_type"] == kind and weights.kwargs["num_classes"] == 10
    model = backbones.create(weights.arch, **weights.kwargs).double().eval()
    model.load_state_dict(weights.state_dict)
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():  # written from a float32 model: float32 rounding
        assert _relative_error(model(x), official_forward(sd, x)) <= 1e-6
