"""The fleet's hourly summary (marketplace.fleet_summary): the dashboard shows the same figures
whether an hour comes from the summary or from its sources, and an hour whose sources change
after it was summarised is recomputed."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from billing.models import LedgerEntry, Settlement
from billing.services import Leg, job_budget_reserve, job_reserved, lease_unsettled, ledger_post
from jobs.models import Job, Lease
from jobs.services import lease_end
from marketplace import fleet_summary
from marketplace.dashboard import fleet_dashboard
from marketplace.fleet_summary import (
    bucket_figures,
    figures_by_hour,
    fleet_hours_due,
    fleet_hours_summarise,
    fleet_summary_run,
)
from marketplace.models import FleetHour, FleetHourSlice
from providers.models import GPU, TelemetryRollup, TelemetrySample
from providers.telemetry import hour_floor, telemetry_rollup
from tests.factories import GPUFactory, JobFactory, MachineFactory, ProviderFactory, fund, placed_lease

pytestmark = pytest.mark.django_db
HOUR = timedelta(hours=1)
HOURS = 30


def _rounded(value: Any) -> Any:
    """Floats to 9 places (sums in another order), settlement lags sorted, figures that are 0
    left out (every reader takes an absent figure as 0), everywhere inside."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {
            k: sorted(_rounded(v)) if k == "lags" else _rounded(v)
            for k, v in value.items()
            if not (isinstance(v, int | float) and not isinstance(v, bool) and v == 0)
        }
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


@pytest.fixture
def history(monkeypatch):  # type: ignore[no-untyped-def]
    """HOURS hours of a small fleet made at random (seeded): three machines in two regions and
    none, one of them with GPUs of two models; rollups with hours missing; leases placed, ended
    (some reclaimed, some lost) and still running, one across two models; charges in many hours;
    settlements confirmed. Returns now."""
    rng = random.Random(14)
    now = timezone.now()
    start = hour_floor(now) - HOURS * HOUR
    eu = MachineFactory(region="eu-west", provider=ProviderFactory())
    us = MachineFactory(region="us-east", provider=ProviderFactory())
    bare = MachineFactory(region="", provider=ProviderFactory())
    gpus = [GPUFactory(machine=eu, index=i, model="A100" if i < 2 else "H100") for i in range(3)]
    gpus += [GPUFactory(machine=us, index=i, model="H100") for i in range(2)]
    gpus += [GPUFactory(machine=bare, index=0, model="L40S")]
    rollups = []
    for gpu in gpus:
        for h in range(HOURS):
            if rng.random() < 0.85:
                idle = rng.random()
                rollups.append(
                    TelemetryRollup(
                        gpu=gpu,
                        hour=start + h * HOUR,
                        samples=60,
                        idle_ratio=idle,
                        leased_ratio=rng.random() * (1 - idle),
                    )
                )
    TelemetryRollup.objects.bulk_create(rollups)
    reasons = [Lease.EndReason.SUCCEEDED, Lease.EndReason.PREEMPTED_BY_OWNER, Lease.EndReason.LOST, None]
    busy: set[GPU] = set()
    for n in range(14):
        placed_at = start + timedelta(minutes=rng.randrange(0, (HOURS - 1) * 60))
        reason = reasons[n % len(reasons)]
        # A lease still running holds its GPU; the L40S stays free for a test's own lease.
        free = [g for g in gpus if g not in busy and (reason is not None or g.model != "L40S")]
        on = [gpus[0], gpus[2]] if n == 0 else [rng.choice(free)]
        if reason is None:
            busy.update(on)
        job = JobFactory(gpu_count=len(on))
        fund(job.renter, 100_000_000)
        job_budget_reserve(job=job)
        lease = placed_lease(job=job, gpus=on, started=placed_at + timedelta(seconds=30))
        Lease.objects.filter(pk=lease.pk).update(created_at=placed_at)
        Job.objects.filter(pk=job.pk).update(created_at=placed_at - timedelta(minutes=rng.randrange(1, 40)))
        for charge in range(rng.randrange(0, 4)):
            at = placed_at + timedelta(minutes=rng.randrange(1, 180))
            amount = rng.randrange(1, 25) * 1000
            with monkeypatch.context() as m:
                m.setattr(timezone, "now", lambda at=at: min(at, now))
                ledger_post(
                    kind=LedgerEntry.Kind.CHARGE,
                    idempotency_key=f"charge:{lease.pk}:{charge}",
                    legs=[Leg(job_reserved(job.pk), -amount), Leg(lease_unsettled(lease.pk), amount)],
                    job_id=job.pk,
                    lease_id=lease.pk,
                )
        if reason is not None:
            ended_at = min(placed_at + timedelta(minutes=rng.randrange(10, 300)), now - timedelta(seconds=1))
            lease_end(lease_id=lease.pk, reason=reason, actor="machine:1", at=ended_at)
    for h in range(0, HOURS, 3):
        confirmed = start + h * HOUR + timedelta(minutes=rng.randrange(0, 60))
        settlement = Settlement.objects.create(status=Settlement.Status.CONFIRMED, confirmed_at=confirmed)
        created = confirmed - timedelta(minutes=rng.randrange(2, 20))
        Settlement.objects.filter(pk=settlement.pk).update(created_at=created)
    return now


