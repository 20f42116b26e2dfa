"""Building blocks: ConvBN, the conv re-parameterization family (ACB, RepVGG, DBB, OREPA, MobileOne,
large kernel), RepMLP and its ResNet blocks, the RepMLPNet block, the pre-BN residual pieces of RepLKNet
and RepMLPNet, and small shared pieces. One file per block."""
from .acb import ACBlock
from .classifier import PooledClassifier
from .convbn import ConvBN
from .dbb import DiverseBranchBlock
from .drop_path import DropPath
from .geometry import ConvGeometry
from .large_kernel import ReparamLargeKernelConv
from .merged_conv import MergedConvBlock
from .mobileone import MobileOneBlock
from .orepa import OREPA
from .prenorm import ConvFFN, NormPoolHead, PreBNResidual
from .repmlp import RepMLP
from .repmlp_blocks import RepMLPBottleneck, RepMLPCfg, RepMLPLight
from .repmlpnet import RepMLPNetBlock
from .repvgg import RepVGGBlock

__all__ = [
    "ACBlock", "PooledClassifier", "ConvBN", "ConvGeometry", "DiverseBranchBlock", "DropPath", "ReparamLargeKernelConv",
    "MergedConvBlock", "MobileOneBlock", "OREPA", "RepMLP", "RepMLPBottleneck", "RepMLPCfg", "RepMLPLight", "RepVGGBlock",
    "RepMLPNetBlock", "ConvFFN", "NormPoolHead", "PreBNResidual",
]
