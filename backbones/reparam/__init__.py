"""The re-parameterization toolkit: the conv/BN/FC math (:mod:`.math`), the block protocol
(:mod:`.block`) and the model-level walker (:mod:`.walker`)."""
from .block import ReparamBlock, assign_parameter
from .math import (
    BNStats, add_branches, avg_kernel, bn_scale_shift, chain_kernels, conv_bias_to_fc, conv_to_fc, fuse_bn,
    fuse_bn_before_linear, identity_kernel, merge_1x1_kxk, merge_depthwise_pointwise, pad_kernel, scaled_sum,
)
from .walker import (
    REPARAM_METHODS, convert_children, find_reparam_method, max_relative_error, model_relative_error,
    reparameterize_model,
)

__all__ = [
    "ReparamBlock", "assign_parameter", "BNStats", "chain_kernels", "scaled_sum", "add_branches", "avg_kernel", "bn_scale_shift", "conv_bias_to_fc",
    "conv_to_fc", "fuse_bn", "fuse_bn_before_linear", "identity_kernel", "merge_1x1_kxk",
    "merge_depthwise_pointwise", "pad_kernel", "REPARAM_METHODS", "convert_children", "find_reparam_method",
    "max_relative_error", "model_relative_error", "reparameterize_model",
]
