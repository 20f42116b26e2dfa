"""RepMLP backbones and the re-parameterization toolkit.

``backbones.create(name, **kwargs)`` builds a registered model; ``backbones.list_models()``
lists them; ``backbones.reparameterize_model(model)`` converts any model to its deploy form.
"""
from .layers.acb import ACBlock
from .layers.convbn import ConvBN
from .layers.dbb import DiverseBranchBlock
from .layers.geometry import ConvGeometry
from .layers.mobileone import MobileOneBlock
from .layers.orepa import OREPA
from .layers.large_kernel import ReparamLargeKernelConv
from .models import create, input_size, list_models, register_model
from .reparam.walker import max_relative_error, model_relative_error, reparameterize_model
from .reparam.block import ReparamBlock
from .layers.repmlp import RepMLP
from .layers.repmlp_blocks import RepMLPBottleneck, RepMLPCfg, RepMLPLight
from .layers.repvgg import RepVGGBlock
from .models.resnet import BasicBlock, Bottleneck, ResNet, StageCfg

__all__ = [
    "ACBlock", "BasicBlock", "Bottleneck", "ConvBN", "ConvGeometry", "DiverseBranchBlock", "MobileOneBlock", "OREPA",
    "ReparamLargeKernelConv", "RepVGGBlock", "RepMLP", "RepMLPBottleneck", "RepMLPCfg", "RepMLPLight", "ReparamBlock", "ResNet", "StageCfg",
    "create", "input_size", "list_models", "max_relative_error", "model_relative_error", "register_model",
    "reparameterize_model",
]
