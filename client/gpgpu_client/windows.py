"""A provider's availability window as a person writes it, to the API's fields.

`mon-fri 20:00-08:00 Europe/Paris` is {"days": ["mon", …, "fri"], "start_time": "20:00",
"end_time": "08:00", "timezone": "Europe/Paris"}: days (one, a comma list, ranges such as
`mon-fri` or `fri-mon`, or `daily`, `weekdays`, `weekends`), then a local time range (an end at
or before its start is the next day, as the API reads it), then an IANA time zone (default UTC).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any
from zoneinfo import available_timezones

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NAMED_DAYS = {"daily": DAY_NAMES, "weekdays": DAY_NAMES[:5], "weekends": DAY_NAMES[5:]}
_TIMES_RE = re.compile(r"(?P<start>[0-9]{1,2}:[0-9]{2})-(?P<end>[0-9]{1,2}:[0-9]{2})")
_TIME_RE = re.compile(r"(?P<hour>[0-9]{1,2}):(?P<minute>[0-9]{2})")


class WindowError(ValueError):
    """A window text that cannot be read; its message says which part and why."""


@cache
def _time_zones() -> frozenset[str]:
    return frozenset(available_timezones() | {"UTC"})


def parse_window(text: str) -> dict[str, Any]:
    """The API's fields (days, start_time, end_time, timezone) of a window text; WindowError
    naming the bad part otherwise."""
    parts = text.split()
    if len(parts) not in (2, 3):
        raise WindowError(
            f"{text!r} is not a window: write DAYS HH:MM-HH:MM [TIME ZONE], e.g. 'mon-fri 20:00-08:00 Europe/Paris'"
        )
    days = parse_days(parts[0])
    times = _TIMES_RE.fullmatch(parts[1])
    if not times:
        raise WindowError(f"{parts[1]!r} is not a time range (HH:MM-HH:MM, e.g. 20:00-08:00)")
    zone = parts[2] if len(parts) == 3 else "UTC"
    if zone not in _time_zones():
        raise WindowError(f"{zone!r} is not a time zone (an IANA name such as Europe/Paris, or UTC)")
    return {"days": days, "start_time": _time(times["start"]), "end_time": _time(times["end"]), "timezone": zone}


def parse_days(text: str) -> list[str]:
    """Day names in week order from `mon-fri`, `sat,sun`, `fri-mon`, `daily`, `weekdays`…"""
    named = _NAMED_DAYS.get(text.lower())
    if named is not None:
        return list(named)
    chosen: set[str] = set()
    for item in text.lower().split(","):
        first, dash, last = item.partition("-")
        for name in (first, last) if dash else (first,):
            if name not in DAY_NAMES:
                raise WindowError(
                    f"{name!r} is not a day (mon, tue, wed, thu, fri, sat, sun, or daily, weekdays, weekends)"
                )
        start, end = DAY_NAMES.index(first), DAY_NAMES.index(last if dash else first)
        # A range may wrap the week's end: fri-mon is fri, sat, sun, mon.
        chosen.update(DAY_NAMES[(start + i) % 7] for i in range((end - start) % 7 + 1))
    return [day for day in DAY_NAMES if day in chosen]


def _time(text: str) -> str:
    match = _TIME_RE.fullmatch(text)
    if not match or int(match["hour"]) > 23 or int(match["minute"]) > 59:
        raise WindowError(f"{text!r} is not a time of day (00:00 to 23:59)")
    return f"{int(match['hour']):02d}:{match['minute']}"
