"""The fleet dashboard (marketplace.dashboard): its figures on a hand-built fleet, and who may
see it."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from billing.models import LedgerEntry
from billing.services import Leg, job_budget_reserve, job_reserved, lease_unsettled, ledger_post
from jobs.models import Job, Lease
from jobs.services import lease_end
from marketplace.dashboard import fleet_dashboard
from marketplace.fleet_summary import fleet_hours_summarise, fleet_summary_run
from marketplace.models import FleetHour
from providers.models import GPU, TelemetryRollup, TelemetrySample
from providers.telemetry import hour_floor, telemetry_rollup
from tests.factories import GPUFactory, JobFactory, MachineFactory, ProviderFactory, fund, placed_lease

pytestmark = pytest.mark.django_db


def _points(svg: str) -> int:
    return len(re.findall(r'<circle class="point"', svg))


@pytest.fixture
def fleet():  # type: ignore[no-untyped-def]
    """Two machines of two GPUs; two hours of rollups; a lease the owner reclaimed after an hour
    of running and a lease still running; a charge of 0.25 tokens."""
    now = timezone.now()
    eu = MachineFactory(region="eu-west", provider=ProviderFactory())
    us = MachineFactory(region="us-east", provider=ProviderFactory())
    a1, a2 = (GPUFactory(machine=eu, index=i, model="A100") for i in range(2))
    h1 = GPUFactory(machine=us, index=0, model="H100")
    GPUFactory(machine=us, index=1, model="H100")
    last = hour_floor(now) - timedelta(hours=1)
    rollup = {"samples": 60, "utilization_avg": 50.0}
    TelemetryRollup.objects.bulk_create(
        [
            TelemetryRollup(gpu=a1, hour=last - timedelta(hours=1), idle_ratio=0.5, leased_ratio=0.5, **rollup),
            TelemetryRollup(gpu=a2, hour=last - timedelta(hours=1), idle_ratio=1.0, leased_ratio=0.0, **rollup),
            TelemetryRollup(gpu=a1, hour=last, idle_ratio=0.0, leased_ratio=1.0, **rollup),
        ]
    )
    reclaimed = placed_lease(gpus=[a1], started=now - timedelta(hours=2), interruptible=True)
    lease_end(
        lease_id=reclaimed.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="machine:1", at=now - timedelta(hours=1)
    )
    Job.objects.filter(pk=reclaimed.job_id).update(created_at=now - timedelta(hours=2, minutes=10))
    Lease.objects.filter(pk=reclaimed.pk).update(created_at=now - timedelta(hours=2))
    job = JobFactory()
    fund(job.renter, 10_000_000)
    job_budget_reserve(job=job)
    running = placed_lease(job=job, gpus=[h1], started=True)
    # Placed at the fixture's instant, however long the rows before took (a loaded machine).
    Lease.objects.filter(pk=running.pk).update(created_at=now)
    charge, _ = ledger_post(
        kind=LedgerEntry.Kind.CHARGE,
        idempotency_key=f"charge:{running.pk}:test",
        legs=[Leg(job_reserved(running.job_id), -250_000), Leg(lease_unsettled(running.pk), 250_000)],
        job_id=running.job_id,
        lease_id=running.pk,
    )
    JobFactory()  # waiting, never placed
    # The dashboard reads up to a second after this: after the charge, however long the rows
    # before it took (ledger entries are append-only, so it cannot be moved back to `now`).
    return max(now, charge.created_at)


def test_figures_come_from_the_rollups_leases_and_ledger(fleet) -> None:  # type: ignore[no-untyped-def]
    d = fleet_dashboard(range_name="day", now=fleet + timedelta(seconds=1))

    f = d.figures
    assert f["idle_offered_gpu_h"] == pytest.approx(3.0)  # idle 1.5 + leased 1.5
    assert f["rented_gpu_h"] == pytest.approx(1.5)
    assert f["share_rented"] == pytest.approx(0.5)
    # The reclaimed lease ran an hour on one GPU: all of it counted as lost.
    assert f["lost_gpu_h"] == pytest.approx(1.0)
    assert f["share_lost"] == pytest.approx(1 / 1.5)
    assert f["useful_gpu_h"] == pytest.approx(0.5)
    assert (f["placements"], f["preemptions"], f["owner_reclaims"]) == (2, 1, 1)
    assert str(f["revenue"]) == "0.250000"
    assert f["gpus_total"] == 4
    assert f["gpus_now"]["leased"] == 1
    # The reclaimed job went back to the queue; the other waits still.
    assert f["pending_now"] == 2
    by_model = {row["model"]: row for row in d.by_model}
    assert by_model["A100"]["share_rented"] == pytest.approx(0.5)
    assert by_model["A100"]["reclaims"] == 1
    by_region = {row["region"]: row for row in d.by_region}
    assert str(by_region["us-east"]["revenue"]) == "0.250000"
    assert by_region["eu-west"]["placements"] == 1


def test_every_chart_has_points_and_the_wait_is_the_placements(fleet) -> None:  # type: ignore[no-untyped-def]
    d = fleet_dashboard(range_name="day", now=fleet + timedelta(seconds=1))

    charts = {c.heading: c.svg for c in d.charts}
    # Two rollup hours and now, for each of the four states.
    assert _points(charts["GPUs by state"]) == 4 * 3
    assert "wait p50 (min), " in charts["Pending jobs and their wait"]
    assert re.search(r"wait p95 \(min\), [^<]*: 10</title>", charts["Pending jobs and their wait"])
    assert all(_points(svg) > 0 for svg in charts.values())


def test_the_hour_range_buckets_by_five_minutes(fleet) -> None:  # type: ignore[no-untyped-def]
    d = fleet_dashboard(range_name="hour", now=fleet + timedelta(seconds=1))

    assert d.bucket == timedelta(minutes=5)
    # The reclaim, an hour ago, is at the edge; the running lease was placed in the range.
    assert d.figures["placements"] == 1


def test_staff_see_the_dashboard_as_the_console_home(client, fleet) -> None:  # type: ignore[no-untyped-def]
    staff = get_user_model().objects.create_superuser("olga", password="pw")
    client.force_login(staff)

    response = client.get(reverse("admin:index"), {"range": "week"})

    assert response.status_code == 200
    body = response.content.decode()
    assert 'id="fleet-dashboard"' in body and "Fleet, last week" in body
    assert "times in UTC" in body
    assert body.count('<svg class="chart"') == 4
    # The admin's list of models is still there.
    assert reverse("admin:providers_machine_changelist") in body


@pytest.mark.parametrize("is_staff", [False, None])
def test_anyone_but_staff_is_sent_to_log_in(client, is_staff) -> None:  # type: ignore[no-untyped-def]
    if is_staff is not None:
        client.force_login(get_user_model().objects.create_user("mallory", password="pw", is_staff=is_staff))

    response = client.get(reverse("admin:index"))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert b"fleet-dashboard" not in response.content


def test_an_unknown_range_falls_back_to_the_day(admin_client) -> None:  # type: ignore[no-untyped-def]
    response = admin_client.get(reverse("admin:index"), {"range": "century"})

    assert response.status_code == 200
    assert "Fleet, last day" in response.content.decode()
    assert GPU.objects.count() == 0


def test_a_late_rollup_is_shown_at_once_and_its_hour_summarised_again(fleet) -> None:  # type: ignore[no-untyped-def]
    now = fleet + timedelta(seconds=1)
    fleet_hours_summarise(start=now - timedelta(days=7), end=now, now=now)
    before = fleet_dashboard(range_name="week", now=now).figures["rented_gpu_h"]
    gpu = GPU.objects.filter(model="H100").first()
    late_hour = hour_floor(now) - timedelta(hours=5)
    # An agent's samples of an hour summarised long ago, rolled up late (a backfill).
    TelemetrySample.objects.bulk_create(
        TelemetrySample(gpu=gpu, at=late_hour + timedelta(minutes=m), state=GPU.State.LEASED) for m in range(0, 60, 10)
    )

    telemetry_rollup(now=now, since=late_hour)

    # Shown at once, computed from the rollups while its summary is stale...
    assert FleetHour.objects.get(hour=late_hour).stale
    assert fleet_dashboard(range_name="week", now=now).figures["rented_gpu_h"] == pytest.approx(before + 1.0)
    # ...and summarised again by the next run.
    fleet_summary_run(now=now)
    summary = FleetHour.objects.get(hour=late_hour)
    assert not summary.stale and summary.leased_gpu_h == pytest.approx(1.0)
    assert fleet_dashboard(range_name="week", now=now).figures["rented_gpu_h"] == pytest.approx(before + 1.0)
