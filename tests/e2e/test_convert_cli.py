"""backbones.convert (CLI and function) and the checkpoint helpers it relies on."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, randomize_bn

from backbones import create, model_relative_error, reparameterize_model
from backbones.convert import ConversionError, convert_checkpoint, main as convert_main
from backbones.weights.io import (
    load_into,
    load_state_dict_file,
    save_checkpoint,
    save_deploy_checkpoint,
    select_prefix,
    state_dict_mode,
    strip_prefix,
)

ARCH = "repmlp_res_tiny"


def _train_model(arch: str = ARCH, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return randomize_bn(create(arch, **kwargs), seed=seed + 1).eval()


def _x(model, batch: int = 2):
    return torch.randn(batch, 3, *model.img_size, generator=torch.Generator().manual_seed(11))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backbones.convert", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _printed_error(stdout: str) -> float:
    match = re.search(r"max relative error: ([0-9.eE+-]+)", stdout)
    assert match, stdout
    return float(match.group(1))


def _check_deploy_file(path: Path, train_model, arch: str = ARCH, num_classes: int = 10) -> None:
    state_dict, meta = load_state_dict_file(path)
    assert meta["arch"] == arch and meta["deploy"] is True
    assert meta["model_kwargs"]["num_classes"] == num_classes
    assert state_dict_mode(state_dict) == "deploy"
    deploy = create(arch, deploy=True, **meta["model_kwargs"])
    deploy.load_state_dict(state_dict, strict=True)
    assert model_relative_error(train_model, deploy, _x(train_model)) <= 1e-4


# ----------------------------------------------------------------- the CLI, good inputs
def test_cli_ddp_checkpoint_to_safetensors(tmp_path):
    model = _train_model()
    src, dst = tmp_path / "ddp.pt", tmp_path / "deploy.safetensors"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, src)
    proc = _cli("--arch", ARCH, str(src), str(dst))
    assert proc.returncode == 0, proc.stderr
    assert _printed_error(proc.stdout) <= 1e-4
    assert re.search(r"params: train [0-9.]+M, deploy [0-9.]+M", proc.stdout)
    _check_deploy_file(dst, model)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind


def test_cli_lightning_checkpoint_to_torch_file(tmp_path):
    model = _train_model(num_classes=7)  # num_classes comes from fc.weight
    src, dst = tmp_path / "epoch=3.ckpt", tmp_path / "deploy.pt"
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.6"}, src)
    proc = _cli("--arch", ARCH, str(src), str(dst), "--tolerance", "1e-4", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert _printed_error(proc.stdout) <= 1e-4
    _check_deploy_file(dst, model, num_classes=7)
    raw = torch.load(dst, map_location="cpu", weights_only=True)  # plain torch loading works too
    assert raw["deploy"] is True and raw["arch"] == ARCH


# ----------------------------------------------------------------- the CLI, bad inputs
@pytest.mark.parametrize("arch,kwargs", [("replknet_31b_tiny", {}), ("resnet18_tiny", {"conv_type": "dbb"})])
def test_cli_converts_family_checkpoints(tmp_path, arch, kwargs):
    """RepLKNet's classifier is head.fc (num_classes is read from it); conv_type goes in --model-kwargs."""
    model = _train_model(arch, num_classes=7, **kwargs)
    src, dst = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), src)
    args = ["--model-kwargs", json.dumps(kwargs)] if kwargs else []
    proc = _cli("--arch", arch, *args, str(src), str(dst))
    assert proc.returncode == 0, proc.stderr
    _check_deploy_file(dst, model, arch, num_classes=7)


def test_cli_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    proc = _cli("--arch", ARCH, str(missing), str(tmp_path / "out.pt"))
    assert proc.returncode != 0
    assert "checkpoint not found" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_already_deploy_checkpoint(tmp_path):
    src = tmp_path / "deploy_in.pt"
    torch.save(reparameterize_model(_train_model()).state_dict(), src)  # bare deploy state dict, no metadata
    proc = _cli("--arch", ARCH, str(src), str(tmp_path / "out.pt"))
    assert proc.returncode != 0
    assert "already in deploy form" in proc.stderr and str(src) in proc.stderr
    assert not (tmp_path / "out.pt").exists()


# ----------------------------------------------------------------- the function, bad inputs
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    model = _train_model()
    full = tmp_path / f"full{suffix}"
    save_checkpoint(model, full, ARCH, {"num_classes": 10})
    data = full.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint") as err:
        convert_checkpoint(ARCH, truncated, tmp_path / "out.pt")
    assert str(truncated) in str(err.value)


def test_checkpoint_of_a_different_arch(tmp_path):
    src = tmp_path / "resnet.pt"
    save_checkpoint(_train_model("resnet_tiny"), src, "resnet_tiny", {"num_classes": 10})
    with pytest.raises(ValueError) as err:
        convert_checkpoint(ARCH, src, tmp_path / "out.pt")
    message = str(err.value)
    assert str(src) in message and repr(ARCH) in message
    assert "records arch 'resnet_tiny'" in message and "different architecture" in message
    assert "missing key" in message and "unexpected key" in message
    assert not (tmp_path / "out.pt").exists()


