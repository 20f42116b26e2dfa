"""Passes applied to a converted (deploy) model: the CPU fusion pass (:mod:`.cpu_fusion`) over
the fused oneDNN kernels (:mod:`.fused_conv`), bf16 inference on CPU (:mod:`.precision`), INT8 in PyTorch
(PT2E + Inductor, :mod:`.pt2e`; imported on use: it needs torchao), and export to ONNX Runtime,
float32 or INT8 (:mod:`.onnx`)."""
from .cpu_fusion import FusedConvAct, fuse_for_cpu, unfuse_for_cpu
from .fused_conv import fusion, fusion_enabled
from .onnx import OnnxModel, check_onnx, export_onnx, quantize_int8
from .precision import Bf16Inference, bf16_supported, to_bf16

__all__ = ["Bf16Inference", "FusedConvAct", "OnnxModel", "bf16_supported", "check_onnx", "export_onnx", "fuse_for_cpu",
           "fusion", "fusion_enabled", "quantize_int8", "to_bf16", "unfuse_for_cpu"]
