"""Task heads: PSP, UPerNet and FCN decode heads (:mod:`.decode`), margin heads for face recognition (:mod:`.margin`)."""
