"""Published RepLKNet checkpoints (DingXiaoH/RepLKNet-pytorch): official train and deploy files load
into this project's RepLKNet and compute the official network's function.

No file can be downloaded here, so each test writes a state dict in the official layout from the
official code's key and shape listing (tests/published_replknet.py), with random float64 tensors,
and compares with an independent functional forward of the official network. The full published
sizes are checked key for key on the meta device; the numerics run on small configurations with
the same structure (a parallel small kernel, and XL's wider depthwise conv without one).
"""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from torch import Tensor

import backbones
from backbones.deploy import fuse_for_cpu
from backbones.models.registry import IMAGENET_MEAN, model_cfg
from backbones.models.replknet import RepLKNet
from backbones.weights import OFFICIAL_ARCHS, load_backbone, read_weights
from backbones.weights.formats import create_loaded
from backbones.weights.official_replknet import LAYOUT
from backbones.weights.resolve import _convert
from conftest import REPO
from published_layouts import official_repvgg, shapes
from published_replknet import (PUBLISHED_PARAMS_M, PUBLISHED_REPLKNET, official_deep_fuse_bn, official_replknet,
                                official_structural_reparam, param_count, replknet_forward)

FORMAT = "official RepLKNet checkpoint (DingXiaoH/RepLKNet-pytorch)"
FORMS = {"train": lambda sd: sd, "deploy": official_structural_reparam,
         "deploy+deep_fuse_BN": lambda sd: official_deep_fuse_bn(official_structural_reparam(sd))}


def _read(sd: dict[str, Tensor], path: str = "<published>"):
    return _convert(dict(sd), {}, path)


def _meta_model(arch: str, deploy: bool):
    with torch.device("meta"):
        return backbones.create(arch, deploy=deploy)


# --------------------------------------------------------------------------- the published sizes
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("official", list(PUBLISHED_REPLKNET))
def test_every_published_size_is_registered_key_for_key(official, form):
    """Each published size's keys and shapes, converted (renamed; the official deploy forms folded
    to this project's BN-free deploy form), are exactly the registered model's, on the meta device."""
    arch, size = PUBLISHED_REPLKNET[official]
    assert OFFICIAL_ARCHS[official] == arch
    sd = FORMS[form](official_replknet(**size, classes=1000, seed=None))
    weights = _read(sd)
    deploy = form != "train"
    assert (weights.format, weights.deploy, weights.scope) == (FORMAT, deploy, "backbone")
    assert weights.kwargs is None  # the class count comes from head.fc.weight (create_loaded)
    assert shapes(weights.state_dict) == shapes(_meta_model(arch, deploy).state_dict())
    if official == "RepLKNet-XL" and form == "train":  # the listing: 1.5x depthwise width, no small kernel
        assert sd["stages.0.blocks.0.large_kernel.lkb_origin.conv.weight"].shape == (384, 1, 27, 27)
        assert not any("small_conv" in k for k in sd)


@pytest.mark.parametrize("official", list(PUBLISHED_REPLKNET))
def test_parameter_counts_are_the_published_ones(official):
    """The README's #params (79M, 172M, 335M) within its rounding, for the official train file,
    the official deploy file and this project's model in both forms (the forms differ by <1M)."""
    arch, size = PUBLISHED_REPLKNET[official]
    train = official_replknet(**size, classes=1000, seed=None)
    counts = [param_count(train), param_count(official_structural_reparam(train))]
    counts += [sum(p.numel() for p in _meta_model(arch, deploy).parameters()) for deploy in (False, True)]
    assert counts[0] == counts[2]  # same tensors
    for count in counts:
        assert abs(count / 1e6 - PUBLISHED_PARAMS_M[official]) < 1, (official, counts)


def test_the_registered_configs_are_the_published_ones():
    """31L is published at 384, XL at 320 with mean = std = 0.5 (official README)."""
    cfgs = {arch: model_cfg(arch) for arch in ("replknet_31b", "replknet_31l", "replknet_xl")}
    assert [cfg.input_size for cfg in cfgs.values()] == [(224, 224), (384, 384), (320, 320)]
    assert cfgs["replknet_xl"].mean == cfgs["replknet_xl"].std == (0.5, 0.5, 0.5)
    assert cfgs["replknet_31l"].mean == cfgs["replknet_31b"].mean == IMAGENET_MEAN


def test_drop_path_rates_follow_the_official_schedule():
    """``torch.linspace(0, rate, sum(layers))``: one rate per (RepLKBlock, ConvFFN) pair."""
    model = RepLKNet(kernels=(3, 3, 3, 3), layers=(1, 2, 1, 1), channels=(8, 8, 8, 8), small_kernel=None,
                     drop_path_rate=0.4)
    rates = [m.drop_path.p for i in range(1, 5) for m in getattr(model, f"stage{i}")]
    expected = torch.linspace(0, 0.4, 5).tolist()
    assert rates == pytest.approx([r for r in expected for _ in range(2)])


