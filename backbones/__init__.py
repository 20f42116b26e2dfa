"""RepMLP backbones and the re-parameterization toolkit.

``backbones.create(name, **kwargs)`` builds a registered model; ``backbones.list_models()``
lists them; ``backbones.reparameterize_model(model)`` converts any model to its deploy form.
"""
from . import faceresnet, mobilefacenet, mobileone, replknet, repvgg, resnet  # noqa: F401  (register their factories)
from .acb import ACBlock
from .convbn import ConvBN
from .dbb import DiverseBranchBlock
from .mobileone import MobileOneBlock
from .orepa import OREPA
from .replknet import ReparamLargeKernelConv
from .registry import create, input_size, list_models, register_model
from .reparam import max_relative_error, model_relative_error, reparameterize_model
from .reparam_block import ReparamBlock
from .repmlp import RepMLP
from .repmlp_blocks import RepMLPBottleneck, RepMLPLight
from .repvgg import RepVGGBlock
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "ACBlock", "BasicBlock", "Bottleneck", "ConvBN", "DiverseBranchBlock", "MobileOneBlock", "OREPA",
    "ReparamLargeKernelConv", "RepVGGBlock", "RepMLP", "RepMLPBottleneck", "RepMLPLight", "ReparamBlock", "ResNet",
    "create", "input_size", "list_models", "max_relative_error", "model_relative_error", "register_model",
    "reparameterize_model",
]
