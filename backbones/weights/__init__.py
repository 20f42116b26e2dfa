"""Weight files: reading and writing (:mod:`.io`), and one module per foreign layout
(:mod:`.official_repmlp`, :mod:`.mmseg`)."""
