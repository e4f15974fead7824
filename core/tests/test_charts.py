"""The console's server-side charts: what a reader (or a screen reader) gets from the SVG."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from core.charts import Series, line_chart, when

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _points(svg: str) -> list[str]:
    return re.findall(r'<circle class="point"[^>]*><title>([^<]*)</title></circle>', svg)


def test_every_value_is_a_point_with_its_own_title_and_gaps_are_not_drawn() -> None:
    svg = line_chart(
        title="GPUs by state",
        series=[
            Series("idle", [(T0, 3.0), (T0 + timedelta(hours=1), 4.0), (T0 + timedelta(hours=2), None)]),
            Series("leased", [(T0, 1.0), (T0 + timedelta(hours=1), 0.0)]),
        ],
        unit="GPUs",
    )

    titles = _points(svg)
    assert len(titles) == 4
    assert "idle, 2026-12-01 11:00:00 UTC: 4 GPUs" in titles
    assert "leased, 2026-12-01 10:00:00 UTC: 1 GPUs" in titles
    assert svg.startswith('<svg class="chart" role="img"')
    assert "<title>GPUs by state</title>" in svg
    # Axis labels: the y range and the first and last time, to the second with the zone.
    assert ">0 GPUs</text>" in svg and ">4 GPUs</text>" in svg
    assert ">2026-12-01 10:00:00 UTC</text>" in svg and ">2026-12-01 11:00:00 UTC</text>" in svg


def test_a_chart_without_values_says_no_data() -> None:
    svg = line_chart(title="Revenue", series=[Series("revenue", [(T0, None)]), Series("fees", [])])

    assert "chart-empty" in svg
    assert "Revenue: no data" in svg
    assert _points(svg) == []


def test_names_are_escaped_not_injected() -> None:
    svg = line_chart(title="<b>x</b>", series=[Series("a<script>", [(T0, 1.0)])])

    assert "<script>" not in svg and "<b>" not in svg
    assert "a&lt;script&gt;" in svg


def test_a_single_point_is_drawn_in_the_middle() -> None:
    svg = line_chart(title="one", series=[Series("s", [(T0, 2.5)])])

    assert len(_points(svg)) == 1
    assert "<polyline" not in svg


def test_when_gives_the_second_and_the_zone() -> None:
    assert when(datetime(2026, 12, 1, 10, 5, 7, tzinfo=UTC)) == "2026-12-01 10:05:07 UTC"
