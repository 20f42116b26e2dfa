"""The command line shared by the tasks: ``python -m tasks.<task> {fit,validate,test,predict}``.

:class:`TaskCLI` is a LightningCLI with the project's conventions:

- with no ``--config``, the task's demo config is used (so a bare ``fit`` trains on the demo data);
- the crop size follows the model: ``data.image_size`` is computed from ``model.backbone`` and
  ``model.backbone_kwargs`` (a RepMLP backbone is built for one input size);
- :class:`callbacks.ReparamCallback` is always present (options under ``--reparam.*``);
- ``seed_everything`` must be an explicit integer; it also seeds the training order and
  augmentation (``data.seed``), so ``--ckpt_path last`` resumes exactly; the config is saved with
  every run (overwriting the copy of an earlier run in the same folder);
- checkpoints are written atomically and an unreadable one is named (:mod:`tasks.lightning.checkpoint_io`);
- ``fit`` is followed by ``test`` of the converted model (``--test_after_fit false`` to skip);
- ``--ckpt_path`` loads weights into the model the config describes (use the run's saved
  ``config.yaml``); a checkpoint of another backbone, class count or mode is explained, and a
  deploy checkpoint turns the model into its deploy structure before loading; checkpoints are
  read with ``weights_only=True`` unless ``--weights_only false`` is given; a backbone file
  (``deploy.safetensors``, the output of ``backbones.convert`` or ``backbones.official``) is taken
  as the task's backbone weights for ``validate``, ``test`` and ``predict``.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO

from backbones import input_size
from backbones.weights.io import is_safetensors_file, load_state_dict_file, state_dict_mode, strip_prefix
from callbacks.reparam import ReparamCallback

from . import adapter
from .checkpoint_io import CheckedCheckpointIO
from .csv_logger import CheckpointedCSVLogger

__all__ = ["TaskCLI", "CONFIG_DIR", "DEFAULT_SEED"]


def _config_dir() -> Path:
    tasks_dir = Path(__file__).resolve().parents[1]
    source_tree = tasks_dir.parent / "configs"  # a checkout (editable install)
    return source_tree if source_tree.is_dir() else tasks_dir / "configs"  # a wheel


CONFIG_DIR = _config_dir()
DEFAULT_SEED = 42
# data.* arguments the CLI computes from others, and where to set them instead
_LINKED_DATA = {
    "image_size": "it follows the model (the img_size its RepMLP blocks are built for): set it with "
                  "--model.backbone_kwargs '{\"img_size\": SIZE}' (a pair [H, W] for non-square inputs)",
    "seed": "it follows seed_everything (which also seeds the training order and augmentation): set that",
}


def _has_config(args: Sequence[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in args)


def _model_input_size(backbone: str, backbone_kwargs: Optional[dict[str, Any]]) -> tuple[int, int]:
    return input_size(backbone, **(backbone_kwargs or {}))


def _explicit_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed_everything must be an explicit integer for reproducible runs, got {seed!r}")
    return seed


def _load_for_inspection(path: str, weights_only: bool) -> Any:
    """``torch.load`` of ``path``, memory-mapped where the format allows (a Lightning checkpoint is
    only looked at here; Lightning reads it for real)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=weights_only)


