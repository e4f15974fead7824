"""Spans of time and durations, one rule each: merging overlapping spans (availability windows,
usage periods) and turning a timedelta into seconds (billing's whole seconds, usage's exact
seconds)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class Interval:
    """[start, end): a span of time."""

    start: datetime
    end: datetime


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of `intervals` as disjoint spans in time order; spans that overlap or touch
    (one ends where the next starts) become one."""
    merged: list[Interval] = []
    for iv in sorted(intervals, key=lambda i: i.start):
        if merged and iv.start <= merged[-1].end:
            if iv.end > merged[-1].end:
                merged[-1] = Interval(merged[-1].start, iv.end)
        else:
            merged.append(iv)
    return merged


def whole_seconds(delta: timedelta) -> int:
    """A duration in whole seconds, rounded down (a started second is not billed); never negative."""
    return max(0, delta.days * 86400 + delta.seconds)


def exact_seconds(delta: timedelta) -> Decimal:
    """A duration in seconds, exactly (to the microsecond); negative for a negative delta."""
    return Decimal(delta.days * 86400 + delta.seconds) + Decimal(delta.microseconds) / Decimal(1_000_000)
