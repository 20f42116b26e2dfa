"""Labelled scatter plots side by side, drawn with matplotlib into PNG and SVG.

Used by :mod:`tasks.compare`: one point per model, the baseline a red diamond with a dashed line at
its metric, every point named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["Point", "Panel", "draw_panels", "FORMATS"]

FORMATS = ("png", "svg")
BLUE, RED = "#1f6eb4", "#d22828"


@dataclass
class Point:
    x: float
    y: float
    label: str
    baseline: bool = False
    group: str = ""  # e.g. the runtime and precision: one marker shape per group


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    points: list[Point] = field(default_factory=list)


MARKERS = "os^vP*Xph"


def _draw(ax: "plt.Axes", panel: Panel) -> None:
    for p in panel.points:
        if p.baseline:
            ax.axhline(p.y, color=RED, linestyle="--", linewidth=0.8, zorder=1)
    xs = [p.x for p in panel.points]
    middle = (min(xs) + max(xs)) / 2
    groups = list(dict.fromkeys(p.group for p in panel.points))
    for p in sorted(panel.points, key=lambda q: q.baseline):  # the baseline on top
        marker = MARKERS[groups.index(p.group) % len(MARKERS)]
        ax.scatter([p.x], [p.y], s=70 if p.baseline else 45, marker="D" if p.baseline else marker,
                   color=RED if p.baseline else BLUE, zorder=3)
        right_half = p.x > middle  # named on the inner side, so the name stays inside the axes
        ax.annotate(p.label + (" (baseline)" if p.baseline else ""), (p.x, p.y), xytext=(-6 if right_half else 6, 6),
                    textcoords="offset points", ha="right" if right_half else "left", fontsize=8,
                    color=RED if p.baseline else "#282828")
    if len(groups) > 1:  # a legend of the marker shapes
        for group in groups:
            ax.scatter([], [], marker=MARKERS[groups.index(group) % len(MARKERS)], color=BLUE, label=group)
        ax.legend(fontsize=8, loc="best")
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, color="#e1e1e1", linewidth=0.6)
    ax.margins(0.15)


def draw_panels(panels: list[Panel], stem: Path, caption: str = "") -> list[Path]:
    """Write ``panels`` side by side to ``stem.png`` and ``stem.svg``; ``caption`` along the bottom.
    Returns the files written."""
    if not panels or any(not p.points for p in panels):
        raise ValueError("every panel needs at least one point")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.0), squeeze=False)
    try:
        for ax, panel in zip(axes[0], panels):
            _draw(ax, panel)
        if caption:
            fig.text(0.01, 0.01, caption, fontsize=7, color="#5a5a5a")
        fig.tight_layout(rect=(0, 0.04 if caption else 0, 1, 1))
        paths = [Path(f"{stem}.{fmt}") for fmt in FORMATS]
        with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable and editable
            for path in paths:
                fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return paths
