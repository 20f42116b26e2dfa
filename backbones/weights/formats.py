"""What a weight file holds (:class:`Weights`), how a layout is recognized (:class:`WeightFormat`),
and this project's own layouts.

A :class:`WeightFormat` recognizes a file from its tensors and plain metadata and turns it into
:class:`Weights`: the state dict in this project's layout plus what it holds (the arch and its
arguments, train-time or deploy form, the backbone alone or the whole task). Foreign layouts live
one per module (:mod:`.official_repmlp`, :mod:`.mmseg`); :func:`backbones.weights.read_weights`
tries them in order.

Every file this project writes records its form: a task checkpoint (Lightning, written by
``fit`` and :class:`callbacks.ReparamCallback`) has ``deploy`` and ``backbone`` entries, a
backbone file (:func:`.io.save_checkpoint`) has ``arch``, ``model_kwargs`` and ``deploy``. Only
foreign files have their form inferred from key names (:func:`.io.state_dict_mode`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from torch import Tensor, nn

from ..models.registry import create
from .io import BACKBONE_PREFIX, load_into, state_dict_mode, strip_prefix

__all__ = ["Weights", "WeightFormat", "Scope", "LIGHTNING", "BACKBONE_FILE", "STATE_DICT", "BACKBONE_PREFIX",
           "backbone_part", "inferred_deploy", "create_loaded"]

Scope = Literal["task", "backbone"]


@dataclass
class Weights:
    """The tensors of one file in this project's layout, and what they are.

    Attributes:
        path: the file, for messages.
        format: the layout it was read as (a :class:`WeightFormat` name).
        state_dict: keys of the task (``backbone.*``, heads) when ``scope == "task"``, of the
            backbone alone (``stem.*``, ``layer1.*``...) when ``scope == "backbone"``.
        scope: the whole task or the backbone alone.
        deploy: deploy (converted) form rather than train-time.
        arch, kwargs: the registered backbone and its constructor arguments, when recorded.
        extra: other recorded facts (``reparam``: the conversion check of a deploy checkpoint).
    """

    path: str
    format: str
    state_dict: dict[str, Tensor]
    scope: Scope
    deploy: bool
    arch: Optional[str] = None
    kwargs: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def form(self) -> str:
        return "deploy" if self.deploy else "train-time"

    def describe(self) -> str:
        """e.g. ``deploy backbone weights of 'repmlp_res_tiny' (this project's backbone file)``."""
        what = "task checkpoint" if self.scope == "task" else "backbone weights"
        arch = f" of {self.arch!r}" if self.arch else ""
        return f"{self.form} {what}{arch} ({self.format})"

    def task_state_dict(self) -> dict[str, Tensor]:
        """The tensors keyed as in a task (a backbone file's keys under ``backbone.``)."""
        if self.scope == "task":
            return dict(self.state_dict)
        return {BACKBONE_PREFIX + k: v for k, v in self.state_dict.items()}

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The backbone's tensors keyed as in the backbone."""
        if self.scope == "backbone":
            return dict(self.state_dict)
        return backbone_part(self.state_dict)


@dataclass(frozen=True)
class WeightFormat:
    """A layout: ``detect(state_dict, meta)`` says whether a file is in it (``meta``: the file's
    plain top-level entries or safetensors metadata), ``read(state_dict, meta, path)`` converts it."""

    name: str
    detect: Callable[[Mapping[str, Tensor], Mapping[str, Any]], bool]
    read: Callable[[dict[str, Tensor], dict[str, Any], str], Weights]


def create_loaded(weights: Weights, arch: str, **model_kwargs: Any) -> nn.Module:
    """``backbones.create(arch)`` with the backbone tensors of ``weights`` loaded strictly; returns
    the model (train mode). ``deploy`` defaults to the file's form and ``num_classes`` to the rows
    of its ``fc.weight`` (or ``head.fc.weight``); ``model_kwargs`` override either and pass other constructor arguments.
    The constructor arguments the file records (``weights.kwargs``: a backbone file's, or those a
    layout's files need, such as ``conv_type="dbb"``) are the defaults under ``model_kwargs``.
    A file that does not fit is a ValueError naming the file, the arch, the layout it was read as
    and the first keys that differ (:func:`.io.load_into`)."""
    state_dict = weights.backbone_state_dict()
    kwargs = {**(weights.kwargs or {}), **model_kwargs}
    kwargs.setdefault("deploy", weights.deploy)
    fc = state_dict.get("fc.weight", state_dict.get("head.fc.weight"))  # the ResNets' classifier, or a head's
    kwargs.setdefault("num_classes", int(fc.shape[0]) if fc is not None else 0)
    model = create(arch, **kwargs)
    hints = [f"the file was read as: {weights.format}"]
    differ = {k: v for k, v in (weights.kwargs or {}).items() if k in model_kwargs and model_kwargs[k] != v}
    if differ:  # e.g. conv_type="orepa" asked of a DBB file
        hints.append(f"the file's model arguments {differ} differ from those asked for "
                     f"{ {k: model_kwargs[k] for k in differ} }")
    return load_into(model, state_dict, weights.path, arch, checkpoint_arch=weights.arch, hints=hints)


def inferred_deploy(state_dict: Mapping[str, Tensor]) -> bool:
    """The form of a foreign file that records none: deploy when it has no BatchNorm entries."""
    return state_dict_mode(state_dict) == "deploy"


def backbone_part(task_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``backbone.*`` entries of a task state dict, keyed as in the backbone."""
    return {k[len(BACKBONE_PREFIX):]: v for k, v in task_state_dict.items() if k.startswith(BACKBONE_PREFIX)}


def _recorded_deploy(meta: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> bool:
    deploy = meta.get("deploy")
    return deploy if isinstance(deploy, bool) else inferred_deploy(state_dict)


# --------------------------------------------------------------------------- Lightning task checkpoints
def _is_lightning(state_dict: Mapping[str, Tensor], meta: Mapping[str, Any]) -> bool:
    return "pytorch-lightning_version" in meta


def _read_lightning(state_dict: dict[str, Tensor], meta: dict[str, Any], path: str) -> Weights:
    spec = meta.get("backbone") if isinstance(meta.get("backbone"), Mapping) else {}
    task_keys = strip_prefix(state_dict)  # DDP's module.
    backbone_keys = backbone_part(task_keys)
    return Weights(
        path=path, format="Lightning task checkpoint", state_dict=task_keys, scope="task",
        deploy=_recorded_deploy(meta, backbone_keys or task_keys),
        arch=spec.get("name") if isinstance(spec.get("name"), str) else None,
        kwargs=spec.get("kwargs") if isinstance(spec.get("kwargs"), Mapping) else None,
        extra={"reparam": meta.get("reparam")} if meta.get("reparam") is not None else {},
    )


LIGHTNING = WeightFormat("Lightning task checkpoint", _is_lightning, _read_lightning)


# --------------------------------------------------------------------------- backbone files
def _is_backbone_file(state_dict: Mapping[str, Tensor], meta: Mapping[str, Any]) -> bool:
    # save_checkpoint records the form too; an "arch" alone is what PyTorch's ImageNet example
    # (and the official DBB and OREPA train.py built on it) saves next to a foreign state dict
    return isinstance(meta.get("arch"), str) and isinstance(meta.get("deploy"), bool)


def _read_backbone_file(state_dict: dict[str, Tensor], meta: dict[str, Any], path: str) -> Weights:
    kwargs = meta.get("model_kwargs")
    return Weights(
        path=path, format="this project's backbone file", state_dict=strip_prefix(state_dict), scope="backbone",
        deploy=_recorded_deploy(meta, state_dict), arch=meta["arch"],
        kwargs=dict(kwargs) if isinstance(kwargs, Mapping) else None,
    )


BACKBONE_FILE = WeightFormat("this project's backbone file", _is_backbone_file, _read_backbone_file)


# --------------------------------------------------------------------------- bare state dicts
def _read_state_dict(state_dict: dict[str, Tensor], meta: dict[str, Any], path: str) -> Weights:
    keys = strip_prefix(state_dict)  # DDP's module.
    task = any(k.startswith(BACKBONE_PREFIX) for k in keys)
    backbone = backbone_part(keys) if task else keys
    return Weights(path=path, format="state dict", state_dict=keys, scope="task" if task else "backbone",
                   deploy=inferred_deploy(backbone))


STATE_DICT = WeightFormat("state dict", lambda state_dict, meta: True, _read_state_dict)
