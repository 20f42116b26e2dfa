"""A small model registry: factories registered by name with a default config, created with keyword arguments.

Each factory is registered with a :class:`ModelCfg` (the pattern of timm's ``default_cfgs``): what
the data and a task's heads need to know about the model without building it
(``tests/backbones/test_registry.py`` checks each one against its built model).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from torch import nn

from ..layers.helpers import to_pair

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelCfg", "create", "input_size", "list_models", "model_cfg",
           "model_input_size", "register_model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelCfg:
    """A registered model's defaults (for the factory's own arguments; ``backbone_kwargs`` may change them).

    Args:
        input_size: ``(H, W)`` the factory builds for when no ``img_size`` is given.
        fixed_size: True when the model works at its ``img_size`` only (RepMLP blocks, a face head
            sized to the last map); False when any size works and ``img_size`` only records the
            training size.
        num_features: pooled features of a headless model (``num_classes=0``), or a face model's
            embedding size.
        feature_channels: channels of the stage outputs a head can tap (ResNet: c2..c5); empty when
            the model exposes none.
        feature_strides: their strides relative to the input (a map is ``ceil(H / stride)`` high).
        mean, std: the RGB input normalization (0..1 units) the model is trained with.
    """

    input_size: tuple[int, int]
    fixed_size: bool
    num_features: int
    feature_channels: tuple[int, ...] = ()
    feature_strides: tuple[int, ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.feature_channels) != len(self.feature_strides):
            raise ValueError(f"ModelCfg: one stride per feature map, got channels {self.feature_channels} "
                             f"and strides {self.feature_strides}")


Factory = TypeVar("Factory", bound=Callable[..., nn.Module])
_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_CFGS: dict[str, ModelCfg] = {}


def register_model(*, cfg: ModelCfg) -> Callable[[Factory], Factory]:
    """Decorator: register a factory under its function name with its default config ``cfg``."""

    def register(factory: Factory) -> Factory:
        name = factory.__name__
        if name in _FACTORIES:
            raise ValueError(f"a model named {name!r} is already registered")
        _FACTORIES[name], _CFGS[name] = factory, cfg
        return factory

    return register


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in _FACTORIES if fnmatch.fnmatch(name, pattern))


def _check_registered(name: str) -> None:
    if name not in _FACTORIES:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` override the factory's defaults
    (every factory takes ``num_classes`` and ``deploy``; face backbones accept only
    ``num_classes=0``, as their identity classifier is the face task's margin head).
    A deploy model comes with the CPU fusion pass applied, as a converted one does."""
    _check_registered(name)
    model = _FACTORIES[name](**kwargs)
    if kwargs.get("deploy"):
        # imported here: the deploy passes import the model files, which import this module
        from ..deploy.cpu_fusion import fuse_for_cpu
        fuse_for_cpu(model)
    return model


def model_cfg(name: str) -> ModelCfg:
    """The default config the model ``name`` was registered with."""
    _check_registered(name)
    return _CFGS[name]


def input_size(name: str, **kwargs: Any) -> tuple[int, int]:
    """The ``(H, W)`` input size ``create(name, **kwargs)`` builds for: ``kwargs["img_size"]``
    (an int: square), else the registered default. No model is built."""
    default = model_cfg(name).input_size
    img_size = kwargs.get("img_size")
    if img_size is None:
        return default
    pair = isinstance(img_size, (list, tuple)) and len(img_size) == 2
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in (img_size if pair else [img_size])):
        raise ValueError(f"{name}: img_size must be a positive int or a pair [H, W] of them, got {img_size!r}")
    return to_pair(img_size)


def model_input_size(model: nn.Module, name: str = "the model", default: int | None = None) -> tuple[int, int]:
    """A built model's ``(H, W)`` input size (its ``img_size``), or ``default`` when it records none."""
    size = getattr(model, "img_size", default)
    if size is None:
        raise ValueError(f"model {name!r} does not record an input size (img_size)")
    return to_pair(size)
