"""Embedded demo data, generated on first use into a cache folder, in the real on-disk layouts.

Nothing can be downloaded on the machines this project targets, so every task ships a small,
learnable synthetic dataset written in the same layout as the real one; the real loaders then
read it exactly as they read the real data.

- :func:`classification_demo`: ImageNet layout, ``root/{train,val}/<class>/*.JPEG``. Ten classes
  of drawn shapes (circle, square, ring, ...) with random colours, sizes, positions, rotation,
  background gradients and noise: a small CNN learns them in a few CPU minutes, and chance is 10%.
- :func:`cityscapes_demo`: Cityscapes layout, ``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png``
  and ``root/gtFine/<split>/<city>/*_gtFine_labelIds.png`` (label *ids*, mapped to trainIds by the
  loader). Procedural street scenes: sky, a skyline of windowed buildings, a perspective road
  between sidewalks, grass, trees, fences, poles with signs and lights, cars and people, and an
  ego-vehicle strip (ignored); class colours vary around typical colours, with texture and noise.

The cache folder is ``$REPMLP_DEMO_ROOT`` or ``~/.cache/repmlp-lightning/demo``. A set is written
to a temporary folder and renamed into place when complete, so concurrent processes (DDP ranks,
parallel test runs) never see a half-written set.
"""
from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

__all__ = ["DEMO_ROOT_ENV", "default_demo_root", "generator_identity", "classification_demo", "SHAPES", "cityscapes_demo",
           "street_scene", "CLASSIFICATION_DEMO_VERSION", "CITYSCAPES_DEMO_VERSION"]

DEMO_ROOT_ENV = "REPMLP_DEMO_ROOT"
_COMPLETE = ".complete"
# Bump when the generator changes, so a cached set from an older version is not reused.
CLASSIFICATION_DEMO_VERSION = 2
CITYSCAPES_DEMO_VERSION = 1


def default_demo_root() -> Path:
    return Path(os.environ.get(DEMO_ROOT_ENV) or Path.home() / ".cache" / "repmlp-lightning" / "demo")


def generator_identity(generator: Callable[..., Path], version: int, **kwargs: Any) -> dict[str, Any]:
    """What determines the data that ``generator(**kwargs)`` writes, JSON-able: its ``name``, its
    ``version`` and every argument (defaults filled in) except the cache folder ``root``."""
    bound = inspect.signature(generator).bind(**kwargs)
    bound.apply_defaults()
    return {"name": generator.__name__, "version": version, **{k: v for k, v in bound.arguments.items() if k != "root"}}


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
    name = f"classification-v{CLASSIFICATION_DEMO_VERSION}-{train_per_class}-{val_per_class}-{image_size}px-s{seed}"

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


# --------------------------------------------------------------------------- street scenes
# Cityscapes label ids (cityscapesscripts/helpers/labels.py) drawn by the street-scene generator.
_ID_UNLABELED, _ID_EGO_VEHICLE = 0, 1
_ID_ROAD, _ID_SIDEWALK, _ID_BUILDING, _ID_FENCE = 7, 8, 11, 13
_ID_POLE, _ID_TRAFFIC_LIGHT, _ID_TRAFFIC_SIGN = 17, 19, 20
_ID_VEGETATION, _ID_TERRAIN, _ID_SKY, _ID_PERSON, _ID_CAR = 21, 22, 23, 24, 26


def _texture_table(values: dict[int, float]) -> np.ndarray:
    table = np.zeros(256, np.float32)
    for label_id, value in values.items():
        table[label_id] = value
    return table


