"""Checkpoints of the official RepVGG code (DingXiaoH/RepVGG @ eae7c52, ``repvgg.py``).

Released files are train-form bare state dicts (``RepVGG-A0-train.pth``); ``tools/convert.py`` writes
the deploy form; training checkpoints nest the state dict under ``model`` (unwrapped on reading),
and DDP's ``module.`` is removed. Same tensors as :class:`backbones.models.repvgg.RepVGG`:

=====================================  =====================================
official                               this project
=====================================  =====================================
``stage0.``                            ``stem.``
``stage{1..4}.{j}.``                   ``stage{1..4}.{j}.``
``rbr_dense.{conv,bn}.``               ``dense.{conv,bn}.``
``rbr_1x1.{conv,bn}.``                 ``pointwise.{conv,bn}.``
``rbr_identity.`` (a BatchNorm)        ``skip_bn.``
``rbr_reparam.`` (deploy)              ``reparam_conv.``
``linear.``                            ``fc.``
=====================================  =====================================

Official names (``RepVGG-A0`` ... ``RepVGG-B3g4``, the ``func_dict`` of ``repvgg.py``) map to the
registered ``repvgg_a0`` ... ``repvgg_b3g4`` (:data:`OFFICIAL_ARCHS`). RepVGG-D2se (SE blocks) and
RepVGGplus are other trees and are not read.
"""
from __future__ import annotations

from .renamed import BN_KEYS as _BN, RenamedLayout

__all__ = ["LAYOUT", "FORMAT", "OFFICIAL_ARCHS"]

OFFICIAL_ARCHS = {f"RepVGG-{size}": f"repvgg_{size.lower()}"
                  for size in ("A0", "A1", "A2", "B0", "B1", "B1g2", "B1g4", "B2", "B2g4", "B3", "B3g4")}

LAYOUT = RenamedLayout(
    name="official RepVGG checkpoint (DingXiaoH/RepVGG)",
    key=(rf"(stage0|stage[1-4]\.\d+)\.(rbr_(dense|1x1)\.(conv\.weight|bn\.{_BN})|rbr_identity\.{_BN}"
         r"|rbr_reparam\.(weight|bias))|linear\.(weight|bias)"),
    rules=(
        (r"^stage0\.", "stem."),
        (r"\.rbr_dense\.", ".dense."),
        (r"\.rbr_1x1\.", ".pointwise."),
        (r"\.rbr_identity\.", ".skip_bn."),
        (r"\.rbr_reparam\.", ".reparam_conv."),
        (r"^linear\.", "fc."),
    ),
)
FORMAT = LAYOUT.format
