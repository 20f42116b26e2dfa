"""The run folder: fresh runs claim distinct versions, ``--ckpt_path last`` finds the newest state
whatever its file is called, one process holds a run, and a failed command leaves no empty run.
The end-to-end forms (a moved run resumed twice, a second writer refused) are in
tests/e2e/test_resume.py."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from backbones.weights.io import atomic_write_json
from tasks.lightning import run_folder
from tasks.lightning.cli import CONFIG_DIR
from tasks.lightning.csv_logger import CheckpointedCSVLogger
from tasks.lightning.run_folder import RunLock, RunLockedError, claim_version, newest_state, remove_unused


def _state(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "epoch": step // 4, "state_dict": {"w": torch.zeros(3)},
                "pytorch-lightning_version": "2.6.0"}, path)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- versions
def test_two_fresh_loggers_claim_two_version_folders(tmp_path):
    # Lightning's own choice lists the existing folders: two runs starting together both take version_0
    first, second = CheckpointedCSVLogger(tmp_path, name="run"), CheckpointedCSVLogger(tmp_path, name="run")
    assert (first.version, second.version) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["version_0", "version_1"]
    assert CheckpointedCSVLogger(tmp_path, name="run", version=0).version == 0  # a resumed run keeps its own


def test_claim_version_goes_past_the_highest_and_skips_a_taken_one(tmp_path, monkeypatch):
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_4").mkdir()
    (tmp_path / "version_x").mkdir()
    assert claim_version(tmp_path) == 5
    real_mkdir = Path.mkdir

    def racing_mkdir(self, *args, **kwargs):  # another run creates version_6 between listing and mkdir
        if self.name == "version_6" and not self.exists():
            real_mkdir(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    assert claim_version(tmp_path) == 7


# --------------------------------------------------------------------------- newest state
def test_newest_state_is_the_highest_step_not_the_file_called_last(tmp_path):
    folder = tmp_path / "version_0" / "checkpoints"
    versioned = _state(folder / "last-v1.ckpt", 12)
    stale = _state(folder / "last.ckpt", 8)
    os.utime(stale, (1e9 + 100, 1e9 + 100))
    os.utime(versioned, (1e9, 1e9))  # file times do not decide within a run (a copy resets them)
    _state(folder / "best-003.ckpt", 99)  # not a latest state
    _state(folder / "last_backup.ckpt", 50)
    assert newest_state([folder]) == (versioned, 12)


def test_newest_state_takes_the_run_written_last(tmp_path):
    old = _state(tmp_path / "version_0" / "checkpoints" / "last.ckpt", 40)
    new = _state(tmp_path / "version_1" / "checkpoints" / "last.ckpt", 4)
    os.utime(old, (1e9, 1e9))
    assert newest_state([p / "checkpoints" for p in tmp_path.iterdir()]) == (new, 4)


def test_two_states_at_one_step_are_refused(tmp_path):
    folder = tmp_path / "checkpoints"
    _state(folder / "last.ckpt", 8)
    _state(folder / "last-v1.ckpt", 8)
    with pytest.raises(ValueError, match=r"holds 2 states at global step 8 \(last-v1.ckpt, last.ckpt\).*--ckpt_path PATH"):
        newest_state([folder])


def test_no_state(tmp_path):
    with pytest.raises(FileNotFoundError):
        newest_state([tmp_path / "missing", tmp_path])


class _Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {_Hostile.marker}",))


def test_ckpt_path_last_reads_the_state_safely_and_names_it(tmp_path, monkeypatch):
    """A hostile ``last.ckpt``: the CLI names the file, runs none of its code, and does not advise
    ``weights_only=False`` (torch's own message does)."""
    from tasks.classification import main

    _Hostile.marker = tmp_path / "ran"
    last = tmp_path / "runs" / "r" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"global_step": 3, "x": _Hostile()}, last)
    with open(last.with_name("last-v1.ckpt"), "wb") as f:  # the legacy format is read too
        pickle.dump({"global_step": 2, "x": _Hostile()}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        main(["fit", "--ckpt_path", "last", "--trainer.logger.init_args.name", "r"])
    assert "not a readable checkpoint: runs/r/version_0/checkpoints/last" in str(info.value)
    assert "weights_only=False" not in str(info.value)
    assert not _Hostile.marker.exists()


@pytest.mark.parametrize("config", sorted(CONFIG_DIR.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_configs_keep_one_latest_state_file(config):
    """Lightning names a state ``last-v1.ckpt`` when it finds a ``last.ckpt`` it did not write itself
    (a moved run); the configs' latest-state checkpoint keeps one name."""
    document = yaml.safe_load(config.read_text())
    trainer = document.get("trainer", document) if config.name.endswith("_trainer.yaml") else document.get("trainer")
    callbacks = trainer.get("callbacks") or [] if isinstance(trainer, dict) else []  # a str: a file tested on its own
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if callback["class_path"].endswith("ModelCheckpoint") and callback["init_args"].get("filename") == "last":
            assert callback["init_args"].get("enable_version_counter") is False


# --------------------------------------------------------------------------- the lock
def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    with RunLock(tmp_path):
        record = json.loads((tmp_path / "run.lock").read_text())
        assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use by pid {os.getpid()} on host "
                           rf"{socket.gethostname()}.*interleave its metrics.csv.*wait for it to end"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / "run.lock").exists()  # released
    RunLock(tmp_path).acquire().release()


def test_a_crashed_holder_is_taken_over(tmp_path, capsys):
    """The kernel drops a dead process's flock; its record stays and is reported."""
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 123456, "host": "node7"}))
    lock = RunLock(tmp_path).acquire()
    assert "taking over from pid 123456 on host node7, which ended without releasing it" in capsys.readouterr().out
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_without_flock_the_record_decides(tmp_path, monkeypatch, capsys):
    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(run_folder.fcntl, "flock", no_flock)
    here = socket.gethostname()
    lock_file = tmp_path / "run.lock"
    lock_file.write_text(json.dumps({"pid": os.getpid(), "host": here, "started": run_folder._start_ticks(os.getpid())}))
    with pytest.raises(RunLockedError, match="wait for it to end"):
        RunLock(tmp_path).acquire()  # a live holder
    lock_file.write_text(json.dumps({"pid": os.getpid(), "host": here, "started": "1"}))
    RunLock(tmp_path).acquire().release()  # this pid, but another process's start time: reused, stale
    lock_file.write_text(json.dumps({"pid": 1, "host": "node7", "since": "2026-01-01"}))
    with pytest.raises(RunLockedError, match=rf"if no process on node7 still runs it \(its node died\), remove {lock_file}"):
        RunLock(tmp_path).acquire()  # another host: this one cannot tell
    lock_file.write_text(json.dumps({"pid": _dead_pid(), "host": here}))
    lock = RunLock(tmp_path).acquire()
    assert "taking over" in capsys.readouterr().out
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()


# --------------------------------------------------------------------------- cleanup and atomic files
def test_remove_unused_keeps_any_trace_of_training(tmp_path):
    empty = tmp_path / "a"
    empty.mkdir()
    (empty / "config.yaml").write_text("x: 1\n")
    (empty / "metrics.csv").write_text("epoch,step\n")
    assert remove_unused(empty) and not empty.exists()
    for name, text in [("metrics.csv", "epoch,step\n0,1\n"), ("results.json", "{}"), ("checkpoints/last.ckpt", "")]:
        kept = tmp_path / name.replace("/", "_")
        (kept / name).parent.mkdir(parents=True)
        (kept / name).write_text(text)
        assert not remove_unused(kept) and kept.exists()


def test_atomic_write_removes_the_temporary_files_of_an_interrupted_save(tmp_path):
    path = tmp_path / "results.json"
    for leftover in (".results.json.abc123.tmp", ".results.json.zz.tmp"):
        (tmp_path / leftover).write_bytes(b"\0" * 1000)
    (tmp_path / ".other.json.abc.tmp").write_text("")  # another file's: kept
    atomic_write_json(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.abc.tmp", "results.json"]
    with pytest.raises(ValueError):
        atomic_write_json(str(path), {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": [1, 2]}  # nothing half-written
