"""The owner's schedule arithmetic: windows in local time, past midnight, DST, blackouts."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from providers.availability import (
    FOREVER,
    Interval,
    WindowSpec,
    available_until,
    days_to_mask,
    mask_to_days,
    seconds_available,
    validate_timezone,
)

WEEKNIGHTS_PARIS = WindowSpec(
    days=days_to_mask(["mon", "tue", "wed", "thu", "fri"]), start=time(20), end=time(8), tz="Europe/Paris"
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_no_windows_means_available_without_end():
    assert available_until(windows=[], blackouts=[], now=utc(2026, 11, 23, 12)) == FOREVER


def test_overnight_window_is_open_after_start_and_closes_next_morning_local_time():
    # Monday 2026-11-23, Paris is UTC+1 in winter: 20:00 local = 19:00 UTC.
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[], now=utc(2026, 11, 23, 18, 59)) is None
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[], now=utc(2026, 11, 23, 19, 0)) == utc(
        2026, 11, 24, 7, 0
    )
    # Tuesday 03:00 local still belongs to Monday's window.
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[], now=utc(2026, 11, 24, 2, 0)) == utc(
        2026, 11, 24, 7, 0
    )


def test_friday_night_window_runs_into_saturday_but_saturday_night_is_closed():
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[], now=utc(2026, 11, 28, 3)) == utc(2026, 11, 28, 7)
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[], now=utc(2026, 11, 28, 21)) is None


def test_window_follows_daylight_saving_time():
    # Paris is UTC+2 in summer: Monday 2026-06-15 20:00 local = 18:00 UTC.
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[], now=utc(2026, 6, 15, 18, 30)) == utc(
        2026, 6, 16, 6, 0
    )
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[], now=utc(2026, 6, 15, 17, 59)) is None


def test_touching_windows_merge_into_one_stretch():
    evening = WindowSpec(days=days_to_mask(["mon"]), start=time(18), end=time(0), tz="UTC")
    night = WindowSpec(days=days_to_mask(["tue"]), start=time(0), end=time(6), tz="UTC")
    assert available_until(windows=[evening, night], blackouts=[], now=utc(2026, 11, 23, 19)) == utc(2026, 11, 24, 6)


def test_every_day_all_day_reaches_past_the_horizon():
    always = WindowSpec(days=127, start=time(0), end=time(0), tz="UTC")
    assert available_until(windows=[always], blackouts=[], now=utc(2026, 11, 23, 19)) == FOREVER


def test_blackout_cuts_a_window_short_and_closes_it_while_it_lasts():
    blackout = Interval(utc(2026, 11, 23, 23), utc(2026, 11, 24, 1))
    now = utc(2026, 11, 23, 20)
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[blackout], now=now) == utc(2026, 11, 23, 23)
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[blackout], now=utc(2026, 11, 24, 0)) is None
    assert available_until(windows=[WEEKNIGHTS_PARIS], blackouts=[blackout], now=utc(2026, 11, 24, 1)) == utc(
        2026, 11, 24, 7
    )


def test_blackout_without_windows_ends_the_open_ended_availability():
    blackout = Interval(utc(2026, 11, 24, 0), utc(2026, 11, 25, 0))
    assert available_until(windows=[], blackouts=[blackout], now=utc(2026, 11, 23, 12)) == utc(2026, 11, 24, 0)


def test_day_names_and_numbers_convert_both_ways():
    assert days_to_mask(["Mon", "friday", 6]) == 0b1010001
    assert mask_to_days(0b1010001) == ["mon", "fri", "sun"]
    with pytest.raises(ValueError, match="day of the week"):
        days_to_mask(["funday"])
    with pytest.raises(ValueError, match="at least one day"):
        days_to_mask([])
    with pytest.raises(ValueError):
        days_to_mask([7])


def test_unknown_time_zone_is_refused():
    with pytest.raises(ValueError, match="IANA"):
        validate_timezone("Mars/Olympus")
    assert str(validate_timezone("Europe/Paris")) == "Europe/Paris"


def test_seconds_available():
    now = utc(2026, 1, 1)
    assert seconds_available(None, now) == 0
    assert seconds_available(FOREVER, now) == float("inf")
    assert seconds_available(now + timedelta(minutes=5), now) == 300
