"""Telemetry rollups, retention and history (providers.telemetry)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import override_settings

from providers.errors import ValidationFailed
from providers.models import GPU, TelemetryRollup, TelemetrySample
from providers.telemetry import gpu_history, telemetry_prune, telemetry_rollup
from tests.factories import GPUFactory

pytestmark = pytest.mark.django_db

# Years ahead of the clock: on PostgreSQL these samples are outside every partition the migration
# made, in the DEFAULT one, until a prune makes partitions around its `now` (see
# test_telemetry_partitions.py for what partitions change).
T0 = datetime(datetime.now(UTC).year + 4, 1, 7, 10, 0, tzinfo=UTC)
RETENTION = {
    "TELEMETRY_SAMPLE_INTERVAL_S": 60,
    "TELEMETRY_RAW_RETENTION_H": 6,
    "TELEMETRY_ROLLUP_RETENTION_D": 2,
    "TELEMETRY_PARTITION_H": 2,
}


def sample(
    gpu: GPU,
    at: datetime,
    *,
    util: float | None = 0.0,
    mem: int | None = 100,
    temp: float | None = 40.0,
    power: float | None = 20.0,
    state: str = GPU.State.IDLE,
) -> TelemetrySample:
    return TelemetrySample.objects.create(
        gpu=gpu, at=at, utilization_pct=util, memory_used_mb=mem, temperature_c=temp, power_w=power, state=state
    )


def retention(**overrides: int):  # type: ignore[no-untyped-def]
    from django.conf import settings

    return override_settings(GPGPU={**settings.GPGPU, **RETENTION, **overrides})


def test_rollup_summarises_each_completed_hour_per_gpu() -> None:
    gpu, other = GPUFactory(), GPUFactory()
    # Hour 10:00 of `gpu`: two leased busy samples, one idle, one owner-busy with unreadable fields.
    sample(gpu, T0 + timedelta(minutes=1), util=90.0, mem=20000, temp=70.0, power=300.0, state=GPU.State.LEASED)
    sample(gpu, T0 + timedelta(minutes=2), util=100.0, mem=22000, temp=75.0, power=350.0, state=GPU.State.LEASED)
    sample(gpu, T0 + timedelta(minutes=3), util=0.0, mem=300, temp=45.0, power=25.0, state=GPU.State.IDLE)
    sample(
        gpu,
        T0 + timedelta(minutes=59, seconds=59),
        util=None,
        mem=None,
        temp=None,
        power=None,
        state=GPU.State.OWNER_BUSY,
    )
    # Hour 11:00 of `gpu`, and hour 10:00 of another GPU.
    sample(gpu, T0 + timedelta(hours=1, minutes=5), util=10.0, state=GPU.State.IDLE)
    sample(other, T0 + timedelta(minutes=30), util=50.0, state=GPU.State.LEASED)

    written = telemetry_rollup(now=T0 + timedelta(hours=2, minutes=1))

    assert written == 3
    r = TelemetryRollup.objects.get(gpu=gpu, hour=T0)
    assert r.samples == 4
    assert r.utilization_avg == pytest.approx((90 + 100 + 0) / 3)  # unreadable values are not zeros
    assert r.utilization_max == 100.0
    assert r.memory_used_max_mb == 22000
    assert r.temperature_max_c == 75.0
    assert r.power_avg_w == pytest.approx((300 + 350 + 25) / 3)
    assert r.idle_ratio == pytest.approx(1 / 4)
    assert r.leased_ratio == pytest.approx(2 / 4)
    later = TelemetryRollup.objects.get(gpu=gpu, hour=T0 + timedelta(hours=1))
    assert (later.samples, later.utilization_avg, later.idle_ratio, later.leased_ratio) == (1, 10.0, 1.0, 0.0)
    assert TelemetryRollup.objects.get(gpu=other, hour=T0).leased_ratio == 1.0


def test_the_current_hour_is_not_rolled_up_until_it_ends() -> None:
    gpu = GPUFactory()
    sample(gpu, T0 + timedelta(minutes=5))

    assert telemetry_rollup(now=T0 + timedelta(minutes=50)) == 0
    assert not TelemetryRollup.objects.exists()

    assert telemetry_rollup(now=T0 + timedelta(hours=1)) == 1
    assert TelemetryRollup.objects.get(gpu=gpu).hour == T0


def test_rerunning_the_rollup_gives_the_same_rows() -> None:
    gpu = GPUFactory()
    for minute in range(0, 120, 7):
        sample(gpu, T0 + timedelta(minutes=minute), util=float(minute % 100), state=GPU.State.LEASED)
    now = T0 + timedelta(hours=2, minutes=3)

    telemetry_rollup(now=now)
    first = list(TelemetryRollup.objects.order_by("hour").values())
    telemetry_rollup(now=now)
    telemetry_rollup(now=now, since=T0 - timedelta(days=1))

    assert list(TelemetryRollup.objects.order_by("hour").values()) == first
    assert [r["samples"] for r in first] == [9, 9]


def test_a_sample_committed_after_its_hour_was_rolled_up_is_counted_on_the_next_run() -> None:
    gpu = GPUFactory()
    sample(gpu, T0 + timedelta(minutes=10), util=10.0)
    telemetry_rollup(now=T0 + timedelta(hours=1, seconds=1))
    # A heartbeat stamped 10:59:59 commits a moment after the rollup at 11:00:01 read the hour.
    sample(gpu, T0 + timedelta(minutes=59, seconds=59), util=30.0)

    telemetry_rollup(now=T0 + timedelta(hours=1, minutes=5))

    r = TelemetryRollup.objects.get(gpu=gpu, hour=T0)
    assert (r.samples, r.utilization_avg) == (2, 20.0)


def test_rollup_catches_up_on_every_hour_missed_while_it_did_not_run() -> None:
    gpu = GPUFactory()
    sample(gpu, T0)
    telemetry_rollup(now=T0 + timedelta(hours=1))
    for h in range(1, 6):
        sample(gpu, T0 + timedelta(hours=h, minutes=30))

    telemetry_rollup(now=T0 + timedelta(hours=6))

    assert list(TelemetryRollup.objects.order_by("hour").values_list("hour", flat=True)) == [
        T0 + timedelta(hours=h) for h in range(6)
    ]


def test_prune_deletes_only_old_raw_samples_that_are_rolled_up() -> None:
    gpu = GPUFactory()
    now = T0 + timedelta(hours=10)
    old_rolled = sample(gpu, T0 + timedelta(minutes=10))  # 10 h old, hour rolled up
    old_unrolled = sample(gpu, T0 + timedelta(hours=2, minutes=10))  # 8 h old, hour not rolled up
    recent = sample(gpu, T0 + timedelta(hours=8))  # 2 h old, hour rolled up
    telemetry_rollup(now=T0 + timedelta(hours=1), since=T0)
    telemetry_rollup(now=now, since=T0 + timedelta(hours=8))

    with retention():
        deleted = telemetry_prune(now=now)

    assert deleted == 1
    remaining = set(TelemetrySample.objects.values_list("pk", flat=True))
    assert remaining == {old_unrolled.pk, recent.pk}
    assert old_rolled.pk not in remaining
    assert TelemetryRollup.objects.filter(hour=T0).exists()  # the summary outlives the raw rows


def test_an_hour_partly_pruned_keeps_its_full_summary_when_rolled_up_again() -> None:
    gpu = GPUFactory()
    for minute in (10, 20, 40, 50):
        sample(gpu, T0 + timedelta(minutes=minute), util=float(minute))
    telemetry_rollup(now=T0 + timedelta(hours=1))
    now = T0 + timedelta(hours=6, minutes=30)  # the 6 h raw retention ends at 10:30

    with retention():
        telemetry_prune(now=now)
        assert TelemetrySample.objects.count() == 2
        telemetry_rollup(now=now)
        telemetry_rollup(now=now, since=T0 - timedelta(hours=1))

    r = TelemetryRollup.objects.get(gpu=gpu, hour=T0)
    assert (r.samples, r.utilization_avg) == (4, 30.0)


def test_prune_deletes_rollups_past_their_retention() -> None:
    gpu = GPUFactory()
    now = T0 + timedelta(days=3)
    for days_ago in (3, 2, 1):
        sample(gpu, now - timedelta(days=days_ago, minutes=-5))
    telemetry_rollup(now=now, since=now - timedelta(days=4))
    assert TelemetryRollup.objects.count() == 3

    with retention():
        telemetry_prune(now=now)

    assert list(TelemetryRollup.objects.order_by("hour").values_list("hour", flat=True)) == [
        now - timedelta(days=2),
        now - timedelta(days=1),
    ]
    assert TelemetrySample.objects.count() == 0


@pytest.mark.usefixtures("telemetry_partitions_restored")
@pytest.mark.django_db(transaction=True)  # each step commits, as beat's tasks do (a partition is
# not dropped in the transaction that wrote it)
def test_tables_stay_bounded_over_days_of_samples() -> None:
    """Five days of a 2-GPU machine sampled every 10 minutes, with beat's rollup every
    20 minutes and prune every hour: raw rows never exceed the raw retention window plus the
    hour in progress (and, on PostgreSQL, one partition's width), and rollups never exceed the
    rollup retention."""
    gpus = [GPUFactory(), GPUFactory()]
    per_hour = 6
    partition_h = RETENTION["TELEMETRY_PARTITION_H"] if connection.vendor == "postgresql" else 0
    raw_bound = len(gpus) * per_hour * (RETENTION["TELEMETRY_RAW_RETENTION_H"] + 2 + partition_h)
    rollup_bound = len(gpus) * 24 * (RETENTION["TELEMETRY_ROLLUP_RETENTION_D"] + 1)
    max_raw = max_rollups = 0
    with retention():
        for step in range(5 * 24 * per_hour):
            now = T0 + timedelta(minutes=10 * step)
            TelemetrySample.objects.bulk_create(
                TelemetrySample(gpu=g, at=now, utilization_pct=50.0, state=GPU.State.IDLE) for g in gpus
            )
            if step % 2 == 0:
                telemetry_rollup(now=now)
            if step % per_hour == 0:
                telemetry_prune(now=now)
            max_raw = max(max_raw, TelemetrySample.objects.count())
            max_rollups = max(max_rollups, TelemetryRollup.objects.count())

    assert max_raw <= raw_bound
    assert max_rollups <= rollup_bound
    # Nothing summarised was lost: every hour still inside the retention has its full count.
    kept = TelemetryRollup.objects.filter(hour__lt=now - timedelta(hours=1))
    assert kept.exists() and {r.samples for r in kept} == {per_hour}


def test_history_joins_rolled_up_hours_with_the_current_hour_from_raw_samples() -> None:
    gpu, other = GPUFactory(), GPUFactory()
    sample(gpu, T0 + timedelta(minutes=5), util=20.0)
    sample(gpu, T0 + timedelta(minutes=35), util=40.0)
    sample(gpu, T0 + timedelta(hours=2, minutes=5), util=60.0)
    sample(other, T0 + timedelta(minutes=5), util=99.0)
    telemetry_rollup(now=T0 + timedelta(hours=1, minutes=1))
    # The current hour (12:00) is not rolled up yet; 11:00 had no samples.
    sample(gpu, T0 + timedelta(hours=2, minutes=15), util=80.0, state=GPU.State.LEASED)

    points = gpu_history(gpu=gpu, since=T0 - timedelta(hours=3), until=T0 + timedelta(hours=2, minutes=20))

    assert [(p["hour"], p["partial"]) for p in points] == [(T0, False), (T0 + timedelta(hours=2), True)]
    assert points[0]["utilization_avg"] == 30.0 and points[0]["samples"] == 2
    assert points[1]["utilization_avg"] == 70.0 and points[1]["leased_ratio"] == 0.5


def test_history_refuses_an_empty_or_overlong_range() -> None:
    gpu = GPUFactory()
    with pytest.raises(ValidationFailed):
        gpu_history(gpu=gpu, since=T0, until=T0)
    with pytest.raises(ValidationFailed):
        gpu_history(gpu=gpu, since=T0 - timedelta(days=400), until=T0)


def test_a_partition_width_that_does_not_tile_the_day_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from marketplace.settings import env_divisor

    monkeypatch.setenv("TELEMETRY_PARTITION_H", "5")
    with pytest.raises(ImproperlyConfigured, match="TELEMETRY_PARTITION_H=5 must divide 24"):
        env_divisor("TELEMETRY_PARTITION_H", 6, of=24)
    monkeypatch.setenv("TELEMETRY_PARTITION_H", "8")
    assert env_divisor("TELEMETRY_PARTITION_H", 6, of=24) == 8
