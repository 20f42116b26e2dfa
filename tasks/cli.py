"""The command line shared by the tasks: ``python -m tasks.<task> {fit,validate,test,predict}``.

:class:`TaskCLI` is a LightningCLI with the project's conventions:

- with no ``--config``, the task's demo config is used (so a bare ``fit`` trains on the demo data);
- the crop size follows the model: ``data.image_size`` is computed from ``model.backbone`` and
  ``model.backbone_kwargs`` (a RepMLP backbone is built for one input size);
- :class:`callbacks.ReparamCallback` is always present (options under ``--reparam.*``);
- ``seed_everything`` must be an explicit integer; the config is saved with every run
  (overwriting the copy of an earlier run in the same folder);
- ``fit`` is followed by ``test`` of the converted model (``--test_after_fit false`` to skip);
- ``--ckpt_path`` loads weights into the model the config describes (use the run's saved
  ``config.yaml``); a checkpoint of another backbone, class count or mode is explained, and a
  deploy checkpoint turns the model into its deploy structure before loading; checkpoints are
  read with ``weights_only=True`` unless ``--weights_only false`` is given.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from backbones import input_size
from callbacks.reparam import ReparamCallback

__all__ = ["TaskCLI", "CONFIG_DIR", "DEFAULT_SEED"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_SEED = 42


def _has_config(args: Sequence[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in args)


def _model_input_size(backbone: str, backbone_kwargs: Optional[dict[str, Any]]) -> tuple[int, int]:
    return input_size(backbone, **(backbone_kwargs or {}))


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
        parser_kwargs: dict[str, Any] = kwargs.pop("parser_kwargs", {})
        if demo_config is not None and not _has_config(argv):
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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the model arguments by the checkpoint's hyperparameters. Here
        # the config decides what is built, and a checkpoint that does not fit it is an error that
        # says why (ReparamTask.on_load_checkpoint) rather than a silent swap of the backbone.
        return

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True  # --ckpt_path files are unpickled safely unless asked otherwise
        return kwargs

    def _set_seed(self) -> None:
        # Checked before Lightning turns ``true`` into a seed taken from the environment (or 0).
        seed = self._get(self.config, "seed_everything")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(
                f"seed_everything must be an explicit integer for reproducible runs, got {seed!r}"
            )
        super()._set_seed()

    def after_fit(self) -> None:
        if self._get(self.config, "test_after_fit") and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule)
