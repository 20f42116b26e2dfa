"""End to end: the real ``python -m tasks.classification`` command lines, in subprocesses."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.demo import classification_demo
from tasks.compare import load_runs
from conftest import REPO, print_configs, assert_failed as _failed, assert_ok as _ok, read_results as _results, run_task

QUICK = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--data.num_workers", "0", "--test_after_fit", "false",
]


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_task("classification", *args, **kwargs)


@pytest.fixture(scope="module")
def demo_run(demo_runs):
    """``python -m tasks.classification fit`` with no arguments, on a fresh demo cache."""
    return demo_runs("classification")


def test_no_argument_fit_learns_converts_and_tests_the_deploy_model(demo_run):
    cwd, demo_root, run, proc = demo_run
    assert "ReparamCallback: deploy model written" in proc.stdout + proc.stderr
    for name in ("deploy.ckpt", "deploy.safetensors", "deploy.json", "config.yaml", "results.json"):
        assert (run / name).is_file(), name
    results = _results(run)
    assert results["deploy"] is True and results["backbone"] == "repmlp_res_tiny"
    assert results["reparam"]["relative_error"] <= 1e-4
    assert results["metrics"]["test/top1"] > 0.6  # chance is 0.1 on the 10-class demo set
    assert any(demo_root.iterdir())  # the demo set was generated into the cache folder


def test_deploy_and_train_checkpoints_give_the_same_accuracy(demo_run):
    cwd, demo_root, run, _ = demo_run
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    _ok(_cli("test", "--ckpt_path", str(run / "deploy.ckpt"), cwd=cwd, demo_root=demo_root))
    _ok(_cli("test", "--ckpt_path", str(best), cwd=cwd, demo_root=demo_root))
    deploy, train = _results(run.parent / "version_1"), _results(run.parent / "version_2")
    assert deploy["deploy"] is True and train["deploy"] is False
    for key in ("test/top1", "test/top5"):
        assert deploy["metrics"][key] == train["metrics"][key] == _results(run)["metrics"][key]
    assert deploy["params"] < train["params"]


def test_backbone_files_test_as_the_run_did(demo_run, tmp_path):
    """The run's deploy.safetensors, and backbones.convert's output of its best checkpoint, given
    to --model.weights: each is loaded as the backbone it holds and scores what the run scored;
    --ckpt_path (Lightning's, for task checkpoints) refuses them with the way out."""
    cwd, demo_root, run, _ = demo_run
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    converted = tmp_path / "converted.pth"
    subprocess.run([sys.executable, "-m", "backbones.convert", "--arch", "repmlp_res_tiny", str(best), str(converted)],
                   cwd=REPO, check=True, capture_output=True)
    name = ["--trainer.logger.init_args.name", "from-backbone-files"]
    for i, path in enumerate((run / "deploy.safetensors", converted)):
        proc = _ok(_cli("test", "--model.weights", str(path), *name, cwd=cwd, demo_root=demo_root))
        assert (f"weights {path}: deploy backbone weights of 'repmlp_res_tiny' (this project's backbone file): "
                "loaded every tensor of the task") in proc.stdout
        results = _results(cwd / "runs" / "from-backbone-files" / f"version_{i}")
        assert results["deploy"] is True
        for key in ("test/top1", "test/top5"):
            assert results["metrics"][key] == _results(run)["metrics"][key]
    proc = _cli("test", "--ckpt_path", str(converted), *name, cwd=cwd, demo_root=demo_root)
    _failed(proc, f"--ckpt_path {converted} is not a Lightning checkpoint of a task",
            f"load weights with --model.weights {converted}")


def test_repvgg_tiny_fit_converts_to_a_plain_vgg_and_tests_it(demo_run, tmp_path):
    """The re-parameterization family through the same CLI and callback: RepVGG on the demo data."""
    _, demo_root, _, _ = demo_run
    proc = _ok(_cli("fit", "--model.backbone", "repvgg_a0_tiny", "--model.backbone_kwargs", "{}",
                    "--trainer.max_epochs", "4", "--trainer.enable_progress_bar", "false",
                    cwd=tmp_path, demo_root=demo_root))
    assert "ReparamCallback: deploy model written" in proc.stdout + proc.stderr
    (run,) = (tmp_path / "runs" / "classification-demo").iterdir()
    results = _results(run)
    assert results["deploy"] is True and results["backbone"] == "repvgg_a0_tiny"
    assert results["reparam"]["relative_error"] <= 1e-4
    assert results["metrics"]["test/top1"] > 0.3  # chance is 0.1; 4 of the demo's 30 epochs
    state = torch.load(run / "deploy.ckpt", weights_only=True)["state_dict"]
    assert not any("bn" in k or "running_" in k for k in state)
    convs = {k.rsplit(".", 2)[-2] for k in state if k.endswith(".weight") and state[k].dim() == 4}
    assert convs == {"reparam_conv"}  # a plain VGG: one 3x3 conv per block, nothing else
    _ok(_cli("test", "--ckpt_path", str(run / "deploy.ckpt"), "--model.backbone", "repvgg_a0_tiny",
             "--model.backbone_kwargs", "{}", cwd=tmp_path, demo_root=demo_root))
    retest = _results(run.parent / "version_1")
    assert retest["deploy"] is True
    assert retest["metrics"]["test/top1"] == results["metrics"]["test/top1"]


def test_predict_writes_top5_csv(demo_run, tmp_path):
    cwd, demo_root, run, _ = demo_run
    images = tmp_path / "imgs"
    val = next(demo_root.glob("classification-*")) / "val"
    for cls in ("circle", "star"):
        (images / cls).mkdir(parents=True)
        for f in sorted((val / cls).iterdir())[:3]:
            shutil.copy(f, images / cls / f.name)
    out = tmp_path / "pred.csv"
    _ok(_cli("predict", "--ckpt_path", str(run / "deploy.ckpt"), "--data.predict_root", str(images),
             "--predictions.path", str(out), cwd=cwd, demo_root=demo_root))
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and list(rows[0])[:3] == ["path", "label_1", "score_1"] and "score_5" in rows[0]
    correct = sum(Path(r["path"]).parent.name == r["label_1"] for r in rows)
    assert correct >= 5
    for r in rows:
        scores = [float(r[f"score_{i}"]) for i in range(1, 6)]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-5


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return classification_demo(tmp_path_factory.mktemp("small"), train_per_class=4, val_per_class=2, image_size=72)


def test_fit_tests_on_each_runtime_pair_of_test_after_fit(small_root, tmp_path):
    """``--test_after_fit`` as a list: the fitted deploy model is tested on each pair in turn, each
    writing its own results file in the run folder, which tasks.compare then reads as rows."""
    pytest.importorskip("torchao", reason="torch int8 needs the extra: pip install -e '.[int8]'")
    quick = QUICK[:-2]  # without --test_after_fit false
    proc = _ok(_cli("fit", "--data.root", str(small_root), "--model.backbone", "repvgg_a0_tiny",
                    "--model.backbone_kwargs", "{}", *quick, "--test_after_fit", "[torch/fp32, torch/int8]",
                    cwd=tmp_path, demo_root=tmp_path))
    assert "INT8 (torch PT2E, compiled for batch" in proc.stdout
    (run,) = (tmp_path / "runs" / "classification-demo").iterdir()
    fp32, int8 = _results(run), json.loads((run / "results.torch-int8.json").read_text())
    assert (fp32["runtime"], fp32["precision"], int8["runtime"], int8["precision"]) == ("torch", "fp32", "torch", "int8")
    assert int8["data"] == fp32["data"] and int8["deploy"] is True and int8["throughput"]["images"] == 20
    assert abs(int8["metrics"]["test/top1"] - fp32["metrics"]["test/top1"]) <= 0.1  # 2 of the 20 images
    assert [(r.spec.runtime, r.spec.precision) for r in load_runs(str(run))] == [("torch", "fp32"), ("torch", "int8")]


def test_fit_fine_tunes_from_an_official_repvgg_file(small_root, tmp_path):
    """``--model.weights`` takes a published layout as it is: an official RepVGG train-form file
    (made from the official key/shape listing, tests/backbones/test_published_layouts.py) of the
    tiny RepVGG's structure, with DDP's ``module.``."""
    from published_layouts import official_repvgg

    state = official_repvgg(depths=(1, 2, 2, 1), widths=(16, 32, 64, 128), stem=16, classes=10, seed=0)
    torch.save({"module." + k: v.float() for k, v in state.items()}, tmp_path / "RepVGG-tiny-train.pth")
    proc = _ok(_cli("fit", "--data.root", str(small_root), "--model.backbone", "repvgg_a0_tiny",
                    "--model.backbone_kwargs", "{}", "--model.weights", str(tmp_path / "RepVGG-tiny-train.pth"), *QUICK,
                    cwd=tmp_path, demo_root=tmp_path))
    assert "train-time backbone weights (official RepVGG checkpoint (DingXiaoH/RepVGG)): loaded the whole task" in proc.stdout


def test_a_bad_test_after_fit_pair_stops_before_training(small_root, tmp_path):
    proc = _cli("fit", "--data.root", str(small_root), *QUICK[:-2], "--test_after_fit", "[torch/fp32, torch/fp16]",
                cwd=tmp_path, demo_root=tmp_path)
    _failed(proc, "--test_after_fit: --precision 'fp16': choose one of fp32, bf16, int8")
    proc = _cli("fit", "--data.root", str(small_root), *QUICK[:-2], "--test_after_fit", "[torch-int8]",
                cwd=tmp_path, demo_root=tmp_path)
    _failed(proc, "'torch-int8': give RUNTIME/PRECISION, e.g. torch/int8")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def _copy(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root, tmp_path / "data")
    return tmp_path / "data"


def test_missing_data_root(tmp_path):
    proc = _cli("fit", "--data.root", str(tmp_path / "missing"), *QUICK, cwd=tmp_path, demo_root=tmp_path)
    _failed(proc, f"data root {tmp_path / 'missing'} does not exist")


def test_empty_class_folder(small_root, tmp_path):
    root = _copy(small_root, tmp_path)
    for f in (root / "train" / "dots").iterdir():
        f.unlink()
    proc = _cli("fit", "--data.root", str(root), *QUICK, cwd=tmp_path, demo_root=tmp_path)
    _failed(proc, "empty class folder", str(root / "train" / "dots"))


def test_corrupt_jpeg_stops_or_is_skipped_on_request(small_root, tmp_path):
    root = _copy(small_root, tmp_path)
    victim = sorted((root / "val" / "ring").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    _failed(_cli("validate", "--data.root", str(root), *QUICK, cwd=tmp_path, demo_root=tmp_path),
            "cannot decode image", str(victim))
    proc = _ok(_cli("validate", "--data.root", str(root), "--data.skip_corrupt", "true", *QUICK,
                    cwd=tmp_path, demo_root=tmp_path))
    assert f"skip_corrupt: cannot decode image {victim}" in proc.stderr
    # predict skips it too: every readable image once, the corrupt one not at all (not a neighbour twice)
    out = tmp_path / "pred.csv"
    _ok(_cli("predict", "--data.root", str(root), "--data.skip_corrupt", "true", "--data.predict_root",
             str(root / "val"), "--predictions.path", str(out), *QUICK, cwd=tmp_path, demo_root=tmp_path))
    paths = [row["path"] for row in csv.DictReader(out.open())]
    readable = sorted(str(p) for p in (root / "val").rglob("*.JPEG") if p != victim)
    assert sorted(paths) == readable


def test_deploy_checkpoint_of_another_backbone(demo_run, tmp_path):
    cwd, demo_root, run, _ = demo_run
    proc = _cli("test", "--ckpt_path", str(run / "deploy.ckpt"), "--model.backbone", "resnet_tiny",
                cwd=tmp_path, demo_root=demo_root)
    _failed(proc, "holds backbone 'repmlp_res_tiny', but this run builds 'resnet_tiny'")


def test_class_count_mismatch(demo_run, small_root, tmp_path):
    cwd, demo_root, run, _ = demo_run
    root = _copy(small_root, tmp_path)
    for split in ("train", "val"):
        for cls in ("dots", "ring", "star"):
            shutil.rmtree(root / split / cls)
    proc = _cli("test", "--ckpt_path", str(run / "deploy.ckpt"), "--data.root", str(root), *QUICK,
                cwd=tmp_path, demo_root=demo_root)
    _failed(proc, "class-count mismatch", "has 10 classes, this run has 7")


def test_image_size_is_set_through_the_model(tmp_path):
    proc = _cli("test", "--data.image_size", "64", cwd=tmp_path, demo_root=tmp_path)
    _failed(proc, "--data.image_size: it follows the model", """--model.backbone_kwargs '{"img_size": SIZE}'""")


@pytest.mark.parametrize("data, name", [("{image_size: [96, 96]}", "image_size"), ("{seed: 7}", "seed")])
def test_config_file_setting_a_computed_data_value(tmp_path, data, name):
    """jsonargparse would replace the file's value by the computed one without a word."""
    extra = tmp_path / "extra.yaml"
    extra.write_text(f"data: {data}\n")
    proc = _cli("test", "-c", str(REPO / "configs" / "classification" / "demo.yaml"), "-c", str(extra),
                cwd=tmp_path, demo_root=tmp_path)
    _failed(proc, f"{extra}: remove data.{name} from this file", "model.backbone_kwargs" if name == "image_size"
            else "seed_everything")


def test_seed_must_be_an_integer(tmp_path):
    proc = _cli("fit", "--seed_everything", "true", *QUICK, cwd=tmp_path, demo_root=tmp_path)
    _failed(proc, "seed_everything must be an explicit integer")


def test_paper_configs_parse(tmp_path):
    names = ("resnet50", "repmlp_res50_g8_224", "repmlp_res50_light_224", "repmlp_res50_g4_8_320")
    argvs = [["tasks.classification", "fit", "-c", str(REPO / "configs" / "classification" / f"{n}.yaml")] for n in names]
    for name, result in zip(names, print_configs(argvs, tmp_path)):
        out = result["out"]
        assert result["code"] == 0, result["err"]
        assert f"backbone: {name}" in out and "max_epochs: 100" in out
        assert "lr: 0.1" in out and "label_smoothing: 0.1" in out


def test_family_configs_parse_with_their_header_commands(tmp_path):
    """Each re-parameterization family config, run as its header says, with its paper's recipe."""
    names = ("repvgg_a0", "mobileone_s0", "replknet_31b", "resnet18_orepa", "repmlpnet_t224", "repmlpnet_b256")
    commands = []
    for name in names:
        text = (REPO / "configs" / "classification" / f"{name}.yaml").read_text()
        (line,) = [ln for ln in text.splitlines() if ln.startswith("#   python -m tasks.classification fit")]
        commands.append(line.split("python -m ", 1)[1].replace("/path/to/imagenet", "data").split())
    results = print_configs(commands, REPO)
    for name, argv, result in zip(names, commands, results):
        assert result["code"] == 0, result["err"]
        out = result["out"]
        backbone = "resnet18" if name == "resnet18_orepa" else name
        assert f"backbone: {backbone}" in out and "devices: 8" in out and "sync_batchnorm: true" in out
        if "--trainer.max_epochs" in argv:
            assert f"max_epochs: {argv[argv.index('--trainer.max_epochs') + 1]}" in out
    outs = dict(zip(names, (r["out"] for r in results)))
    assert "conv_type: orepa" in outs["resnet18_orepa"]
    # the papers' recipes (next_capabilities.md §5): RepLKNet-31B, MobileOne-S0 (MMPretrain), RepMLPNet
    replk = outs["replknet_31b"]
    for line in ("rand_augment: rand-m9-mstd0.5-inc1", "random_erasing: 0.25", "erasing_mode: pixel",
                 "interpolation: bicubic", "mixup_alpha: 0.8", "cutmix_alpha: 1.0", "drop_path_rate: 0.5",
                 "decay: 0.9999", "accumulate_grad_batches: 8", "weight_decay: 0.05", "lr: 0.004"):
        assert line in replk, line
    assert "weight_decay_end: 1.0e-05" in outs["mobileone_s0"] and "decay: 0.9995" in outs["mobileone_s0"]
    for name in ("repmlpnet_t224", "repmlpnet_b256"):
        assert "mixup_alpha: 0.4" in outs[name] and "rand_augment: rand-m14-mmax14-mstd101-p1.0" in outs[name]
        assert "gradient_clip_val: 5" in outs[name] and "callbacks.ema.EMA" not in outs[name]


class _Payload:
    """Anything a weights-only unpickler must refuse to construct."""


def test_ckpt_path_is_read_with_weights_only(demo_run, tmp_path):
    import torch

    cwd, demo_root, run, _ = demo_run
    checkpoint = torch.load(run / "deploy.ckpt", weights_only=True)
    checkpoint["payload"] = _Payload()
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(checkpoint, unsafe)
    _failed(_cli("test", "--ckpt_path", str(unsafe), cwd=cwd, demo_root=demo_root), "weights_only", "_Payload")
