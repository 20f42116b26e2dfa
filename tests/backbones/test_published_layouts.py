"""Published checkpoints of the family: official RepVGG (DingXiaoH/RepVGG), official MobileOne
(apple/ml-mobileone) and timm's byobnet layout of both.

No file can be downloaded here, so each test writes a checkpoint in the published layout from the
official code's key and shape listing (tests/published_layouts.py), with random tensors, and checks
that it converts, loads strictly into the registered model and computes what an independent
functional forward of the official network computes on the same file. The timm files are the
official ones renamed as timm's ``byobnet.py`` names its modules.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor

import backbones
from backbones.weights import load_backbone, read_weights
from conftest import REPO
from published_layouts import (PUBLISHED_MOBILEONE, PUBLISHED_REPVGG, mobileone_forward, mobileone_size, repvgg_size, shapes,
                               official_mobileone, official_repvgg, repvgg_forward, to_timm)


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("official", list(PUBLISHED_REPVGG) + [f"mobileone-{v}" for v in PUBLISHED_MOBILEONE])
def test_every_published_size_is_registered_key_for_key(official, deploy):
    """Each published checkpoint's keys and shapes, converted, are exactly the registered model's
    (built on the meta device: only shapes), in both forms and in timm's layout too."""
    if official.startswith("RepVGG"):
        arch, size, groups = PUBLISHED_REPVGG[official]
        sd = official_repvgg(**size, groups=groups, deploy=deploy, classes=1000, seed=None)
        layout = "official RepVGG checkpoint (DingXiaoH/RepVGG)"
    else:
        arch = official.replace("-", "_")
        sd = official_mobileone(**mobileone_size(official.split("-")[1]), deploy=deploy, classes=1000, seed=None)
        layout = "official MobileOne checkpoint (apple/ml-mobileone)"
    with torch.device("meta"):
        model = backbones.create(arch, deploy=deploy)
    expected = shapes(model.state_dict())
    for source, name in ((sd, layout), (to_timm(sd), "timm byobnet checkpoint (RepVGG / MobileOne)")):
        weights = _read(source)
        assert weights.format == name and weights.deploy is deploy and weights.scope == "backbone"
        assert shapes(weights.state_dict) == expected
    if official == "RepVGG-B1g4":  # the reference listing: stage1's second block is grouped
        assert sd["stage1.1.rbr_dense.conv.weight" if not deploy else "stage1.1.rbr_reparam.weight"].shape == (128, 32, 3, 3)


def _read(sd: dict[str, Tensor]):
    from backbones.weights.resolve import _convert
    return _convert(dict(sd), {}, "<published>")


# --------------------------------------------------------------------------- numeric parity
def _save(sd: dict[str, Tensor], path, prefix: str = "", wrap: str | None = None):
    sd = {prefix + k: v for k, v in sd.items()}
    torch.save({wrap: sd} if wrap else sd, path)
    return path


def _relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# (arch, constructor kwargs matching the builder's structure): a registered published size and
# small structures that exercise what the sizes vary (groups, SE, k, deploy)
REPVGG_CASES = {
    "repvgg_a0": ({}, dict(**repvgg_size(0.75, 2.5), groups=1, classes=1000)),
    "grouped": (dict(num_blocks=(2, 3, 4, 1), widths=(16, 32, 64, 96), stem_width=16, groups=4, num_classes=10),
                dict(depths=(2, 3, 4, 1), widths=(16, 32, 64, 96), stem=16, groups=4)),
}
MOBILEONE_CASES = {
    "mobileone_s0": ({}, dict(**mobileone_size("s0"), classes=1000)),
    "se": (dict(num_blocks=(1, 2, 3, 2), widths=(16, 32, 64, 128), stem_width=16, num_conv_branches=2,
                se_blocks=(0, 1, 2, 2), num_classes=10),
           dict(depths=(1, 2, 3, 2), widths=(16, 32, 64, 128), stem=16, k=2, se_blocks=(0, 1, 2, 2))),
}


def _model(family: str, case: str, deploy: bool):
    kwargs = (REPVGG_CASES if family == "repvgg" else MOBILEONE_CASES)[case][0]
    if kwargs:
        from backbones.models.mobileone import MobileOne
        from backbones.models.repvgg import RepVGG
        model = (RepVGG if family == "repvgg" else MobileOne)(deploy=deploy, **kwargs)
        return backbones.deploy.fuse_for_cpu(model) if deploy else model
    return backbones.create(case, deploy=deploy)


