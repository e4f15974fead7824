"""Analogs (providers.forecasting.Analogs): an owner's days read from the days before, the
calibration that says how far to trust them, honest replays, and bounded storage."""

from __future__ import annotations

import math
import random

import pytest

from providers.forecasting import (
    ANALOG_JUDGED_AT_S,
    ANALOG_KEEP_S,
    ANALOG_MAX_STRETCHES,
    ANALOG_MIN_JUDGEMENTS,
    SAFE_P,
    Analogs,
)

DAY = 86400.0
HOUR = 3600.0
MONDAY = 1_767_571_200.0  # 2026-01-05 00:00 UTC


def days_of(
    owner: list[tuple[float, float]], days: int, *, jitter_s: float = 0.0, seed: int = 1
) -> list[tuple[float, float]]:
    """The owner's absences (start, end as seconds of the day) on `days` days from MONDAY, each
    day shifted by a uniform draw within `jitter_s`."""
    rng = random.Random(seed)
    stretches = []
    for d in range(days):
        shift = rng.uniform(-jitter_s, jitter_s) if jitter_s else 0.0
        stretches.extend((MONDAY + d * DAY + a + shift, MONDAY + d * DAY + b + shift) for a, b in owner)
    return stretches


def learnt(stretches: list[tuple[float, float]]) -> Analogs:
    analogs = Analogs()
    for start, end in stretches:
        analogs.add(start, end)
    analogs.calibrate(SAFE_P)
    return analogs


# Away at night, over lunch, and for a coffee.
NIGHT_OWL = [(1 * HOUR, 7 * HOUR), (12 * HOUR, 13 * HOUR), (16 * HOUR, 16 * HOUR + 600)]


def test_an_owner_who_keeps_the_same_days_is_read_from_the_days_before() -> None:
    analogs = learnt(days_of(NIGHT_OWL, 4))
    assert analogs.factor == pytest.approx(1.0)
    today = MONDAY + 4 * DAY
    # Two minutes into tonight's absence: away until 07:00, as on the nights before.
    assert analogs.safe_until(today + HOUR, today + HOUR + 120) == pytest.approx(today + 7 * HOUR)
    assert analogs.safe_until(today + 12 * HOUR, today + 12 * HOUR + 120) == pytest.approx(today + 13 * HOUR)
    # Away since 09:00, when the owner was at the machine on every day before: no analog.
    assert analogs.safe_until(today + 9 * HOUR, today + 9 * HOUR + 120) is None
    # Away since 16:00 and it is 16:30: the coffee breaks before were over by 16:10.
    assert analogs.safe_until(today + 16 * HOUR, today + 16 * HOUR + 1800) is None


def test_an_owner_whose_day_starts_later_is_followed() -> None:
    analogs = learnt(days_of(NIGHT_OWL, 4))
    today = MONDAY + 4 * DAY
    # Tonight the owner left at 01:40: the nights before still say six hours.
    assert analogs.safe_until(today + HOUR + 2400, today + HOUR + 2520) == pytest.approx(today + 7 * HOUR + 2400)


# Away for minutes at uneven times through the morning, then for the afternoon from 12:05.
ERRANDS = [(10 * HOUR + m * 60, 10 * HOUR + m * 60 + 300) for m in (-60, -25, 0, 40, 70, 85, 110)] + [
    (12 * HOUR + 300, 15 * HOUR)
]


def test_an_owner_whose_days_shift_is_read_by_the_stretch_that_plays_the_same_part() -> None:
    """Each day of the owner's runs late or early by its own amount. Today the afternoon's
    absence began at 12:05; on the day before, a five-minute errand began at 12:05 too, the
    afternoon 40 minutes later. The errands before them line up only under the day's shift."""
    stretches = []
    for day, shift in enumerate((-1800.0, 900.0, 2400.0, 0.0)):
        stretches.extend((MONDAY + day * DAY + a + shift, MONDAY + day * DAY + b + shift) for a, b in ERRANDS)
    today = MONDAY + 3 * DAY
    analogs = Analogs()
    for start, end in stretches[:-1]:  # all but today's afternoon, still going on
        analogs.add(start, end)
    since = today + 12 * HOUR + 300
    # The nearest start a day and two days before is an errand's; every day's afternoon lasted
    # 2 h 55 min.
    assert analogs.remaining(since, since + 120) == pytest.approx(2 * HOUR + 55 * 60 - 120)
    # Read again at a later age: the same analogs (kept for the stretch until one is added).
    assert analogs.remaining(since, since + HOUR) == pytest.approx(HOUR + 55 * 60)
    # Without this morning's errands to line up, the nearest start is the analog: an errand's.
    morning = Analogs()
    for start, end in stretches[: 3 * len(ERRANDS)]:
        morning.add(start, end)
    assert morning.remaining(since, since + 120) == pytest.approx(300 - 120)


