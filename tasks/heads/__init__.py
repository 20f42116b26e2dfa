"""Task heads: PSP and FCN decode heads (:mod:`.decode`), margin heads for face recognition (:mod:`.margin`)."""
