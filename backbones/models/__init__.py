"""Networks, one file per family, each registering its factories in :mod:`.registry`."""
from . import faceresnet, mobilefacenet, mobileone, replknet, repvgg, resnet  # noqa: F401  (register their factories)
from .registry import create, input_size, list_models, register_model

__all__ = ["create", "input_size", "list_models", "register_model"]
