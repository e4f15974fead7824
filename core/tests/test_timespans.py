"""The one rule for merging spans and for a duration's seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from core.timespans import Interval, exact_seconds, merge, whole_seconds

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_overlapping_touching_and_nested_spans_merge_and_gaps_stay():
    spans = [Interval(at(50), at(60)), Interval(at(0), at(10)), Interval(at(10), at(20)), Interval(at(12), at(15))]
    assert merge(spans) == [Interval(at(0), at(20)), Interval(at(50), at(60))]


def test_whole_seconds_round_down_and_never_go_negative():
    assert whole_seconds(timedelta(seconds=59, microseconds=999_999)) == 59
    assert whole_seconds(timedelta(days=2, seconds=3)) == 2 * 86400 + 3
    assert whole_seconds(timedelta(seconds=-5)) == 0


def test_exact_seconds_keep_the_microseconds():
    assert exact_seconds(timedelta(seconds=1, microseconds=500)) == Decimal("1.0005")
    assert exact_seconds(timedelta(days=1, microseconds=1)) == Decimal("86400.000001")
