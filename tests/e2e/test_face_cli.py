"""End to end: the real ``python -m tasks.face`` command lines, in subprocesses."""
from __future__ import annotations

import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from datamodules.demo_faces import DEMO_VERIFICATION_SETS
from datamodules.recordio import write_face_recordio
from datamodules.verification_pairs import read_bin
from conftest import REPO, print_configs, assert_failed as _failed, assert_ok as _ok, copy_root, read_results as _results, run_task

SETS = DEMO_VERIFICATION_SETS
QUICK = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.check_val_every_n_epoch", "1",
    "--trainer.enable_progress_bar", "false", "--data.num_workers", "0", "--data.batch_size", "8",
]


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_task("face", *args, **kwargs)


@pytest.fixture(scope="module")
def demo_run(demo_runs):
    """``python -m tasks.face fit`` with no arguments, on a fresh demo cache."""
    return demo_runs("face")


def test_no_argument_fit_learns_converts_and_tests_every_set(demo_run):
    cwd, demo_root, run, proc = demo_run
    assert "ReparamCallback: deploy model written" in proc.stdout + proc.stderr
    for name in ("deploy.ckpt", "deploy.safetensors", "deploy.json", "results.json"):
        assert (run / name).is_file(), name
    results = _results(run)
    assert results["task"] == "face" and results["deploy"] is True and results["backbone"] == "repmlp_faceres_tiny"
    assert results["reparam"]["relative_error"] <= 1e-4
    assert list(results["verification"]) == list(SETS)
    for name, summary in results["verification"].items():
        assert summary["pairs"] == 400 and summary["folds"] == 10
        assert 0 <= summary["acc_std"] < 0.2 and 0 <= summary["tar@far=1e-3"] <= 1
        assert summary["acc"] > 0.75, (name, summary)  # chance is 0.5: half the pairs are the same person
        assert results["metrics"][f"test/{name}/acc"] == pytest.approx(summary["acc"])
    assert results["verification"]["demo_verify"]["auc"] > 0.9


def test_deploy_and_train_checkpoints_verify_the_same(demo_run):
    cwd, demo_root, run, _ = demo_run
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    _ok(_cli("test", "--ckpt_path", str(run / "deploy.ckpt"), cwd=cwd, demo_root=demo_root))
    _ok(_cli("test", "--ckpt_path", str(best), cwd=cwd, demo_root=demo_root))
    deploy, train = _results(run.parent / "version_1"), _results(run.parent / "version_2")
    assert deploy["deploy"] is True and train["deploy"] is False and deploy["params"] < train["params"]
    for name in SETS:
        for key in ("acc", "acc_std", "tar@far=1e-3"):
            assert deploy["verification"][name][key] == pytest.approx(train["verification"][name][key], abs=1e-9)
        assert deploy["verification"][name]["auc"] == pytest.approx(train["verification"][name]["auc"], abs=1e-4)


def test_deploy_backbone_file_verifies_as_the_run_did(demo_run):
    """deploy.safetensors (the embedding network alone) given to --model.weights: no margin head is
    needed outside fit, and every verification set scores what the run scored."""
    cwd, demo_root, run, _ = demo_run
    path = run / "deploy.safetensors"
    proc = _ok(_cli("test", "--model.weights", str(path), "--trainer.logger.init_args.name", "from-backbone-file",
                    cwd=cwd, demo_root=demo_root))
    assert f"weights {path}: deploy backbone weights" in proc.stdout and "loaded every tensor of the task" in proc.stdout
    results = _results(cwd / "runs" / "from-backbone-file" / "version_0")
    assert results["deploy"] is True
    for name in SETS:
        for key in ("acc", "acc_std", "tar@far=1e-3"):
            assert results["verification"][name][key] == pytest.approx(_results(run)["verification"][name][key], abs=1e-9)


