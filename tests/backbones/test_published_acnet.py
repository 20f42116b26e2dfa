"""Published checkpoints of the official ACNet code (DingXiaoH/ACNet): its ImageNet ResNets
``sres18`` / ``sres50`` with ACBlocks, as HDF5 files (``finish.hdf5``, ``finish_deploy.hdf5``) or
``.pth`` training checkpoints, read into this project's ``resnet18`` / ``resnet50`` with
``conv_type="acb"``.

No file can be downloaded (the README lists none), so each test writes one in the official layout
from the official code's key and shape listing (tests/published_acnet.py), with random tensors, and
checks that it converts, loads strictly and computes what an independent functional forward of the
official network computes on the same file. The HDF5 tests skip without h5py (the ``hdf5`` extra).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor

import backbones
from backbones.weights import load_backbone, read_weights
from backbones.weights.formats import create_loaded
from backbones.weights.official_acnet import NAME
from conftest import REPO
from published_acnet import (acnet_resnet_forward, convert_acnet_weights, official_acnet_resnet, official_size,
                             save_official_hdf5)
from published_layouts import official_repvgg, repvgg_size, shapes

HDF5_REASON = 'needs the hdf5 extra: pip install -e ".[hdf5]"'


def _read(sd: dict[str, Tensor], path: str = "<published>"):
    from backbones.weights.resolve import _convert
    return _convert(dict(sd), {}, path)


def _relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------- the published sizes, key for key
# the official names (acnet/do_acnet.py -a) → registered name and arguments; sres34 has no name of its own here
PUBLISHED = {"sres18": ("resnet18", {}), "sres34": ("resnet18", {"layers": (3, 4, 6, 3)}), "sres50": ("resnet50", {})}


@pytest.mark.parametrize("form", ["train", "deploy", "base"])
@pytest.mark.parametrize("official", list(PUBLISHED))
def test_every_published_size_is_registered_key_for_key(official, form):
    """``sres18`` / ``sres34`` / ``sres50`` files (train form, the deploy form ``convert_acnet_weights``
    writes, and the ``-b base`` baseline without ACBlocks), converted, hold exactly the registered
    model's keys and shapes (built on the meta device) with the constructor arguments the layout names."""
    deploy, acb = form == "deploy", form != "base"
    arch, kwargs = PUBLISHED[official]
    weights = _read(official_acnet_resnet(**official_size(official), acb=acb, deploy=deploy, seed=None))
    assert (weights.format, weights.deploy, weights.scope) == (NAME, deploy, "backbone")
    assert weights.kwargs == {"conv_type": "acb" if acb else "conv"}
    with torch.device("meta"):
        model = backbones.create(arch, deploy=deploy, **weights.kwargs, **kwargs)
    assert shapes(weights.state_dict) == shapes(model.state_dict())
    if official != "sres34":
        assert backbones.weights.OFFICIAL_ARCHS[official] == arch


# --------------------------------------------------------------------------- numeric parity
# this project's tiny test sizes as official configurations: sres18 with width multiplier 1/4 and
# one block per stage, and a SBottleneckResNet with the deps of ``resnet_tiny``
TINY = {
    "resnet18_tiny": dict(block="basic", layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem=16),
    "resnet_tiny": dict(block="bottleneck", layers=(1, 2, 2, 1), widths=(32, 64, 128, 256), stem=16),
}
# 197x203 gives a 7x7 c5 map, where the official AvgPool2d(7) is the global mean (official_acnet.py)
X = torch.randn(1, 3, 197, 203, dtype=torch.float64, generator=torch.Generator().manual_seed(4))


