"""The comparison plot: both formats written, every point named, the baseline marked."""
from __future__ import annotations

import pytest

from tasks.plot import Panel, Point, draw_panels


def test_panels_are_written_as_png_and_svg_with_every_point_named(tmp_path):
    points = [Point(100.0, 95.6, "repmlp_res_tiny"), Point(120.0, 96.8, "resnet_tiny", baseline=True)]
    paths = draw_panels([Panel("top-1 vs speed", "images/s", "top-1 (%)", points),
                         Panel("top-1 vs size", "parameters (M)", "top-1 (%)", points)],
                        tmp_path / "comparison", caption="classification: cpu, batch 8")
    assert [p.name for p in paths] == ["comparison.png", "comparison.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = paths[1].read_text()
    assert svg.count("repmlp_res_tiny") == 2 and svg.count("resnet_tiny (baseline)") == 2
    assert "classification: cpu, batch 8" in svg


def test_a_panel_without_points_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one point"):
        draw_panels([Panel("t", "x", "y", [])], tmp_path / "c")
    assert not list(tmp_path.iterdir())
