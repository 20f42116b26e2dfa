"""Faults: a killed fit resumed with ``--ckpt_path last`` ends exactly where an uninterrupted run
ends; checkpoints are written atomically; an unreadable checkpoint is named."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_failed, assert_ok, read_results, run_task

from datamodules.demo import cityscapes_demo
from datamodules.seeded_sampler import SampleKey, SeededSampler
from tasks.lightning.checkpoint_io import CheckedCheckpointIO
from tasks.lightning.run_folder import RunLock

# Segmentation has every source of randomness: shuffling, random scale/crop/flip/photometric
# augmentation in persistent workers, and dropout. The latest state is saved every 2 of the 4 steps
# of an epoch (as the step-based GPU configs do every 1000), so the kill lands mid-epoch.
FIT = [
    "fit", "--model.backbone", "resnet_tiny_d8", "--model.head_channels", "16", "--model.aux_channels", "8",
    "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--data.batch_size", "2",
    "--data.num_workers", "2", "--data.persistent_workers", "true", "--trainer.enable_progress_bar", "false",
    "--trainer.log_every_n_steps", "1",
]
CALLBACKS = """
trainer:
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {monitor: val/mIoU, mode: max, filename: "best-{step}"}
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {filename: last, every_n_train_steps: 2}
"""


def _name(name: str) -> list[str]:
    return ["--trainer.logger.init_args.name", name]


def _fit_args(root: Path) -> list[str]:
    return ["fit", "-c", str(REPO / "configs" / "segmentation" / "demo.yaml"), "-c", "callbacks.yaml", *FIT[1:],
            "--data.root", str(root)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted fit, and the same fit killed (SIGKILL, workers included) after its first
    checkpoint, then resumed with ``--ckpt_path last``: ``(cwd, root, full run, resumed run, resume
    process, the checkpoint it resumed from)``."""
    cwd = tmp_path_factory.mktemp("resume")
    root = cityscapes_demo(cwd / "data", train_images=8, val_images=2)
    (cwd / "callbacks.yaml").write_text(CALLBACKS)
    args = _fit_args(root)
    assert_ok(run_task("segmentation", *args, *_name("full"), cwd=cwd, demo_root=cwd))

    env = {**os.environ, "REPMLP_DEMO_ROOT": str(cwd), "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, "-m", "tasks.segmentation", *args, *_name("killed")], cwd=cwd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    last = cwd / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert killed.poll() is None, killed.communicate()[1][-3000:].decode()
    os.killpg(killed.pid, signal.SIGKILL)
    _, stderr = killed.communicate()
    assert last.exists() and killed.returncode == -signal.SIGKILL, stderr[-3000:].decode()
    at_kill = torch.load(last, weights_only=True)
    resume = assert_ok(run_task("segmentation", *args, *_name("killed"), "--ckpt_path", "last", cwd=cwd, demo_root=cwd))
    return cwd, root, cwd / "runs" / "full" / "version_0", cwd / "runs" / "killed" / "version_0", resume, at_kill


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def test_killed_fit_resumed_from_last_ends_with_the_same_weights_and_metrics(runs):
    cwd, _, full, resumed, proc, _ = runs
    assert f"resuming from {Path('runs/killed/version_0/checkpoints/last.ckpt')}" in proc.stdout
    a, b = _checkpoint(full), _checkpoint(resumed)
    assert a["global_step"] == b["global_step"] == 8 and a["epoch"] == b["epoch"] == 1
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different[:5]
    # the deploy model of each run, tested after fit, scores the same
    assert read_results(full)["metrics"] == read_results(resumed)["metrics"]
    assert (resumed / "deploy.ckpt").is_file() and not (cwd / "runs" / "killed" / "version_1").exists()


def _metrics_rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_resumed_run_keeps_its_log_as_if_it_had_never_stopped(runs):
    """Lightning's CSVLogger deletes the folder's metrics.csv; the resumed run keeps the rows logged
    before its checkpoint and logs the later ones again, so the file equals the uninterrupted run's."""
    _, _, full, resumed, *_ = runs
    rows = _metrics_rows(resumed)
    assert rows == _metrics_rows(full)
    assert [r["step"] for r in rows if r["train/loss"]] == [str(s) for s in range(8)]  # steps 0-1 before the kill
    assert [r["epoch"] for r in rows if r["val/mIoU"]] == ["0", "1"]


def test_a_moved_run_resumes_its_newest_state_twice(runs, tmp_path):
    """A moved run folder, resumed with its save folder spelled ``./runs``: Lightning does not take
    ``last.ckpt`` as its own and writes ``last-v1.ckpt`` beside it. The next ``--ckpt_path last``
    resumes that newer state, not the stale ``last.ckpt``, and the log holds every epoch once."""
    cwd, root, full, *_ = runs
    shutil.copytree(full, tmp_path / "runs" / "moved" / "version_0")
    # a user's config that lets Lightning version the name (the shipped ones never do)
    (tmp_path / "callbacks.yaml").write_text(CALLBACKS.replace("every_n_train_steps: 2}", "every_n_train_steps: 2, "
                                                               "enable_version_counter: true}"))
    again = [*_fit_args(root), *_name("moved"), "--ckpt_path", "last"]
    first = assert_ok(run_task("segmentation", *again, "--trainer.max_epochs", "3",
                               "--trainer.logger.init_args.save_dir", "./runs", cwd=tmp_path, demo_root=cwd))
    run = tmp_path / "runs" / "moved" / "version_0"
    assert "checkpoints/last.ckpt (global step 8)" in first.stdout
    steps = {p.name: torch.load(p, weights_only=True)["global_step"] for p in (run / "checkpoints").glob("last*.ckpt")}
    assert steps == {"last.ckpt": 8, "last-v1.ckpt": 12}  # the fault's precondition: a versioned newer state
    second = assert_ok(run_task("segmentation", *again, "--trainer.max_epochs", "4", cwd=tmp_path, demo_root=cwd))
    assert "checkpoints/last-v1.ckpt (global step 12)" in second.stdout
    assert max(torch.load(p, weights_only=True)["global_step"] for p in (run / "checkpoints").glob("last*.ckpt")) == 16
    rows = _metrics_rows(run)
    assert [r["epoch"] for r in rows if r["val/mIoU"]] == ["0", "1", "2", "3"]
    assert [r["step"] for r in rows if r["train/loss"]] == [str(s) for s in range(16)]
    assert not (tmp_path / "runs" / "moved" / "version_1").exists()


def test_a_second_writer_of_a_run_is_refused_at_once(runs):
    """A resubmitted job beside its running copy: the second ``fit --ckpt_path last`` fails before
    touching the run, naming the process that holds it."""
    cwd, root, _, resumed, *_ = runs
    before = {p.name: p.read_bytes() for p in resumed.iterdir() if p.is_file()}
    with RunLock(resumed):
        proc = run_task("segmentation", *_fit_args(root), *_name("killed"), "--ckpt_path", "last",
                        "--trainer.max_epochs", "3", cwd=cwd, demo_root=cwd)
    assert_failed(proc, f"the run folder {Path('runs/killed/version_0')} is in use by pid {os.getpid()} on host")
    assert {p.name: p.read_bytes() for p in resumed.iterdir() if p.is_file()} == before
    assert not (cwd / "runs" / "killed" / "version_1").exists()


def test_a_command_that_fails_before_training_leaves_no_run_folder(runs, tmp_path):
    cwd, root, *_ = runs
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"not a checkpoint")
    proc = run_task("segmentation", *_fit_args(root), *_name("failed"), "--model.weights", str(garbage),
                    cwd=cwd, demo_root=cwd)
    assert_failed(proc, f"not a readable checkpoint: {garbage}", "removed its new run folder")
    assert not (cwd / "runs" / "failed").exists() or not any((cwd / "runs" / "failed").iterdir())


