"""Write Cityscapes ``*_gtFine_labelTrainIds.png`` next to every ``*_gtFine_labelIds.png``.

``python -m datamodules.cityscapes_train_ids ROOT [--splits train val]`` does what cityscapesscripts'
``createTrainIdLabelImgs.py`` and mmseg's ``tools/dataset_converters/cityscapes.py`` do, from the
``labelIds`` PNGs of the official ``gtFine`` download (no polygons needed). The loader reads
``labelIds`` directly too (mapped on the fly); the converted files save that lookup and are what
mmseg-trained tooling expects. Existing files are kept unless ``--overwrite``; each file is written
to a temporary name and renamed, so an interrupted run leaves no half-written label.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import cv2

from .cityscapes import LABEL_IDS_SUFFIX, LABEL_TRAINIDS_SUFFIX, read_label

__all__ = ["write_train_ids"]


def write_train_ids(root: str | os.PathLike, splits: Sequence[str] = ("train", "val"), overwrite: bool = False) -> int:
    """Convert every ``gtFine/<split>/**/*_gtFine_labelIds.png`` of ``splits``; returns the number written.

    Raises FileNotFoundError for a missing split folder and ValueError (naming the file) for a label
    with values outside the Cityscapes id table.
    """
    written = 0
    for split in splits:
        folder = Path(root) / "gtFine" / split
        if not folder.is_dir():
            raise FileNotFoundError(f"no label folder {folder} (expected ROOT/gtFine/<split>/<city>/*{LABEL_IDS_SUFFIX})")
        for source in sorted(folder.rglob(f"*{LABEL_IDS_SUFFIX}")):
            target = source.with_name(source.name[: -len(LABEL_IDS_SUFFIX)] + LABEL_TRAINIDS_SUFFIX)
            if target.exists() and not overwrite:
                continue
            tmp = target.with_name(f".{target.name}.tmp.png")
            if not cv2.imwrite(str(tmp), read_label(source, "labelIds")):
                raise OSError(f"could not write {tmp}")
            os.replace(tmp, target)
            written += 1
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.cityscapes_train_ids", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="Cityscapes root holding gtFine/")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing labelTrainIds files")
    args = parser.parse_args(argv)
    try:
        count = write_train_ids(args.root, args.splits, args.overwrite)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} labelTrainIds files under {Path(args.root) / 'gtFine'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
