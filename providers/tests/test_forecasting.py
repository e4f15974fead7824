"""Idle forecasts (providers.forecasting): survival of known distributions, censoring, the
blend with the prior, storage, and expected lost work against closed forms."""

from __future__ import annotations

import math
import random

import pytest

from providers.forecasting import (
    BIN_EDGES_S,
    Forecast,
    StretchCounts,
    Survival,
    bin_of,
    expected_lost_s,
    hour_of_week,
)

MONDAY = 1_767_571_200.0  # 2026-01-05 00:00 UTC


def exponential_counts(mean_s: float, n: int, *, hour: int = 0, seed: int = 1) -> StretchCounts:
    rng = random.Random(seed)
    counts = StretchCounts()
    for _ in range(n):
        counts.add(began_hour=hour, length_s=rng.expovariate(1 / mean_s), ended=True)
    return counts


def test_survival_of_exponential_stretches_follows_the_exponential() -> None:
    curve = Forecast(exponential_counts(1800, 20_000), StretchCounts()).curve(0)
    for t in (300, 1800, 3600, 7200):
        assert curve(t) == pytest.approx(math.exp(-t / 1800), abs=0.02)
    # memoryless: the age does not change the chance of another half hour
    assert curve.conditional(3600, 1800) == pytest.approx(math.exp(-1), abs=0.03)


def test_age_matters_where_stretches_are_either_short_or_long() -> None:
    counts = StretchCounts()
    for _ in range(500):
        counts.add(began_hour=0, length_s=200, ended=True)
        counts.add(began_hour=0, length_s=20_000, ended=True)
    curve = Forecast(counts, StretchCounts()).curve(0)
    assert curve.conditional(0, 3600) == pytest.approx(0.5, abs=0.05)
    assert curve.conditional(1000, 3600) > 0.95


def test_censored_stretches_count_as_at_risk_not_as_ended() -> None:
    ended_only = StretchCounts()
    with_censored = StretchCounts()
    for _ in range(100):
        ended_only.add(began_hour=0, length_s=500, ended=True)
        with_censored.add(began_hour=0, length_s=500, ended=True)
        with_censored.add(began_hour=0, length_s=5000, ended=False)
    a = Forecast(ended_only, StretchCounts()).curve(0)
    b = Forecast(with_censored, StretchCounts()).curve(0)
    assert b(1000) > a(1000) + 0.3


def test_a_new_machine_is_forecast_as_the_fleet_and_an_old_one_as_itself() -> None:
    fleet = exponential_counts(600, 5000)
    new = Forecast(StretchCounts(), fleet).curve(0)
    old = Forecast(exponential_counts(7200, 2000, seed=2), fleet).curve(0)
    assert new(1800) == pytest.approx(math.exp(-3), abs=0.03)
    assert old(1800) == pytest.approx(math.exp(-0.25), abs=0.05)


def test_an_hour_with_its_own_history_is_forecast_from_it() -> None:
    counts = exponential_counts(300, 2000, hour=3)
    counts.merge(exponential_counts(10_000, 2000, hour=20, seed=9))
    forecast = Forecast(counts, StretchCounts())
    assert forecast.survival(idle_since=MONDAY + 3 * 3600, now=MONDAY + 3 * 3600, more_s=1200) < 0.1
    assert forecast.survival(idle_since=MONDAY + 20 * 3600, now=MONDAY + 20 * 3600, more_s=1200) > 0.8


def test_a_day_of_history_forecasts_the_same_hour_on_other_days() -> None:
    # Monday's history alone: nights away for hours, afternoons back within minutes. Tuesday
    # has no history of its own; its night and afternoon are forecast from Monday's same hours,
    # and an hour never seen on any day from the machine's all-hours counts.
    counts = exponential_counts(20_000, 40, hour=2)  # Monday 02:00
    counts.merge(exponential_counts(200, 40, hour=14, seed=3))  # Monday 14:00
    forecast = Forecast(counts, StretchCounts())
    tuesday = MONDAY + 86400
    night = forecast.survival(idle_since=tuesday + 2 * 3600, now=tuesday + 2 * 3600, more_s=3600)
    afternoon = forecast.survival(idle_since=tuesday + 14 * 3600, now=tuesday + 14 * 3600, more_s=3600)
    evening = forecast.survival(idle_since=tuesday + 20 * 3600, now=tuesday + 20 * 3600, more_s=3600)
    assert night > 0.7
    assert afternoon < 0.1
    assert afternoon < evening < night


