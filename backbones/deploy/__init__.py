"""Passes applied to a converted (deploy) model: the CPU fusion pass (:mod:`.cpu_fusion`) over
the fused oneDNN kernels (:mod:`.fused_conv`); export to ONNX Runtime, float32 or INT8 (:mod:`.onnx`)."""
from .cpu_fusion import FusedConvAct, fuse_for_cpu
from .fused_conv import fusion, fusion_enabled
from .onnx import OnnxModel, check_onnx, export_onnx, quantize_int8

__all__ = ["FusedConvAct", "fuse_for_cpu", "fusion", "fusion_enabled", "OnnxModel", "check_onnx", "export_onnx",
           "quantize_int8"]