# Per label id, the standard deviation (grey levels) of per-pixel grain and of coarse blotches: the
# texture, not only the colour, tells vegetation from terrain and road from sidewalk.
_GRAIN = _texture_table({
    _ID_SKY: 2, _ID_BUILDING: 5, _ID_ROAD: 6, _ID_SIDEWALK: 5, _ID_VEGETATION: 16, _ID_TERRAIN: 10,
    _ID_FENCE: 6, _ID_POLE: 3, _ID_TRAFFIC_SIGN: 3, _ID_TRAFFIC_LIGHT: 3, _ID_CAR: 4, _ID_PERSON: 5,
    _ID_EGO_VEHICLE: 3, _ID_UNLABELED: 2,
})
_BLOTCH = _texture_table({
    _ID_SKY: 4, _ID_BUILDING: 6, _ID_ROAD: 7, _ID_SIDEWALK: 4, _ID_VEGETATION: 22, _ID_TERRAIN: 14,
})
_FACADES = ((120, 118, 115), (160, 142, 120), (182, 172, 150), (100, 88, 82), (140, 128, 132), (88, 92, 100))
_CAR_COLOURS = ((225, 225, 228), (165, 168, 172), (35, 35, 40), (170, 30, 30), (30, 60, 140), (85, 88, 92), (200, 190, 160))
_CLOTHES = ((40, 40, 50), (150, 30, 40), (30, 60, 120), (200, 200, 195), (90, 100, 60), (120, 90, 60))


def _jitter(rng: np.random.Generator, colour: tuple[float, ...], spread: float) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-spread, spread, 3), 0, 255).astype(np.float32)


class _Scene:
    """An RGB float image and its Cityscapes label-id map, painted together so they always agree."""

    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.rgb = np.zeros((height, width, 3), np.float32)
        self.ids = np.zeros((height, width), np.uint8)

    def paint(self, mask: np.ndarray, colour: np.ndarray, label_id: int, alpha: float = 1.0) -> None:
        self.rgb[mask] = colour if alpha >= 1 else (1 - alpha) * self.rgb[mask] + alpha * np.asarray(colour)
        self.ids[mask] = label_id

    def _mask(self, draw: Callable[[np.ndarray], None]) -> np.ndarray:
        mask = np.zeros((self.h, self.w), np.uint8)
        draw(mask)
        return mask.view(bool)

    def poly(self, points, colour, label_id: int, alpha: float = 1.0) -> None:
        pts = np.round(np.asarray(points, np.float64)).astype(np.int32)
        self.paint(self._mask(lambda m: cv2.fillPoly(m, [pts], 1)), colour, label_id, alpha)

    def ellipse(self, cx, cy, ax, ay, colour, label_id: int) -> None:
        centre, axes = (int(round(cx)), int(round(cy))), (max(1, int(round(ax))), max(1, int(round(ay))))
        self.paint(self._mask(lambda m: cv2.ellipse(m, centre, axes, 0, 0, 360, 1, -1)), colour, label_id)

    def rect(self, x0, y0, x1, y1, colour, label_id: int) -> None:
        x0, x1 = max(0, int(round(x0))), min(self.w, int(round(x1)))
        y0, y1 = max(0, int(round(y0))), min(self.h, int(round(y1)))
        if x1 > x0 and y1 > y0:
            self.rgb[y0:y1, x0:x1] = colour
            self.ids[y0:y1, x0:x1] = label_id