def test_the_summary_gives_back_what_the_sources_give(history) -> None:  # type: ignore[no-untyped-def]
    now = history
    start = hour_floor(now) - (HOURS + 2) * HOUR
    from_sources = bucket_figures(start, now, HOUR)
    assert len([at for at, f in from_sources.items() if f.get("revenue")]) > 3  # the history is not empty

    assert fleet_hours_summarise(start=start, end=now, now=now) == HOURS + 2

    assert FleetHourSlice.objects.filter(dimension="model", key="L40S").exists()
    assert _rounded(figures_by_hour(start, now)) == _rounded(from_sources)


def test_the_dashboard_is_the_same_from_the_summary(history, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    now = history
    live = {name: fleet_dashboard(range_name=name, now=now) for name in ("day", "week")}
    fleet_summary_run(now=now)
    spans: list[tuple[datetime, datetime]] = []
    computed = fleet_summary.bucket_figures

    def recorded(start: datetime, end: datetime, step: timedelta) -> dict[datetime, Any]:
        spans.append((start, end))
        return computed(start, end, step)

    monkeypatch.setattr(fleet_summary, "bucket_figures", recorded)

    for name, expected in live.items():
        got = fleet_dashboard(range_name=name, now=now)
        assert _rounded(got.figures) == _rounded(expected.figures), name
        assert _rounded(got.by_model) == _rounded(expected.by_model), name
        assert _rounded(got.by_region) == _rounded(expected.by_region), name
        assert [c.heading for c in got.charts] == [c.heading for c in expected.charts]
    # Only the current hour came from the sources.
    assert set(spans) == {(hour_floor(now), now)}


def test_a_lease_ended_back_in_a_summarised_hour_is_shown_and_summarised_again(history) -> None:  # type: ignore[no-untyped-def]
    now = timezone.now()
    fleet_summary_run(now=now)
    lease = placed_lease(gpus=[GPU.objects.filter(model="L40S").get()], started=now - 3 * HOUR)
    before = fleet_dashboard(range_name="day", now=now).figures["owner_reclaims"]

    # The machine's last heartbeat came two hours ago: the lease ended then.
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="machine:1", at=now - 2 * HOUR)

    hour = hour_floor(now - 2 * HOUR)
    assert FleetHour.objects.get(hour=hour).stale
    assert fleet_dashboard(range_name="day", now=now).figures["owner_reclaims"] == before + 1
    fleet_summary_run(now=now)
    assert FleetHour.objects.get(hour=hour).reclaims >= 1 and not FleetHour.objects.get(hour=hour).stale
    assert fleet_dashboard(range_name="day", now=now).figures["owner_reclaims"] == before + 1


