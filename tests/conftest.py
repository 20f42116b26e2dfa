"""Shared test helpers: randomized BN statistics make every fusion test meaningful."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters (identity BNs hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                dtype = m.running_mean.dtype
                m.running_mean.copy_((torch.rand(n, generator=gen) - 0.5).to(dtype))
                m.running_var.copy_((torch.rand(n, generator=gen) + 0.5).to(dtype))
                if m.affine:
                    m.weight.copy_((torch.rand(n, generator=gen) + 0.5).to(dtype))
                    m.bias.copy_((torch.rand(n, generator=gen) - 0.5).to(dtype))
    return model


def perturb_params(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Move every parameter off its initialization, so zero-initialized branches (DBB's and OREPA's
    identity-based 1x1, OREPA's prior scale) take part in the equivalence checks too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- end-to-end helpers
def run_task(task: str, *args: str, cwd: Path, demo_root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m tasks.<task> ARGS`` in ``cwd``, with the demo cache in ``demo_root``."""
    env = {**os.environ, "REPMLP_DEMO_ROOT": str(demo_root), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", f"tasks.{task}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def demo_fit(task: str, tmp_path_factory) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
    """``python -m tasks.<task> fit`` with no arguments on a fresh demo cache:
    ``(cwd, demo cache, run folder, process)``."""
    cwd = tmp_path_factory.mktemp("cwd")
    demo_root = tmp_path_factory.mktemp("cache")
    proc = assert_ok(run_task(task, "fit", cwd=cwd, demo_root=demo_root))
    return cwd, demo_root, cwd / "runs" / f"{task}-demo" / "version_0", proc


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    """``demo_runs(task)``: the result of :func:`demo_fit` for ``task``, run once per session and
    shared by the task's CLI tests and the README's journey."""
    done: dict[str, tuple] = {}

    def get(task: str) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
        if task not in done:
            done[task] = demo_fit(task, tmp_path_factory)
        return done[task]

    return get


_PRINT_CONFIGS = """
import contextlib, importlib, io, json, sys
results = []
for line in sys.stdin:
    argv = json.loads(line)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            importlib.import_module(argv[0]).main(argv[1:] + ["--print_config"])
            code = 0
        except SystemExit as exc:
            code = exc.code
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()[-3000:]})
print(json.dumps(results))
"""


def print_configs(argvs: list[list[str]], cwd: Path) -> list[dict]:
    """``module.main(args + ["--print_config"])`` for each ``[module, subcommand, *args]``, all in one
    Python process (one start-up instead of one each): ``[{"code", "out", "err"}]``."""
    lines = "".join(json.dumps(a) + "\n" for a in argvs)
    proc = subprocess.run([sys.executable, "-c", _PRINT_CONFIGS], input=lines, capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), "REPMLP_DEMO_ROOT": str(cwd)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def assert_failed(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """The command failed and its error output contains every ``needle``."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-4000:]


def read_results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def free_port() -> int:
    """A free TCP port on localhost for a gloo process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int) -> Iterator[None]:
    """A CPU (gloo) process group on localhost for a spawned worker, one thread per process.

    Leaving, the group is destroyed only when nothing holds it, every rank at once; otherwise gloo
    aborts a rank at exit ("terminate called without an active exception"):
    - a ``DistributedDataParallel`` sits in a reference cycle and holds the group: the worker must
      keep it in a function that returns inside the ``with``, and the cycle is collected here; left
      to interpreter shutdown, the group's gloo threads die there;
    - every rank meets at a barrier first: a rank that tore its group down while a peer was still
      talking to it would abort the peer.
    """
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        yield
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def copy_root(root: Path, tmp_path: Path) -> Path:
    """A private copy of a dataset folder, for tests that damage it."""
    out = tmp_path / "root"
    shutil.copytree(root, out)
    return out


@pytest.fixture(scope="session")
def small_face_root(tmp_path_factory) -> Path:
    """A small demo-face root: 6 identities x 4 faces, two 20-pair verification sets."""
    from datamodules.demo_faces import face_demo

    return face_demo(tmp_path_factory.mktemp("faces"), train_identities=6, images_per_identity=4,
                     verify_identities=4, verify_images_per_identity=4, verify_pairs=20)