def _draw_sky_and_buildings(s: _Scene, rng: np.random.Generator, horizon: int) -> None:
    w, h = s.w, s.h
    if rng.random() < 0.3:  # overcast
        top, low = _jitter(rng, (150, 158, 168), 15), _jitter(rng, (200, 204, 210), 12)
    else:
        top, low = _jitter(rng, (85, 135, 200), 20), _jitter(rng, (180, 205, 230), 15)
    t = np.clip(np.arange(h, dtype=np.float32) / max(horizon, 1), 0, 1)[:, None, None]
    s.rgb[:] = top * (1 - t) + low * t
    s.ids[:] = _ID_SKY
    for _ in range(int(rng.integers(0, 4))):  # clouds
        s.ellipse(rng.uniform(0, w), rng.uniform(0, horizon * 0.5), w * rng.uniform(0.04, 0.12),
                  h * rng.uniform(0.02, 0.05), _jitter(rng, (228, 230, 234), 10), _ID_SKY)
    # a skyline of blocks with window grids; gaps let the sky through down to the horizon
    x = -rng.uniform(0, 0.1) * w
    while x < w:
        bw = w * rng.uniform(0.08, 0.22)
        if rng.random() < 0.12:
            x += bw * 0.6
            continue
        top_y = rng.uniform(0.03 * h, max(0.04 * h, horizon - 0.12 * h))
        s.rect(x, top_y, x + bw, horizon + 1, _jitter(rng, _FACADES[rng.integers(len(_FACADES))], 15), _ID_BUILDING)
        ww, wh = max(1.0, bw * rng.uniform(0.08, 0.14)), max(1.0, h * rng.uniform(0.025, 0.045))
        gx, gy = ww * rng.uniform(1.8, 2.6), wh * rng.uniform(1.8, 2.5)
        glass, lit = _jitter(rng, (50, 60, 75), 15), _jitter(rng, (215, 200, 140), 15)
        lit_windows = rng.random((64, 64)) < 0.1
        for r, yy in enumerate(np.arange(top_y + 0.6 * gy, horizon - wh - 1, gy)[:64]):
            for c, xx in enumerate(np.arange(x + 0.5 * gx, x + bw - ww - 1, gx)[:64]):
                s.rect(xx, yy, xx + ww, yy + wh, lit if lit_windows[r, c] else glass, _ID_BUILDING)
        x += bw


