"""EMA of the weights from the command line: ``--trainer.callbacks+=EMA``, the paper configs that
carry it, and a fit killed mid-epoch and resumed with ``--ckpt_path last`` that ends exactly where
the uninterrupted fit ends (trained weights, EMA weights, log, deploy model and its test): with EMA
alone, and with every recipe option on at once (RandAugment, random erasing, mixup/cutmix, drop
path, annealed weight decay, bf16-mixed in channels_last)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_ok, print_configs, read_results, run_task

from backbones.deploy import bf16_supported
from callbacks.ema import EMA
from datamodules.demo import classification_demo
from tasks.classification import main

EMA_FLAGS = ["--trainer.callbacks+=EMA", "--trainer.callbacks.decay", "0.8"]
# 2 epochs of 5 steps; the latest state every 2 steps, so the kill (after the first save) is mid-epoch
FIT = ["fit", "-c", str(REPO / "configs" / "classification" / "demo.yaml"), "--model.backbone", "mobileone_s0_tiny",
       "--model.backbone_kwargs", "{}", "--trainer.max_epochs", "2", "--data.batch_size", "8",
       "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
       "-c", "callbacks.yaml", *EMA_FLAGS]
CALLBACKS = """
trainer:
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {monitor: val/top1, mode: max, filename: "best-{step}"}
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {filename: last, every_n_train_steps: 2, enable_version_counter: false}
"""
# every recipe option on top of EMA: repmlpnet_tiny (drop path) at 64 px on the 72 px demo images
RECIPE = ["--model.backbone", "repmlpnet_tiny", "--model.backbone_kwargs", '{"drop_path_rate": 0.2}',
          "--data.rand_augment", "rand-m9-mstd0.5-inc1", "--data.random_erasing", "0.25",
          "--model.mixup.mixup_alpha", "0.8", "--model.mixup.cutmix_alpha", "1.0", "--model.weight_decay_end", "1e-5"]
if bf16_supported():
    RECIPE += ["--trainer.precision", "bf16-mixed", "--model.channels_last", "true"]
_KILLER = """
import os
from tasks.lightning.checkpoint_io import CheckedCheckpointIO


class ExitAfterFirstSave(CheckedCheckpointIO):
    def save_checkpoint(self, *args, **kwargs):
        super().save_checkpoint(*args, **kwargs)
        os._exit(3)
"""


def _name(name: str) -> list[str]:
    return ["--trainer.logger.init_args.name", name]


@pytest.fixture(scope="module", params=["ema", "every_recipe_option"])
def runs(tmp_path_factory, request):
    """An uninterrupted fit with EMA (and with :data:`RECIPE`), and the same fit ended by the process
    exiting right after its first checkpoint (global step 2 of 10), then resumed with
    ``--ckpt_path last``: ``(full run folder, resumed run folder, the checkpoint at the exit)``."""
    cwd = tmp_path_factory.mktemp("ema")
    root = classification_demo(cwd / "data", train_per_class=4, val_per_class=2, image_size=72)
    (cwd / "callbacks.yaml").write_text(CALLBACKS)
    (cwd / "killer.py").write_text(_KILLER)
    (cwd / "exit_after_save.yaml").write_text("trainer:\n  plugins:\n    - class_path: killer.ExitAfterFirstSave\n")
    args = [*FIT, "--data.root", str(root), *(RECIPE if request.param == "every_recipe_option" else [])]
    assert_ok(run_task("classification", *args, *_name("full"), cwd=cwd, demo_root=cwd))
    if request.param == "every_recipe_option":  # the run really had them on
        saved = (cwd / "runs" / "full" / "version_0" / "config.yaml").read_text()
        for option in ("rand_augment: rand-m9-mstd0.5-inc1", "random_erasing: 0.25", "mixup_alpha: 0.8",
                       "cutmix_alpha: 1.0", "drop_path_rate: 0.2", "weight_decay_end: 1.0e-05"):
            assert option in saved, option

    env = {**os.environ, "REPMLP_DEMO_ROOT": str(cwd), "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, "-m", "tasks.classification", *args, *_name("killed"),
                               "-c", "exit_after_save.yaml"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    code = killed.wait(timeout=600)
    stderr = killed.stderr.read().decode()
    assert code == 3, stderr[-3000:]
    resumed = cwd / "runs" / "killed" / "version_0"
    at_exit = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    proc = assert_ok(run_task("classification", *args, *_name("killed"), "--ckpt_path", "last", cwd=cwd, demo_root=cwd))
    assert "resuming from" in proc.stdout
    return cwd / "runs" / "full" / "version_0", resumed, at_exit


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_the_exit_was_mid_epoch_with_the_ema_state_saved(runs):
    *_, at_exit = runs
    assert at_exit["global_step"] == 2 and at_exit["epoch"] == 0
    assert int(at_exit["averaging_state"]["n_averaged"]) == 2
    assert at_exit["callbacks"]["EMAWeightAveraging"] == {"latest_update_step": 2}
    assert _equal(at_exit["state_dict"], at_exit["current_model_state"])  # the average is not the weights


def test_a_resumed_fit_ends_with_the_uninterrupted_fits_weights_average_log_and_deploy_model(runs):
    full, resumed, _ = runs
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in (full, resumed))
    assert a["global_step"] == b["global_step"] == 10
    for key in ("state_dict", "current_model_state", "averaging_state"):  # EMA, trained, n_averaged
        assert not _equal(a[key], b[key]), key
    assert int(a["averaging_state"]["n_averaged"]) == 10
    assert _rows(full) == _rows(resumed)
    assert [r["epoch"] for r in _rows(full) if r["val/top1"]] == ["0", "1"]
    deploy = [torch.load(run / "deploy.ckpt", weights_only=True)["state_dict"] for run in (full, resumed)]
    assert not _equal(*deploy)
    assert read_results(full)["metrics"] == read_results(resumed)["metrics"]


def test_the_paper_configs_carry_their_ema_and_the_command_line_adds_one(tmp_path):
    argvs = [["tasks.classification", "fit", "-c", str(REPO / "configs" / "classification" / f"{name}.yaml")]
             for name in ("replknet_31b", "mobileone_s0", "repmlpnet_b224", "demo")]
    argvs.append(["tasks.classification", "fit", *EMA_FLAGS])
    results = print_configs(argvs, tmp_path)
    for result in results:
        assert result["code"] == 0, result["err"]
    outs = [r["out"] for r in results]
    assert "class_path: callbacks.ema.EMA\n    init_args:\n      decay: 0.9999\n" in outs[0]
    assert "class_path: callbacks.ema.EMA\n    init_args:\n      decay: 0.9995\n" in outs[1]
    assert "max_epochs: 300" in outs[0] and "accumulate_grad_batches: 8" in outs[0] and "max_epochs: 300" in outs[1]
    assert all("EMA" not in out for out in outs[2:4])  # RepMLPNet's official recipe has none (EMA_ALPHA 0)
    assert "class_path: callbacks.EMA\n    init_args:\n      decay: 0.8\n" in outs[4]


def test_a_bad_decay_from_the_command_line_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPMLP_DEMO_ROOT", str(tmp_path))
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\), got 1.5"):
        main(["--trainer.callbacks+=EMA", "--trainer.callbacks.decay", "1.5"], run=False)
    cli = main(EMA_FLAGS, run=False)
    (ema,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, EMA)]
    assert ema.decay == 0.8
