"""Task metrics: segmentation IoU (:mod:`.segmentation`), face verification (:mod:`.verification`)."""
