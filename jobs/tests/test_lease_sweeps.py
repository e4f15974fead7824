"""The lease sweeper: leases never started time out, leases past their job's max duration are
stopped, then ended if the agent does not stop them."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs import services
from jobs.models import Job, Lease
from jobs.services import Placement, lease_mark_started, leases_assign
from jobs.tasks import sweep_leases
from providers.models import GPU
from tests.factories import JobFactory, machine_with_gpus

pytestmark = pytest.mark.django_db


def assign(job: Job) -> Lease:
    machine = machine_with_gpus(count=1)
    with transaction.atomic():
        [lease] = leases_assign(
            placements=[
                Placement(
                    job_id=job.pk,
                    machine_id=machine.pk,
                    gpu_ids=(machine.gpus.get().pk,),
                    price_per_gpu_hour=Decimal("0.5"),
                )
            ]
        )
    return lease


def running(job: Job, *, for_s: int) -> Lease:
    lease = assign(job)
    lease_mark_started(lease_id=lease.pk, actor="test")
    Lease.objects.filter(pk=lease.pk).update(started_at=timezone.now() - timedelta(seconds=for_s))
    return lease


def test_lease_not_started_in_time_is_ended_and_its_job_requeued() -> None:
    timeout = settings.GPGPU["LEASE_START_TIMEOUT_S"]
    stale = assign(JobFactory())
    Lease.objects.filter(pk=stale.pk).update(created_at=timezone.now() - timedelta(seconds=timeout + 1))
    fresh = assign(JobFactory())

    result = sweep_leases()

    assert result["start_timeouts"] == 1
    stale.refresh_from_db()
    assert (stale.status, stale.end_reason) == (Lease.Status.ENDED, "start_timeout")
    assert Job.objects.get(pk=stale.job_id).status == Job.Status.PENDING
    assert GPU.objects.get(lease_gpus__lease=stale).state == GPU.State.IDLE
    fresh.refresh_from_db()
    assert fresh.status == Lease.Status.ASSIGNED


def test_start_timeouts_fail_the_job_once_attempts_run_out(settings) -> None:  # type: ignore[no-untyped-def]
    settings.GPGPU = {**settings.GPGPU, "JOB_MAX_ATTEMPTS": 1}
    lease = assign(JobFactory())
    Lease.objects.filter(pk=lease.pk).update(created_at=timezone.now() - timedelta(hours=1))

    services.leases_sweep()

    job = Job.objects.get(pk=lease.job_id)
    assert job.status == Job.Status.FAILED
    assert "start_timeout" in job.failure_reason


def test_lease_past_max_duration_is_asked_to_stop_then_ended() -> None:
    job = JobFactory(expected_duration_s=60, max_duration_s=120)
    over = running(job, for_s=121)
    within = running(JobFactory(expected_duration_s=60, max_duration_s=120), for_s=100)

    first = services.leases_sweep()

    assert first.stops_requested == 1
    over.refresh_from_db()
    assert over.status == Lease.Status.RUNNING
    assert over.stop_reason == "max_duration" and over.stop_requested_at is not None
    assert Lease.objects.get(pk=within.pk).stop_requested_at is None

    # A sweep inside the grace period leaves it to the agent.
    assert services.leases_sweep().ended_after_stop == 0
    Lease.objects.filter(pk=over.pk).update(
        stop_requested_at=timezone.now() - timedelta(seconds=services.STOP_GRACE_S + 1)
    )

    last = services.leases_sweep()

    assert last.ended_after_stop == 1
    over.refresh_from_db()
    assert (over.status, over.end_reason) == (Lease.Status.ENDED, "max_duration")
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert "max_duration" in job.failure_reason


def test_repeated_sweeps_do_not_ask_twice() -> None:
    lease = running(JobFactory(expected_duration_s=60, max_duration_s=60), for_s=61)

    services.leases_sweep()
    asked_at = Lease.objects.get(pk=lease.pk).stop_requested_at
    again = services.leases_sweep()

    assert again.stops_requested == 0
    assert Lease.objects.get(pk=lease.pk).stop_requested_at == asked_at
