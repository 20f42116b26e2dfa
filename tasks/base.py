"""The task base class: a LightningModule around a registered backbone that knows its deploy form.

:class:`ReparamTask` owns what every task shares:

- the backbone, built by name from the registry with its keyword arguments (``backbone``,
  ``backbone_kwargs``), in train-time or deploy form (``deploy``);
- the optimizer (SGD or AdamW, optionally without weight decay on BN and bias parameters) and a
  per-step schedule: linear warm-up, then cosine decay to ``min_lr``;
- the deploy conversion used by :class:`callbacks.ReparamCallback` (:meth:`convert_to_deploy`),
  and the checkpoint markers (form, arch and arguments) that let ``test --ckpt_path deploy.ckpt``
  rebuild the deploy structure (:meth:`on_save_checkpoint` / :meth:`on_load_checkpoint`);
- the one way in for weights (:meth:`load_weights`, ``--model.weights PATH``): any file
  :func:`backbones.weights.read_weights` reads, the structure matched to its form, with clear
  errors for a file of another backbone, form or shape;
- the global RNG states in every training checkpoint, restored on resume (:mod:`tasks.lightning.rng_state`);
- the log row of the batch a step checkpoint is saved in, which Lightning logs only after saving:
  kept in the checkpoint and given back to the CSV logger on resume (:mod:`tasks.lightning.csv_logger`);
- the runtime and precision the test and predict stages run the model on (:meth:`use_runtime`,
  :mod:`tasks.runtime`), and the throughput measured in them;
- ``results.json`` in the log folder after every test run (:meth:`on_test_end`);
  ``results.<runtime>-<precision>.json`` for a test on another runtime or precision.

Subclasses add the head, the loss, the metrics and the steps.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Literal, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import WeightAveraging
import torch
from torch import Tensor, nn

from backbones import create, reparameterize_model
from backbones.complexity import count_macs, count_params
from backbones.memory_format import to_channels_last, to_contiguous
from backbones.models.registry import model_input_size
from backbones.weights import Weights, read_weights, weights_of_checkpoint
from backbones.reparam.walker import max_relative_error
from backbones.weights.io import atomic_write_json, check_fits, listing, load_into
from tasks.lightning import adapter
from tasks.lightning.csv_logger import CheckpointedCSVLogger, PendingRow
from tasks.lightning.rng_state import rng_state, set_rng_state
from tasks.runtime import Runner, RuntimeSpec, build_runner, first_inputs

__all__ = ["ReparamTask", "RESULTS_FILE", "RESULTS_PATTERN"]

RESULTS_FILE = "results.json"  # a torch fp32 test; other runtimes: RuntimeSpec.results_file
RESULTS_PATTERN = "results*.json"  # every test of a run folder


def _finite(value: Any) -> Any:
    """NaN and infinities (e.g. mIoU of an unlabelled test split) as JSON null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _cosine(floor: float, progress: float) -> float:
    """A cosine from 1 at ``progress`` 0 down to ``floor`` at ``progress`` 1."""
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _plain(value: Any) -> Any:
    """JSON-friendly copy (tuples → lists) of constructor arguments."""
    return json.loads(json.dumps(value, default=str))