@pytest.mark.parametrize("layout", ["official", "timm"])
@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("family, case", [("repvgg", c) for c in REPVGG_CASES] + [("mobileone", c) for c in MOBILEONE_CASES])
def test_a_published_checkpoint_computes_the_official_forward(tmp_path, family, case, deploy, layout):
    """The file (train or deploy form, DDP's ``module.`` on the train files, timm's names for the
    timm layout) loads strictly into this project's model, which then computes the official
    network's function in float64 to 1e-10; the train form, converted, computes it too."""
    build, forward = (official_repvgg, repvgg_forward) if family == "repvgg" else (official_mobileone, mobileone_forward)
    args = {"classes": 10, **(REPVGG_CASES if family == "repvgg" else MOBILEONE_CASES)[case][1]}
    sd = build(**args, deploy=deploy, seed=3)
    file = _save(to_timm(sd) if layout == "timm" else sd, tmp_path / "published.pth", prefix="" if deploy else "module.")
    weights = read_weights(file)
    assert weights.format.startswith(layout) and weights.deploy is deploy
    model = _model(family, case, deploy).double().eval()
    model.load_state_dict(weights.state_dict, strict=True)
    x = torch.randn(2, 3, 35, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected = forward(sd, x)
    with torch.no_grad():
        assert _relative_error(model(x), expected) <= 1e-10
        if not deploy:
            converted = backbones.reparameterize_model(model)
            assert _relative_error(converted(x), expected) <= 1e-10
            again = _model(family, case, True).double().eval()
            again.load_state_dict(converted.state_dict(), strict=True)  # the deploy=True round trip
            assert _relative_error(again(x), expected) <= 1e-10


def test_official_files_of_training_runs_load_from_their_model_entry(tmp_path):
    """RepVGG's training checkpoints nest the state dict under ``model`` (``tools/convert.py``
    unwraps it); ``load_backbone`` takes the official name and the file's class count."""
    sd = official_repvgg(**REPVGG_CASES["grouped"][1], classes=7, seed=5)
    file = _save(sd, tmp_path / "checkpoint.pth", wrap="model")
    model, weights = load_backbone(file, "repvgg_a0_tiny", **{k: v for k, v in REPVGG_CASES["grouped"][0].items()
                                                                if k != "num_classes"})
    assert weights.format == "official RepVGG checkpoint (DingXiaoH/RepVGG)" and model.num_classes == 7
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # the float64 file went through the float32 model: float32 rounding
        assert _relative_error(model.double().eval()(x), repvgg_forward(sd, x)) <= 1e-6


def test_a_checkpoint_that_does_not_fit_is_named_with_the_keys_that_differ(tmp_path):
    a1 = _save(official_repvgg(**repvgg_size(1, 2.5), classes=1000, seed=0), tmp_path / "RepVGG-A1-train.pth")
    with pytest.raises(ValueError) as err:
        load_backbone(a1, "RepVGG-A0")
    text = str(err.value)
    assert "RepVGG-A1-train.pth does not fit model 'repvgg_a0'" in text and "shape mismatch" in text
    assert "stem.dense.conv.weight: checkpoint (64, 3, 3, 3) vs model (48, 3, 3, 3)" in text
    assert "the file was read as: official RepVGG checkpoint (DingXiaoH/RepVGG)" in text

    sd = official_mobileone(**mobileone_size("s0"), classes=1000, seed=0)
    partial = _save({k: v for k, v in sd.items() if not k.startswith("stage4.")}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"(?s)partial\.pth does not fit model 'mobileone_s0'.*missing key\(s\): stage4\.0\."):
        load_backbone(partial, "mobileone_s0")
    with pytest.raises(ValueError, match=r"(?s)does not fit model 'repvgg_a0'.*missing key\(s\): stem\.dense"):
        load_backbone(_save(sd, tmp_path / "mobileone_s0.pth"), "repvgg_a0")  # another family's layout
    unknown = _save({**official_repvgg(**repvgg_size(0.75, 2.5), classes=1000, seed=0),
                     "stage1.0.rbr_dense.attention.weight": torch.zeros(1)}, tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match=r"(?s)unexpected key\(s\): stage1\.0\.rbr_dense\.attention\.weight"):
        load_backbone(unknown, "repvgg_a0")


def test_the_command_converts_detecting_and_naming_the_layout(tmp_path):
    """``python -m backbones.official --arch RepVGG-A0 IN OUT``; the output is this project's backbone file."""
    sd = official_repvgg(**repvgg_size(0.75, 2.5), classes=1000, seed=0)
    src = _save(to_timm(sd), tmp_path / "repvgg_a0.timm.pth")
    proc = subprocess.run([sys.executable, "-m", "backbones.official", "--arch", "RepVGG-A0", str(src),
                           str(tmp_path / "a0.safetensors")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "converted timm byobnet checkpoint (RepVGG / MobileOne)" in proc.stdout and "arch=repvgg_a0, train-time" in proc.stdout
    weights = read_weights(tmp_path / "a0.safetensors")
    assert (weights.arch, weights.deploy, weights.format) == ("repvgg_a0", False, "this project's backbone file")
    model = backbones.create("repvgg_a0").double().eval()
    model.load_state_dict(weights.state_dict)
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():  # written from a float32 model: float32 rounding
        assert _relative_error(model(x), repvgg_forward(sd, x)) <= 1e-6
