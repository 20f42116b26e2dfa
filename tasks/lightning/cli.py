"""The command line shared by the tasks: ``python -m tasks.<task> {fit,validate,test,predict}``.

:class:`TaskCLI` is a LightningCLI with the project's conventions:

- with no ``--config``, the task's demo config is used (so a bare ``fit`` trains on the demo data);
- the crop size follows the model: ``data.image_size`` is the ``img_size`` in ``model.backbone_kwargs``,
  else the backbone's registered default (a RepMLP backbone is built for one input size);
- :class:`callbacks.ReparamCallback` is always present (options under ``--reparam.*``);
- ``seed_everything`` must be an explicit integer; it also seeds the training order and
  augmentation (``data.seed``), so ``--ckpt_path last`` resumes exactly; the config is saved with
  every run (a resumed run's over the earlier copy);
- ``fit --ckpt_path last`` resumes the newest state of the run, whatever Lightning named its file;
  one process at a time writes a run folder, and a command that fails before training removes the
  folder it created (:mod:`tasks.lightning.run_folder`);
- checkpoints are written atomically and an unreadable one is named (:mod:`tasks.lightning.checkpoint_io`);
- ``fit`` is followed by ``test`` of the converted model (``--test_after_fit false`` to skip, or a
  list of runtime/precision pairs to test it on each: ``[torch/fp32, torch/int8]``);
- ``test`` and ``predict`` run the model on ``--runtime torch|onnxruntime`` in ``--precision
  fp32|bf16|int8`` (:mod:`tasks.runtime`); onnxruntime and INT8 also get ``--calibration_images``
  training images, seeded by ``seed_everything``, to check the export and calibrate INT8;
- ``--ckpt_path`` is Lightning's: a task checkpoint of this project, to resume or to evaluate,
  loaded into the model the config describes (use the run's saved ``config.yaml``); a checkpoint
  of another backbone, class count or mode is explained, and a deploy checkpoint turns the model
  into its deploy structure before loading; checkpoints are read with ``weights_only=True``
  unless ``--weights_only false`` is given. Every other weight file (a backbone file such as
  ``deploy.safetensors``, an official or mmseg checkpoint) goes through ``--model.weights``
  (:meth:`tasks.base.ReparamTask.load_weights`).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO

from backbones import input_size
from callbacks.reparam import ReparamCallback

from . import adapter
from .checkpoint_io import CheckedCheckpointIO, is_local_path
from .csv_logger import CheckpointedCSVLogger
from .run_folder import RunLock, newest_state, remove_unused
from ..runtime import PRECISIONS, RUNTIMES, RuntimeSpec

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
    return input_size(backbone, **(backbone_kwargs or {}))  # from the registry's config: no model is built


def _is_file(text: str) -> bool:
    """Whether ``text`` names a file (an inline YAML config may be too long to be a file name)."""
    try:
        return Path(text).is_file()
    except OSError:
        return False


def _refuse_linked_data(argv: Sequence[str], default_configs: Sequence[str]) -> None:
    """A flag (``--data.image_size``), config file or inline config (``-c``, ``--config``, ``--data``)
    that sets a ``data`` value the CLI links (:data:`_LINKED_DATA`) is an error that names it and
    where to set the value. Checked before parsing, as jsonargparse refuses such a flag with a
    message that does not say where the value comes from, and silently replaces a file's value."""
    configs = [(path, path, "data") for path in default_configs]  # (name, file or YAML text, section)
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        key = flag.removeprefix("--data.")
        if key != flag and key in _LINKED_DATA:
            raise ValueError(f"{flag}: {_LINKED_DATA[key]}")
        if flag in ("-c", "--config", "--data"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            configs.append((value if _is_file(value) else flag, value, "data" if flag != "--data" else None))
    for name, source, section in configs:
        try:
            document = yaml.safe_load(Path(source).read_text() if _is_file(source) else source)
        except (OSError, yaml.YAMLError):
            continue  # jsonargparse reports it
        data = document.get(section) if section and isinstance(document, dict) else document
        for key, rule in _LINKED_DATA.items():
            if isinstance(data, dict) and key in data:
                place = "this file" if name == source else "this value"
                raise ValueError(f"{name}: remove data.{key} from {place}: {rule}")


def _explicit_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed_everything must be an explicit integer for reproducible runs, got {seed!r}")
    return seed


class TaskCLI(LightningCLI):
    """LightningCLI for a :class:`tasks.base.ReparamTask` and its datamodule (see the module doc).

    Args:
        model_class, datamodule_class: the task and its data.
        demo_config: config used when the command line names none.
        args: command-line arguments (default ``sys.argv[1:]``).
        run: run the subcommand (False: only parse and instantiate, for tests).
    """

    _lock: Optional[RunLock] = None
    _new_folder: Optional[Path] = None  # the run folder this command created, while nothing is in it

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
        demo_configs: list[str] = []
        if demo_config is not None and not _has_config(argv):
            if not Path(demo_config).is_file():  # jsonargparse would silently run without it
                raise FileNotFoundError(
                    f"the demo config {demo_config} is missing (it ships in configs/ of the source tree and in "
                    "the package); reinstall the package, or pass --config FILE"
                )
            demo_configs.append(str(demo_config))
            for sub in self.subcommands():
                parser_kwargs.setdefault(sub, {}).setdefault("default_config_files", [str(demo_config)])
        _refuse_linked_data(argv, demo_configs)
        try:
            super().__init__(
                model_class,
                datamodule_class,
                # a resumed run saves its command over the earlier one; RunLock keeps other runs out
                save_config_kwargs={"overwrite": True},
                seed_everything_default=DEFAULT_SEED,
                parser_kwargs=parser_kwargs,
                args=args,
                run=run,
                auto_configure_optimizers=False,  # the task configures its optimizer and schedule
                **kwargs,
            )
        except BaseException:
            self._end_run(failed=True)
            raise
        self._end_run(failed=False)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ReparamCallback, "reparam")
        parser.add_argument(
            "--test_after_fit", type=Union[bool, list[str]], default=True,
            help="fit only: test the converted model on the test split when fit ends: true (torch fp32), "
                 "false, or a list of RUNTIME/PRECISION pairs tested in turn, e.g. [torch/fp32, torch/int8]",
        )
        parser.add_argument("--runtime", type=Literal[RUNTIMES], default="torch",
                            help="test and predict: what runs the model (tasks.runtime)")
        parser.add_argument("--precision", type=Literal[PRECISIONS], default="fp32",
                            help="test and predict: in what precision (bf16: torch; int8: torch PT2E or onnxruntime)")
        parser.add_argument("--calibration_images", type=int, default=256,
                            help="int8: training images (chosen with seed_everything) that calibrate it")
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
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            self._resolve_last_checkpoint(self.config.fit)
        config = self.config[self.subcommand] if self.subcommand else None
        if config is not None and config.get("ckpt_path") and config.model.get("weights"):
            # the checkpoint's tensors replace the weights file's: skip reading it (a run's saved
            # config.yaml names the file its fit started from, which may be gone by now)
            print(f"--ckpt_path {config.ckpt_path} is restored; model.weights {config.model.weights} is not read")
            config.model.weights = None

    def _resolve_last_checkpoint(self, config: Any) -> None:
        """``fit --ckpt_path last``: continue the newest state of this config's run, in its own folder.

        Lightning looks for ``last.ckpt`` only in the *new* run's folder (a fresh ``version_N``), so
        it would find none and silently start over. Here the state is
        :func:`~tasks.lightning.run_folder.newest_state` of the logger's ``version_*/checkpoints``
        (or of the ModelCheckpoint's ``dirpath``): the ``last*.ckpt`` with the highest
        ``global_step``, ``last-v1.ckpt`` included. The logger writes on into that run's folder;
        a CSVLogger keeps the rows logged before the checkpoint
        (:class:`~tasks.lightning.csv_logger.CheckpointedCSVLogger`).
        """
        logger = config.trainer.get("logger")
        logger = logger[0] if isinstance(logger, list) and logger else logger
        init = logger.get("init_args") if hasattr(logger, "get") else None
        dirpaths = [cb.init_args.get("dirpath") for cb in (config.trainer.get("callbacks") or [])
                    if hasattr(cb, "init_args") and str(cb.get("class_path", "")).endswith("ModelCheckpoint")]
        fixed = [d for d in dirpaths if d]
        if fixed:
            folders, where = [Path(fixed[0])], f"the ModelCheckpoint dirpath {fixed[0]}"
        elif init is not None and init.get("save_dir") is not None:
            run_root = Path(init["save_dir"]) / (init.get("name") or "lightning_logs")
            folders, where = [p / "checkpoints" for p in run_root.glob("version_*")], f"{run_root}/version_*/checkpoints"
        else:
            raise ValueError("--ckpt_path last needs a trainer.logger with a save_dir, or a ModelCheckpoint dirpath, "
                             "to find the run to resume; give the checkpoint's path instead")
        try:
            last, step = newest_state(folders)
        except FileNotFoundError:
            raise FileNotFoundError(f"--ckpt_path last: no last.ckpt in {where}; nothing to resume "
                                    "(the configs keep the latest state with a ModelCheckpoint of filename: last)") from None
        config.ckpt_path = str(last)
        if not fixed and last.parent.parent.name.startswith("version_"):
            init["version"] = last.parent.parent.name.removeprefix("version_")
            if init["version"].isdigit():
                init["version"] = int(init["version"])
            if str(logger.get("class_path", "")).endswith("CSVLogger"):
                # Lightning's CSVLogger would delete the run's metrics.csv: keep the rows logged before
                # the checkpoint instead (the resumed run logs the later ones again)
                logger.class_path = f"{CheckpointedCSVLogger.__module__}.{CheckpointedCSVLogger.__name__}"
                init["resume_step"] = step
        print(f"resuming from {last} (global step {step})")

    # ------------------------------------------------------------------ one writer per run
    def _hold_run_folder(self) -> None:
        """Rank 0 locks the run folder for the whole command (:class:`~tasks.lightning.run_folder.RunLock`)."""
        if not self.trainer.is_global_zero or not is_local_path(self.trainer.log_dir):
            return
        folder = Path(self.trainer.log_dir)  # a CheckpointedCSVLogger creates a new run's folder here
        fresh = not (folder.is_dir() and any(folder.iterdir()))
        cwd = Path.cwd()
        if fresh and self.trainer.logger is not None and folder.resolve() not in (cwd, *cwd.parents):
            self._new_folder = folder
        self._lock = RunLock(folder).acquire()

    def _fp32_only(self) -> None:
        if not self._runtime_spec().is_default:
            raise ValueError(f"{self.subcommand} runs the fp32 torch model; --runtime and --precision are for test and "
                             "predict: python -m tasks.<task> test --config RUN/config.yaml --ckpt_path RUN/deploy.ckpt "
                             "--runtime R --precision P" + (", or fit with --test_after_fit '[torch/fp32, R/P]'"
                                                            if self.subcommand == "fit" else ""))

    def before_fit(self) -> None:
        self._fp32_only()
        self._tests_after_fit()  # a bad pair is an error before training, not after it
        self._hold_run_folder()

    def before_validate(self) -> None:
        self._fp32_only()
        self._hold_run_folder()

    def before_test(self) -> None:
        self._hold_run_folder()
        self._use_runtime()

    before_predict = before_test

    def _runtime_spec(self) -> RuntimeSpec:
        config = self.config[self.subcommand]
        return RuntimeSpec(config.runtime, config.precision, config.calibration_images, seed=config.seed_everything)

    def _tests_after_fit(self) -> list[RuntimeSpec]:
        """``--test_after_fit``: true is one torch fp32 test, false none, a list its pairs in order."""
        config = self.config.fit
        choice = config.get("test_after_fit")
        if isinstance(choice, bool) or choice is None:
            return [RuntimeSpec()] if choice else []
        try:
            specs = [RuntimeSpec.parse(pair, calibration_images=config.calibration_images, seed=config.seed_everything)
                     for pair in choice]
        except ValueError as exc:
            raise ValueError(f"--test_after_fit: {exc}") from None
        files = [spec.results_file for spec in specs]
        if len(set(files)) < len(files):
            raise ValueError(f"--test_after_fit names a pair twice: {list(choice)}")
        return specs

    def _use_runtime(self, spec: Optional[RuntimeSpec] = None) -> None:
        """Give the task the runtime of ``spec`` (default ``--runtime``/``--precision``), and for
        onnxruntime and INT8 the training images that check the export or the quantized model and
        calibrate INT8."""
        spec = spec or self._runtime_spec()
        calibration = None
        if spec.needs_calibration:
            if not hasattr(self.datamodule, "calibration_batches"):
                raise ValueError(f"--runtime {spec.runtime} --precision {spec.precision} needs calibration images "
                                 "from the datamodule; "
                                 f"{type(self.datamodule).__name__} offers none")
            calibration = self.datamodule.calibration_batches(spec.calibration_images, spec.seed)
        self.model.use_runtime(spec, calibration)

    def _end_run(self, failed: bool) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if failed and self._new_folder is not None and remove_unused(self._new_folder):
            print(f"the command failed before training: removed its new run folder {self._new_folder}", file=sys.stderr)

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        for spec in self._tests_after_fit():  # each writes its own results file (RuntimeSpec.results_file)
            self._use_runtime(spec)
            self.trainer.test(self.model, datamodule=self.datamodule)
