"""Networks, one file per family, each registering its factories and default configs in :mod:`.registry`."""
from . import faceresnet, mobilefacenet, mobileone, replknet, repmlpnet, repvgg, resnet  # noqa: F401  (register their factories)
from .registry import ModelCfg, create, input_size, list_models, model_cfg, register_model

__all__ = ["ModelCfg", "create", "input_size", "list_models", "model_cfg", "register_model"]
