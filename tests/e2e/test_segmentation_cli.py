"""End to end: the real ``python -m tasks.segmentation`` command lines, in subprocesses."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, assert_failed, assert_ok, print_configs, read_results, run_task
from datamodules.cityscapes import PALETTE
from datamodules.demo import cityscapes_demo

QUICK = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--data.num_workers", "0", "--data.persistent_workers", "false", "--data.batch_size", "2",
    "--trainer.check_val_every_n_epoch", "1", "--test_after_fit", "false",
]


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_task("segmentation", *args, **kwargs)


@pytest.fixture(scope="module")
def demo_run(demo_runs):
    """``python -m tasks.segmentation fit`` with no arguments, on a fresh demo cache."""
    return demo_runs("segmentation")


def test_no_argument_fit_learns_converts_and_tests_the_deploy_model(demo_run):
    cwd, demo_root, run, proc = demo_run
    assert "ReparamCallback: deploy model written" in proc.stdout + proc.stderr
    for name in ("deploy.ckpt", "deploy.safetensors", "deploy.json", "config.yaml", "results.json"):
        assert (run / name).is_file(), name
    results = read_results(run)
    assert results["deploy"] is True and results["reparam"]["relative_error"] <= 1e-4
    assert results["metrics"]["test/mIoU"] > 0.35  # 12 classes occur; chance is far below
    assert 0.8 < results["metrics"]["test/aAcc"] <= 1.0
    iou = results["per_class_iou"]
    assert list(iou)[:3] == ["road", "sidewalk", "building"] and iou["road"] > 0.7 and iou["wall"] is None
    assert results["window"] == [128, 128] and results["inference"]["inference"] == "slide"


def test_deploy_and_train_checkpoints_give_the_same_miou(demo_run):
    cwd, demo_root, run, _ = demo_run
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    assert_ok(_cli("test", "--ckpt_path", str(run / "deploy.ckpt"), cwd=cwd, demo_root=demo_root))
    assert_ok(_cli("test", "--ckpt_path", str(best), cwd=cwd, demo_root=demo_root))
    deploy, train = read_results(run.parent / "version_1"), read_results(run.parent / "version_2")
    assert deploy["deploy"] is True and train["deploy"] is False
    for key in ("test/mIoU", "test/aAcc"):
        assert deploy["metrics"][key] == pytest.approx(train["metrics"][key], abs=1e-4)
        assert deploy["metrics"][key] == pytest.approx(read_results(run)["metrics"][key], abs=1e-6)


def test_predict_writes_label_colour_and_overlay_pngs(demo_run, tmp_path):
    cwd, demo_root, run, _ = demo_run
    images = sorted((next(demo_root.glob("cityscapes-*")) / "leftImg8bit" / "val").rglob("*.png"))[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for image in images:
        shutil.copy(image, folder / image.name)
    out = tmp_path / "pred"
    assert_ok(_cli("predict", "--ckpt_path", str(run / "deploy.ckpt"), "--data.predict_root", str(folder),
                   "--predictions.dirpath", str(out), cwd=cwd, demo_root=demo_root))
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        labels = cv2.imread(str(out / f"{stem}_pred_labelTrainIds.png"), cv2.IMREAD_UNCHANGED)
        color = cv2.imread(str(out / f"{stem}_pred_color.png"))
        overlay = cv2.imread(str(out / f"{stem}_pred_overlay.png"))
        assert labels.shape == (128, 256) and labels.max() <= 18
        assert color.shape == overlay.shape == (128, 256, 3)
        for train_id in np.unique(labels):  # each class in its Cityscapes colour (BGR on disk)
            assert (color[labels == train_id] == PALETTE[train_id][::-1]).all()


def test_predict_keeps_subfolders_and_refuses_two_inputs_of_one_name(demo_run, tmp_path):
    """Frames of the same name in two sequences are both written, under their sequence folders;
    ``a.png`` beside ``a.jpg`` would overwrite each other's predictions and is an error up front."""
    cwd, demo_root, run, _ = demo_run
    image = sorted((next(demo_root.glob("cityscapes-*")) / "leftImg8bit" / "val").rglob("*.png"))[0]
    folder = tmp_path / "in"
    for seq in ("seqA", "seqB"):
        (folder / seq).mkdir(parents=True)
        shutil.copy(image, folder / seq / "frame_0001.png")
    out = tmp_path / "pred"
    args = ["--ckpt_path", str(run / "deploy.ckpt"), "--data.predict_root", str(folder), "--predictions.dirpath", str(out)]
    assert_ok(_cli("predict", *args, cwd=cwd, demo_root=demo_root))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_labelTrainIds.png")) == [
        "seqA/frame_0001_pred_labelTrainIds.png", "seqB/frame_0001_pred_labelTrainIds.png"]
    cv2.imwrite(str(folder / "seqB" / "frame_0001.jpg"), cv2.imread(str(image)))
    shutil.rmtree(out)
    proc = _cli("predict", *args, cwd=cwd, demo_root=demo_root)
    assert_failed(proc, "frame_0001.jpg and", "frame_0001.png would both be written as seqB/frame_0001_pred_*.png")
    assert not list(out.rglob("*.png"))  # nothing written