# --------------------------------------------------------------------------- numeric parity
# small structures with what the published sizes vary: a parallel small kernel (31B/31L), and XL's
# 1.5x depthwise width without one; two pairs in one stage
CASES = {
    "small_kernel": dict(kernels=(7, 5, 5, 3), layers=(1, 2, 1, 1), channels=(8, 16, 24, 32), small_kernel=3),
    "xl_like": dict(kernels=(5, 5, 5, 3), layers=(1, 1, 2, 1), channels=(8, 16, 16, 32), small_kernel=None,
                    dw_ratio=1.5),
}


def _ours(case: str, deploy: bool, classes: int = 10) -> RepLKNet:
    model = RepLKNet(**CASES[case], num_classes=classes, img_size=64, deploy=deploy)
    return (fuse_for_cpu(model) if deploy else model).double().eval()


def _relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _x() -> Tensor:
    return torch.randn(2, 3, 35, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", list(CASES))
def test_an_official_file_computes_the_official_forward(tmp_path, case, form):
    """The file (train form with DDP's ``module.``; the official deploy forms nested under ``model``
    as a training run saves them) loads strictly into this project's model of that form, which then
    computes the official network's function in float64 to 1e-10. The train form, converted,
    computes it too, equals the converted official deploy file, and survives a ``deploy=True``
    state-dict round trip."""
    train = official_replknet(**CASES[case], seed=3)
    sd = FORMS[form](train)
    path = tmp_path / "official.pth"
    if form == "train":
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    else:
        torch.save({"model": sd, "epoch": 7, "scaler": {"scale": 65536.0}}, path)
    weights = read_weights(path)
    deploy = form != "train"
    assert (weights.format, weights.deploy) == (FORMAT, deploy)
    model = _ours(case, deploy)
    model.load_state_dict(weights.state_dict, strict=True)
    x = _x()
    expected = replknet_forward(sd, x)
    with torch.no_grad():
        assert _relative_error(replknet_forward(train, x), expected) <= 1e-10  # the official forms agree
        assert _relative_error(model(x), expected) <= 1e-10
        if deploy:
            return
        converted = backbones.reparameterize_model(model)
        assert _relative_error(converted(x), expected) <= 1e-10
        official_deploy = _read(official_structural_reparam(train)).state_dict
        assert converted.state_dict().keys() == official_deploy.keys()
        for key, value in converted.state_dict().items():
            assert _relative_error(value, official_deploy[key]) <= 1e-12, key
        again = _ours(case, True)
        again.load_state_dict(converted.state_dict(), strict=True)  # the deploy=True round trip
        assert _relative_error(again(x), expected) <= 1e-10


def test_a_training_checkpoint_loads_from_its_model_entry(tmp_path):
    """``utils.save_model`` writes ``{"model", "optimizer", "epoch", "scaler", "model_ema"}``: the
    weights come from ``model`` (as ``--resume`` reads them), not ``model_ema``; the official name
    and the file's class count are taken. (Its ``args`` entry, an ``argparse.Namespace``, is refused
    by the safe loader: see the next test.)"""
    sd = official_replknet(**CASES["small_kernel"], classes=7, seed=5)
    ema = official_replknet(**CASES["small_kernel"], classes=7, seed=6)
    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 4e-3, "params": [0]}]}
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": sd, "optimizer": optimizer, "epoch": 299, "scaler": {"scale": 65536.0}, "model_ema": ema}, path)
    model, weights = load_backbone(path, "replknet_31b_tiny", **{k: v for k, v in CASES["small_kernel"].items()})
    assert weights.format == FORMAT and model.num_classes == 7 and not model.deploy
    x = _x()
    with torch.no_grad():  # the float64 file went through the float32 model: float32 rounding
        assert _relative_error(model.double().eval()(x), replknet_forward(sd, x)) <= 1e-6


class GradScalerState:
    """An object of a class that no allow-list names (as a training script's own state would be)."""


def test_training_checkpoints_with_args_load_and_downstream_files_are_refused(tmp_path):
    """A training checkpoint stores its ``args`` (an ``argparse.Namespace``, allow-listed for
    ``weights_only``) and loads; any other object stays refused. An official downstream file with
    per-stage BNs (``norm_intermediate_features``) has no counterpart here. Messages name the file."""
    sd = official_replknet(**CASES["small_kernel"], seed=0)
    with_args = tmp_path / "checkpoint-299.pth"
    torch.save({"model": sd, "epoch": 299, "args": argparse.Namespace(model="RepLKNet-31B")}, with_args)
    assert read_weights(with_args).format == LAYOUT.name
    with_object = tmp_path / "checkpoint-300.pth"
    torch.save({"model": sd, "epoch": 300, "scaler": GradScalerState()}, with_object)
    with pytest.raises(ValueError, match=r"(?s)checkpoint-300\.pth holds Python objects.*weights_only=True.*GradScalerState"):
        read_weights(with_object)
    downstream = tmp_path / "downstream.pth"
    torch.save({**sd, "stages.0.norm.weight": torch.ones(8), "stages.0.norm.bias": torch.zeros(8)}, downstream)
    with pytest.raises(ValueError, match=r"downstream\.pth: .*norm_intermediate_features=True.*stages\.0\.norm\.weight"):
        read_weights(downstream)