class TaskCLI(LightningCLI):
    """LightningCLI for a :class:`tasks.base.ReparamTask` and its datamodule (see the module doc).

    Args:
        model_class, datamodule_class: the task and its data.
        demo_config: config used when the command line names none.
        args: command-line arguments (default ``sys.argv[1:]``).
        run: run the subcommand (False: only parse and instantiate, for tests).
    """

    def __init__(
        self,
        model_class: type,
        datamodule_class: type,
        demo_config: Optional[Path] = None,
        args: Optional[list[str]] = None,
        run: bool = True,
        **kwargs: Any,
    ) -> None:
        argv = sys.argv[1:] if args is None else list(args)
        if any(a == "--data.image_size" or a.startswith("--data.image_size=") for a in argv):
            # jsonargparse's own message for this link (computed from two arguments) is cryptic
            raise ValueError(f"--data.image_size: {_LINKED_DATA['image_size']}")
        parser_kwargs: dict[str, Any] = kwargs.pop("parser_kwargs", {})
        self._demo_configs: list[str] = []
        if demo_config is not None and not _has_config(argv):
            if not Path(demo_config).is_file():  # jsonargparse would silently run without it
                raise FileNotFoundError(
                    f"the demo config {demo_config} is missing (it ships in configs/ of the source tree and in "
                    "the package); reinstall the package, or pass --config FILE"
                )
            self._demo_configs.append(str(demo_config))
            for sub in self.subcommands():
                parser_kwargs.setdefault(sub, {}).setdefault("default_config_files", [str(demo_config)])
        super().__init__(
            model_class,
            datamodule_class,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=DEFAULT_SEED,
            parser_kwargs=parser_kwargs,
            args=args,
            run=run,
            auto_configure_optimizers=False,  # the task configures its optimizer and schedule
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ReparamCallback, "reparam")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="fit only: test the converted model on the test split when fit ends",
        )
        parser.link_arguments(
            ("model.backbone", "model.backbone_kwargs"), "data.image_size",
            compute_fn=_model_input_size, apply_on="parse",
        )
        # _explicit_seed also refuses a seed that is not an integer, at parse time: before Lightning
        # would turn ``true`` into a seed taken from the environment (or 0)
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_explicit_seed, apply_on="parse")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own plugin
            trainer.strategy.checkpoint_io = CheckedCheckpointIO()
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # The config decides what is built: LightningCLI would otherwise replace the model arguments
        # by a --ckpt_path file's hyperparameters, and a checkpoint that does not fit the config is
        # an error that says why (ReparamTask.on_load_checkpoint) rather than a silent swap.
        adapter.hold_ckpt_path(self)

    def before_instantiate_classes(self) -> None:
        adapter.release_ckpt_path(self)
        if self.subcommand and self.config[self.subcommand].get("weights_only", False) is None:
            self.config[self.subcommand].weights_only = True  # --ckpt_path files are unpickled safely unless asked
        self._refuse_linked_values(self.config[self.subcommand] if self.subcommand else self.config)
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            self._resolve_last_checkpoint(self.config.fit)

    def _refuse_linked_values(self, config: Any) -> None:
        """A config file that sets a ``data`` value the CLI computes is an error naming the file:
        jsonargparse would silently replace the file's value by the computed one."""
        files = [(str(p), p.get_content) for p in config.get("config") or [] if hasattr(p, "get_content")]
        files += [(p, Path(p).read_text) for p in self._demo_configs]
        for name, read in files:
            document = yaml.safe_load(read())
            data = document.get("data") if isinstance(document, dict) else None
            if not isinstance(data, dict):
                continue
            for key, rule in _LINKED_DATA.items():
                if key in data:
                    raise ValueError(f"{name}: remove data.{key} from this file: {rule}")

    def _resolve_last_checkpoint(self, config: Any) -> None:
        """``fit --ckpt_path last``: continue the newest run of this config in its own folder.

        Lightning looks for ``last.ckpt`` only in the *new* run's folder (a fresh ``version_N``), so
        it would find none and silently start over. Here the newest ``last.ckpt`` among the logger's
        ``version_*/checkpoints`` (or the ModelCheckpoint's ``dirpath``) is resumed, and the logger
        writes on into that run's folder; a CSVLogger keeps the rows logged before the checkpoint
        (:class:`~tasks.lightning.csv_logger.CheckpointedCSVLogger`).
        """
        logger = config.trainer.get("logger")
        logger = logger[0] if isinstance(logger, list) and logger else logger
        init = logger.get("init_args") if hasattr(logger, "get") else None
        dirpaths = [cb.init_args.get("dirpath") for cb in (config.trainer.get("callbacks") or [])
                    if hasattr(cb, "init_args") and str(cb.get("class_path", "")).endswith("ModelCheckpoint")]
        fixed = [d for d in dirpaths if d]
        if fixed:
            candidates = [Path(fixed[0]) / "last.ckpt"]
            where = f"the ModelCheckpoint dirpath {fixed[0]}"
        elif init is not None and init.get("save_dir") is not None:
            run_root = Path(init["save_dir"]) / (init.get("name") or "lightning_logs")
            candidates = sorted(run_root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
            where = f"{run_root}/version_*/checkpoints"
        else:
            raise ValueError("--ckpt_path last needs a trainer.logger with a save_dir, or a ModelCheckpoint dirpath, "
                             "to find the run to resume; give the checkpoint's path instead")
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(f"--ckpt_path last: no last.ckpt in {where}; nothing to resume "
                                    "(the configs keep the latest state with a ModelCheckpoint of filename: last)")
        last = found[-1]
        config.ckpt_path = str(last)
        if not fixed and last.parent.parent.name.startswith("version_"):
            init["version"] = last.parent.parent.name.removeprefix("version_")
            if init["version"].isdigit():
                init["version"] = int(init["version"])
            if str(logger.get("class_path", "")).endswith("CSVLogger"):
                # Lightning's CSVLogger would delete the run's metrics.csv: keep the rows logged before
                # the checkpoint instead (the resumed run logs the later ones again)
                logger.class_path = f"{CheckpointedCSVLogger.__module__}.{CheckpointedCSVLogger.__name__}"
                init["resume_step"] = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        print(f"resuming from {last}")

    def _rewrite_foreign_checkpoint(self, subcommand: str) -> None:
        """Let ``--ckpt_path`` name a file that is not a Lightning checkpoint: read it once, and
        load the Lightning checkpoint :meth:`foreign_checkpoint` makes of it instead."""
        config = self.config_init[subcommand]
        path = config.get("ckpt_path")
        if not path or not os.path.isfile(path):
            return
        raw = None
        if not is_safetensors_file(path):
            try:
                raw = _load_for_inspection(path, weights_only=config.get("weights_only") is not False)
            except Exception:  # noqa: BLE001 - not ours to judge: Lightning loads it and CheckedCheckpointIO reports
                return
            if not isinstance(raw, Mapping) or "pytorch-lightning_version" in raw:
                return
        self.substitute_checkpoint(config, self.foreign_checkpoint(path, raw))

    def foreign_checkpoint(self, path: str, raw: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """The Lightning checkpoint content (``state_dict``, ``deploy``, ``backbone``, ``source``,
        optionally ``backbone_only``) of a non-Lightning file, ``raw`` its ``torch.load`` (None for
        safetensors). Here: a backbone file, its tensors under ``backbone.``, with its arch and mode
        for the checks on loading; task CLIs that know other formats override this."""
        state_dict, meta = load_state_dict_file(path)
        state_dict = strip_prefix(state_dict)  # DDP's module.
        if not any(k.startswith("backbone.") for k in state_dict):
            state_dict = {f"backbone.{k}": v for k, v in state_dict.items()}
        deploy = meta.get("deploy")
        if not isinstance(deploy, bool):
            deploy = state_dict_mode(state_dict) == "deploy"
        print(f"backbone file {path}: loaded as the task's backbone ({'deploy' if deploy else 'train-time'} weights)")
        return {
            "state_dict": state_dict,
            "deploy": deploy,
            "backbone": {"name": meta["arch"]} if isinstance(meta.get("arch"), str) else {},
            "backbone_only": True,  # the task's heads are not in it (named if the load fails)
            "source": f"backbone file {path}",
        }

    @staticmethod
    def substitute_checkpoint(config: Any, checkpoint: dict[str, Any]) -> None:
        """Point ``config.ckpt_path`` at a Lightning checkpoint of ``checkpoint`` (``state_dict`` and
        the keys the task checks on loading; ``source`` names the original in errors), written to a
        temporary file that is removed at exit."""
        folder = tempfile.mkdtemp(prefix="ckpt-")
        atexit.register(shutil.rmtree, folder, True)
        converted = os.path.join(folder, os.path.basename(config["ckpt_path"]) + ".ckpt")
        torch.save({**checkpoint, "pytorch-lightning_version": pl.__version__}, converted)
        config["ckpt_path"] = converted

    def before_validate(self) -> None:
        self._rewrite_foreign_checkpoint("validate")

    def before_test(self) -> None:
        self._rewrite_foreign_checkpoint("test")

    def before_predict(self) -> None:
        self._rewrite_foreign_checkpoint("predict")

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit") and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule)
