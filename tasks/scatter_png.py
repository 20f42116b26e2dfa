"""Labelled scatter plots side by side, drawn with OpenCV into a PNG (no plotting library needed).

Used by :mod:`tasks.compare`: one point per model, the baseline drawn as a red diamond with a
dashed line at its metric, every point named.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = ["Point", "Panel", "draw_panels", "nice_ticks"]

FONT = cv2.FONT_HERSHEY_SIMPLEX
INK, GRID, BLUE, RED = (40, 40, 40), (225, 225, 225), (180, 110, 30), (40, 40, 210)  # BGR
PANEL_W, PANEL_H = 620, 500
LEFT, RIGHT, TOP, BOTTOM = 90, 30, 60, 70


@dataclass
class Point:
    x: float
    y: float
    label: str
    baseline: bool = False


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    points: list[Point] = field(default_factory=list)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    span = hi - lo
    raw = span / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.12 if hi > lo else max(abs(hi) * 0.1, 1e-3)
    return lo - pad, hi + pad


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.3g}"


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45, color=INK, thickness: int = 1) -> None:
    cv2.putText(img, text, org, FONT, scale, color, thickness, cv2.LINE_AA)


def _vertical_text(img: np.ndarray, text: str, center: tuple[int, int], scale: float = 0.5) -> None:
    (w, h), base = cv2.getTextSize(text, FONT, scale, 1)
    patch = np.full((h + base + 4, w + 4, 3), 255, np.uint8)
    _text(patch, text, (2, h + 2), scale)
    patch = cv2.rotate(patch, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0, x0 = max(0, center[1] - patch.shape[0] // 2), max(0, center[0] - patch.shape[1] // 2)
    img[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = np.minimum(img[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]], patch)


def _draw_panel(img: np.ndarray, panel: Panel, x_off: int) -> None:
    x0, x1, y0, y1 = x_off + LEFT, x_off + PANEL_W - RIGHT, TOP, PANEL_H - BOTTOM
    xlo, xhi = _range([p.x for p in panel.points])
    ylo, yhi = _range([p.y for p in panel.points])

    def to_px(x: float, y: float) -> tuple[int, int]:
        return (int(round(x0 + (x - xlo) / (xhi - xlo) * (x1 - x0))), int(round(y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))))

    for t in nice_ticks(xlo, xhi):
        px = to_px(t, ylo)[0]
        cv2.line(img, (px, y0), (px, y1), GRID, 1)
        label = _fmt(t)
        _text(img, label, (px - cv2.getTextSize(label, FONT, 0.42, 1)[0][0] // 2, y1 + 20), 0.42)
    for t in nice_ticks(ylo, yhi):
        py = to_px(xlo, t)[1]
        cv2.line(img, (x0, py), (x1, py), GRID, 1)
        label = _fmt(t)
        _text(img, label, (x0 - 8 - cv2.getTextSize(label, FONT, 0.42, 1)[0][0], py + 5), 0.42)
    cv2.rectangle(img, (x0, y0), (x1, y1), INK, 1)
    (tw, _), _ = cv2.getTextSize(panel.title, FONT, 0.6, 1)
    _text(img, panel.title, ((x0 + x1 - tw) // 2, y0 - 20), 0.6, thickness=1)
    (lw, _), _ = cv2.getTextSize(panel.xlabel, FONT, 0.5, 1)
    _text(img, panel.xlabel, ((x0 + x1 - lw) // 2, y1 + 48), 0.5)
    _vertical_text(img, panel.ylabel, (x_off + 22, (y0 + y1) // 2))

    for p in panel.points:
        if p.baseline:  # dashed line at the baseline's metric
            py = to_px(xlo, p.y)[1]
            for x in range(x0, x1, 12):
                cv2.line(img, (x, py), (min(x + 6, x1), py), RED, 1, cv2.LINE_AA)
    taken: list[tuple[int, int, int, int]] = []
    for p in sorted(panel.points, key=lambda q: q.baseline):
        cx, cy = to_px(p.x, p.y)
        if p.baseline:
            diamond = np.array([(cx, cy - 9), (cx + 9, cy), (cx, cy + 9), (cx - 9, cy)], np.int32)
            cv2.fillPoly(img, [diamond], RED, cv2.LINE_AA)
        else:
            cv2.circle(img, (cx, cy), 7, BLUE, -1, cv2.LINE_AA)
        label = p.label + (" (baseline)" if p.baseline else "")
        (w, h), _ = cv2.getTextSize(label, FONT, 0.45, 1)
        lx = cx + 12 if cx + 12 + w <= x1 - 2 else cx - 12 - w
        ly = cy - 8
        while any(lx < bx1 and lx + w > bx0 and ly - h < by1 and ly > by0 for bx0, by0, bx1, by1 in taken):
            ly += h + 6  # step below a label already placed
        taken.append((lx, ly - h, lx + w, ly))
        _text(img, label, (lx, ly), 0.45, RED if p.baseline else INK)


def draw_panels(panels: list[Panel], path: str, caption: str = "") -> None:
    """Write ``panels`` side by side to the PNG ``path``; ``caption`` is printed along the bottom."""
    if not panels or any(not p.points for p in panels):
        raise ValueError("every panel needs at least one point")
    img = np.full((PANEL_H + (26 if caption else 0), PANEL_W * len(panels), 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        _draw_panel(img, panel, i * PANEL_W)
    if caption:
        _text(img, caption, (12, img.shape[0] - 10), 0.42, (90, 90, 90))
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