_KILLER = """
import os
from tasks.lightning.checkpoint_io import CheckedCheckpointIO


class ExitAfterFirstSave(CheckedCheckpointIO):
    \"\"\"Ends the process as soon as the first checkpoint is on disk: inside ModelCheckpoint's
    on_train_batch_end, before Lightning hands that batch's row to the loggers.\"\"\"

    def save_checkpoint(self, *args, **kwargs):
        super().save_checkpoint(*args, **kwargs)
        os._exit(3)
"""


def test_a_kill_between_the_step_checkpoint_and_its_log_row_loses_no_row(runs):
    """Lightning saves the step checkpoint (global_step 2) before it logs the row of step 1; the
    process here dies exactly there. The checkpoint keeps that row, and the resumed run writes it
    back: the log equals the uninterrupted run's."""
    cwd, root, full, *_ = runs
    (cwd / "killer.py").write_text(_KILLER)
    (cwd / "exit_after_save.yaml").write_text("trainer:\n  plugins:\n    - class_path: killer.ExitAfterFirstSave\n")
    args = ["fit", "-c", str(REPO / "configs" / "segmentation" / "demo.yaml"), "-c", "callbacks.yaml", *FIT[1:],
            "--data.root", str(root), *_name("window")]
    env = {**os.environ, "REPMLP_DEMO_ROOT": str(cwd), "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, "-m", "tasks.segmentation", *args, "-c", "exit_after_save.yaml"],
                              cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    code = killed.wait(timeout=600)
    try:
        os.killpg(killed.pid, signal.SIGKILL)  # the data workers the exit left behind
    except ProcessLookupError:
        pass
    stderr = killed.stderr.read().decode()
    assert code == 3, stderr[-3000:]
    run = cwd / "runs" / "window" / "version_0"
    at_kill = _checkpoint(run)
    assert at_kill["global_step"] == 2
    # the window was hit: the row of step 1 is in the checkpoint, not yet in the file
    assert [r["step"] for r in _metrics_rows(run) if r["train/loss"]] == ["0"]
    assert at_kill["pending_log_row"]["step"] == 1 and "train/loss" in at_kill["pending_log_row"]["metrics"]
    assert_ok(run_task("segmentation", *args, "--ckpt_path", "last", cwd=cwd, demo_root=cwd))
    assert _metrics_rows(run) == _metrics_rows(full)


def test_the_kill_was_mid_epoch_and_the_position_is_checkpointed(runs):
    """The resumed run really started part-way (what makes the test above non-trivial): from the
    checkpoint of step 2 of epoch 0's 4 steps, with the RNG states."""
    at_kill = runs[-1]
    assert at_kill["global_step"] == 2
    assert at_kill["CityscapesDataModule"] == {"epoch": 0, "batches_done": 2, "batches_per_epoch": 4}
    assert set(at_kill["rng"]) >= {"torch", "numpy", "python"}


def test_truncated_checkpoint_is_named(runs, tmp_path):
    cwd, root, full, *_ = runs
    truncated = tmp_path / "truncated.ckpt"
    data = (full / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for sub in ("fit", "test"):
        proc = run_task("segmentation", sub, "--data.root", str(root), *FIT[1:7], "--ckpt_path", str(truncated),
                        cwd=tmp_path, demo_root=cwd)
        assert_failed(proc, f"not a readable checkpoint: {truncated}", "truncated")


def test_ckpt_path_last_without_a_run_to_resume(tmp_path):
    proc = run_task("segmentation", "fit", "--ckpt_path", "last", "--trainer.logger.init_args.name", "nothing",
                    cwd=tmp_path, demo_root=tmp_path)
    assert_failed(proc, "--ckpt_path last: no last.ckpt in runs/nothing/version_*/checkpoints")


_WRITER = """
import sys, torch
from tasks.lightning.checkpoint_io import CheckedCheckpointIO
io = CheckedCheckpointIO()
i = 0
while True:
    io.save_checkpoint({"i": i, "w": torch.full((4_000_000,), float(i))}, sys.argv[1])
    i += 1
    print(i, flush=True)
"""


def test_a_process_killed_while_saving_leaves_a_whole_checkpoint(tmp_path):
    """SIGKILL at random moments of back-to-back 16 MB saves: the file is always a whole checkpoint.

    At least 6 kills, and more until one lands mid-write (how long a save takes depends on the
    machine's page cache, so a fixed number of kills sometimes missed every write)."""
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    gen = torch.Generator().manual_seed(0)
    mid_write = 0
    for attempt in range(30):
        if attempt >= 6 and mid_write:
            break
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # one save done, more under way
        time.sleep(float(torch.rand(1, generator=gen)) * 0.2)
        proc.kill()
        proc.wait()
        state = torch.load(path, weights_only=True)
        assert torch.equal(state["w"], torch.full((4_000_000,), float(state["i"])))
        # the temporary file of an interrupted save (the next writer's first save removes it)
        mid_write += any(p.name.startswith(".last.ckpt.") for p in tmp_path.iterdir())
    assert mid_write, "no kill landed mid-write: the test did not exercise the atomic save"
    CheckedCheckpointIO().save_checkpoint({"i": -1}, path)  # the next save clears the last one
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# --------------------------------------------------------------------------- the sampler
def test_seeded_sampler_orders_by_seed_and_epoch_and_shards_without_loss():
    data = range(10)

    def keys(seed, epoch, **kw):
        sampler = SeededSampler(data, seed, **kw)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert keys(1, 0) == keys(1, 0) and all(isinstance(k, SampleKey) for k in keys(1, 0))
    assert sorted(k.index for k in keys(1, 0)) == list(range(10))
    assert [k.index for k in keys(1, 0)] != [k.index for k in keys(1, 1)] != [k.index for k in keys(2, 0)]
    seeds = {k.index: k.seed for k in keys(1, 0)}
    assert len(set(seeds.values())) == 10 and seeds != {k.index: k.seed for k in keys(1, 1)}
    shards = [keys(1, 0, num_replicas=3, rank=r) for r in range(3)]
    assert {k.index for shard in shards for k in shard} == set(range(10)) and {len(s) for s in shards} == {4}
    assert all(k.seed == seeds[k.index] for shard in shards for k in shard)  # the rank does not change a sample


def test_seeded_sampler_resumes_part_way_through_an_epoch():
    whole = SeededSampler(range(10), 5)
    whole.set_epoch(3)
    resumed = SeededSampler(range(10), 5)
    resumed.resume(3, 4)
    assert list(resumed) == list(whole)[4:] and len(resumed) == 10
    resumed.set_epoch(4)
    whole.set_epoch(4)
    assert list(resumed) == list(whole)  # the next epoch is whole again