def test_a_day_two_hours_late_is_followed_where_the_morning_lines_up() -> None:
    """On each of the days before, the owner's day ran two hours later than today's: their
    afternoons began two hours from today's, further than the nearest start (ANALOG_WINDOW_S),
    and are read only because this morning's errands line up with theirs."""
    today = MONDAY + 3 * DAY
    analogs = Analogs()
    for day in range(3):
        for a, b in ERRANDS:
            analogs.add(MONDAY + day * DAY + a + 2 * HOUR, MONDAY + day * DAY + b + 2 * HOUR)
    since = today + 12 * HOUR + 300
    before_errands = Analogs.from_json(analogs.to_json())
    for a, b in ERRANDS[:-1]:
        analogs.add(today + a, today + b)
    assert analogs.remaining(since, since + 120) == pytest.approx(2 * HOUR + 55 * 60 - 120)
    # Without them, the nearest start on those days is an errand's, at 12:00.
    assert before_errands.remaining(since, since + 120) == pytest.approx(300 - 120)


def test_the_days_before_disagreeing_are_read_at_the_earliest_return() -> None:
    analogs = learnt(days_of(NIGHT_OWL, 3))
    # Last night ended at 04:00 instead of 07:00.
    yesterday = MONDAY + 3 * DAY
    # Read before last night was over (and kept for this stretch) ...
    assert analogs.remaining(yesterday + DAY + HOUR, yesterday + DAY + 2 * HOUR) == pytest.approx(5 * HOUR)
    analogs.add(yesterday + HOUR, yesterday + 4 * HOUR)
    # ... and read again once it is.
    assert analogs.remaining(yesterday + DAY + HOUR, yesterday + DAY + 2 * HOUR) == pytest.approx(2 * HOUR)


@pytest.mark.parametrize(("owner", "jitter_s"), [("regular", 0.0), ("regular", 1800.0), ("irregular", 0.0)])
def test_the_promise_holds_on_days_the_calibration_has_not_seen(owner: str, jitter_s: float) -> None:
    """Learn from 7 days; on the next 7, the owner is still away at safe_until at least about
    SAFE_P of the times the analogs speak."""
    rng = random.Random(7)
    if owner == "regular":
        stretches = days_of(NIGHT_OWL, 14, jitter_s=jitter_s)
    else:
        stretches, at = [], MONDAY
        while at < MONDAY + 14 * DAY:
            start = at + rng.expovariate(1 / 3000)
            at = start + rng.expovariate(1 / 4000)
            stretches.append((start, at))
    cut = MONDAY + 7 * DAY
    analogs = learnt([s for s in stretches if s[1] <= cut])
    held, spoke = 0, 0
    for start, end in stretches:
        if start < cut or end - start <= 120:
            continue
        judged = start + 120
        safe = analogs.safe_until(start, judged)
        if safe is not None:
            spoke += 1
            held += end >= safe - 1e-6
        analogs.add(start, end)  # what the fold would have added by the next stretch
    assert spoke >= 14
    assert held / spoke >= SAFE_P - 0.15


def test_a_replay_reads_only_stretches_over_by_then() -> None:
    analogs = Analogs()
    analogs.add(MONDAY, MONDAY + 2 * DAY)  # away two whole days
    since = MONDAY + DAY
    # The stretch a day before began then, and was over only after `since + 120`: unknown then.
    assert analogs.remaining(since, since + 120) is None
    assert analogs.remaining(since, since + 120, known_by=MONDAY + 3 * DAY) == pytest.approx(2 * DAY - 120)


def test_short_stretches_and_too_little_history_give_no_opinion() -> None:
    analogs = Analogs()
    analogs.add(MONDAY, MONDAY + 60)  # too short to rent: not kept
    assert analogs.starts == []
    assert analogs.remaining(MONDAY + DAY, MONDAY + DAY + 120) is None
    two_days = learnt(days_of(NIGHT_OWL, 2))
    assert two_days.factor is None  # three judgements, fewer than ANALOG_MIN_JUDGEMENTS
    assert two_days.safe_until(MONDAY + 2 * DAY + HOUR, MONDAY + 2 * DAY + HOUR + 120) is None


def test_storage_is_bounded_and_survives_json() -> None:
    rng = random.Random(2)
    analogs = Analogs()
    at = MONDAY
    for _ in range(5000):
        start = at + rng.uniform(0, 600)
        at = start + rng.uniform(121, 900)
        analogs.add(start, at)
    assert len(analogs.starts) <= ANALOG_MAX_STRETCHES
    assert analogs.starts[0] >= analogs.ends[-1] - ANALOG_KEEP_S
    analogs.calibrate(SAFE_P)
    again = Analogs.from_json(analogs.to_json())
    assert again.starts == analogs.starts
    assert again.ends == pytest.approx(analogs.ends)
    assert again.factor == analogs.factor
    assert again.observed_from == analogs.observed_from
    assert Analogs.from_json({}).starts == []