def test_predict_writes_embeddings_and_the_file_list(demo_run, tmp_path):
    cwd, demo_root, run, _ = demo_run
    hard = next(demo_root.glob("faces-*")) / "demo_verify_hard"
    faces = tmp_path / "faces"
    for person in ("person000", "person001"):
        shutil.copytree(hard / person, faces / person)
    out = tmp_path / "emb.npy"
    _ok(_cli("predict", "--ckpt_path", str(run / "deploy.ckpt"), "--data.predict_root", str(faces),
             "--predictions.path", str(out), cwd=cwd, demo_root=demo_root))
    embeddings = np.load(out)
    paths = (tmp_path / "emb.txt").read_text().splitlines()
    assert embeddings.shape == (16, 128) and len(paths) == 16
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    person = np.array([Path(p).parent.name for p in paths])
    sim = embeddings @ embeddings.T
    same = person[:, None] == person[None, :]
    off_diagonal = ~np.eye(16, dtype=bool)
    assert sim[same & off_diagonal].mean() > sim[~same].mean() + 0.2  # the rows follow the file list


# --------------------------------------------------------------------------- other layouts, bad input


def test_recordio_training_set_with_arcface_mobilefacenet(small_face_root, tmp_path):
    root = copy_root(small_face_root, tmp_path)
    folders = sorted((root / "train").iterdir())
    samples = [(f.read_bytes(), k) for k, d in enumerate(folders) for f in sorted(d.iterdir())]
    write_face_recordio(root, samples, num_classes=len(folders), image_size=64)
    shutil.rmtree(root / "train")
    _ok(_cli("fit", *QUICK, "--data.root", str(root), "--model.backbone", "mobilefacenet_tiny",
             "--model.loss", "arcface", "--model.schedule", "step", cwd=tmp_path, demo_root=tmp_path))
    results = _results(tmp_path / "runs" / "face-demo" / "version_0")
    assert results["backbone"] == "mobilefacenet_tiny" and results["deploy"] is True
    assert [s["pairs"] for s in results["verification"].values()] == [20, 20]
    assert [s["folds"] for s in results["verification"].values()] == [10, 10]


def test_bad_input_is_named(small_face_root, tmp_path):
    root = copy_root(small_face_root, tmp_path)
    images, issame = read_bin(root / "demo_verify.bin")
    with open(root / "demo_verify.bin", "wb") as f:
        pickle.dump((images[:-1], issame), f)
    _failed(_cli("fit", *QUICK, "--data.root", str(root), cwd=tmp_path, demo_root=tmp_path),
            "demo_verify.bin", "39 images")
    shutil.copy(small_face_root / "demo_verify.bin", root / "demo_verify.bin")
    (root / "train" / "id_without_faces").mkdir()
    _failed(_cli("fit", *QUICK, "--data.root", str(root), cwd=tmp_path, demo_root=tmp_path),
            "empty class folder(s)", "id_without_faces")


def test_test_without_training_data_and_a_checkpoint_of_another_backbone(demo_run, small_face_root, tmp_path):
    cwd, demo_root, run, _ = demo_run
    root = copy_root(small_face_root, tmp_path)
    shutil.rmtree(root / "train")  # test needs only the verification sets; the head comes from the checkpoint
    _ok(_cli("test", "--ckpt_path", str(run / "deploy.ckpt"), "--data.root", str(root), cwd=tmp_path,
             demo_root=demo_root))
    assert _results(tmp_path / "runs" / "face-demo" / "version_0")["verification"]["demo_verify"]["pairs"] == 20
    _failed(_cli("test", "--ckpt_path", str(run / "deploy.ckpt"), "--data.root", str(root),
                 "--model.backbone", "faceresnet_tiny", cwd=tmp_path, demo_root=demo_root),
            "holds backbone 'repmlp_faceres_tiny', but this run builds 'faceresnet_tiny'")


def test_paper_configs_parse(tmp_path):
    expected = {
        "repmlp_faceres": ("loss: amsoftmax", "schedule: step", "max_steps: 420000", "- 0.6"),
        "faceresnet": ("loss: amsoftmax", "schedule: step", "max_steps: 420000"),
        "mobilefacenet": ("loss: arcface", "schedule: poly", "max_epochs: 40", "clip_grad_norm: 5.0"),
    }
    argvs = [["tasks.face", "fit", "-c", str(REPO / "configs" / "face" / f"{name}.yaml")] for name in expected]
    for (name, needles), result in zip(expected.items(), print_configs(argvs, tmp_path)):
        out = result["out"]
        assert result["code"] == 0, result["err"]
        assert f"backbone: {name}" in out and "lr: 0.1" in out, out
        assert f"img_size: {96 if 'faceres' in name else 112}" in out
        assert "- lfw" in out and "- agedb_30" in out
        for needle in needles:
            assert needle in out, (name, needle)


