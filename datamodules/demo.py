"""Embedded demo data, generated on first use into a cache folder, in the real on-disk layouts.

Nothing can be downloaded on the machines this project targets, so every task ships a small,
learnable synthetic dataset written in the same layout as the real one; the real loaders then
read it exactly as they read the real data.

- :func:`classification_demo`: ImageNet layout, ``root/{train,val}/<class>/*.JPEG``. Ten classes
  of drawn shapes (circle, square, ring, ...) with random colours, sizes, positions, rotation,
  background gradients and noise: a small CNN learns them in a few CPU minutes, and chance is 10%.

The cache folder is ``$REPMLP_DEMO_ROOT`` or ``~/.cache/repmlp-lightning/demo``. A set is written
to a temporary folder and renamed into place when complete, so concurrent processes (DDP ranks,
parallel test runs) never see a half-written set.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

__all__ = ["DEMO_ROOT_ENV", "default_demo_root", "classification_demo", "SHAPES"]

DEMO_ROOT_ENV = "REPMLP_DEMO_ROOT"
_COMPLETE = ".complete"
# Bump when the generator changes, so a cached set from an older version is not reused.
_CLASSIFICATION_VERSION = 2


def default_demo_root() -> Path:
    return Path(os.environ.get(DEMO_ROOT_ENV) or Path.home() / ".cache" / "repmlp-lightning" / "demo")


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` into a temporary sibling of ``target`` and rename it into place."""
    if (target / _COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        (tmp / _COMPLETE).write_text("ok\n")
        if target.exists() and not (target / _COMPLETE).exists():
            shutil.rmtree(target)  # an interrupted earlier attempt at the old, non-atomic path
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE).exists():  # not just another process finishing first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- shapes
def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float, star: bool = False) -> np.ndarray:
    points = []
    count = sides * 2 if star else sides
    for i in range(count):
        r = radius * (0.45 if star and i % 2 else 1.0)
        a = angle + 2 * np.pi * i / count
        points.append((cx + r * np.cos(a), cy + r * np.sin(a)))
    return np.round(np.array(points)).astype(np.int32)


def _draw_circle(img, cx, cy, r, angle, color):
    cv2.circle(img, (int(cx), int(cy)), int(r), color, -1, cv2.LINE_AA)


def _draw_ring(img, cx, cy, r, angle, color):
    cv2.circle(img, (int(cx), int(cy)), int(r), color, max(2, int(r * 0.3)), cv2.LINE_AA)


def _draw_square(img, cx, cy, r, angle, color):
    cv2.fillPoly(img, [_polygon(cx, cy, r, 4, angle)], color, cv2.LINE_AA)


def _draw_triangle(img, cx, cy, r, angle, color):
    cv2.fillPoly(img, [_polygon(cx, cy, r, 3, angle)], color, cv2.LINE_AA)


def _draw_star(img, cx, cy, r, angle, color):
    cv2.fillPoly(img, [_polygon(cx, cy, r, 5, angle, star=True)], color, cv2.LINE_AA)


def _draw_cross(img, cx, cy, r, angle, color):
    t = max(2, int(r * 0.35))
    for a in (angle, angle + np.pi / 2):
        dx, dy = r * np.cos(a), r * np.sin(a)
        cv2.line(img, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), color, t, cv2.LINE_AA)


def _draw_stripes(img, cx, cy, r, angle, color):
    h, w = img.shape[:2]
    period = max(4, int(r * 0.5))
    ys, xs = np.mgrid[0:h, 0:w]
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) // (period / 2)
    mask = (phase % 2 == 0) & ((xs - cx) ** 2 + (ys - cy) ** 2 <= (1.3 * r) ** 2)
    img[mask] = color


def _draw_checker(img, cx, cy, r, angle, color):
    h, w = img.shape[:2]
    cell = max(3, int(r * 0.4))
    ys, xs = np.mgrid[0:h, 0:w]
    mask = ((xs // cell + ys // cell) % 2 == 0) & (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    img[mask] = color


def _draw_dots(img, cx, cy, r, angle, color):
    for i in range(5):
        a = angle + 2 * np.pi * i / 5
        cv2.circle(img, (int(cx + 0.7 * r * np.cos(a)), int(cy + 0.7 * r * np.sin(a))),
                   max(2, int(r * 0.2)), color, -1, cv2.LINE_AA)


def _draw_hexagon(img, cx, cy, r, angle, color):
    cv2.fillPoly(img, [_polygon(cx, cy, r, 6, angle)], color, cv2.LINE_AA)


# Class name → drawing function; class indices follow the sorted names, as for ImageNet wnids.
SHAPES: dict[str, Callable] = {
    "checker": _draw_checker,
    "circle": _draw_circle,
    "cross": _draw_cross,
    "dots": _draw_dots,
    "hexagon": _draw_hexagon,
    "ring": _draw_ring,
    "square": _draw_square,
    "star": _draw_star,
    "stripes": _draw_stripes,
    "triangle": _draw_triangle,
}


def _render(draw: Callable, size: int, rng: np.random.Generator) -> np.ndarray:
    """One BGR image of ``draw``'s shape on a random gradient background with noise."""
    c0 = rng.integers(0, 256, 3)
    c1 = np.clip(c0 + rng.integers(-60, 61, 3), 0, 255)
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    ramp = ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2)
    img = (c0 * (1 - ramp) + c1 * ramp).astype(np.float32) * np.ones((size, size, 1), np.float32)
    img = np.ascontiguousarray(img.astype(np.uint8))
    background = img.reshape(-1, 3).mean(0)
    while True:  # a foreground colour that stands out from the background
        color = rng.integers(0, 256, 3)
        if np.abs(color - background).sum() > 180:
            break
    r = size * rng.uniform(0.24, 0.36)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    draw(img, cx, cy, r, rng.uniform(0, 2 * np.pi), tuple(int(c) for c in color))
    noise = rng.normal(0, rng.uniform(2, 12), img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def classification_demo(
    root: Optional[str | os.PathLike] = None,
    train_per_class: int = 200,
    val_per_class: int = 50,
    image_size: int = 80,
    seed: int = 0,
) -> Path:
    """The classification demo set (ImageNet layout); generated on the first call, then reused.

    Returns the dataset root holding ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``.
    Different arguments give different cache folders.
    """
    base = Path(root) if root is not None else default_demo_root()
    name = f"classification-v{_CLASSIFICATION_VERSION}-{train_per_class}-{val_per_class}-{image_size}px-s{seed}"

    def build(folder: Path) -> None:
        rng = np.random.default_rng(seed)
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for label, (cls, draw) in enumerate(sorted(SHAPES.items())):
                out = folder / split / cls
                out.mkdir(parents=True)
                for i in range(count):
                    img = _render(draw, image_size, rng)
                    ok = cv2.imwrite(str(out / f"{cls}_{split}_{i:05d}.JPEG"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
                    if not ok:
                        raise OSError(f"cannot write demo image into {out}")

    return _build_once(base / name, build)
