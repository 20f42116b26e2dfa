"""ReparamCallback: when fit ends, convert the trained model to its deploy form, check it, save it.

Lightning runs ``on_fit_end`` on every rank after its teardown: DDP is unwrapped, SyncBatchNorm
is reverted to BatchNorm and the module is on the CPU. The callback then, identically on every
rank:

1. optionally reloads the best checkpoint (``ModelCheckpoint.best_model_path``);
2. takes a real validation batch (at most ``check_samples`` images), converts the task in place
   with :meth:`tasks.base.ReparamTask.convert_to_deploy` and compares the outputs before and
   after: a relative error above ``tolerance`` raises :class:`ReparamCheckError` and nothing is
   written;
3. writes, into ``dirpath`` (default: the run's log folder):
   - ``deploy.ckpt``: a Lightning checkpoint of the converted task (``test --ckpt_path``);
   - ``deploy.safetensors``: the converted backbone alone, with its arch and arguments as metadata;
   - ``deploy.json``: the arch, its arguments, parameter counts and the conversion error.

``trainer.save_checkpoint`` is collective (rank 0 writes, then a barrier) and is called on every
rank; the other files are written by rank 0 followed by a barrier, so saving cannot hang.
The task is left in deploy form: a ``trainer.test()`` after ``trainer.fit()`` tests the deploy weights.

With EMA of the weights (:class:`callbacks.ema.EMA`) the converted weights are the average: the best
checkpoint's ``state_dict`` holds it, and without ``load_best`` the EMA callback has copied it into
the model in ``on_train_end``, which Lightning runs before ``on_fit_end``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from backbones.weights.io import atomic_write_json, save_deploy_checkpoint

__all__ = ["ReparamCallback", "ReparamCheckError"]

log = logging.getLogger(__name__)


class ReparamCheckError(RuntimeError):
    """The converted model's outputs differ from the train-time model's beyond the tolerance."""


class ReparamCallback(pl.Callback):
    """Convert the task to its deploy form when fit ends, verify it and save it.

    Args:
        load_best: reload ``ModelCheckpoint.best_model_path`` (when there is one) before converting.
        tolerance: largest accepted max relative error between train-time and deploy outputs.
        check_samples: validation images used for the check.
        dirpath: output folder; default the trainer's log folder.
        filename: base name of the files written (``deploy`` → deploy.ckpt, .safetensors, .json).
        save_safetensors: also write the backbone alone as safetensors.
    """

    def __init__(
        self,
        load_best: bool = True,
        tolerance: float = 1e-4,
        check_samples: int = 8,
        dirpath: Optional[str] = None,
        filename: str = "deploy",
        save_safetensors: bool = True,
    ) -> None:
        if tolerance <= 0:
            raise ValueError(f"reparam.tolerance must be positive, got {tolerance}")
        if check_samples < 1:
            raise ValueError(f"reparam.check_samples must be at least 1, got {check_samples}")
        self.load_best = load_best
        self.tolerance = tolerance
        self.check_samples = check_samples
        self.dirpath = dirpath
        self.filename = filename
        self.save_safetensors = save_safetensors
        self.paths: dict[str, str] = {}
        self.info: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ inputs
    def _check_batch(self, trainer: pl.Trainer, task: Any) -> Optional[Tensor]:
        """The first validation batch's images, or None (with a warning) when there is no val data."""
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.datamodule is not None:
            loaders = trainer.datamodule.val_dataloader()
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            return None
        for batch in loader:
            return task.batch_inputs(batch)[: self.check_samples]
        return None

    def _best_path(self, trainer: pl.Trainer) -> Optional[str]:
        ckpt = trainer.checkpoint_callback
        path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        return path if path and os.path.isfile(path) else None

    # ------------------------------------------------------------------ the hook
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "convert_to_deploy"):
            raise TypeError(
                f"ReparamCallback needs a tasks.base.ReparamTask, got {type(pl_module).__name__}"
            )
        if trainer.interrupted:
            rank_zero_info("ReparamCallback: fit was interrupted; no deploy model written")
            return
        best = self._best_path(trainer) if self.load_best else None
        if best is not None:
            rank_zero_info(f"ReparamCallback: reloading the best checkpoint {best}")
            pl_module.load_weights(best, match="all")  # the run's own checkpoint: every tensor

        inputs = self._check_batch(trainer, pl_module)
        if inputs is None:
            rank_zero_info("ReparamCallback: no validation data; checking on random inputs")
            generator = torch.Generator().manual_seed(0)
            inputs = torch.randn(2, 3, *pl_module.input_size, generator=generator)
        info = dict(pl_module.convert_to_deploy(inputs))
        info["tolerance"] = self.tolerance
        info["source_checkpoint"] = best
        self.info = info
        error = info["relative_error"]
        rank_zero_info(
            f"ReparamCallback: params {info['params_train']:,} -> {info['params_deploy']:,}; "
            f"max relative error {error:.3g} on a batch of {info['check_batch'][0]} (tolerance {self.tolerance:g})"
        )
        # Every rank checks its own batch; decide together so that no rank waits at a barrier for
        # one that raised. NaN fails the comparison.
        if not trainer.strategy.reduce_boolean_decision(bool(error <= self.tolerance), all=True):
            raise ReparamCheckError(
                f"deploy conversion of {pl_module.backbone_name!r} changed the outputs: max relative error "
                f"{error:.3g} (this rank) > tolerance {self.tolerance:g} (reparam.tolerance) on a validation batch of shape "
                f"{tuple(inputs.shape)}; no deploy files were written"
            )
        self._save(trainer, pl_module, info)

    def _save(self, trainer: pl.Trainer, task: Any, info: dict[str, Any]) -> None:
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir  # log_dir: collective
        base = os.path.join(folder, self.filename)
        self.paths = {"ckpt": f"{base}.ckpt", "json": f"{base}.json"}
        if self.save_safetensors:
            self.paths["safetensors"] = f"{base}.safetensors"
        trainer.save_checkpoint(self.paths["ckpt"], weights_only=True)  # every rank: it has a barrier
        if trainer.is_global_zero:
            spec = task.backbone_spec()
            if self.save_safetensors:
                save_deploy_checkpoint(task.backbone, self.paths["safetensors"], spec["name"], spec["kwargs"])
            atomic_write_json(self.paths["json"], {"task": task.task_name, "backbone": spec, **info, "files": self.paths})
            if trainer.logger is not None:
                trainer.logger.log_metrics(
                    {"reparam/relative_error": info["relative_error"], "reparam/params_deploy": info["params_deploy"]},
                    step=trainer.global_step,
                )
                trainer.logger.save()
            rank_zero_info(f"ReparamCallback: deploy model written to {self.paths['ckpt']}")
        trainer.strategy.barrier("ReparamCallback")