def test_a_run_recomputes_the_recent_hours_and_fills_the_missing_ones(history) -> None:  # type: ignore[no-untyped-def]
    now = history
    this_hour = hour_floor(now)
    assert len(fleet_hours_due(now=now)) == 7 * 24  # nothing summarised: the whole week

    fleet_summary_run(now=now)
    rows = list(FleetHour.objects.order_by("hour").values_list("hour", "leased_gpu_h", "revenue_micro"))
    FleetHour.objects.filter(hour=this_hour - 10 * HOUR).delete()

    assert fleet_hours_due(now=now) == [this_hour - 10 * HOUR, this_hour - 2 * HOUR, this_hour - HOUR]
    # Running again gives the same rows.
    fleet_summary_run(now=now)
    assert list(FleetHour.objects.order_by("hour").values_list("hour", "leased_gpu_h", "revenue_micro")) == rows
    assert FleetHour.objects.count() == 7 * 24


def test_the_backfill_command_summarises_the_days_asked_for(history) -> None:  # type: ignore[no-untyped-def]
    call_command("fleet_summarise", days=2)

    assert FleetHour.objects.count() == 48
    assert not FleetHour.objects.filter(hour__gte=hour_floor(timezone.now())).exists()


def test_five_minute_buckets_add_up_to_their_hours(history) -> None:  # type: ignore[no-untyped-def]
    now = history
    start, end = hour_floor(now) - HOURS * HOUR, hour_floor(now)
    hours = bucket_figures(start, end, HOUR)
    fives = bucket_figures(start, end, timedelta(minutes=5))

    for name in ("placements", "preemptions", "reclaims", "revenue", "in", "out"):
        summed: dict[datetime, int] = {}
        for at, f in fives.items():
            summed[hour_floor(at)] = summed.get(hour_floor(at), 0) + f.get(name, 0)
        assert {at: n for at, n in summed.items() if n} == {at: f[name] for at, f in hours.items() if f.get(name)}, name
    assert sum(f.get("revenue", 0) for f in fives.values()) > 0


def test_a_late_rollup_asks_for_a_summary_run_once_committed(
    history, fleet_summary_requested, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    now = history
    fleet_summary_run(now=now)
    hour = hour_floor(now) - 20 * HOUR
    gpu = GPU.objects.filter(model="L40S").get()
    TelemetrySample.objects.create(gpu=gpu, at=hour + timedelta(minutes=5), state=GPU.State.IDLE)

    with django_capture_on_commit_callbacks(execute=True):
        telemetry_rollup(now=now, since=hour)

    assert FleetHour.objects.filter(stale=True).count() == 20
    assert len(fleet_summary_requested) == 1
    fleet_summary_run(now=now)
    assert not FleetHour.objects.filter(stale=True).exists()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's planner settings")
@pytest.mark.django_db
def test_an_error_in_a_short_spans_reads_is_the_one_raised_and_leaves_the_planner_as_it_found_it() -> None:
    now = timezone.now()
    with transaction.atomic(), connection.cursor() as cursor:
        with pytest.raises(DatabaseError, match="no_such_table"), fleet_summary._along_indexes(now - HOUR, now):
            cursor.execute("SELECT * FROM no_such_table")

        cursor.execute("SELECT current_setting('enable_hashjoin'), current_setting('enable_mergejoin')")
        assert cursor.fetchone() == ("on", "on")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's planner settings")
def test_the_current_hours_ledger_leaves_the_planner_as_it_found_it(history) -> None:  # type: ignore[no-untyped-def]
    now = history
    with transaction.atomic(), connection.cursor() as cursor:
        bucket_figures(hour_floor(now), now, HOUR)

        cursor.execute("SELECT current_setting('enable_hashjoin'), current_setting('enable_mergejoin')")
        assert cursor.fetchone() == ("on", "on")