def test_backbone_file_alone_is_refused_with_the_way_out(demo_run):
    cwd, demo_root, run, _ = demo_run
    path = run / "deploy.safetensors"
    proc = _cli("test", "--model.weights", str(path), cwd=cwd, demo_root=demo_root)
    assert_failed(proc, f"checkpoint {path} does not fit", "holds the backbone alone",
                  "auxiliary_head, decode_head: test the run's deploy.ckpt")


# --------------------------------------------------------------------------- mmseg checkpoints
def _mmseg_names(state_dict: dict) -> dict:
    stem = {("0", "conv"): 0, ("0", "bn"): 1, ("1", "conv"): 3, ("1", "bn"): 4, ("2", "conv"): 6, ("2", "bn"): 7}
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"backbone\.stem\.(\d)\.(conv|bn)\.(.+)", key):
            key = f"backbone.stem.{stem[m.group(1), m.group(2)]}.{m.group(3)}"
        elif m := re.match(r"backbone\.(layer\d\.\d+)\.conv(\d)\.(conv|bn)\.(.+)", key):
            key = f"backbone.{m.group(1)}.{m.group(3)}{m.group(2)}.{m.group(4)}"
        elif m := re.match(r"backbone\.(layer\d\.\d+)\.shortcut\.(conv|bn)\.(.+)", key):
            key = f"backbone.{m.group(1)}.downsample.{0 if m.group(2) == 'conv' else 1}.{m.group(3)}"
        out[key] = value
    return out


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return cityscapes_demo(tmp_path_factory.mktemp("small"), train_images=4, val_images=2)


def test_mmseg_checkpoint_tests_as_the_baseline(small_root, tmp_path):
    """A checkpoint in mmseg's layout (meta + state_dict, no Lightning keys), given to --model.weights,
    is tested as it is."""
    args = ["--data.root", str(small_root), "--model.backbone", "resnet_tiny_d8", "--model.head_channels", "16",
            "--model.aux_channels", "8", "--model.inference", "whole", *QUICK]
    assert_ok(_cli("fit", *args, "--trainer.max_epochs", "1", cwd=tmp_path, demo_root=tmp_path))
    run = tmp_path / "runs" / "segmentation-demo"
    ours = run / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ours, weights_only=True)["state_dict"]
    mmseg = tmp_path / "pspnet_mmseg.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2", "CLASSES": ["road"] * 19}, "state_dict": _mmseg_names(state),
                "optimizer": {}}, mmseg)
    proc = assert_ok(_cli("test", "--model.weights", str(mmseg), *args, cwd=tmp_path, demo_root=tmp_path))
    assert f"weights {mmseg}: train-time task checkpoint (mmseg checkpoint): loaded every tensor" in proc.stdout
    assert_ok(_cli("test", "--ckpt_path", str(ours), *args, cwd=tmp_path, demo_root=tmp_path))
    via_mmseg, direct = read_results(run / "version_1"), read_results(run / "version_2")
    assert via_mmseg["metrics"] == direct["metrics"] and via_mmseg["deploy"] is False
    out = tmp_path / "pred"
    assert_ok(_cli("predict", "--model.weights", str(mmseg), "--predictions.dirpath", str(out), *args,
                   cwd=tmp_path, demo_root=tmp_path))
    assert len(list(out.rglob("*_pred_labelTrainIds.png"))) == 2  # the two val images


# --------------------------------------------------------------------------- UPerNet
UPERNET_DEMO = REPO / "configs" / "segmentation" / "demo_upernet_repmlpnet.yaml"


def test_upernet_repmlpnet_demo_fits_converts_and_tests_the_deploy_model(small_root, tmp_path):
    """The UPerNet demo config (RepMLPNet built for its 128x128 crop), shortened: fit, convert the best
    checkpoint (Locality Injection, BNs folded), and test the deploy model after fit."""
    proc = assert_ok(_cli("fit", "--config", str(UPERNET_DEMO), "--data.root", str(small_root),
                          "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
                          "--trainer.enable_progress_bar", "false", "--data.num_workers", "0",
                          "--data.persistent_workers", "false", "--data.batch_size", "2",
                          cwd=tmp_path, demo_root=tmp_path))
    assert "ReparamCallback: deploy model written" in proc.stdout + proc.stderr
    run = tmp_path / "runs" / "segmentation-demo-upernet" / "version_0"
    results = read_results(run)
    assert results["deploy"] is True and results["backbone"] == "repmlpnet_tiny"
    assert results["hparams"]["decode_head"] == "uper"
    assert results["reparam"]["relative_error"] <= 1e-4
    assert results["params"] == results["reparam"]["params_deploy"] < results["reparam"]["params_train"]
    assert 0.0 <= results["metrics"]["test/mIoU"] <= 1.0 and len(results["per_class_iou"]) == 19
    assert results["window"] == [128, 128] and results["inference"]["inference"] == "slide"
    state = torch.load(run / "deploy.ckpt", weights_only=True)["state_dict"]
    assert "decode_head.fpn_bottleneck.conv.bias" in state and "backbone.stage1.0.mlp.fc3.bias" in state
    assert not [k for k in state if ".bn." in k or "pre_bn" in k or "local." in k]


