"""A small model registry: factories registered by name, created with keyword arguments."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from ..layers.helpers import to_pair

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])
_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Factory) -> Factory:
    """Decorator: register ``factory`` under its function name."""
    name = factory.__name__
    if name in _FACTORIES:
        raise ValueError(f"a model named {name!r} is already registered")
    _FACTORIES[name] = factory
    return factory


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in _FACTORIES if fnmatch.fnmatch(name, pattern))


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` override the factory's defaults
    (every factory takes ``num_classes`` and ``deploy``; face backbones accept only
    ``num_classes=0``, as their identity classifier is the face task's margin head).
    A deploy model comes with the CPU fusion pass applied, as a converted one does."""
    if name not in _FACTORIES:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    model = _FACTORIES[name](**kwargs)
    if kwargs.get("deploy"):
        # imported here: the deploy passes import the model files, which import this module
        from ..deploy.cpu_fusion import fuse_for_cpu
        fuse_for_cpu(model)
    return model


def input_size(name: str, **kwargs: Any) -> tuple[int, int]:
    """The ``(H, W)`` input size the model ``name`` is built for with ``kwargs`` (its ``img_size``).

    The model is built on the meta device, so this costs no memory and no initialization.
    """
    with torch.device("meta"):
        model = create(name, **kwargs)
    return model_input_size(model, name)


def model_input_size(model: nn.Module, name: str = "the model", default: int | None = None) -> tuple[int, int]:
    """A built model's ``(H, W)`` input size (its ``img_size``), or ``default`` when it records none."""
    size = getattr(model, "img_size", default)
    if size is None:
        raise ValueError(f"model {name!r} does not record an input size (img_size)")
    return to_pair(size)
