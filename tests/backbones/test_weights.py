"""backbones.weights.read_weights: one reader for every accepted file, which says what the file holds."""
from __future__ import annotations

import pickle

import pytest
import torch
from conftest import perturb_params

from backbones import create, reparameterize_model
from backbones.weights import FORMATS, read_weights, weights_of_checkpoint
from backbones.weights.formats import STATE_DICT
from backbones.weights.io import save_checkpoint

ARCH = "resnet_tiny"


def _model(deploy: bool = False):
    model = perturb_params(create(ARCH, num_classes=3), seed=3)
    return reparameterize_model(model) if deploy else model


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("deploy", [False, True])
def test_backbone_file_records_arch_arguments_and_form(tmp_path, suffix, deploy):
    model = _model(deploy)
    path = tmp_path / f"b{suffix}"
    save_checkpoint(model, path, ARCH, {"num_classes": 3})
    weights = read_weights(path)
    assert (weights.format, weights.scope, weights.deploy) == ("this project's backbone file", "backbone", deploy)
    assert weights.arch == ARCH and weights.kwargs == {"num_classes": 3}
    _equal(weights.state_dict, model.state_dict())
    _equal(weights.task_state_dict(), {f"backbone.{k}": v for k, v in model.state_dict().items()})


def test_task_checkpoint_form_is_the_recorded_one_not_guessed_from_keys(tmp_path):
    """A task checkpoint that records deploy=True is deploy even with BN-like keys: this project's
    files say their form, and only foreign files are guessed from key names."""
    model = _model()
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "task.ckpt"
    for recorded in (False, True):
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "pytorch-lightning_version": "2.6.6",
                    "deploy": recorded, "backbone": {"name": ARCH, "kwargs": {"num_classes": 3}, "deploy": recorded},
                    "reparam": {"relative_error": 1e-7}}, path)
        weights = read_weights(path)
        assert (weights.format, weights.scope, weights.deploy, weights.arch) == (
            "Lightning task checkpoint", "task", recorded, ARCH)
        assert weights.extra == {"reparam": {"relative_error": 1e-7}}
        _equal(weights.task_state_dict(), state)  # DDP's module. removed
        _equal(weights.backbone_state_dict(), model.state_dict())
    checkpoint = torch.load(path, weights_only=True)
    assert weights_of_checkpoint(checkpoint, str(path)).deploy is True


@pytest.mark.parametrize("deploy", [False, True])
def test_bare_state_dicts_have_their_form_inferred(tmp_path, deploy):
    model = _model(deploy)
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    weights = read_weights(path)
    assert (weights.format, weights.scope, weights.deploy, weights.arch) == ("state dict", "backbone", deploy, None)
    _equal(weights.state_dict, model.state_dict())
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    assert read_weights(path).scope == "task"


def test_foreign_layouts_are_detected_and_named(tmp_path):
    ours = create("repmlp_res_tiny", num_classes=3).state_dict()
    # the official v1 names of a few RepMLP-ResNet keys (the full mapping is tested in test_official.py)
    official = {"stage0.0.conv.weight": ours["stem.0.conv.weight"], "stage0.0.bn.weight": ours["stem.0.bn.weight"],
                "linear.weight": ours["fc.weight"], "linear.bias": ours["fc.bias"]}
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    weights = read_weights(path)
    assert (weights.format, weights.scope, weights.deploy) == ("official RepMLP v1 checkpoint", "backbone", False)
    assert set(weights.state_dict) == {"stem.0.conv.weight", "stem.0.bn.weight", "fc.weight", "fc.bias"}
    mmseg = {"backbone.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1), "backbone.layer1.0.bn1.weight": torch.ones(4),
             "decode_head.conv_seg.weight": torch.zeros(19, 4, 1, 1)}
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": mmseg}, path)
    weights = read_weights(path)
    assert (weights.format, weights.scope, weights.deploy) == ("mmseg checkpoint", "task", False)
    assert set(weights.state_dict) == {"backbone.layer1.0.conv1.conv.weight", "backbone.layer1.0.conv1.bn.weight",
                                       "decode_head.conv_seg.weight"}


def test_the_catch_all_format_comes_last():
    assert FORMATS[-1] is STATE_DICT and STATE_DICT not in FORMATS[:-1]


def test_unreadable_files_are_errors_that_name_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {tmp_path / 'nope.pth'}"):
        read_weights(tmp_path / "nope.pth")
    path = tmp_path / "cut.pth"
    torch.save(_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"not a readable checkpoint: {path}"):
        read_weights(path)

    class Hostile:
        def __reduce__(self):
            return (print, ("this must not run",))

    path.write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(1)}, "x": Hostile()}))
    with pytest.raises(ValueError, match=f"not a readable checkpoint: {path}"):
        read_weights(path)