class _WholeCalibration(Analogs):
    """Analogs calibrated as they were before calibrations were kept up to date: every kept
    stretch walked each time, a judgement reused only while its stretch is kept."""

    def calibrate(self, p: float) -> float | None:
        ratios = []
        before, self._whole = getattr(self, "_whole", {}), {}
        for stretch in zip(self.starts, self.ends, strict=True):
            if stretch in before:
                ratio = before[stretch]
            else:
                start, end = stretch
                judged = start + ANALOG_JUDGED_AT_S
                said = self.remaining(start, judged) if end > judged else None
                ratio = (end - judged) / said if said is not None and said > 0 else None
            self._whole[stretch] = ratio
            if ratio is not None:
                ratios.append(ratio)
        ratios.sort()
        enough = len(ratios) >= ANALOG_MIN_JUDGEMENTS
        self.factor = min(ratios[int((1.0 - p) * (len(ratios) - 1))], 1.0) if enough else None
        return self.factor


def test_a_calibration_kept_up_to_date_is_the_one_made_over_every_kept_stretch() -> None:
    """Calibrating judges only the stretches added since the last time (with the reading made
    live when its GPU became rentable, where nothing since could change it), drops the
    judgements of pruned ones and counts a stretch kept twice (two GPUs of a machine) twice:
    the factors are those of walking every kept stretch each time, through pruning, stretches
    reported late and a JSON round trip."""
    rng = random.Random(5)
    kept, whole = Analogs(), _WholeCalibration()
    at, factors, most = MONDAY, set(), 0
    for step in range(2200):
        # Short absences first (the count bounds what is kept), then long ones too (the time
        # does), and copies.
        start = at + rng.uniform(0, 120)
        long = step > 1300 and rng.random() < 0.3
        at = start + (rng.uniform(3 * HOUR, 9 * HOUR) if long else rng.uniform(121, 400))
        copies = 2 if rng.random() < 0.1 else 1
        # Another GPU's absence of about a day before, reported only now.
        late = start - DAY + rng.uniform(-HOUR, HOUR)
        other = (late, late + rng.uniform(121, 1800)) if rng.random() < 0.05 else None
        kept.remaining(start, start + ANALOG_JUDGED_AT_S)  # read live when the GPU became rentable
        for analogs in (kept, whole):
            for _ in range(copies):
                analogs.add(start, at)
            if other:
                analogs.add(*other)
        if step % 29 == 0:
            assert kept.calibrate(SAFE_P) == whole.calibrate(SAFE_P)
            factors.add(kept.factor)
        if step == 1100:
            kept = Analogs.from_json(kept.to_json())
            whole = _WholeCalibration.from_json(whole.to_json())
        most = max(most, len(kept.starts))
    assert most == ANALOG_MAX_STRETCHES  # pruned by count,
    assert len(kept.starts) < ANALOG_MAX_STRETCHES  # then by time
    assert len(factors) > 10  # the factor moved: the comparison compared something


@pytest.mark.parametrize(
    "data",
    [
        {"stretches": [[MONDAY, -5.0]]},
        {"stretches": [[math.nan, 300.0]]},
        {"stretches": [["1767571200", 300.0]]},
        {"stretches": [[MONDAY]]},
        {"factor": 2.0},
        {"factor": math.inf},
        {"observed_from": True},
    ],
)
def test_bad_stored_analogs_are_refused(data: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        Analogs.from_json(data)


@pytest.mark.parametrize("jitter_s", [0.0, 1200.0])
def test_a_reading_kept_apart_answers_as_the_analogs_do(jitter_s: float) -> None:
    # The simulator reads a stretch's analogs once, when it becomes rentable, and its pool asks
    # the reading (Analogs.reading) at each age after: the same figures to the last bit.
    analogs = learnt(days_of(NIGHT_OWL, 4, jitter_s=jitter_s, seed=3))
    assert analogs.factor is not None
    today = MONDAY + 4 * DAY
    answered = 0
    for since in (today + HOUR, today + 12 * HOUR, today + 9 * HOUR, today + 16 * HOUR):
        ats = [since + age for age in (0.0, 60.0, 90.0, 135.0, 1800.0, 5 * HOUR, 6 * HOUR, 9 * HOUR)]
        reading = analogs.reading(since, since)
        expected = [analogs.safe_until(since, at) for at in ats]
        assert [reading.safe_until(since, at) if reading else None for at in ats] == expected
        answered += sum(found is not None for found in expected)
    assert answered >= 6  # the nights and the lunches are read
    with pytest.raises(ValueError, match="asked of one from"):
        analogs.reading(today + HOUR, today + HOUR).safe_until(today + 2 * HOUR, today + 3 * HOUR)  # type: ignore[union-attr]
    # A stretch some kept stretch was not over by (a replay) is not read ahead.
    with pytest.raises(ValueError, match="only for a stretch every kept stretch was over by"):
        analogs.reading(MONDAY + 3 * DAY + HOUR, MONDAY + 3 * DAY + HOUR)
    assert Analogs().reading(today, today) is None
