"""Charts for the operator console, drawn on the server as inline SVG: no JavaScript, no CDN.

`line_chart` turns time series into one accessible <svg>: a <title> and <desc> naming the chart,
axis labels (the y range, and the first, middle and last time in the console's time zone), one
<circle class="point"> per value with its own <title> ("series, time: value unit") so a test or a
screen reader can count and read them, and a line per series. A chart with no values says
"no data" instead of drawing empty axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

from django.utils import timezone
from django.utils.safestring import SafeString, mark_safe

WIDTH = 640
HEIGHT = 200
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 12, 36
# Colours that stay apart for the common kinds of colour blindness (Okabe–Ito).
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#d55e00", "#56b4e9", "#000000", "#f0e442")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S %Z"


@dataclass(frozen=True)
class Series:
    """One line: its name and its (time, value) points; a None value is a gap (no point)."""

    name: str
    points: Sequence[tuple[datetime, float | None]]


def when(moment: datetime) -> str:
    """`moment` to the second, in the console's time zone, with the zone's name."""
    return timezone.localtime(moment).strftime(TIME_FORMAT)


def _number(value: float) -> str:
    if abs(value) >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def line_chart(*, title: str, series: Sequence[Series], unit: str = "", y_min: float = 0.0) -> SafeString:
    """The series as one inline <svg> (module docstring). `unit` follows every value shown; the
    y axis starts at `y_min` (0 by default) and ends at the largest value."""
    values = [(name, at, v) for name, at, v in ((s.name, at, v) for s in series for at, v in s.points) if v is not None]
    label = escape(str(title))
    if not values:
        return mark_safe(  # noqa: S308 - every interpolated string is escaped
            f'<svg class="chart chart-empty" role="img" viewBox="0 0 {WIDTH} 60" width="100%"'
            f' preserveAspectRatio="xMinYMid meet"><title>{label}: no data</title>'
            f'<text x="{WIDTH // 2}" y="35" text-anchor="middle" fill="#666">{label}: no data</text></svg>'
        )
    times = [at.timestamp() for _, at, _ in values]
    t0, t1 = min(times), max(times)
    y_max = max(max(v for _, _, v in values), y_min)
    y_max = y_max if y_max > y_min else y_min + 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: datetime) -> float:
        return LEFT + (plot_w * (at.timestamp() - t0) / (t1 - t0) if t1 > t0 else plot_w / 2)

    def y(v: float) -> float:
        return TOP + plot_h * (1 - (v - y_min) / (y_max - y_min))

    unit_text = f" {unit}" if unit else ""
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%">',
        f"<title>{label}</title>",
        f"<desc>{escape(', '.join(s.name for s in series))}; {len(values)} points from "
        f"{escape(when(min(at for _, at, _ in values)))} to {escape(when(max(at for _, at, _ in values)))}</desc>",
        f'<g class="axes" stroke="#999" fill="none"><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>'
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}"/></g>',
        '<g class="y-labels" font-size="11" fill="#444" text-anchor="end">',
    ]
    for v in (y_min, (y_min + y_max) / 2, y_max):
        parts.append(f'<text x="{LEFT - 4}" y="{y(v) + 4:.1f}">{escape(_number(v) + unit_text)}</text>')
    parts.append('</g><g class="x-labels" font-size="11" fill="#444">')
    first, last = min(values, key=lambda p: p[1])[1], max(values, key=lambda p: p[1])[1]
    for at, anchor in ((first, "start"), (last, "end")):
        parts.append(
            f'<text x="{x(at):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="{anchor}">{escape(when(at))}</text>'
        )
    parts.append("</g>")
    # The series share their times: each time's label is written once (a week's chart has 168
    # times and up to four series).
    labels: dict[datetime, str] = {}

    def label_of(at: datetime) -> str:
        text = labels.get(at)
        if text is None:
            text = labels[at] = escape(when(at))
        return text

    legend_x = LEFT
    for index, s in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        name = escape(s.name)
        shown = [(at, v) for at, v in sorted(s.points, key=lambda p: p[0]) if v is not None]
        parts.append(f'<g class="series" data-series="{name}" stroke="{colour}" fill="{colour}">')
        if len(shown) > 1:
            path = " ".join(f"{x(at):.1f},{y(v):.1f}" for at, v in shown)
            parts.append(f'<polyline fill="none" stroke-width="1.5" points="{path}"/>')
        for at, v in shown:
            parts.append(
                f'<circle class="point" cx="{x(at):.1f}" cy="{y(v):.1f}" r="2.5">'
                f"<title>{name}, {label_of(at)}: {escape(_number(v) + unit_text)}</title></circle>"
            )
        parts.append(
            f'<text class="legend" x="{legend_x}" y="{HEIGHT - 4}" font-size="11" stroke="none">'
            f"\u25a0 {name}</text></g>"
        )
        legend_x += 14 + 7 * len(s.name)
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every interpolated string is escaped
