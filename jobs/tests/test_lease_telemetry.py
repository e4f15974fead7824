"""What a renter sees of its lease's GPUs: GET /api/v1/leases/{id}/telemetry/ (per-GPU utilisation
and memory, downsampled) and the job detail's gpu_utilization_mean (jobs.lease_telemetry)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.lease_telemetry import job_gpu_utilization_mean, lease_telemetry
from jobs.models import Lease
from jobs.services import lease_end
from providers.models import GPU, TelemetryRollup, TelemetrySample
from providers.telemetry import hour_floor, telemetry_prune, telemetry_rollup
from tests.factories import JobFactory, placed_lease

pytestmark = pytest.mark.django_db


def samples(gpu: GPU, start: datetime, minutes: int, *, util: float, mem: int = 1000, state: str = "leased") -> None:
    """One sample a minute for `minutes` minutes, the first 30 s after `start`."""
    TelemetrySample.objects.bulk_create(
        TelemetrySample(
            gpu=gpu,
            at=start + timedelta(seconds=30 + 60 * i),
            utilization_pct=util,
            memory_used_mb=mem,
            temperature_c=50.0,
            power_w=100.0,
            state=state,
        )
        for i in range(minutes)
    )


def running_lease(renter, *, started: datetime, gpus: int = 1) -> Lease:  # type: ignore[no-untyped-def]
    return placed_lease(job=JobFactory(renter=renter, gpu_count=gpus), started=started)


def telemetry(client, lease_id: int, query: str = ""):  # type: ignore[no-untyped-def]
    return client.get(f"/api/v1/leases/{lease_id}/telemetry/{query}")


def test_a_running_lease_reports_its_gpus_average_per_bucket_up_to_now(renter_client):
    client, renter = renter_client
    start = timezone.now().replace(microsecond=0) - timedelta(hours=1)
    lease = running_lease(renter, started=start)
    gpu = lease.gpus.get()
    # Before the lease (another renter's, or the owner's): not this lease's telemetry.
    samples(gpu, start - timedelta(minutes=10), 10, util=100.0, mem=9000)
    # The lease's first half hour busy, the second half mostly waiting.
    samples(gpu, start, 30, util=80.0, mem=1000)
    samples(gpu, start + timedelta(minutes=30), 30, util=20.0, mem=3000)

    response = telemetry(client, lease.pk, "?points=2")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["running"] is True
    assert datetime.fromisoformat(body["since"]) == start
    assert timezone.now() - datetime.fromisoformat(body["until"]) < timedelta(seconds=30)
    assert body["points_max"] == 2
    assert body["bucket_s"] >= 1800
    (series,) = body["gpus"]
    assert series["uuid"] == gpu.uuid
    assert series["utilization_mean"] == pytest.approx(50.0)
    first, second = series["points"]
    assert datetime.fromisoformat(first["at"]) == start
    assert (first["samples"], first["utilization_avg"], first["utilization_max"]) == (30, 80.0, 80.0)
    assert first["memory_used_max_mb"] == 1000
    assert (second["samples"], second["utilization_avg"], second["memory_used_max_mb"]) == (30, 20.0, 3000)
    assert first["resolution_s"] == body["bucket_s"]


def test_an_ended_lease_stops_at_its_end_and_ignores_what_the_gpu_did_after(renter_client):
    client, renter = renter_client
    start = timezone.now().replace(microsecond=0) - timedelta(hours=3)
    lease = running_lease(renter, started=start)
    gpu = lease.gpus.get()
    samples(gpu, start, 60, util=60.0)
    lease_end(
        lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", exit_code=0, at=start + timedelta(hours=1)
    )
    samples(gpu, start + timedelta(hours=1), 60, util=100.0, state="idle")

    body = telemetry(client, lease.pk).json()

    assert body["running"] is False
    assert datetime.fromisoformat(body["until"]) == start + timedelta(hours=1)
    (series,) = body["gpus"]
    # 120 points asked for an hour: one a minute, each one sample.
    assert body["bucket_s"] == 60
    assert len(series["points"]) == 60
    assert {p["utilization_avg"] for p in series["points"]} == {60.0}
    assert series["utilization_mean"] == 60.0


def test_points_never_exceed_what_was_asked_for(renter_client):
    client, renter = renter_client
    start = timezone.now().replace(microsecond=0) - timedelta(hours=2)
    lease = running_lease(renter, started=start, gpus=2)
    for gpu in lease.gpus.all():
        samples(gpu, start, 120, util=float(gpu.index))

    body = telemetry(client, lease.pk, "?points=7").json()

    assert [len(s["points"]) for s in body["gpus"]] == [7, 7]
    assert sum(p["samples"] for p in body["gpus"][0]["points"]) == 120
    assert [s["utilization_mean"] for s in body["gpus"]] == sorted(float(g.index) for g in lease.gpus.all())


@pytest.mark.parametrize("query", ["?points=0", "?points=1001", "?points=many", "?point=10"])
def test_a_points_value_out_of_bounds_is_a_400_naming_it(renter_client, query):
    client, renter = renter_client
    lease = running_lease(renter, started=timezone.now() - timedelta(minutes=5))

    response = telemetry(client, lease.pk, query)

    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert ("points" if "points" in query else "point") in response.json()["detail"]


def test_another_renters_lease_is_a_404(renter_client):
    client, _ = renter_client
    lease = placed_lease(started=timezone.now() - timedelta(minutes=5))

    response = telemetry(client, lease.pk)

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_a_lease_not_started_yet_has_no_range_and_no_points(renter_client):
    client, renter = renter_client
    lease = placed_lease(job=JobFactory(renter=renter))

    body = telemetry(client, lease.pk).json()

    assert (body["since"], body["until"], body["running"]) == (None, None, True)
    assert body["gpus"][0]["points"] == []
    assert body["gpus"][0]["utilization_mean"] is None


def test_an_old_lease_is_read_from_the_hourly_rollups_once_its_samples_are_pruned():
    # Given a lease of two whole hours, four hours ago, whose raw samples are past retention.
    now = timezone.now()
    top = hour_floor(now)
    lease = placed_lease(started=top - timedelta(hours=4))
    gpu = lease.gpus.get()
    samples(gpu, top - timedelta(hours=4), 60, util=10.0, mem=500)
    samples(gpu, top - timedelta(hours=3), 60, util=30.0, mem=700)
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", at=top - timedelta(hours=2))
    samples(gpu, top - timedelta(hours=2), 60, util=99.0, state="idle")
    with override_settings(GPGPU={**settings.GPGPU, "TELEMETRY_RAW_RETENTION_H": 1}):
        telemetry_rollup(now=now)
        # Retention takes the raw samples (row by row on SQLite; with their partition, later, on
        # PostgreSQL: providers/tests/test_telemetry_partitions.py).
        TelemetrySample.objects.filter(gpu=gpu, at__lt=top - timedelta(hours=2)).delete()
        assert TelemetryRollup.objects.filter(gpu=gpu).count() == 3

        # When its telemetry is read.
        result = lease_telemetry(lease=Lease.objects.get(pk=lease.pk), points=120, now=now)
        mean = job_gpu_utilization_mean(job_id=lease.job_id, now=now)

    # Then one point per hour, marked as hourly, with the hours' figures; the hour after it is not its.
    (series,) = result.gpus
    assert [(p.at, p.resolution_s, p.samples) for p in series.points] == [
        (top - timedelta(hours=4), 3600, 60),
        (top - timedelta(hours=3), 3600, 60),
    ]
    assert [(p.utilization_avg, p.memory_used_max_mb) for p in series.points] == [(10.0, 500), (30.0, 700)]
    assert series.utilization_mean == pytest.approx(20.0)
    assert mean == pytest.approx(20.0)


@pytest.mark.parametrize("rolled_up", [False, True], ids=["not-rolled-up-yet", "rolled-up-not-pruned-yet"])
def test_samples_past_retention_count_once_whether_or_not_their_hour_is_rolled_up(rolled_up):
    now = timezone.now()
    top = hour_floor(now)
    lease = placed_lease(started=top - timedelta(hours=4))
    gpu = lease.gpus.get()
    samples(gpu, top - timedelta(hours=4), 60, util=10.0)
    samples(gpu, top - timedelta(hours=3), 60, util=30.0)
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", at=top - timedelta(hours=2))
    with override_settings(GPGPU={**settings.GPGPU, "TELEMETRY_RAW_RETENTION_H": 1}):
        if rolled_up:
            telemetry_rollup(now=now)
        result = lease_telemetry(lease=Lease.objects.get(pk=lease.pk), points=120, now=now)
        mean = job_gpu_utilization_mean(job_id=lease.job_id, now=now)

    (series,) = result.gpus
    assert sum(p.samples for p in series.points) == 120
    assert {p.resolution_s for p in series.points} == ({3600} if rolled_up else {60})
    assert series.utilization_mean == pytest.approx(20.0)
    assert mean == pytest.approx(20.0)


def test_a_lease_across_the_retention_line_reads_rollups_before_it_and_samples_after():
    now = hour_floor(timezone.now()) + timedelta(minutes=30)
    top = hour_floor(now)
    lease = placed_lease(started=top - timedelta(hours=2))
    gpu = lease.gpus.get()
    samples(gpu, top - timedelta(hours=2), 120, util=10.0)
    samples(gpu, top, 29, util=40.0)
    with override_settings(GPGPU={**settings.GPGPU, "TELEMETRY_RAW_RETENTION_H": 1}):
        telemetry_rollup(now=now)
        telemetry_prune(now=now)
        result = lease_telemetry(lease=Lease.objects.get(pk=lease.pk), points=150, now=now)
        mean = job_gpu_utilization_mean(job_id=lease.job_id, now=now)

    (series,) = result.gpus
    assert [(p.resolution_s, p.samples) for p in series.points[:2]] == [(3600, 60), (3600, 60)]
    assert {(p.resolution_s, p.samples, p.utilization_avg) for p in series.points[2:]} == {(60, 1, 40.0)}
    assert len(series.points) == 2 + 29
    assert mean == pytest.approx((120 * 10.0 + 29 * 40.0) / 149)
    assert series.utilization_mean == pytest.approx(mean)


def test_the_number_of_queries_does_not_grow_with_the_samples(renter_client):
    client, renter = renter_client
    start = timezone.now().replace(microsecond=0) - timedelta(hours=6)
    lease = running_lease(renter, started=start, gpus=2)
    for gpu in lease.gpus.all():
        samples(gpu, start, 360, util=50.0)

    with CaptureQueriesContext(connection) as queries:
        response = telemetry(client, lease.pk, "?points=1000")

    assert response.status_code == 200
    # Authentication and throttling, the lease with its GPUs, one GROUP BY for the samples.
    assert len(queries) <= 8, [q["sql"] for q in queries]
    assert sum(p["samples"] for s in response.json()["gpus"] for p in s["points"]) == 720


# --- the job's summary ----------------------------------------------------------------------


def test_the_job_detail_shows_a_job_that_leaves_its_gpu_idle(renter_client):
    client, renter = renter_client
    start = timezone.now().replace(microsecond=0) - timedelta(hours=1)
    idle = running_lease(renter, started=start)
    busy = running_lease(renter, started=start)
    samples(idle.gpus.get(), start, 60, util=0.0)
    samples(busy.gpus.get(), start, 60, util=95.0)

    idle_job = client.get(f"/api/v1/jobs/{idle.job_id}/").json()
    busy_job = client.get(f"/api/v1/jobs/{busy.job_id}/").json()

    assert idle_job["gpu_utilization_mean"] == pytest.approx(0.0)
    assert busy_job["gpu_utilization_mean"] == pytest.approx(95.0)


def test_the_job_mean_weighs_every_sample_of_every_lease_and_none_outside_them(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter, gpu_count=1)
    start = timezone.now().replace(microsecond=0) - timedelta(hours=3)
    first = placed_lease(job=job, started=start)
    gpu = first.gpus.get()
    samples(gpu, start, 30, util=40.0)
    lease_end(
        lease_id=first.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test", at=start + timedelta(minutes=30)
    )
    # The owner's own use between the two leases is not the job's.
    samples(gpu, start + timedelta(minutes=30), 30, util=100.0, state="owner_busy")
    job.refresh_from_db()
    second = placed_lease(job=job, gpus=[gpu], started=start + timedelta(hours=1))
    samples(gpu, start + timedelta(hours=1), 90, util=80.0)

    body = client.get(f"/api/v1/jobs/{second.job_id}/").json()

    assert body["gpu_utilization_mean"] == pytest.approx((30 * 40.0 + 90 * 80.0) / 120)


def test_a_job_without_telemetry_has_no_mean(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter)

    assert client.get(f"/api/v1/jobs/{job.pk}/").json()["gpu_utilization_mean"] is None
