"""The CLI's guard for the data values it links (data.image_size from the model, data.seed from
seed_everything): every way of setting one is an error that names it and where to set the value.
The end-to-end form runs in tests/e2e/test_classification_cli.py."""
from __future__ import annotations

import re

import pytest

from tasks.lightning.cli import _refuse_linked_data

IMAGE_SIZE = """set it with --model.backbone_kwargs '{"img_size": SIZE}'"""
SEED = "it follows seed_everything"


@pytest.mark.parametrize("argv, named, where", [
    (["fit", "--data.image_size", "64"], "--data.image_size: ", IMAGE_SIZE),
    (["fit", "--data.image_size=[64, 96]"], "--data.image_size: ", IMAGE_SIZE),
    (["test", "--data.seed", "3"], "--data.seed: ", SEED),
    (["fit", "--config={data: {seed: 4}}"], "--config: remove data.seed from this value", SEED),
    (["fit", "--data", "{image_size: 5}"], "--data: remove data.image_size from this value", IMAGE_SIZE),
])
def test_flags_and_inline_configs_are_refused(argv, named, where):
    with pytest.raises(ValueError, match=re.escape(named) + ".*" + re.escape(where)):
        _refuse_linked_data(argv, [])


def test_files_are_refused_by_name(tmp_path):
    config, data, demo = tmp_path / "config.yaml", tmp_path / "data.yaml", tmp_path / "demo.yaml"
    config.write_text("trainer: {max_epochs: 1}\ndata: {image_size: [96, 96], batch_size: 2}\n")
    data.write_text("seed: 7\n")  # a --data file is the data section itself
    demo.write_text("data: {seed: 1}\n")
    cases = [(["fit", "-c", str(config)], [], config, "image_size", IMAGE_SIZE),
             (["fit", f"--config={config}"], [], config, "image_size", IMAGE_SIZE),
             (["fit", "--data", str(data)], [], data, "seed", SEED),
             (["fit"], [str(demo)], demo, "seed", SEED)]
    for argv, defaults, path, key, where in cases:
        with pytest.raises(ValueError, match=re.escape(f"{path}: remove data.{key} from this file: ") + ".*"
                           + re.escape(where)):
            _refuse_linked_data(argv, defaults)


def test_other_values_pass(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("data: {batch_size: 2}\nmodel: {backbone_kwargs: {img_size: 96}}\nseed_everything: 3\n")
    _refuse_linked_data(["fit", "-c", str(config), "--model.backbone_kwargs", '{"img_size": 64}',
                         "--data.batch_size", "4", "--seed_everything", "5", "-c", str(tmp_path / "missing.yaml"),
                         "--config", "{data: [unclosed"], [str(config)])
