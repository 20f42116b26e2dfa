"""Weight files: reading and writing (:mod:`.io`), what a file holds (:mod:`.formats`), the one
reader every caller uses (:func:`read_weights`, :mod:`.resolve`), and one module per foreign
layout (:mod:`.official_repmlp`, :mod:`.official_repvgg`, :mod:`.official_mobileone`,
:mod:`.timm_byobnet`, :mod:`.official_replknet`, :mod:`.official_acnet`, :mod:`.official_dbb`,
:mod:`.official_orepa`, :mod:`.official_repmlpnet`, :mod:`.mmpretrain_repmlp`, :mod:`.mmseg`; the
key-renaming ones built on :mod:`.renamed`, deploy files' kept BNs folded by :mod:`.folding`)."""
from .formats import Weights, WeightFormat
from .resolve import FORMATS, OFFICIAL_ARCHS, load_backbone, read_weights, weights_of_checkpoint

__all__ = ["FORMATS", "OFFICIAL_ARCHS", "Weights", "WeightFormat", "load_backbone", "read_weights",
           "weights_of_checkpoint"]