def test_upernet_configs_parse_with_their_header_commands(tmp_path):
    """The Cityscapes UPerNet configs, run as their headers say, and the UPerNet demo config."""
    commands = {}
    for name in ("upernet_r50_512x1024", "upernet_repmlpnet_b256_512x1024"):
        text = (REPO / "configs" / "segmentation" / f"{name}.yaml").read_text()
        (line,) = [ln for ln in text.splitlines() if ln.startswith("#   python -m tasks.segmentation fit")]
        commands[name] = line.split("python -m ", 1)[1].replace("/path/to/cityscapes", "data").split()
    commands["demo"] = ["tasks.segmentation", "fit", "--config", str(UPERNET_DEMO)]
    results = dict(zip(commands, print_configs(list(commands.values()), REPO)))
    for name, result in results.items():
        assert result["code"] == 0, result["err"]
        assert "decode_head: uper" in result["out"], name
    r50, b256, demo = (results[n]["out"] for n in commands)
    assert "backbone: resnet50_v1c\n" in r50 and "max_steps: 80000" in r50 and "val_check_interval: 8000" in r50
    assert "inference: whole" in r50 and "lr: 0.01" in r50 and "poly_power: 0.9" in r50 and "devices: 4" in r50
    assert "backbone: repmlpnet_b256" in b256 and "- 512\n" in b256 and "- 1024\n" in b256
    assert "devices: '8'" in b256 and "max_steps: 80000" in b256 and "optimizer: adamw" in b256
    assert "lr: 0.0002" in b256 and "weight_decay: 0.05" in b256 and "poly_power: 1.0" in b256
    assert "inference: slide" in b256 and "warmup_epochs: 2.15" in b256 and "weights_match: matching" in b256
    assert "backbone: repmlpnet_tiny" in demo and "root: null" in demo
    # the configs build: RepMLPNet-B256 at 512x1024 has whole partitions in every stage (on the meta device)
    from backbones import create

    with torch.device("meta"):
        model = create("repmlpnet_b256", img_size=[512, 1024], num_classes=0)
    assert model.stage_sizes == [(128, 256), (64, 128), (32, 64), (16, 32)]


# --------------------------------------------------------------------------- bad input
def _copy(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root, tmp_path / "data")
    return tmp_path / "data"


def test_image_without_label(small_root, tmp_path):
    root = _copy(small_root, tmp_path)
    label = sorted((root / "gtFine" / "train").rglob("*_gtFine_labelIds.png"))[0]
    label.unlink()
    image = label.name.replace("_gtFine_labelIds.png", "_leftImg8bit.png")
    assert_failed(_cli("fit", "--data.root", str(root), *QUICK, cwd=tmp_path, demo_root=tmp_path),
                  "have no label file", image)


def test_label_outside_the_id_table(small_root, tmp_path):
    root = _copy(small_root, tmp_path)
    label = sorted((root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))[0]
    values = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    values[0, :5] = 40
    cv2.imwrite(str(label), values)
    assert_failed(_cli("validate", "--data.root", str(root), *QUICK, cwd=tmp_path, demo_root=tmp_path),
                  f"{label.name} holds value(s) 40 that are not Cityscapes label ids")


def test_image_label_size_mismatch(small_root, tmp_path):
    root = _copy(small_root, tmp_path)
    label = sorted((root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))[0]
    cv2.imwrite(str(label), np.full((64, 100), 7, np.uint8))
    assert_failed(_cli("validate", "--data.root", str(root), *QUICK, cwd=tmp_path, demo_root=tmp_path),
                  label.name, "(64, 100)")


def test_crop_larger_than_any_rescaled_image(tmp_path):
    proc = _cli("fit", "--data.scale", "[64, 32]", "--data.ratio_range", "[0.5, 1.0]", *QUICK,
                cwd=tmp_path, demo_root=tmp_path)
    assert_failed(proc, "data.image_size (crop h, w)", "can never fit")


def test_window_that_does_not_fit_the_repmlp_partitions(tmp_path):
    proc = _cli("fit", "--model.backbone_kwargs", '{"img_size": 120}', *QUICK, cwd=tmp_path, demo_root=tmp_path)
    # 120 px → 15x15 maps in c3/c4, not divisible by the 8x8 partition
    assert_failed(proc, "img_size 120x120 gives a 15x15 feature map", "not a multiple of the partition 8x8")