def test_median_more_is_where_survival_halves() -> None:
    forecast = Forecast(exponential_counts(1800, 20_000), StretchCounts())
    median = forecast.median_more(idle_since=MONDAY, now=MONDAY + 600)
    assert median == pytest.approx(1800 * math.log(2), rel=0.05)
    curve = forecast.curve(0)
    for age in (0.0, 100.0, 5000.0, 1e6):
        for p in (0.1, 0.5, 0.8):
            assert curve.conditional(age, curve.quantile_more(age, p)) == pytest.approx(p, rel=1e-6)


def test_counts_survive_json_and_decay() -> None:
    counts = exponential_counts(900, 300)
    counts.add(began_hour=100, length_s=50_000, ended=False, weight=2.5)
    again = StretchCounts.from_json(counts.to_json())
    for mine, theirs in zip(again.profile(), counts.profile(), strict=True):
        assert mine == pytest.approx(theirs, abs=1e-4)
    total = counts.total()
    counts.decay(0.5)
    assert counts.total() == pytest.approx(total / 2, rel=0.01)
    assert counts.total(100) == pytest.approx(1.25)


@pytest.mark.parametrize(
    "data",
    [
        {"e": {"168": {"0": 1}}},
        {"e": {"0": {str(len(BIN_EDGES_S)): 1}}},
        {"c": {"0": {"1": -1}}},
        {"e": {"0": {"1": "nan"}}},
    ],
)
def test_bad_stored_counts_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        StretchCounts.from_json(data)


def test_bad_stretches_are_refused() -> None:
    with pytest.raises(ValueError):
        StretchCounts().add(began_hour=168, length_s=10, ended=True)
    with pytest.raises(ValueError):
        StretchCounts().add(began_hour=0, length_s=math.inf, ended=True)


def test_expected_lost_work_matches_closed_forms() -> None:
    rate = 1 / 3600
    duration = 7200.0

    def survive(x: float) -> float:
        return math.exp(-rate * x)

    # No checkpoints: E[lost] = integral of x f(x) over [0, D] = (1 - e^-rD (1 + rD)) / r
    closed = (1 - math.exp(-rate * duration) * (1 + rate * duration)) / rate
    assert expected_lost_s(survive, duration_s=duration, checkpoint_interval_s=None, steps=400) == pytest.approx(
        closed, rel=0.01
    )
    # A certain owner who never returns loses nothing; one back at once loses nothing either.
    assert expected_lost_s(lambda x: 1.0, duration_s=duration, checkpoint_interval_s=600) == 0.0
    # Checkpoints every c with a uniform return over [0, D] (S(x) = 1 - x/D): mean lost c/2
    assert expected_lost_s(
        lambda x: max(0.0, 1 - x / duration), duration_s=duration, checkpoint_interval_s=600, steps=400
    ) == pytest.approx(300, rel=0.02)


def test_hour_of_week_and_bins() -> None:
    assert hour_of_week(MONDAY) == 0
    assert hour_of_week(MONDAY + 7 * 86400 - 1) == 167
    assert bin_of(0) == 0
    assert bin_of(59.9) == 0
    assert bin_of(60) == 1
    assert bin_of(10**9) == len(BIN_EDGES_S) - 1
    assert isinstance(Forecast(StretchCounts(), StretchCounts()).curve(0), Survival)


def test_profiles_read_between_counts_answer_as_counts_read_once_at_the_end() -> None:
    # A machine's forecast reads its profiles after every stretch it counts; what was read and
    # kept must follow each new stretch, whatever hour and bin it falls in.
    kept, fresh = StretchCounts(), StretchCounts()
    stretches = [(h % 168, 37.0 * (h + 1) ** 2, h % 3 != 0, 1.0 + (h % 4) / 4) for h in range(0, 400, 7)]
    for hour, length_s, ended, weight in stretches:
        kept.profile()
        kept.profile(hour)
        kept.profile((hour + 24) % 168)
        kept.add(began_hour=hour, length_s=length_s, ended=ended, weight=weight)
        fresh.add(began_hour=hour, length_s=length_s, ended=ended, weight=weight)
    assert kept.profile() == fresh.profile()
    for hour in range(168):
        assert kept.profile(hour) == fresh.profile(hour)
    assert sum(kept.profile()[0]) + sum(kept.profile()[1]) == sum(w for *_, w in stretches)