def street_scene(rng: np.random.Generator, width: int = 256, height: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One procedural street scene: RGB ``uint8 (H, W, 3)`` and Cityscapes label ids ``uint8 (H, W)``."""
    w, h = width, height
    s = _Scene(w, h)
    horizon = int(round(h * rng.uniform(0.38, 0.5)))
    ground = h - horizon
    vx = w * rng.uniform(0.35, 0.65)  # vanishing point column
    _draw_sky_and_buildings(s, rng, horizon)

    # ground: sidewalk everywhere below the horizon, with perspective-spaced paving joints
    paving = _jitter(rng, (162, 156, 148), 18)
    s.rect(0, horizon, w, h, paving, _ID_SIDEWALK)
    for k in range(1, 14):
        y = horizon + ground * (k / 14) ** 1.7
        s.rect(0, y, w, y + max(1, round(k / 10)), paving * 0.8, _ID_SIDEWALK)

    half = w * rng.uniform(0.015, 0.05)  # road half width at the horizon
    left_bottom, right_bottom = w * rng.uniform(-0.35, 0.12), w * rng.uniform(0.88, 1.35)
    curb = w * rng.uniform(0.18, 0.45)  # sidewalk width at the bottom row

    def road_edge(y: float, side: int) -> float:
        t = (y - horizon) / ground
        return vx + side * half + t * ((left_bottom if side < 0 else right_bottom) - vx - side * half)

    def outer_edge(y: float, side: int) -> float:
        t = (y - horizon) / ground
        return road_edge(y, side) + side * (1.5 * half * (1 - t) + curb * t)

    for side in (-1, 1):  # grass beyond the sidewalk
        if rng.random() < 0.55:
            far = -w if side < 0 else 2 * w
            s.poly([(outer_edge(horizon, side), horizon), (outer_edge(h, side), h), (far, h), (far, horizon)],
                   _jitter(rng, (130, 158, 92), 18), _ID_TERRAIN)
    asphalt = _jitter(rng, (92, 92, 98), 16)
    s.poly([(vx - half, horizon), (vx + half, horizon), (right_bottom, h), (left_bottom, h)], asphalt, _ID_ROAD)
    marking = _jitter(rng, (222, 222, 212), 12)
    for k in range(10):  # dashed centre line: painted on the road, still road
        t0, t1 = (k / 10) ** 1.5, ((k + 0.5) / 10) ** 1.5
        pts = []
        for t, sign in ((t0, -1), (t0, 1), (t1, 1), (t1, -1)):
            y = horizon + t * ground
            centre = (road_edge(y, -1) + road_edge(y, 1)) / 2
            pts.append((centre + sign * max(0.5, t * w * 0.008), y))
        s.poly(pts, marking, _ID_ROAD)

    if rng.random() < 0.45:  # a perspective fence along the outer edge of one sidewalk
        side = -1 if rng.random() < 0.5 else 1
        t0, t1 = rng.uniform(0.0, 0.3), rng.uniform(0.45, 1.0)
        height_at = lambda t: h * (0.03 + 0.22 * t)  # noqa: E731
        y0, y1 = horizon + t0 * ground, horizon + t1 * ground
        x0, x1 = outer_edge(y0, side), outer_edge(y1, side)
        colour = _jitter(rng, (150, 135, 115), 20)
        s.poly([(x0, y0), (x1, y1), (x1, y1 - height_at(t1)), (x0, y0 - height_at(t0))], colour, _ID_FENCE, alpha=0.55)
        for t in np.linspace(t0, t1, 7):  # posts
            y = horizon + t * ground
            x = outer_edge(y, side)
            s.rect(x, y - height_at(t), x + max(1, t * w * 0.01), y, colour * 0.7, _ID_FENCE)

    # objects, painted far to near
    objects: list[tuple[float, Callable[[], None]]] = []

    def tree(t: float, side: int) -> None:
        y = horizon + t * ground
        x = outer_edge(y, side) + side * rng.uniform(-0.02, 0.1) * w
        size = h * (0.15 + 0.55 * t) * rng.uniform(0.7, 1.1)
        s.rect(x - size * 0.05, y - size * 0.9, x + max(1, size * 0.05), y, _jitter(rng, (90, 70, 50), 12), _ID_VEGETATION)
        leaves = _jitter(rng, (68, 112, 42), 18)
        for _ in range(int(rng.integers(3, 7))):
            s.ellipse(x + rng.uniform(-0.4, 0.4) * size, y - size * rng.uniform(0.9, 1.3), size * rng.uniform(0.25, 0.45),
                      size * rng.uniform(0.25, 0.4), _jitter(rng, leaves, 12), _ID_VEGETATION)

    def pole(t: float, side: int) -> None:
        y = horizon + t * ground
        x = road_edge(y, side) + (outer_edge(y, side) - road_edge(y, side)) * rng.uniform(0.1, 0.5)  # on the sidewalk
        ph, pw = h * (0.12 + 0.55 * t), max(1.0, w * 0.006 * (0.3 + t))
        s.rect(x - pw / 2, y - ph, x + pw / 2 + 1, y, _jitter(rng, (120, 122, 125), 20), _ID_POLE)
        r = max(1.5, h * 0.045 * (0.3 + t))
        kind = rng.random()
        if kind < 0.35:  # round sign: red ring, white face
            s.ellipse(x, y - ph + r, r, r, _jitter(rng, (200, 30, 35), 15), _ID_TRAFFIC_SIGN)
            s.ellipse(x, y - ph + r, r * 0.65, r * 0.65, _jitter(rng, (235, 235, 235), 10), _ID_TRAFFIC_SIGN)
        elif kind < 0.55:  # square blue sign
            s.rect(x - r, y - ph, x + r, y - ph + 2 * r, _jitter(rng, (30, 80, 190), 20), _ID_TRAFFIC_SIGN)
        elif kind < 0.7:  # warning triangle
            s.poly([(x - r, y - ph + 1.8 * r), (x + r, y - ph + 1.8 * r), (x, y - ph)],
                   _jitter(rng, (230, 200, 40), 15), _ID_TRAFFIC_SIGN)
        elif kind < 0.9:  # traffic light: dark box, one lit lamp
            bw = max(2.0, 3.5 * pw)
            s.rect(x - bw / 2, y - ph, x + bw / 2 + 1, y - ph + 2.6 * bw, _jitter(rng, (35, 35, 38), 8), _ID_TRAFFIC_LIGHT)
            lamp = int(rng.integers(3))
            s.ellipse(x, y - ph + (0.45 + 0.85 * lamp) * bw, bw * 0.3, bw * 0.3,
                      ((230, 40, 30), (240, 170, 30), (40, 220, 90))[lamp], _ID_TRAFFIC_LIGHT)

    def car(t: float) -> None:
        y = horizon + t * ground
        left, right = road_edge(y, -1), road_edge(y, 1)
        side_view = rng.random() < 0.35
        cw = (right - left) * rng.uniform(0.18, 0.3) * (1.7 if side_view else 1.0)
        ch = cw * (rng.uniform(0.35, 0.45) if side_view else rng.uniform(0.6, 0.75))
        if right - left <= cw + 2:
            return
        x = rng.uniform(left, right - cw)
        body = _jitter(rng, _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))], 15)
        glass, tyre = _jitter(rng, (40, 48, 60), 10), _jitter(rng, (22, 22, 24), 6)
        if side_view:
            s.rect(x, y - ch * 0.62, x + cw, y - ch * 0.15, body, _ID_CAR)
            s.poly([(x + cw * 0.18, y - ch * 0.6), (x + cw * 0.3, y - ch), (x + cw * 0.72, y - ch), (x + cw * 0.85, y - ch * 0.6)],
                   body, _ID_CAR)
            s.poly([(x + cw * 0.25, y - ch * 0.62), (x + cw * 0.33, y - ch * 0.92), (x + cw * 0.7, y - ch * 0.92),
                    (x + cw * 0.78, y - ch * 0.62)], glass, _ID_CAR)
            for cx in (x + cw * 0.2, x + cw * 0.8):
                s.ellipse(cx, y - ch * 0.17, ch * 0.17, ch * 0.17, tyre, _ID_CAR)
        else:
            s.rect(x, y - ch * 0.15, x + cw * 0.18, y, tyre, _ID_CAR)
            s.rect(x + cw * 0.82, y - ch * 0.15, x + cw, y, tyre, _ID_CAR)
            s.rect(x, y - ch * 0.62, x + cw, y - ch * 0.12, body, _ID_CAR)
            s.poly([(x + cw * 0.1, y - ch * 0.6), (x + cw * 0.2, y - ch), (x + cw * 0.8, y - ch), (x + cw * 0.9, y - ch * 0.6)],
                   body, _ID_CAR)
            s.poly([(x + cw * 0.17, y - ch * 0.62), (x + cw * 0.25, y - ch * 0.92), (x + cw * 0.75, y - ch * 0.92),
                    (x + cw * 0.83, y - ch * 0.62)], glass, _ID_CAR)
            for lx in (x + cw * 0.04, x + cw * 0.84):  # rear lights
                s.rect(lx, y - ch * 0.5, lx + cw * 0.12, y - ch * 0.4, _jitter(rng, (200, 30, 30), 15), _ID_CAR)

    def person(t: float, side: int) -> None:
        y = horizon + t * ground
        inner, outer = road_edge(y, side), outer_edge(y, side)
        x = inner + (outer - inner) * rng.uniform(0.15, 0.85)
        ph = h * (0.08 + 0.35 * t) * rng.uniform(0.85, 1.1)
        trousers, shirt = _jitter(rng, (45, 45, 55), 15), _jitter(rng, _CLOTHES[rng.integers(len(_CLOTHES))], 20)
        leg = max(1.0, ph * 0.07)
        s.rect(x - leg * 1.3, y - ph * 0.45, x - leg * 0.3, y, trousers, _ID_PERSON)
        s.rect(x + leg * 0.3, y - ph * 0.45, x + leg * 1.3, y, trousers, _ID_PERSON)
        s.ellipse(x, y - ph * 0.62, ph * 0.14, ph * 0.2, shirt, _ID_PERSON)
        s.ellipse(x, y - ph * 0.89, ph * 0.08, ph * 0.09, _jitter(rng, (205, 165, 130), 20), _ID_PERSON)

    def side() -> int:
        return -1 if rng.random() < 0.5 else 1

    for _ in range(int(rng.integers(1, 5))):
        t = rng.uniform(0.0, 0.6)
        objects.append((t, lambda t=t, sd=side(): tree(t, sd)))
    for _ in range(int(rng.integers(1, 5))):
        t = rng.uniform(0.05, 0.9)
        objects.append((t, lambda t=t, sd=side(): pole(t, sd)))
    for _ in range(int(rng.integers(1, 5))):
        t = rng.uniform(0.1, 1.0)
        objects.append((t, lambda t=t: car(t)))
    for _ in range(int(rng.integers(0, 5))):
        t = rng.uniform(0.05, 0.95)
        objects.append((t, lambda t=t, sd=side(): person(t, sd)))
    for _, draw in sorted(objects, key=lambda o: o[0]):
        draw()

    if rng.random() < 0.75:  # the ego vehicle's bonnet (ignored, as in Cityscapes)
        eh = h * rng.uniform(0.05, 0.11)
        s.ellipse(w / 2 + rng.uniform(-0.1, 0.1) * w, h + eh * 0.4, w * 0.75, eh * 1.4, _jitter(rng, (32, 34, 38), 8), _ID_EGO_VEHICLE)
    if rng.random() < 0.4:  # a black unlabeled border row, like Cityscapes' rectification border
        s.rect(0, h - max(1, round(h * 0.015)), w, h, np.zeros(3, np.float32), _ID_UNLABELED)

    # texture: grain and coarse blotches by class, then per-image lighting
    blotch = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), sigmaX=max(1.0, w / 80))
    blotch /= blotch.std() + 1e-6
    grain = rng.normal(0, 1, (h, w, 1)).astype(np.float32) + 0.3 * rng.normal(0, 1, (h, w, 3)).astype(np.float32)
    rgb = s.rgb + _GRAIN[s.ids][..., None] * grain + (_BLOTCH[s.ids] * blotch)[..., None]
    light = rng.uniform(0.8, 1.15) * (1 + rng.uniform(-0.12, 0.12) * (np.arange(w, dtype=np.float32) / w - 0.5))
    rgb = rgb * light[None, :, None] + rng.uniform(-10, 10)
    if rng.random() < 0.5:
        rgb = cv2.GaussianBlur(rgb, (0, 0), sigmaX=0.6)
    return np.clip(rgb, 0, 255).astype(np.uint8), s.ids


def cityscapes_demo(
    root: Optional[str | os.PathLike] = None,
    train_images: int = 160,
    val_images: int = 16,
    width: int = 256,
    height: int = 128,
    seed: int = 0,
) -> Path:
    """The Cityscapes-layout street-scene demo set; generated on the first call, then reused.

    Returns the dataset root holding ``leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png``
    and ``gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (single-channel uint8
    Cityscapes label *ids*). Train images are split between two cities, val images use a third.
    Different arguments give different cache folders.
    """
    if train_images < 1 or val_images < 1 or width < 32 or height < 16:
        raise ValueError(f"cityscapes_demo needs >= 1 image per split and at least 32x16 pixels, got "
                         f"{train_images}/{val_images} images of {width}x{height}")
    base = Path(root) if root is not None else default_demo_root()
    name = f"cityscapes-v{CITYSCAPES_DEMO_VERSION}-{train_images}-{val_images}-{width}x{height}-s{seed}"

    def build(folder: Path) -> None:
        rng = np.random.default_rng(seed)
        split_cities = {
            "train": ["demotown"] * ((train_images + 1) // 2) + ["samplecity"] * (train_images // 2),
            "val": ["valville"] * val_images,
        }
        for split, cities in split_cities.items():
            for seq, city in enumerate(cities):
                image, ids = street_scene(rng, width, height)
                stem = f"{city}_{seq:06d}_000019"
                for kind, array, suffix in (("leftImg8bit", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), "leftImg8bit"),
                                            ("gtFine", ids, "gtFine_labelIds")):
                    out = folder / kind / split / city
                    out.mkdir(parents=True, exist_ok=True)
                    if not cv2.imwrite(str(out / f"{stem}_{suffix}.png"), array):
                        raise OSError(f"cannot write demo file into {out}")

    return _build_once(base / name, build)
