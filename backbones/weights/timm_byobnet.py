"""RepVGG and MobileOne checkpoints in timm's layout (``timm/models/byobnet.py`` @ aa4b585).

timm builds both as a ByobNet: ``stem``, ``stages.{s}.{b}``, ``head.fc``; its hub weights are the
official ones renamed, train form (``RepVggBlock``, ``MobileOneBlock``), or deploy form after
``reparameterize()``. Same tensors as this project's models:

=====================================  =====================================
timm                                   this project
=====================================  =====================================
``stages.{s}.{b}.``                    ``stage{s+1}.{b}.``
``conv_kxk.{conv,bn}.`` (RepVGG)       ``dense.{conv,bn}.``
``conv_kxk.{i}.{conv,bn}.`` (MobileOne) ``convs.{i}.{conv,bn}.``
``conv_1x1.{conv,bn}.`` (RepVGG)       ``pointwise.{conv,bn}.``
``conv_scale.{conv,bn}.`` (MobileOne)  ``scale.{conv,bn}.``
``identity.`` (BatchNormAct2d)         ``skip_bn.``
``reparam_conv.``                      ``reparam_conv.``
``attn.fc1.``, ``attn.fc2.`` (SE)      ``se.reduce.``, ``se.expand.``
``head.fc.``                           ``fc.``
=====================================  =====================================

timm's ``repvgg_a0`` ... ``repvgg_b3g4`` and ``mobileone_s0`` ... ``mobileone_s4`` carry the
registered names here. (timm builds a model constructed with ``inference_mode=True`` with
unpadded deploy convs; its ``reparameterize()`` pads them correctly, and so does this project.)
"""
from __future__ import annotations

from .renamed import BN_KEYS as _BN, RenamedLayout

__all__ = ["LAYOUT", "FORMAT"]

_CONV_BN = rf"(conv\.weight|bn\.{_BN})"
LAYOUT = RenamedLayout(
    name="timm byobnet checkpoint (RepVGG / MobileOne)",
    key=(rf"(stem|stages\.\d+\.\d+)\.(conv_kxk\.(\d+\.)?{_CONV_BN}|conv_(1x1|scale)\.{_CONV_BN}|identity\.{_BN}"
         r"|reparam_conv\.(weight|bias)|attn\.fc[12]\.(weight|bias))|head\.fc\.(weight|bias)"),
    rules=(
        (r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}."),
        (r"\.conv_kxk\.(\d+)\.", r".convs.\1."),
        (r"\.conv_kxk\.", ".dense."),
        (r"\.conv_1x1\.", ".pointwise."),
        (r"\.conv_scale\.", ".scale."),
        (r"\.identity\.", ".skip_bn."),
        (r"\.attn\.fc1\.", ".se.reduce."),
        (r"\.attn\.fc2\.", ".se.expand."),
        (r"^head\.fc\.", "fc."),
    ),
)
FORMAT = LAYOUT.format