def test_already_deploy_by_metadata_and_other_errors(tmp_path):
    deploy = reparameterize_model(_train_model())
    src = tmp_path / "deploy.safetensors"
    save_deploy_checkpoint(deploy, src, ARCH, {"num_classes": 10})
    with pytest.raises(ValueError, match=r"already in deploy form \(deploy backbone weights of 'repmlp_res_tiny' "
                                         r"\(this project's backbone file\)\)"):
        convert_checkpoint(ARCH, src, tmp_path / "out.pt")
    with pytest.raises(ValueError, match="train-time form.*reparameterize_model"):
        save_deploy_checkpoint(_train_model(), tmp_path / "x.pt", ARCH)
    train = tmp_path / "train.pt"
    torch.save(_train_model().state_dict(), train)
    with pytest.raises(KeyError, match="unknown model"):
        convert_checkpoint("repmlp_res_huge", train, tmp_path / "out.pt")
    with pytest.raises(ValueError, match="shape mismatch.*fc.weight"):
        convert_checkpoint(ARCH, train, tmp_path / "out.pt", num_classes=5)


def test_task_checkpoint_with_a_head_converts_its_backbone(tmp_path):
    """A task's checkpoint (backbone + a separate head) is read as a task: its backbone converts,
    as with an explicit --prefix backbone."""
    model = _train_model(num_classes=0)  # headless backbone + a separate head in the task
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    src = tmp_path / "task.ckpt"
    torch.save({"state_dict": {**state, "head.weight": torch.randn(3, 256), "head.bias": torch.zeros(3)}}, src)
    convert_checkpoint(ARCH, src, tmp_path / "out.pt")
    _check_deploy_file(tmp_path / "out.pt", model, num_classes=0)
    convert_checkpoint(ARCH, src, tmp_path / "prefixed.pt", prefix="backbone.")
    _check_deploy_file(tmp_path / "prefixed.pt", model, num_classes=0)
    with pytest.raises(ValueError, match="no key starts with 'decoder.'"):
        convert_checkpoint(ARCH, src, tmp_path / "x.pt", prefix="decoder.")


def test_tolerance_failure_writes_nothing(tmp_path):
    src, dst = tmp_path / "train.pt", tmp_path / "out.safetensors"
    torch.save(_train_model().state_dict(), src)
    with pytest.raises(ConversionError, match="above the tolerance"):
        convert_checkpoint(ARCH, src, dst, tolerance=1e-12)
    assert not dst.exists()
    lines: list[str] = []
    error = convert_checkpoint(ARCH, src, dst, log=lines.append)
    assert 0 < error <= 1e-5 and dst.exists() and any("max relative error" in line for line in lines)


# ----------------------------------------------------------------- checkpoint helpers
class Opaque:
    """An arbitrary Python object: refused when unpickling with weights_only=True."""


def test_weights_only_refuses_python_objects(tmp_path):
    src = tmp_path / "pickled.pt"
    torch.save({"state_dict": _train_model().state_dict(), "hparams": Opaque()}, src)
    with pytest.raises(ValueError, match="(?s)not a readable checkpoint.*pickled.pt.*weights_only=True"):
        load_state_dict_file(src)


def test_strip_and_select_prefix():
    sd = {"module.model.a.weight": torch.zeros(1), "module.model.b.bias": torch.zeros(1)}
    assert list(strip_prefix(sd)) == ["model.a.weight", "model.b.bias"]
    assert list(strip_prefix(sd, auto=True)) == ["a.weight", "b.bias"]
    mixed = {"backbone.a": torch.zeros(1), "head.b": torch.zeros(1)}
    assert strip_prefix(mixed, auto=True) == mixed  # not shared by every key: left alone
    assert list(select_prefix(mixed, "backbone")) == ["a"]
    with pytest.raises(ValueError, match="no key starts with 'neck.'.*backbone., head."):
        select_prefix(mixed, "neck.")


def test_load_into_names_mode_mismatch_both_ways(tmp_path):
    train = _train_model()
    deploy_sd = reparameterize_model(train).state_dict()
    with pytest.raises(ValueError, match="(?s)f.pt.*'repmlp_res_tiny'.*checkpoint is in deploy form; build the model with deploy=True"):
        load_into(create(ARCH), deploy_sd, "f.pt", ARCH)
    with pytest.raises(ValueError, match="checkpoint is in train-time form; build the model with deploy=False"):
        load_into(create(ARCH, deploy=True), train.state_dict(), "f.pt", ARCH)
    plain = tmp_path / "plain.pt"
    torch.save({**deploy_sd, "arch": ARCH, "deploy": True}, plain)  # metadata next to the tensors
    state_dict, meta = load_state_dict_file(plain)
    assert meta == {"arch": ARCH, "deploy": True} and set(state_dict) == set(deploy_sd)


# ----------------------------------------------------------------- the destination
def test_destination_that_is_the_source_is_refused(tmp_path, capsys):
    src = tmp_path / "train.pt"
    torch.save(_train_model().state_dict(), src)
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.pt").symlink_to(src)
    for dst in (src, tmp_path / "sub" / ".." / "train.pt", tmp_path / "link.pt"):
        for extra in ([], ["--overwrite"]):  # --overwrite never allows writing over the input
            assert convert_main(["--arch", ARCH, str(src), str(dst), *extra]) == 1
            err = capsys.readouterr().err
            assert f"the destination {dst} is the source {src}" in err
    assert src.read_bytes() == before


def test_existing_destination_needs_overwrite(tmp_path, capsys):
    model = _train_model()
    src, dst = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), src)
    dst.write_bytes(b"keep me")
    assert convert_main(["--arch", ARCH, str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert f"the destination {dst} already exists" in err and "--overwrite" in err
    assert dst.read_bytes() == b"keep me"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_checkpoint(ARCH, src, dst)
    assert convert_main(["--arch", ARCH, str(src), str(dst), "--overwrite"]) == 0
    _check_deploy_file(dst, model)
