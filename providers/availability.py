"""When a machine may be rented, from its owner's declared schedule.

Pure functions over plain values so the matcher, the GPU search and the agent's reply all use
the same arithmetic, and tests need no database.

Rules:
- A window starts on each day in its `days` bitmask (Monday = bit 0) at `start_time` local time
  and ends at `end_time`; an end at or before the start means the next day (20:00–08:00).
  Local times are converted with the window's IANA time zone, so DST moves them correctly.
- A machine's own windows replace its provider's provider-wide windows; with none of either,
  the machine is available at any time (idleness alone decides).
- Blackouts (the machine's and the provider-wide ones) are cut out of whatever windows give.
- Touching or overlapping windows merge: Mon 20:00–24:00 and Tue 00:00–08:00 are one stretch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from core.timespans import Interval, merge

# "Available with no end in sight": no windows at all, or windows that cover the horizon.
FOREVER = datetime.max.replace(tzinfo=UTC)
# How far ahead windows are expanded; a stretch reaching past it counts as FOREVER.
HORIZON = timedelta(days=8)

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class WindowSpec:
    days: int  # bitmask, Monday = 1 << 0
    start: time
    end: time
    tz: str


def days_to_mask(days: Iterable[str | int]) -> int:
    """["mon", "fri"] or [0, 4] → bitmask. Raises ValueError on an unknown day."""
    mask = 0
    for day in days:
        if isinstance(day, int) and not isinstance(day, bool):
            if not 0 <= day <= 6:
                raise ValueError(f"day {day} is not 0 (Monday) … 6 (Sunday)")
            mask |= 1 << day
        elif isinstance(day, str) and day.lower()[:3] in DAY_NAMES:
            mask |= 1 << DAY_NAMES.index(day.lower()[:3])
        else:
            raise ValueError(f"{day!r} is not a day of the week (mon … sun)")
    if mask == 0:
        raise ValueError("a window needs at least one day")
    return mask


def mask_to_days(mask: int) -> list[str]:
    return [name for i, name in enumerate(DAY_NAMES) if mask & (1 << i)]


def validate_timezone(name: str) -> ZoneInfo:
    """The zone for an IANA name; ValueError for anything else."""
    if not name or name not in _zone_names():
        raise ValueError(f"{name!r} is not an IANA time zone (for example Europe/Paris)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone (for example Europe/Paris)") from None


_ZONES: frozenset[str] | None = None


def _zone_names() -> frozenset[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = frozenset(available_timezones()) | {"UTC"}
    return _ZONES


def window_intervals(window: WindowSpec, start: datetime, end: datetime) -> list[Interval]:
    """The window's occurrences (in UTC) that overlap [start, end)."""
    tz = ZoneInfo(window.tz)
    local_first = start.astimezone(tz).date() - timedelta(days=1)
    local_last = end.astimezone(tz).date()
    out: list[Interval] = []
    day: date = local_first
    while day <= local_last:
        if window.days & (1 << day.weekday()):
            begin = datetime.combine(day, window.start, tzinfo=tz)
            end_day = day if window.end > window.start else day + timedelta(days=1)
            finish = datetime.combine(end_day, window.end, tzinfo=tz)
            b, f = begin.astimezone(UTC), finish.astimezone(UTC)
            if f > start and b < end and f > b:
                out.append(Interval(b, f))
        day += timedelta(days=1)
    return out


def _subtract(intervals: list[Interval], holes: Sequence[Interval]) -> list[Interval]:
    result = intervals
    for hole in holes:
        next_result: list[Interval] = []
        for iv in result:
            if hole.end <= iv.start or hole.start >= iv.end:
                next_result.append(iv)
                continue
            if hole.start > iv.start:
                next_result.append(Interval(iv.start, hole.start))
            if hole.end < iv.end:
                next_result.append(Interval(hole.end, iv.end))
        result = next_result
    return result


def available_until(*, windows: Sequence[WindowSpec], blackouts: Sequence[Interval], now: datetime) -> datetime | None:
    """The end of the stretch of availability that contains `now`.

    Returns None when the machine is outside every window (or inside a blackout) now, FOREVER
    when its availability reaches past the horizon, else the UTC end time.
    """
    horizon_end = now + HORIZON
    if windows:
        spans: list[Interval] = []
        for window in windows:
            spans.extend(window_intervals(window, now - timedelta(days=1), horizon_end))
        stretches = merge(spans)
    else:
        stretches = [Interval(now - timedelta(days=1), FOREVER)]
    stretches = _subtract(stretches, [b for b in blackouts if b.end > now and b.start < horizon_end])
    for stretch in stretches:
        if stretch.start <= now < stretch.end:
            return FOREVER if stretch.end >= horizon_end else stretch.end
    return None


def seconds_available(until: datetime | None, now: datetime) -> float:
    """How long from `now` a stretch ending at `until` lasts (inf for FOREVER, 0 for None)."""
    if until is None:
        return 0.0
    if until == FOREVER:
        return float("inf")
    return max(0.0, (until - now).total_seconds())