class ReparamTask(pl.LightningModule):
    """Base LightningModule: backbone management, optimization, deploy conversion, results file.

    Args:
        backbone: registered model name (``backbones.list_models()``).
        backbone_kwargs: constructor arguments for it (``groups``, ``img_size``, ...).
        deploy: build the deploy (converted) structure; normally set by loading a deploy checkpoint.
        weights: a weight file to start from (fit) or to evaluate (validate, test, predict): a task
            checkpoint, a backbone file (``deploy.safetensors``, ``backbones.convert`` output), an
            official RepMLP v1 or an mmseg checkpoint (:func:`backbones.weights.read_weights`). It is
            loaded when the trainer sets the task up; a ``--ckpt_path`` checkpoint is restored after
            it and wins. A file of the backbone alone fine-tunes with freshly initialized heads.
        weights_match: ``"all"``: every tensor the file holds must fit, and outside fit it must hold
            everything the task evaluates with; ``"matching"``: load the tensors whose name and shape
            fit (e.g. an ImageNet backbone into a segmentation backbone) and name the ones left
            initialized.
        optimizer: ``"sgd"`` (momentum, optional Nesterov) or ``"adamw"``.
        lr: peak learning rate (after warm-up).
        momentum: SGD momentum, or AdamW's beta1.
        nesterov: Nesterov momentum for SGD.
        weight_decay: decoupled for AdamW, L2 for SGD.
        weight_decay_end: None: constant weight decay. A value: the weight decay follows a cosine from
            ``weight_decay`` at the first optimizer step to ``weight_decay_end`` at the last (over the
            whole run, warm-up included; MobileOne's MMPretrain recipe: 1e-4 → 1e-5); parameter groups
            without decay stay at 0 (:meth:`weight_decay_factor`).
        no_decay_bn_bias: no weight decay on 1-D parameters (BN weights and biases, all biases).
        warmup_epochs: linear warm-up length in epochs (fractions allowed); stepped every batch.
        warmup_start_factor: learning rate at step 0 as a fraction of ``lr``.
        min_lr: learning rate at the end of the decay.
        schedule: after warm-up, ``"cosine"`` decay, mmseg's ``"poly"``: ``(1 - t)^poly_power``, or
            ``"step"``: multiply by ``step_gamma`` at each of ``step_milestones``.
        poly_power: exponent of the poly decay.
        step_milestones: fractions of training (0..1) where the step schedule decays, e.g. the
            RepMLP-FaceRes recipe's 252k/364k/406k of 420k iterations = ``(0.6, 0.867, 0.967)``.
        step_gamma: the step schedule's factor.
        channels_last: train in the channels_last layout (:func:`backbones.memory_format.to_channels_last`,
            applied when fit sets the task up): oneDNN's convs run faster in it on CPU, most of all
            with ``--trainer.precision bf16-mixed``. Outputs are unchanged; the deploy conversion
            and the files it writes are NCHW.
    """

    task_name = "task"
    primary_metric = "test/loss"  # what tasks.compare ranks models by; subclasses name their own

    def __init__(
        self,
        backbone: str,
        backbone_kwargs: Optional[dict[str, Any]] = None,
        deploy: bool = False,
        weights: Optional[str] = None,
        weights_match: Literal["all", "matching"] = "all",
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        weight_decay_end: Optional[float] = None,
        no_decay_bn_bias: bool = True,
        warmup_epochs: float = 0.0,
        warmup_start_factor: float = 0.01,
        min_lr: float = 0.0,
        schedule: Literal["cosine", "poly", "step"] = "cosine",
        poly_power: float = 0.9,
        step_milestones: tuple[float, ...] = (0.6, 0.867, 0.967),
        step_gamma: float = 0.1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"model.optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if weights_match not in ("all", "matching"):
            raise ValueError(f"model.weights_match must be 'all' or 'matching', got {weights_match!r}")
        if schedule not in ("cosine", "poly", "step"):
            raise ValueError(f"model.schedule must be 'cosine', 'poly' or 'step', got {schedule!r}")
        if any(not 0 < m < 1 for m in step_milestones) or list(step_milestones) != sorted(step_milestones):
            raise ValueError(f"model.step_milestones must be increasing fractions of training in (0, 1), got {step_milestones}")
        if weight_decay_end is not None and not (weight_decay_end >= 0 and weight_decay > 0):
            raise ValueError(f"model.weight_decay_end must be >= 0 and needs model.weight_decay > 0 to anneal from, "
                             f"got weight_decay_end={weight_decay_end}, weight_decay={weight_decay}")
        self.save_hyperparameters()  # collects the subclass's arguments too
        self.backbone_name = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.deploy = deploy
        # Filled by convert_to_deploy (or read from a deploy checkpoint): params, error, tolerance.
        self.reparam_info: Optional[dict[str, Any]] = None
        self._resume_rng: Optional[dict[str, Any]] = None  # RNG states of a checkpoint being resumed
        self._weights_loaded = False  # model.weights is loaded once, at the first setup
        self._log_row = PendingRow()  # the row of the training batch in progress
        self._resume_log_row: Optional[dict[str, Any]] = None  # that row in a checkpoint being resumed
        self.runtime_spec = RuntimeSpec()  # how test and predict run the model (use_runtime)
        self._calibration: Optional[list[Tensor]] = None
        self._runner: Optional[Runner] = None
        self._test_images = 0
        self._schedule_steps = 1  # optimizer steps of the whole run, set by configure_optimizers

    # ------------------------------------------------------------------ backbone
    def backbone_args(self) -> dict[str, Any]:
        """Everything passed to ``backbones.create`` besides ``deploy`` (subclasses add e.g. num_classes)."""
        return dict(self.backbone_kwargs)

    def build_backbone(self, deploy: bool) -> nn.Module:
        return create(self.backbone_name, deploy=deploy, **self.backbone_args())

    def build_model(self, deploy: bool) -> None:
        """(Re)build every module that has a train-time and a deploy form (the backbone; subclasses
        add heads). Called from ``__init__`` and when a checkpoint's mode differs from the task's."""
        self.backbone = self.build_backbone(deploy)
        self.deploy = deploy

    def backbone_spec(self) -> dict[str, Any]:
        """The architecture and its arguments, enough to rebuild the backbone: ``create(name, **kwargs)``."""
        return {"name": self.backbone_name, "kwargs": _plain(self.backbone_args()), "deploy": self.deploy}

    @property
    def input_size(self) -> tuple[int, int]:
        return model_input_size(self.backbone, self.backbone_name, default=224)

    def batch_inputs(self, batch: Any) -> Tensor:
        """The image tensor ``(N, C, H, W)`` of a batch (the first element)."""
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    # ------------------------------------------------------------------ deploy conversion
    def _convert_structure(self) -> None:
        for child in self.children():  # metrics and losses have nothing to convert; heads may
            reparameterize_model(child, inplace=True)
        self.deploy = True

    def convert_to_deploy(self, check_inputs: Optional[Tensor] = None) -> dict[str, Any]:
        """Convert every re-parameterizable block in place (eval mode) and measure the error.

        ``check_inputs``: a batch run through the model before and after; the max relative error
        of the outputs is returned. Returns ``{"params_train", "params_deploy", "relative_error",
        "check_batch"}`` and keeps it in :attr:`reparam_info` (saved into deploy checkpoints).
        A second call on a converted model changes nothing and reports zero error.
        """
        self.eval()
        to_contiguous(self)  # the conversion math and the safetensors writer take NCHW tensors
        params_train = count_params(self)
        reference = None
        if check_inputs is not None:
            check_inputs = check_inputs.to(self.device)
            with torch.no_grad():
                reference = self(check_inputs)
        self._convert_structure()
        error = None
        if reference is not None:
            with torch.no_grad():
                error = max_relative_error(reference, self(check_inputs))
        self.reparam_info = {
            "params_train": params_train,
            "params_deploy": count_params(self),
            "relative_error": error,
            "check_batch": list(check_inputs.shape) if check_inputs is not None else None,
        }
        return self.reparam_info

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["deploy"] = self.deploy
        checkpoint["backbone"] = self.backbone_spec()
        if self.reparam_info is not None:
            checkpoint["reparam"] = self.reparam_info
        if self.trainer_stage() == "fit":
            # Every rank seeds the same and draws the same, so rank 0's state (the one written)
            # serves every rank on resume.
            checkpoint["rng"] = rng_state()
            row = self._log_row.pending(self.trainer, self.automatic_optimization)
            if row is not None:
                checkpoint["pending_log_row"] = row

    # ------------------------------------------------------------------ weights
    def setup(self, stage: str) -> None:
        if self.hparams.weights and not self._weights_loaded:
            self.load_weights(self.hparams.weights)
        if stage == "fit" and self.hparams.get("channels_last") and not self.deploy:
            to_channels_last(self)

    def load_weights(self, source: str | Weights, match: Optional[Literal["all", "matching"]] = None) -> Weights:
        """Load a weight file (any layout :func:`backbones.weights.read_weights` reads) into this task.

        The structure first follows the file's form (a deploy file converts the task, outside fit),
        then the tensors load as ``match`` (default ``model.weights_match``) says. A file of the
        backbone alone loads into the backbone during fit (the heads keep their initialization,
        named); outside fit it must be all the task needs. Returns what was loaded.
        """
        weights = source if isinstance(source, Weights) else read_weights(source)
        match = match or self.hparams.weights_match
        self.align_to(weights)
        if match == "matching":
            note = self._load_matching(weights)
        elif weights.scope == "backbone" and self.trainer_stage() == "fit":
            load_into(self.backbone, weights.backbone_state_dict(), weights.path, self.backbone_name,
                      checkpoint_arch=weights.arch, hints=self._kwargs_hints(weights))
            heads = self._heads_outside(weights)
            note = f"the backbone; {', '.join(heads)} start(s) initialized" if heads else "the whole task"
        else:
            load_into(self, weights.task_state_dict(), weights.path, self.backbone_name,
                      checkpoint_arch=weights.arch, hints=self._task_hints(weights))
            note = "every tensor of the task"
        self._weights_loaded = True
        print(f"weights {weights.path}: {weights.describe()}: loaded {note}")
        return weights

    def _load_matching(self, weights: Weights) -> str:
        own = self.state_dict()
        state = weights.task_state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise ValueError(f"model.weights {weights.path}: no tensor of this {weights.describe()} fits the task "
                             f"(backbone {self.backbone_name!r}); first keys of the file: {listing(sorted(state))}")
        self.load_state_dict(usable, strict=False)
        skipped = sorted(set(own) - set(usable))
        return (f"{len(usable)} tensors whose name and shape match, {len(skipped)} left initialized"
                + (f" (e.g. {', '.join(skipped[:3])})" if skipped else ""))

    def _heads_outside(self, weights: Weights) -> list[str]:
        """The task's top-level modules with tensors that ``weights`` does not hold."""
        held = {k.split(".")[0] for k in weights.task_state_dict()}
        return sorted({k.split(".")[0] for k in self.state_dict()} - held)

    def _kwargs_hints(self, weights: Weights) -> list[str]:
        run = _plain(self.backbone_args())
        differ = {k: v for k, v in (weights.kwargs or {}).items() if run.get(k) != v}
        if differ:
            return [f"the file's backbone arguments {differ} differ from this run's "
                    f"{ {k: run.get(k) for k in differ} } (--model.backbone_kwargs)"]
        return []

    def mismatch_hints(self, state_dict: dict[str, Tensor]) -> list[str]:
        """Task-specific explanations of a checkpoint that does not fit (e.g. class count)."""
        return []

    def adapt_heads(self, weights: Weights) -> None:
        """Hook: rebuild heads to the file's before loading (e.g. the face task's margin head outside fit)."""

    def align_to(self, weights: Weights) -> None:
        """Match the module structure to the file's form, or explain why the file cannot load."""
        if weights.arch is not None and weights.arch != self.backbone_name:
            raise ValueError(
                f"{weights.path} holds backbone {weights.arch!r}, but this run builds {self.backbone_name!r} "
                f"(model.backbone); use the config the weights were trained with"
            )
        if weights.deploy and not self.deploy:
            if self.trainer_stage() == "fit":
                raise ValueError(
                    f"{weights.path} holds deploy (converted) weights, which cannot be trained or resumed; "
                    "fit from the train-time checkpoint (checkpoints/last.ckpt) instead"
                )
            self._convert_structure()
        elif not weights.deploy and self.deploy:
            self.build_model(deploy=False)
        self.adapt_heads(weights)
        self.reparam_info = weights.extra.get("reparam") if weights.deploy else None

    def _task_hints(self, weights: Weights) -> list[str]:
        """Why ``weights`` may not fit the whole task: the task's own hints, missing heads, arguments."""
        hints = self.mismatch_hints(weights.task_state_dict())
        heads = self._heads_outside(weights) if weights.scope == "backbone" else []
        if heads:
            hints.insert(0, f"a backbone file holds the backbone alone, and this task also needs its "
                            f"{', '.join(heads)}: test the run's deploy.ckpt (the whole task) instead")
        return hints + self._kwargs_hints(weights)

    def check_fits(self, weights: Weights) -> None:
        """Raise one error that says why ``weights`` do not load strictly into the whole task."""
        check_fits(self, weights.task_state_dict(), weights.path, self.backbone_name,
                   checkpoint_arch=weights.arch, hints=self._task_hints(weights))

    def attached_trainer(self) -> Optional[pl.Trainer]:
        """The Trainer running this task, None outside one (e.g. :meth:`load_weights` from a script)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's answer for a module not attached to a Trainer
            return None

    def trainer_stage(self) -> Optional[str]:
        trainer = self.attached_trainer()
        return trainer.state.fn.value if trainer is not None and trainer.state.fn is not None else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self.attached_trainer()
        if (self.trainer_stage() == "fit" and "current_model_state" in checkpoint
                and not any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks)):
            # A checkpoint of a run with weight averaging (callbacks.ema.EMA) holds the average in
            # state_dict and the trained weights in current_model_state; resumed without the
            # callback, training continues from the trained weights, which its optimizer state fits.
            checkpoint["state_dict"] = checkpoint["current_model_state"]
            print(f"{trainer.ckpt_path}: resuming the trained weights (current_model_state); its averaged "
                  "(EMA) weights are dropped, as no weight averaging callback is configured")
        weights = weights_of_checkpoint(checkpoint, str(trainer.ckpt_path if trainer is not None else "(checkpoint)"))
        self.align_to(weights)
        self.check_fits(weights)
        if self.trainer_stage() == "fit":
            self._resume_rng = checkpoint.get("rng")
            self._resume_log_row = checkpoint.get("pending_log_row")

    def on_train_start(self) -> None:
        adapter.close_restored_epoch(self.trainer)
        # Restored here, after the sanity check (which Lightning runs with the RNGs isolated), so
        # the resumed epoch draws what the uninterrupted run drew after saving the checkpoint.
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        if self._resume_log_row is not None:
            # written unless the interrupted run wrote it after saving the checkpoint
            for logger in self.loggers:
                if isinstance(logger, CheckpointedCSVLogger):
                    logger.log_metrics(self._resume_log_row["metrics"], self._resume_log_row["step"])
            self._resume_log_row = None

    def log(self, *args: Any, **kwargs: Any) -> None:
        super().log(*args, **kwargs)
        self._log_row.record(self, *args, **kwargs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._log_row.start(self.trainer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._log_row.end()

    # ------------------------------------------------------------------ optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        wd = self.hparams.weight_decay
        if not self.hparams.no_decay_bn_bias:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": wd}]
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    def lr_factor(self, step: int, total_steps: int, warmup_steps: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step``: linear warm-up, then cosine or poly to
        ``min_lr``, or step decay (milestones are fractions of all ``total_steps``)."""
        hp = self.hparams
        if step < warmup_steps:
            return hp.warmup_start_factor + (1.0 - hp.warmup_start_factor) * step / warmup_steps
        if hp.schedule == "step":
            passed = sum(step >= m * total_steps for m in hp.step_milestones)
            return hp.step_gamma ** passed
        floor = hp.min_lr / hp.lr if hp.lr > 0 else 0.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if hp.schedule == "poly":
            return floor + (1.0 - floor) * (1.0 - progress) ** hp.poly_power
        return _cosine(floor, progress)

    def weight_decay_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of every group's weight decay at optimizer step ``step`` of ``total_steps``:
        1 without ``weight_decay_end``, else a cosine from 1 to ``weight_decay_end / weight_decay``."""
        hp = self.hparams
        if hp.get("weight_decay_end") is None:
            return 1.0
        return _cosine(hp.weight_decay_end / hp.weight_decay, min(1.0, step / max(1, total_steps)))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Computed from global_step before every step (not accumulated), so a resumed run sets the
        # value the uninterrupted run had; groups that start at 0 stay at 0.
        if self.hparams.get("weight_decay_end") is not None:
            factor = self.weight_decay_factor(self.trainer.global_step, self._schedule_steps)
            for group in optimizer.param_groups:
                group["weight_decay"] = group.setdefault("initial_weight_decay", group["weight_decay"]) * factor

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.parameter_groups()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.momentum, 0.999))
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)  # also sets up the train loader
        if trainer.max_epochs and trainer.max_epochs > 0:
            per_epoch = total / trainer.max_epochs
        elif hp.warmup_epochs > 0:  # step-limited run (max_steps): one epoch is one pass over the train loader
            per_epoch = adapter.train_batches_per_epoch(trainer) / trainer.accumulate_grad_batches
            if not math.isfinite(per_epoch):
                raise ValueError("model.warmup_epochs needs epochs of known length; this train loader has no length "
                                 "(an iterable dataset): give the warm-up with max_epochs, or set warmup_epochs 0")
        else:
            per_epoch = 0.0
        warmup = min(total, int(round(hp.warmup_epochs * per_epoch)))
        self._schedule_steps = total
        for group in opt.param_groups:  # what weight_decay_end anneals from (kept in the optimizer's state)
            group["initial_weight_decay"] = group["weight_decay"]
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_factor(step, total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ inference runtime
    def use_runtime(self, spec: RuntimeSpec, calibration: Optional[list[Tensor]] = None) -> None:
        """Run the next test or predict stage on ``spec`` (:mod:`tasks.runtime`). ``calibration``:
        batches of training images (evaluation transform), which :meth:`calibration_inputs` turns
        into model inputs; needed by onnxruntime and INT8 (export check, INT8 calibration)."""
        self.runtime_spec = spec
        self._calibration = calibration

    def calibration_inputs(self, images: Tensor) -> Tensor:
        """Model inputs ``(M, 3, h, w)`` made from a batch of evaluation images (the images themselves;
        segmentation cuts windows)."""
        return images

    def inputs_from_images(self, batches: list[Tensor], count: int) -> list[Tensor]:
        """The first ``count`` model inputs (:meth:`calibration_inputs`) of batches of evaluation images."""
        return first_inputs([self.calibration_inputs(images) for images in batches], count)

    def infer(self, x: Tensor) -> Tensor:
        """The forward on the stage's runtime (``self(x)`` outside test and predict), timed."""
        return self(x) if self._runner is None else self._runner(x)

    def count_test_images(self, count: int) -> None:
        """Add ``count`` images to the test stage's throughput (called by the test steps)."""
        self._test_images += count

    def _start_runtime(self) -> None:
        self._test_images = 0
        calibration, batch_size = None, None
        if self._calibration is not None:
            calibration = self.inputs_from_images(self._calibration, self.runtime_spec.calibration_images)
            batch_size = max(int(images.shape[0]) for images in self._calibration)  # the test batch
        self._runner = build_runner(self, self.runtime_spec, calibration, batch_size=batch_size)

    def _stop_runtime(self) -> None:
        if self._runner is not None:
            self._runner.close()

    def on_test_start(self) -> None:
        self._start_runtime()

    def on_predict_start(self) -> None:
        self._start_runtime()

    def on_predict_end(self) -> None:
        self._stop_runtime()
        self._runner = None

    def throughput(self) -> Optional[dict[str, Any]]:
        """The test stage's images per second in the runtime's calls (data loading and metrics left
        out), with the batch size and thread count it ran at; None before a test."""
        runner = self._runner
        if runner is None or runner.seconds <= 0 or not self._test_images:
            return None
        return {"images_per_s": self._test_images / runner.seconds, "images": self._test_images,
                "seconds": runner.seconds, "batch_size": runner.batch_size, "threads": torch.get_num_threads()}

    # ------------------------------------------------------------------ results
    def results(self) -> dict[str, Any]:
        """What a test run reports; written to ``results.json`` (or the runtime's
        :attr:`~tasks.runtime.RuntimeSpec.results_file`) by :meth:`on_test_end`."""
        metrics = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")
        }
        was_training = self.training
        self.eval()
        macs = count_macs(self, self.input_size)
        self.train(was_training)
        datamodule = self.trainer.datamodule
        return {
            "task": self.task_name,
            "backbone": self.backbone_name,
            "backbone_kwargs": _plain(self.backbone_args()),
            "deploy": self.deploy,
            "checkpoint": str(self.trainer.ckpt_path) if self.trainer.ckpt_path else None,
            "metrics": metrics,
            "params": count_params(self),
            "macs": macs,
            "flops": 2 * macs,  # FlopCounterMode convention: one multiply-add = 2 FLOPs
            "input_size": list(self.input_size),
            "reparam": self.reparam_info,
            "primary_metric": self.primary_metric,
            "runtime": self.runtime_spec.runtime,
            "precision": self.runtime_spec.precision,
            "throughput": self.throughput(),
            # what the metrics were measured on (SplitDataModule.describe); tasks.compare refuses mixed data
            "data": datamodule.describe() if hasattr(datamodule, "describe") else None,
            # the constructor arguments, to rebuild the task (tasks.compare measures its speed)
            "hparams": _plain({k: v for k, v in self.hparams.items() if not k.startswith("_")}),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def on_test_end(self) -> None:
        self._stop_runtime()  # the fp32 torch model back (results count its MACs); the timings stay
        folder = self.trainer.log_dir or self.trainer.default_root_dir  # collective: every rank asks
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, self.runtime_spec.results_file)
            atomic_write_json(path, _finite(self.results()))
            print(f"results written to {path}")
        self._runner = None