def test_a_checkpoint_that_does_not_fit_is_named_with_the_keys_that_differ(tmp_path):
    # a published size for another: the same check as on a file (load_backbone = read + create_loaded), on meta
    weights = _read(official_replknet(**PUBLISHED_REPLKNET["RepLKNet-31B"][1], classes=1000, seed=None),
                    "RepLKNet-31B_ImageNet-1K_224.pth")
    with torch.device("meta"), pytest.raises(ValueError) as err:
        create_loaded(weights, OFFICIAL_ARCHS["RepLKNet-31L"])
    text = str(err.value)
    assert "RepLKNet-31B_ImageNet-1K_224.pth does not fit model 'replknet_31l'" in text and "shape mismatch" in text
    assert "stem.0.conv.weight: checkpoint (128, 3, 3, 3) vs model (192, 3, 3, 3)" in text
    assert f"the file was read as: {FORMAT}" in text
    xl = _read(official_replknet(**PUBLISHED_REPLKNET["RepLKNet-XL"][1], classes=1000, seed=None), "xl.pth")
    with torch.device("meta"), pytest.raises(ValueError, match=r"(?s)missing key\(s\): stage1\.0\.large_kernel\.small"):
        create_loaded(xl, "replknet_31b")

    tiny = dict(kernels=(13, 11, 7, 5), channels=(16, 32, 64, 128), small_kernel=3, layers=(1, 1, 1, 1))
    sd = official_replknet(**tiny, classes=10, seed=0)
    load_backbone(_save(sd, tmp_path / "tiny.pth"), "replknet_31b_tiny")  # fits
    partial = _save({k: v for k, v in sd.items() if not k.startswith("stages.3.")}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"(?s)partial\.pth does not fit model 'replknet_31b_tiny'.*"
                                         r"missing key\(s\): stage4\.0\.pre_bn"):
        load_backbone(partial, "replknet_31b_tiny")
    unknown = _save({**sd, "stages.0.blocks.0.large_kernel.attention.weight": torch.zeros(1)}, tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match=r"(?s)unexpected key\(s\): stages\.0\.blocks\.0\.large_kernel\.attention"):
        load_backbone(unknown, "replknet_31b_tiny")
    repvgg = _save(official_repvgg((1, 1, 1, 1), (8, 8, 8, 8), 8, classes=10, seed=0), tmp_path / "RepVGG-train.pth")
    with pytest.raises(ValueError, match=r"(?s)does not fit model 'replknet_31b_tiny'.*missing key\(s\): stem\.0\.conv"):
        load_backbone(repvgg, "replknet_31b_tiny")  # another family's layout
    deploy = _save(official_structural_reparam(sd), tmp_path / "deploy.pth")
    with pytest.raises(ValueError, match="checkpoint is in deploy form; build the model with deploy=True"):
        load_backbone(deploy, "replknet_31b_tiny", deploy=False)


def _save(sd: dict[str, Tensor], path):
    torch.save(sd, path)
    return path


def test_the_layout_is_told_apart_from_this_projects_own():
    """This project's RepLKNet keys (``stage1.0.``, ``head.norm``) are not read as the official layout."""
    with torch.device("meta"):
        ours = backbones.create("replknet_31b_tiny").state_dict()
    assert not LAYOUT.matches(ours)
    assert _read(ours).format == "state dict"


def test_the_command_converts_an_official_file(tmp_path):
    """``python -m backbones.official --arch replknet_31b_tiny IN OUT`` on an official deploy file
    (nested under ``model``, DDP's ``module.``): the output is this project's deploy backbone file."""
    tiny = dict(kernels=(13, 11, 7, 5), channels=(16, 32, 64, 128), small_kernel=3, layers=(1, 1, 1, 1))
    sd = official_structural_reparam(official_replknet(**tiny, classes=10, seed=1))
    src = tmp_path / "RepLKNet-tiny-deploy.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, src)
    proc = subprocess.run([sys.executable, "-m", "backbones.official", "--arch", "replknet_31b_tiny", str(src),
                           str(tmp_path / "tiny.safetensors")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"converted {FORMAT}" in proc.stdout and "arch=replknet_31b_tiny, deploy" in proc.stdout
    weights = read_weights(tmp_path / "tiny.safetensors")
    assert (weights.arch, weights.deploy, weights.kwargs) == ("replknet_31b_tiny", True, {"num_classes": 10})
    model = backbones.create("replknet_31b_tiny", deploy=True).double().eval()
    model.load_state_dict(weights.state_dict)
    x = _x()
    with torch.no_grad():  # written from a float32 model: float32 rounding
        assert _relative_error(model(x), replknet_forward(sd, x)) <= 1e-6
