"""RepMLPNet checkpoints of MMPretrain (open-mmlab/mmpretrain @ ee7f2e8,
``mmpretrain/models/backbones/repmlp.py``; ``configs/repmlp/``).

MMPretrain's ``RepMLPNet`` is the official network (:mod:`.official_repmlpnet`) under other names,
inside an ``ImageClassifier`` (``backbone.`` prefix, ``GlobalAveragePooling`` neck, ``LinearClsHead``
``head.fc``). Its released files (``repmlp-base_3rdparty_8xb64_in1k_20220330-1cb1f11b.pth``, the
``-256px`` one: the official B224 and B256 weights, converted) are ``{"meta", "state_dict"}``, the
state dict being read from ``state_dict``; a backbone saved alone (no ``backbone.`` prefix, no
``head.fc``) is read too:

=====================================================  =====================================================
MMPretrain (``backbone.`` omitted)                     this project
=====================================================  =====================================================
``patch_embed.projection.``, ``patch_embed.norm.``      ``stem.conv.``, ``stem.bn.``
``stages.{i}.{j}.norm1.``                              ``stage{i+1}.{2j}.pre_bn.`` (the RepMLP unit)
``stages.{i}.{j}.repmlp_block.``                       ``stage{i+1}.{2j}.mlp.``
``  gp.conv1.conv.``, ``gp.conv2.conv.`` (SELayer)       ``  gp.reduce.``, ``gp.expand.``
``  fc3.``, ``fc3_bn.``                                ``  fc3.``, ``fc3_bn.``
``  repconv{k}.{conv,bn}.`` (ConvModule)               ``  local.{k}x{k}.{conv,bn}.``
``stages.{i}.{j}.norm2.``                              ``stage{i+1}.{2j+1}.pre_bn.`` (the ConvFFN)
``stages.{i}.{j}.ffn_block.ffn_fc{1,2}.{conv,bn}.``    ``stage{i+1}.{2j+1}.pw{1,2}.{conv,bn}.``
``downsample_layers.{i}.{conv,bn}.``                   ``transition{i+1}.{conv,bn}.``
``final_norm.``                                        ``head.norm.``
``head.fc.`` (no ``backbone.``)                        ``head.fc.``
=====================================================  =====================================================

The deploy form (``switch_to_deploy``, or the ``deploy=True`` configs, one of them spelled
``repmlp-base_delopy_8xb64_in1k.py``) is the official one: a biased ``fc3``, no ``fc3_bn`` or
``repconv*``, every other BN kept; it is folded to this project's BN-free deploy form
(:func:`.official_repmlpnet.deploy_to_ours`). The Local Perceptron's kernels are read from a train
file (the class default is ``(3,)``, the configs use ``(1, 3)``).

MMPretrain's Global Perceptron is ``make_divisible(C // 4, 8)`` wide, the official one ``C // 4``:
equal for the published 'b' arch (and T, L), not for a stage width of 80 (D256: 24 against 20) or
16 (8 against 4); a file whose widths are not ``C // r`` for one r is refused with a message naming
them. ``_convert_conv_to_fc`` (``switch_to_deploy``) is wrong only for non-square partitions, which
no released file has; it does not affect the tensors read here.
"""
from __future__ import annotations


from .formats import WeightFormat
from .official_repmlpnet import read_repmlpnet, unit_prefix  # stages.i.j -> stage{i+1}.{2j(+1)}
from .renamed import BN_KEYS as _BN, RenamedLayout

__all__ = ["LAYOUT", "FORMAT"]

_UNIT = rf"(conv\.weight|bn\.{_BN})"  # ConvModule with a BN: a bias-free conv and its BN


LAYOUT = RenamedLayout(
    name="MMPretrain RepMLPNet checkpoint (open-mmlab/mmpretrain)",
    key=(rf"(backbone\.)?(patch_embed\.(projection\.weight|norm\.{_BN})"
         rf"|stages\.\d+\.\d+\.(norm[12]\.{_BN}|ffn_block\.ffn_fc[12]\.{_UNIT}"
         rf"|repmlp_block\.(gp\.conv[12]\.conv\.(weight|bias)|fc3\.(weight|bias)|fc3_bn\.{_BN}|repconv\d+\.{_UNIT}))"
         rf"|downsample_layers\.\d+\.{_UNIT}|final_norm\.{_BN})|head\.fc\.(weight|bias)"),
    rules=(
        (r"^backbone\.", ""),
        (r"^patch_embed\.projection\.", "stem.conv."),
        (r"^patch_embed\.norm\.", "stem.bn."),
        (r"^stages\.(\d+)\.(\d+)\.norm1\.", lambda m: unit_prefix(m, 0) + "pre_bn."),
        (r"^stages\.(\d+)\.(\d+)\.repmlp_block\.", lambda m: unit_prefix(m, 0) + "mlp."),
        (r"^stages\.(\d+)\.(\d+)\.norm2\.", lambda m: unit_prefix(m, 1) + "pre_bn."),
        (r"^stages\.(\d+)\.(\d+)\.ffn_block\.ffn_fc([12])\.", lambda m: unit_prefix(m, 1) + f"pw{m.group(3)}."),
        (r"\.mlp\.gp\.conv1\.conv\.", ".mlp.gp.reduce."),
        (r"\.mlp\.gp\.conv2\.conv\.", ".mlp.gp.expand."),
        (r"\.mlp\.repconv(\d+)\.", r".mlp.local.\1x\1."),
        (r"^downsample_layers\.(\d+)\.", lambda m: f"transition{int(m.group(1)) + 1}."),
        (r"^final_norm\.", "head.norm."),
    ),
    signature=r"^(backbone\.)?stages\.\d+\.\d+\.norm1\.",  # the official files' prebn1, whose other keys these share
)

FORMAT = WeightFormat(LAYOUT.name, lambda state_dict, meta: LAYOUT.matches(state_dict),
                      lambda state_dict, meta, path: read_repmlpnet(LAYOUT, state_dict, path))
