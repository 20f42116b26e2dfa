"""A non-editable install carries the demo configs, and a missing demo config is an error."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

PACKAGES = ("backbones", "tasks", "datamodules", "callbacks", "configs")


def test_wheel_ships_the_configs_and_the_cli_finds_them(tmp_path):
    src = tmp_path / "src"
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "tasks" / "configs" / "segmentation" / "demo.yaml").is_file()
    # installed without a source tree beside it, the CLI reads the packaged copy
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", "import tasks.lightning.cli as c; print(c.CONFIG_DIR)"],
                         cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip() == str(site / "tasks" / "configs")


def test_missing_demo_config_is_an_error_not_a_silent_default(tmp_path):
    from tasks.classification import ClassificationCLI, ClassificationTask, ImageNetDataModule

    missing = tmp_path / "demo.yaml"
    with pytest.raises(FileNotFoundError, match=f"demo config {missing} is missing"):
        ClassificationCLI(ClassificationTask, ImageNetDataModule, demo_config=missing, args=["fit"], run=False)
