"""Weight files: reading and writing (:mod:`.io`), what a file holds (:mod:`.formats`), the one
reader every caller uses (:func:`read_weights`, :mod:`.resolve`), and one module per foreign
layout (:mod:`.official_repmlp`, :mod:`.mmseg`)."""
from .formats import Weights, WeightFormat
from .resolve import FORMATS, read_weights, weights_of_checkpoint

__all__ = ["FORMATS", "Weights", "WeightFormat", "read_weights", "weights_of_checkpoint"]
