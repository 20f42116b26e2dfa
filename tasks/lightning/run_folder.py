"""The run folder (``save_dir/name/version_N``): how a run claims it, holds it, resumes from it,
and leaves nothing behind when it fails before training.

- :func:`claim_version`: a fresh run takes the next ``version_N`` by creating it (``mkdir`` fails
  for the second of two runs that picked the same number, which then takes the next one), so two
  fresh runs never share a folder.
- :class:`RunLock`: ``run.lock`` in the folder, held by rank 0 for a whole command, so a second
  process on the same run (a resubmitted job beside its requeued copy) fails at once, naming the
  holder, instead of interleaving ``metrics.csv`` and overwriting the run's files. The lock is a
  ``flock`` on the file, which the kernel releases when the holder dies, so a crashed run leaves
  a record (pid, host, command) but no lock; on a filesystem without ``flock`` the record alone
  decides: a holder on this host that no longer runs is stale and taken over.
- :func:`newest_state`: what ``--ckpt_path last`` resumes. Lightning writes ``last-v1.ckpt`` beside
  a ``last.ckpt`` it does not recognize as its own (a moved folder, another spelling of the save
  folder), so the newest state is the ``last*.ckpt`` with the highest ``global_step``, whatever
  its file is called.
- :func:`remove_unused`: a command that fails before training removes the folder it created.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from backbones.weights.io import read_torch_file

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "claim_version", "newest_state", "remove_unused"]

LOCK_FILE = "run.lock"


# --------------------------------------------------------------------------- version folders
def claim_version(root: Path) -> int:
    """Create ``root/version_N`` for the lowest ``N`` above every existing version and return ``N``."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:  # another run took it between the listing and here
            version += 1


def remove_unused(folder: Path) -> bool:
    """Remove ``folder`` if no training happened in it: no checkpoint, no results and no logged row
    (``metrics.csv`` absent or a header only). Returns whether it was removed."""
    if not folder.is_dir() or any(folder.rglob("*.ckpt")) or any(folder.glob("results*.json")):
        return False
    metrics = folder / "metrics.csv"
    if metrics.is_file() and len(metrics.read_text().splitlines()) > 1:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


# --------------------------------------------------------------------------- the newest state
def _global_step(path: Path) -> int:
    state = read_torch_file(str(path), mmap=True)  # checked and safe; mmap: the tensors are not read
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int):
        raise ValueError(f"--ckpt_path last: {path} is not a Lightning training state (it has no global_step)")
    return step


def last_states(folder: Path, stem: str = "last") -> list[Path]:
    """``stem.ckpt`` and Lightning's versioned ``stem-vN.ckpt`` in ``folder``."""
    pattern = re.compile(rf"{re.escape(stem)}(-v\d+)?\.ckpt")
    return sorted(p for p in folder.glob(f"{stem}*.ckpt") if pattern.fullmatch(p.name)) if folder.is_dir() else []


def newest_state(folders: Sequence[Path], stem: str = "last") -> tuple[Path, int]:
    """The state ``--ckpt_path last`` resumes, and its ``global_step``.

    Among ``folders`` (the checkpoint folders of a run's versions), the one written last (newest
    file time: the run worked on last); in it, the ``stem*.ckpt`` with the highest
    ``global_step``. Raises FileNotFoundError when there is none, and ValueError when two files
    hold the same step (they cannot be ordered) or one is not a readable training state.
    """
    runs = [states for folder in folders if (states := last_states(folder, stem))]
    if not runs:
        raise FileNotFoundError(f"no {stem}.ckpt")
    states = max(runs, key=lambda paths: max(p.stat().st_mtime for p in paths))
    steps = {p: _global_step(p) for p in states}
    step = max(steps.values())
    top = [p for p, s in steps.items() if s == step]
    if len(top) > 1:
        raise ValueError(
            f"--ckpt_path last: {states[0].parent} holds {len(top)} states at global step {step} "
            f"({', '.join(p.name for p in top)}) and which is newer cannot be told; resume one of them with "
            "--ckpt_path PATH, or move the other away"
        )
    return top[0], step


# --------------------------------------------------------------------------- the lock
class RunLockedError(RuntimeError):
    """Another process holds the run folder."""


def _start_ticks(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the fields after the command name start at 3


def _running(holder: dict[str, Any]) -> Optional[bool]:
    """Whether the holder still runs: None when it is on another host (this host cannot tell)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists under another user
    started = _start_ticks(holder["pid"])
    return started is None or holder.get("started") in (None, started)


class RunLock:
    """``run.lock`` in ``folder`` (see the module doc). ``acquire()`` raises :class:`RunLockedError`
    naming the holder; ``release()`` removes the file. Holder record: JSON with ``pid``, ``host``,
    ``started`` (process start ticks), ``since`` and ``command``."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: Optional[int] = None

    def _record(self) -> bytes:
        return json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": _start_ticks(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
        }).encode()

    def _holder(self, fd: Optional[int] = None) -> dict[str, Any]:
        try:
            text = os.pread(fd, 1 << 16, 0) if fd is not None else self.path.read_bytes()
            holder = json.loads(text) if text else {}
        except (OSError, ValueError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict[str, Any], running: Optional[bool]) -> RunLockedError:
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')} "
               f"({holder.get('command', 'command unknown')})")
        if running is None and holder.get("host") not in (None, socket.gethostname()):
            clear = f"if no process on {holder.get('host')} still runs it (its node died), remove {self.path}"
        else:
            clear = "wait for it to end or stop it"
        return RunLockedError(
            f"the run folder {self.path.parent} is in use by {who}: two processes writing one run would "
            f"interleave its metrics.csv and overwrite its checkpoints; {clear}"
        )

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise self._refuse(holder, True) from None
            except OSError:  # no flock on this filesystem
                os.close(fd)
                return self._acquire_by_record()
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (removed) the file we opened: take the new one
                os.close(fd)
                continue
            self._take_over(self._holder(fd))
            self._write(fd)
            return self

    def _acquire_by_record(self) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                running = _running(holder)
                if running is not False:
                    raise self._refuse(holder, running) from None
                self._take_over(holder)
                self.path.unlink(missing_ok=True)
                continue
            self._write(fd)
            return self
        raise self._refuse(self._holder(), None)

    def _take_over(self, holder: dict[str, Any]) -> None:
        if holder:
            print(f"{self.path}: taking over from pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
                  "which ended without releasing it")

    def _write(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking, so a waiting process takes a new file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
