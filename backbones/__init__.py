"""RepMLP backbones and the re-parameterization toolkit.

``backbones.create(name, **kwargs)`` builds a registered model; ``backbones.list_models()``
lists them; ``backbones.reparameterize_model(model)`` converts any model to its deploy form.
"""
from . import faceresnet, mobilefacenet, resnet  # noqa: F401  (register their factories)
from .convbn import ConvBN
from .registry import create, input_size, list_models, register_model
from .reparam import max_relative_error, model_relative_error, reparameterize_model
from .reparam_block import ReparamBlock
from .repmlp import RepMLP
from .repmlp_blocks import RepMLPBottleneck, RepMLPLight
from .resnet import Bottleneck, ResNet

__all__ = [
    "Bottleneck", "ConvBN", "RepMLP", "RepMLPBottleneck", "RepMLPLight", "ReparamBlock", "ResNet",
    "create", "input_size", "list_models", "max_relative_error", "model_relative_error", "register_model",
    "reparameterize_model",
]