@pytest.fixture
def float64_default():
    """Models built in float64, so that ``load_backbone`` itself is checked to 1e-10."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _write(sd: dict[str, Tensor], tmp_path, kind: str, name: str) -> str:
    if kind == "hdf5":
        pytest.importorskip("h5py", reason=HDF5_REASON)
        return save_official_hdf5(sd, tmp_path / f"{name}.hdf5")
    # utils/engine.py:save_checkpoint nests the state dict under "model"; a DDP run's keys carry module.
    path = tmp_path / f"{name}.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "optimizer": {"state": {}, "param_groups": []},
                "iteration": 40000}, path)
    return str(path)


# the official files: finish.hdf5 and the .pth checkpoints (train form), finish_deploy.hdf5 (deploy form)
@pytest.mark.parametrize("arch, deploy, kind", [
    pytest.param("resnet18_tiny", False, "hdf5", id="basic-train-hdf5"),
    pytest.param("resnet18_tiny", True, "hdf5", id="basic-deploy-hdf5"),
    pytest.param("resnet_tiny", False, "pth", id="bottleneck-train-pth"),
    pytest.param("resnet_tiny", True, "hdf5", id="bottleneck-deploy-hdf5"),
])
def test_a_published_checkpoint_computes_the_official_forward(tmp_path, float64_default, arch, deploy, kind):
    """The file (``finish.hdf5`` / ``finish_deploy.hdf5`` as the official engine and converter write
    them, or a ``.pth`` training checkpoint with DDP's ``module.``) loads strictly through
    ``load_backbone`` and computes the official network's function in float64 to 1e-10; the deploy
    file (official conversion, other conv-BNs folded on reading) computes the train file's; the
    train form converted by ``reparameterize_model``, and its deploy=True round trip, too."""
    train = official_acnet_resnet(**TINY[arch], seed=3)
    sd = convert_acnet_weights(train) if deploy else train
    model, weights = load_backbone(_write(sd, tmp_path, kind, arch), arch)
    assert (weights.format, weights.deploy, weights.kwargs) == (NAME, deploy, {"conv_type": "acb"})
    assert model.deploy is deploy and next(model.parameters()).dtype == torch.float64
    model.eval()
    with torch.no_grad():
        expected = acnet_resnet_forward(sd, X)
        assert _relative_error(model(X), expected) <= 1e-10
        if deploy:  # the official conversion is exact: the deploy file computes the train file's function
            assert _relative_error(expected, acnet_resnet_forward(train, X)) <= 1e-10
            return
        converted = backbones.reparameterize_model(model)
        assert _relative_error(converted(X), expected) <= 1e-10
        again = backbones.create(arch, conv_type="acb", deploy=True).eval()
        again.load_state_dict(converted.state_dict(), strict=True)  # the deploy=True round trip
        assert _relative_error(again(X), expected) <= 1e-10


def test_the_base_baseline_reads_as_the_plain_resnet(tmp_path, float64_default):
    """A ``-b base`` run (no ACBlock) is the plain ResNet: ``conv_type="conv"``, same function."""
    sd = official_acnet_resnet(**TINY["resnet_tiny"], acb=False, seed=6)
    model, weights = load_backbone(_write(sd, tmp_path, "pth", "base"), "resnet_tiny")
    assert weights.kwargs == {"conv_type": "conv"} and not weights.deploy
    with torch.no_grad():
        assert _relative_error(model.eval()(X), acnet_resnet_forward(sd, X)) <= 1e-10


# --------------------------------------------------------------------------- HDF5 files
def test_an_hdf5_file_as_the_official_engine_writes_it(tmp_path):
    """float32 arrays, BN counters as 0-d int64 datasets and ``deps`` (``save_hdf5``): the tensors
    keep their dtypes and shapes, ``deps`` is metadata (not a tensor); the official name ``sres18``
    takes the file with the tiny size's constructor arguments; the float32 model computes the
    official forward of the same float32 values."""
    pytest.importorskip("h5py", reason=HDF5_REASON)
    sd = official_acnet_resnet(**TINY["resnet18_tiny"], seed=7)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # as a float32 run saves it
    path = save_official_hdf5(sd, tmp_path / "finish.hdf5", deps=[0.25])
    weights = read_weights(path)
    assert weights.extra == {"deps": [0.25]} and "deps" not in weights.state_dict
    counter = weights.state_dict["layer1.0.conv1.square.bn.num_batches_tracked"]
    assert counter.dtype == torch.int64 and counter.shape == () and counter.item() == 100
    assert weights.state_dict["layer1.0.conv1.ver.conv.weight"].dtype == torch.float32
    model, _ = load_backbone(path, "sres18", layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16)
    assert next(model.parameters()).dtype == torch.float32 and model.num_classes == 10
    with torch.no_grad():  # the same float32 values, computed in float64 on both sides
        expected = acnet_resnet_forward({k: v.double() if v.is_floating_point() else v for k, v in sd.items()}, X)
        assert _relative_error(model.double().eval()(X), expected) <= 1e-10


def test_hdf5_reading_errors_name_the_file(tmp_path, monkeypatch):
    """A corrupt or truncated .hdf5 (through ``load_backbone`` too), one with groups or no tensors,
    and a missing h5py (library and command line) are clear errors naming the file (the last with
    the install line)."""
    h5py = pytest.importorskip("h5py", reason=HDF5_REASON)
    from backbones.weights.io import load_state_dict_file

    garbage = tmp_path / "garbage.hdf5"
    garbage.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(ValueError, match=r"not a readable checkpoint: .*garbage\.hdf5 \(HDF5: .*corrupt"):
        load_state_dict_file(garbage)
    corrupt = tmp_path / "finish.hdf5"  # the signature, then zeros
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    with pytest.raises(ValueError, match=r"not a readable checkpoint: .*finish\.hdf5 \(HDF5: "):
        load_backbone(corrupt, "sres18")
    whole = save_official_hdf5(official_acnet_resnet(**TINY["resnet18_tiny"], seed=0), tmp_path / "whole.h5")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(open(whole, "rb").read()[:3000])
    with pytest.raises(ValueError, match=r"not a readable checkpoint: .*truncated\.h5 \(HDF5: "):
        read_weights(truncated)
    nested = tmp_path / "nested.hdf5"
    with h5py.File(nested, "w") as f:
        f.create_dataset("conv1/conv.weight", data=torch.zeros(2).numpy())  # a "/" makes a group
    with pytest.raises(ValueError, match=r"nested\.hdf5 holds HDF5 groups \(conv1\).*flat layout"):
        read_weights(nested)
    empty = tmp_path / "deps_only.hdf5"
    with h5py.File(empty, "w") as f:
        f.create_dataset("deps", data=[64, 128])
    with pytest.raises(ValueError, match=r"deps_only\.hdf5 contains no tensors \(HDF5 datasets: deps\)"):
        read_weights(empty)
    plus = tmp_path / "plus.hdf5"  # save_hdf5 writes "/" as "+", read_hdf5 turns it back
    with h5py.File(plus, "w") as f:
        f.create_dataset("a+b", data=[1.0])
    assert list(load_state_dict_file(plus)[0]) == ["a/b"]

    monkeypatch.setitem(sys.modules, "h5py", None)  # as if the extra were not installed
    hint = r'whole\.h5 is an HDF5 file; reading it needs h5py .*pip install -e "\.\[hdf5\]"'
    with pytest.raises(ImportError, match=hint):
        read_weights(whole)
    from backbones.official import main
    assert main(["--arch", "resnet18_tiny", whole, str(tmp_path / "out.safetensors")]) == 1


# --------------------------------------------------------------------------- files that do not fit
def test_a_checkpoint_that_does_not_fit_is_named_with_the_keys_that_differ(tmp_path):
    """ResNet-50's file for ResNet-18 (meta device), a partial file, unknown keys (ACBlock's
    ``last_bn``, which ACNetBuilder never sets) and another family's layout: each a ValueError
    naming the file, the arch, the layout and the first keys that differ (a corrupt .hdf5: above)."""
    weights = _read(official_acnet_resnet(**official_size("sres50"), seed=None), "sres50_finish.hdf5")
    with torch.device("meta"), pytest.raises(ValueError) as err:
        create_loaded(weights, "resnet18")
    text = str(err.value)
    assert "sres50_finish.hdf5 does not fit model 'resnet18'" in text and f"the file was read as: {NAME}" in text
    assert "missing key(s): layer1.0.conv1.square.conv.weight" in text
    assert "unexpected key(s): layer1.0.shortcut.conv.weight" in text  # sres50's stage1 projection
    assert "layer2.0.shortcut.conv.weight: checkpoint (512, 256, 1, 1) vs model (128, 64, 1, 1)" in text

    sd = official_acnet_resnet(**TINY["resnet18_tiny"], seed=0)
    partial = _write({k: v for k, v in sd.items() if not k.startswith("stage4.")}, tmp_path, "pth", "partial")
    with pytest.raises(ValueError, match=r"(?s)partial\.pth does not fit model 'resnet18_tiny'.*"
                                         r"missing key\(s\): layer4\."):
        load_backbone(partial, "resnet18_tiny")
    last_bn = {f"stage1.0.conv1.acb.last_bn.{n}": torch.ones(16) for n in ("weight", "bias", "running_var")}
    unknown = _write({**sd, **last_bn}, tmp_path, "pth", "last_bn")
    with pytest.raises(ValueError, match=r"(?s)last_bn\.pth does not fit.*read as: official ACNet.*"
                                         r"unexpected key\(s\): stage1\.0\.conv1\.acb\.last_bn"):
        load_backbone(unknown, "resnet18_tiny")
    repvgg = tmp_path / "RepVGG-A0-train.pth"
    torch.save(official_repvgg(**repvgg_size(0.75, 2.5), classes=10, seed=0), repvgg)
    with pytest.raises(ValueError, match=r"(?s)RepVGG-A0-train\.pth does not fit model 'resnet18_tiny'.*"
                                         r"official RepVGG.*missing key\(s\): stem\.0\.conv\.weight"):
        load_backbone(repvgg, "resnet18_tiny", conv_type="acb")


# --------------------------------------------------------------------------- the command line
def test_the_command_converts_an_official_hdf5_file(tmp_path):
    """``python -m backbones.official --arch sres18 --model-kwargs ... finish_deploy.hdf5 OUT``: the
    layout is detected and named, the output is this project's backbone file recording
    ``conv_type="acb"`` and the deploy form, and computes the official forward."""
    pytest.importorskip("h5py", reason=HDF5_REASON)
    sd = convert_acnet_weights(official_acnet_resnet(**TINY["resnet18_tiny"], seed=8))
    src = save_official_hdf5(sd, tmp_path / "finish_deploy.hdf5")
    kwargs = '{"layers": [1, 1, 1, 1], "widths": [16, 32, 64, 128], "stem_width": 16}'
    command = [sys.executable, "-m", "backbones.official", "--arch", "sres18", "--model-kwargs", kwargs, src,
               str(tmp_path / "acnet.safetensors")]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"converted {NAME}" in proc.stdout and "arch=resnet18, deploy" in proc.stdout
    weights = read_weights(tmp_path / "acnet.safetensors")
    assert (weights.arch, weights.deploy, weights.format) == ("resnet18", True, "this project's backbone file")
    assert weights.kwargs["conv_type"] == "acb" and weights.kwargs["num_classes"] == 10
    model = backbones.create("resnet18", deploy=True, **weights.kwargs).double().eval()
    model.load_state_dict(weights.state_dict)
    with torch.no_grad():  # written from a float32 model: float32 rounding
        assert _relative_error(model(X), acnet_resnet_forward(sd, X)) <= 1e-6
