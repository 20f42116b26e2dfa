"""Every command in the README runs, so none goes stale.

The commands are read from the README's ``bash`` blocks and sorted into:

- ``ci``: the install and test commands, run by ``.ci/run`` itself;
- ``demo``: the no-argument demo fits, run once per session by ``conftest.demo_runs``;
- ``run``: run here as written, in the folder of the demo run they use (placeholders for real
  data or downloads are replaced by demo data or by checkpoints made here);
- ``parse``: commands that need real datasets, GPUs or a cluster. Their task command line is
  parsed and resolved with ``--print_config`` (every config file, argument name and value type is
  checked); launcher flags (torchrun, SLURM) are checked against the launcher.

A command that fits none of these fails ``test_every_command_is_covered``.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_ok, print_configs, read_results

README = (REPO / "README.md").read_text()
CI = {"pip install torch==2.13.0", 'pip install -e ".[dev]"', "python -m pytest -q"}
DEMO = {f"python -m tasks.{t} fit": t for t in ("classification", "segmentation", "face")}
ENV = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "SLURM_NNODES": "4"}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks (comments and ``#SBATCH`` lines dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


# What the run tests below pick from the README; every "run" command must match one of them.
RUN_PATTERNS = {
    "deploy": r"tasks\.\w+ (test|predict) (?!.*--runtime ).*runs/\w+-demo/",
    "runtimes": r"tasks\.classification test .*--runtime |tasks\.export ",
    "baseline": r"tasks\.classification fit .*classification-demo-resnet",
    "compare": r"tasks\.compare runs/classification-demo/",
    "upernet": r"tasks\.segmentation fit .*demo_upernet_repmlpnet",
    "compare_segmentation": r"tasks\.compare runs/segmentation-demo/",
    "train_ids": r"datamodules\.cityscapes_train_ids ",
    "convert": r"backbones\.convert ",
    "official": r"backbones\.official ",
}


def _plan(command: str) -> str:
    if command in CI:
        return "ci"
    if command in DEMO:
        return "demo"
    if any(re.search(p, command) for p in RUN_PATTERNS.values()):
        return "run"
    if re.search(r"-m tasks\.\w+ (fit|validate|test|predict) ", command):
        return "parse"
    return "unknown"


def test_every_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 20
    assert {c: _plan(c) for c in commands if _plan(c) == "unknown"} == {}
    assert {"ci", "demo", "run", "parse"} == {_plan(c) for c in commands}
    assert all(any(re.search(p, c) for c in commands) for p in RUN_PATTERNS.values())


def test_ci_runs_the_readme_install_and_test_blocks():
    ci = (REPO / ".ci" / "run").read_text()
    assert "<!-- ci:install -->" in ci and "<!-- ci:test -->" in ci
    for marker, expected in (("<!-- ci:install -->", ['pip install torch==2.13.0', 'pip install -e ".[dev]"']),
                             ("<!-- ci:test -->", ["python -m pytest -q"])):
        block = README.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
        assert block.split("\n")[:-1] == expected


# --------------------------------------------------------------------------- parse
def _task_argv(command: str) -> list[str]:
    """The ``tasks.X SUB ...`` part of a command (after ``python -m`` or a launcher's ``-m``), with
    the environment variables of the cluster commands filled in."""
    words = shlex.split(re.sub(r"\$(\w+)", lambda m: ENV[m.group(1)], command))
    start = words.index("-m") + 1
    return words[start:]


def test_cluster_and_real_data_commands_parse():
    commands = [c for c in readme_commands() if _plan(c) == "parse"]
    assert any(c.startswith("torchrun ") for c in commands) and any(c.startswith("srun ") for c in commands)
    results = print_configs([_task_argv(c) for c in commands], cwd=REPO)
    failures = {c: r["err"] for c, r in zip(commands, results) if r["code"] != 0 or "model:" not in r["out"]}
    assert failures == {}


def test_launcher_flags_exist_and_agree():
    commands = readme_commands()
    [torchrun] = [c for c in commands if c.startswith("torchrun ")]
    launcher = torchrun.split(" -m ")[0]
    help_text = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True, text=True).stdout
    for flag in re.findall(r"--[\w-]+", launcher):
        assert flag in help_text, flag
    assert "--nproc_per_node 8" in launcher and torchrun.endswith("--trainer.num_nodes $NNODES --trainer.devices 8")
    # SLURM: one task per GPU, as many as --trainer.devices (Lightning's SLURM environment checks it)
    sbatch = dict(re.findall(r"#SBATCH --([\w-]+)=(\d+)", README))
    [srun] = [c for c in commands if c.startswith("srun ")]
    assert sbatch["ntasks-per-node"] == sbatch["gpus-per-node"] == re.search(r"--trainer.devices (\d+)", srun).group(1)


# --------------------------------------------------------------------------- run
def _run(command: str, cwd: Path, demo_root: Path, replace: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    for old, new in (replace or {}).items():
        assert old in command, (old, command)
        command = command.replace(old, new)
    env = {**os.environ, "REPMLP_DEMO_ROOT": str(demo_root), "PYTHONPATH": str(REPO)}
    return assert_ok(subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=cwd, env=env,
                                    capture_output=True, text=True, timeout=900))


def _commands(pattern: str) -> list[str]:
    found = [c for c in readme_commands() if _plan(c) == "run" and re.search(pattern, c)]
    assert found, pattern
    return found


def _demo_copy(demo_runs, task: str, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the demo run's folder (the CLI tests count the run versions in theirs)
    and the shared demo data cache."""
    cwd, demo_root, _, _ = demo_runs(task)
    return shutil.copytree(cwd, tmp_path / "cwd"), demo_root


@pytest.mark.parametrize("task", ["classification", "segmentation", "face"])
def test_deploy_test_and_predict_commands_run_on_the_demo_run(task, demo_runs, tmp_path):
    cwd, demo_root = _demo_copy(demo_runs, task, tmp_path)
    run = cwd / "runs" / f"{task}-demo"
    before = set(run.glob("version_*"))  # other tests may have added runs to the shared demo run
    for command in _commands(RUN_PATTERNS["deploy"].replace(r"\w+", task)):
        faces = {"/data/my_faces": str(next(demo_root.glob("faces-*")) / "demo_verify_hard")} if task == "face" else None
        _run(command, cwd, demo_root, faces)
    if task == "classification":  # the deploy model tests as it did at the end of fit
        [tested] = [read_results(p) for p in set(run.glob("version_*")) - before]
        assert tested["deploy"] is True
        assert tested["metrics"]["test/top1"] == read_results(run / "version_0")["metrics"]["test/top1"]
    if task == "segmentation":
        assert list(run.rglob("predictions/*_overlay.png"))
    if task == "face":
        assert list(run.rglob("embeddings.npy"))


def test_runtime_and_export_commands_on_the_demo_run(demo_runs, tmp_path):
    """The deploy runtimes on the demo run: each test-stage runtime scores the deploy model with the
    fp32 test's data and metric code, close to it; the exports are written, checked, never overwritten."""
    pytest.importorskip("onnxruntime", reason="the ONNX commands need the extra: pip install -e '.[onnx]'")
    pytest.importorskip("torchao", reason="torch int8 needs the extra: pip install -e '.[int8]'")
    cwd, demo_root = _demo_copy(demo_runs, "classification", tmp_path)
    run = cwd / "runs" / "classification-demo"
    fp32 = read_results(run / "version_0")
    before = set(run.glob("version_*"))
    commands = _commands(RUN_PATTERNS["runtimes"])
    for command in commands:
        proc = _run(command, cwd, demo_root)
        if "tasks.export" in command:
            assert "check: onnxruntime fp32 against the PyTorch model, max relative error" in proc.stdout
    files = [file for folder in set(run.glob("version_*")) - before for file in folder.glob("results*.json")]
    tested = {(r["runtime"], r["precision"]): r for r in (json.loads(f.read_text()) for f in files)}
    assert sorted(f.name for f in files) == sorted(f"results.{rt}-{p}.json" for rt, p in tested)  # named by runtime
    assert set(tested) == {("onnxruntime", "int8"), ("torch", "int8"), ("torch", "bf16")} and (fp32["runtime"], fp32["precision"]) == ("torch", "fp32")
    for (runtime, precision), results in tested.items():
        drop = {"int8": 0.03, "bf16": 0.01}[precision]  # 15 and 5 of the 500 demo images
        assert results["metrics"]["test/top1"] >= fp32["metrics"]["test/top1"] - drop, (runtime, precision, results["metrics"])
        assert results["data"] == fp32["data"] and results["throughput"]["images"] == fp32["throughput"]["images"] > 0
        assert results["throughput"]["images_per_s"] > 0 and results["throughput"]["threads"] >= 1
    folder = run / "version_0"
    assert (folder / "deploy.onnx").stat().st_size > (folder / "deploy.int8.onnx").stat().st_size > 0
    assert not list(folder.glob(".export-*"))
    export = next(c for c in commands if "tasks.export" in c and "--precision" not in c)
    for extra, message in (("", "deploy.onnx already exists; pass --overwrite"), (" --format tflite", "choose one of onnx")):
        proc = subprocess.run([sys.executable, *shlex.split(export + extra)[1:]], cwd=cwd, capture_output=True, text=True,
                              env={**os.environ, "REPMLP_DEMO_ROOT": str(demo_root), "PYTHONPATH": str(REPO)})
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_baseline_demo_and_comparison(demo_runs, tmp_path):
    """The README's comparison on the demo: the RepMLP demo run against its trained baseline.

    The baseline fit runs as written but for 3 of its 30 epochs (CI time): this test checks the
    command and the comparison it feeds, not the baseline's accuracy (the README's demo table)."""
    cwd, demo_root = _demo_copy(demo_runs, "classification", tmp_path)
    [fit] = _commands(RUN_PATTERNS["baseline"])
    [compare] = _commands(RUN_PATTERNS["compare"])
    _run(fit + " --trainer.max_epochs 3", cwd, demo_root)
    proc = _run(compare, cwd, demo_root)
    rows = (cwd / "comparison" / "comparison.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("repmlp_res_tiny,torch,fp32,False") and rows[2].startswith("resnet_tiny,torch,fp32,True")
    assert "| resnet_tiny (baseline) |" in proc.stdout and (cwd / "comparison" / "comparison.png").stat().st_size > 10_000


def test_upernet_demo_and_comparison_with_the_pspnet_demo(demo_runs, tmp_path):
    """The RepMLPNet + UPerNet demo as written but for 2 of its 30 epochs (CI time; the README's demo
    table has the full run), then its comparison with the PSPNet demo run on the same demo city."""
    cwd, demo_root = _demo_copy(demo_runs, "segmentation", tmp_path)
    shutil.copytree(REPO / "configs", cwd / "configs")  # the command names a config as from the checkout's root
    [fit] = _commands(RUN_PATTERNS["upernet"])
    [compare] = _commands(RUN_PATTERNS["compare_segmentation"])
    _run(fit + " --trainer.max_epochs 2 --trainer.check_val_every_n_epoch 1", cwd, demo_root)
    results = read_results(cwd / "runs" / "segmentation-demo-upernet" / "version_0")
    assert results["deploy"] is True and results["backbone"] == "repmlpnet_tiny"
    proc = _run(compare, cwd, demo_root)
    rows = (cwd / "comparison-segmentation" / "comparison.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("repmlp_res_tiny_d8,") and rows[2].startswith("repmlpnet_tiny,")
    assert "| repmlp_res_tiny_d8 (baseline) |" in proc.stdout


def test_cityscapes_train_ids_command(demo_runs, tmp_path):
    _, demo_root, _, _ = demo_runs("segmentation")
    [command] = _commands(RUN_PATTERNS["train_ids"])
    [source] = [p for p in demo_root.iterdir() if p.name.startswith("cityscapes")]
    root = shutil.copytree(source, tmp_path / "cityscapes")
    proc = _run(command, tmp_path, demo_root, {"/data/cityscapes": str(root)})
    assert "wrote" in proc.stdout and list(root.rglob("*_gtFine_labelTrainIds.png"))


def test_convert_and_official_commands(tmp_path):
    """The checkpoint commands, on a train-time checkpoint and published-layout ones made here from
    the official key/shape listings (tests/published_*.py, tests/backbones/test_official.py)."""
    import backbones
    sys.path.insert(0, str(REPO / "tests" / "backbones"))  # test_official's builder, when this file runs alone
    from test_official import make_official
    from published_acnet import official_acnet_resnet, official_size, save_official_hdf5
    from published_layouts import PUBLISHED_REPVGG, mobileone_size, official_mobileone, official_repvgg
    from published_resnet import PUBLISHED_RESNETS, official_resnet

    [convert] = _commands(RUN_PATTERNS["convert"])
    arch = re.search(r"--arch (\S+)", convert).group(1)
    torch.save(backbones.create(arch).state_dict(), tmp_path / "train.ckpt")
    assert "max relative error" in _run(convert, tmp_path, tmp_path).stdout
    assert (tmp_path / "deploy.safetensors").is_file()
    officials = _commands(RUN_PATTERNS["official"])
    assert len(officials) == 5
    for official in officials:
        name, src, dst = re.search(r"--arch (\S+)", official).group(1), official.split()[-2], official.split()[-1]
        if name in PUBLISHED_REPVGG:
            state = official_repvgg(**PUBLISHED_REPVGG[name][1], classes=1000, seed=0)
        elif name.startswith("mobileone"):
            state = official_mobileone(**mobileone_size(name.split("_")[1]), classes=1000, seed=0)
        elif name in PUBLISHED_RESNETS:
            state = official_resnet("dbb", *PUBLISHED_RESNETS[name][1:], seed=0)
        elif name == "sres18":
            save_official_hdf5(official_acnet_resnet(**official_size(name), seed=0), tmp_path / src)
            state = None
        else:
            state = make_official(name, deploy=False)
        if state is not None:
            torch.save(state, tmp_path / src)
        assert "arch=" in _run(official, tmp_path, tmp_path).stdout
        assert (tmp_path / dst).is_file()


def test_every_inline_command_names_a_module_run_here():
    """Commands quoted in the prose (`python -m ...`) use modules that the commands above run."""
    run_here = {c.split()[2] for c in readme_commands() if c.startswith("python -m ")} | {"bench.reparam"}
    inline = set(re.findall(r"`python -m ([\w.]+)", README))
    assert inline and inline <= run_here, inline - run_here


def test_bench_command_runs_on_one_model():
    """`python -m bench.reparam` (the performance tables) on the smallest model, one repeat; the
    training-cost section (a full-size ResNet-18) is run on a tiny model in tests/bench/test_bench.py."""
    assert "`python -m bench.reparam`" in README
    proc = subprocess.run([sys.executable, "-m", "bench.reparam", "--models", "repmlp_res_tiny", "--repeats", "1",
                           "--sections", "models", "throughput", "fc3"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| `repmlp_res_tiny` |" in proc.stdout and "FC3 verdict" in proc.stdout
    assert "train/deploy, plain ops" in proc.stdout  # the fused kernels' share is measured too
