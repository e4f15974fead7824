"""The lease sweeper: leases never started time out, leases past their job's max duration are
stopped, then ended if the agent does not stop them."""

from __future__ import annotations

import secrets
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from billing import services as billing_services
from jobs import sweeps
from jobs.models import Job, Lease
from jobs.services import JobSpec
from jobs.tasks import sweep_leases
from marketplace.submit import job_submit
from providers import services as provider_services
from providers.models import GPU, Machine
from tests.factories import JobFactory, RenterFactory, placed_lease

pytestmark = pytest.mark.django_db


def running(job: Job, *, for_s: int) -> Lease:
    """`job` leased on a fresh machine, running for `for_s` seconds."""
    return placed_lease(job=job, started=timezone.now() - timedelta(seconds=for_s))


def test_lease_not_started_in_time_is_ended_and_its_job_requeued() -> None:
    timeout = settings.GPGPU["LEASE_START_TIMEOUT_S"]
    stale = placed_lease()
    Lease.objects.filter(pk=stale.pk).update(created_at=timezone.now() - timedelta(seconds=timeout + 1))
    fresh = placed_lease()

    result = sweep_leases()

    assert result["start_timeouts"] == 1
    stale.refresh_from_db()
    assert (stale.status, stale.end_reason) == (Lease.Status.ENDED, "start_timeout")
    assert Job.objects.get(pk=stale.job_id).status == Job.Status.PENDING
    assert GPU.objects.get(lease_gpus__lease=stale).state == GPU.State.IDLE
    fresh.refresh_from_db()
    assert fresh.status == Lease.Status.ASSIGNED


def test_a_lease_its_agent_reports_starting_waits_for_its_image_up_to_the_maximum(settings) -> None:  # type: ignore[no-untyped-def]
    """A large image takes minutes to pull: ended at LEASE_START_TIMEOUT_S while its agent was
    pulling, the job was placed again elsewhere, and the workload started here too once the image
    was in (the agent told to stop it only at its next heartbeat), an attempt spent for nothing."""
    from tests.factories import agent_client, gpu_entry, heartbeat

    timeout, most = settings.GPGPU["LEASE_START_TIMEOUT_S"], settings.GPGPU["LEASE_START_MAX_S"]
    pulling, silent = placed_lease(), placed_lease()
    gpu = pulling.gpus.get()
    answer = heartbeat(
        agent_client(pulling.machine), [gpu_entry(gpu.uuid, gpu.index)], [{"lease_id": pulling.pk, "state": "starting"}]
    )
    assert answer.status_code == 200 and answer.json()["start"] == []  # listed: not ordered again
    placed = timezone.now() - timedelta(seconds=timeout + 1)
    Lease.objects.filter(pk__in=[pulling.pk, silent.pk]).update(created_at=placed)

    assert sweep_leases()["start_timeouts"] == 1

    assert Lease.objects.get(pk=silent.pk).end_reason == "start_timeout"
    assert Lease.objects.get(pk=pulling.pk).status == Lease.Status.ASSIGNED
    Lease.objects.filter(pk=pulling.pk).update(created_at=timezone.now() - timedelta(seconds=most + 1))
    assert sweep_leases()["start_timeouts"] == 1
    ended = Lease.objects.get(pk=pulling.pk)
    assert (ended.end_reason, ended.end_detail) == (
        "start_timeout",
        f"the agent did not start it within {most} seconds",
    )


def test_start_timeouts_fail_the_job_once_attempts_run_out(settings) -> None:  # type: ignore[no-untyped-def]
    settings.GPGPU = {**settings.GPGPU, "JOB_MAX_ATTEMPTS": 1}
    lease = placed_lease()
    Lease.objects.filter(pk=lease.pk).update(created_at=timezone.now() - timedelta(hours=1))

    sweeps.leases_sweep()

    job = Job.objects.get(pk=lease.job_id)
    assert job.status == Job.Status.FAILED
    assert "start_timeout" in job.failure_reason


def test_lease_past_max_duration_is_asked_to_stop_then_ended() -> None:
    job = JobFactory(expected_duration_s=60, max_duration_s=120)
    over = running(job, for_s=121)
    within = running(JobFactory(expected_duration_s=60, max_duration_s=120), for_s=100)

    first = sweeps.leases_sweep()

    assert first.stops_requested == 1
    over.refresh_from_db()
    assert over.status == Lease.Status.RUNNING
    assert over.stop_reason == "max_duration" and over.stop_requested_at is not None
    assert Lease.objects.get(pk=within.pk).stop_requested_at is None

    # A sweep inside the grace period leaves it to the agent.
    assert sweeps.leases_sweep().ended_after_stop == 0
    Lease.objects.filter(pk=over.pk).update(
        stop_requested_at=timezone.now() - timedelta(seconds=sweeps.STOP_GRACE_S + 1)
    )

    last = sweeps.leases_sweep()

    assert last.ended_after_stop == 1
    over.refresh_from_db()
    assert (over.status, over.end_reason) == (Lease.Status.ENDED, "max_duration")
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert "max_duration" in job.failure_reason


def test_repeated_sweeps_do_not_ask_twice() -> None:
    lease = running(JobFactory(expected_duration_s=60, max_duration_s=60), for_s=61)

    sweeps.leases_sweep()
    asked_at = Lease.objects.get(pk=lease.pk).stop_requested_at
    again = sweeps.leases_sweep()

    assert again.stops_requested == 0
    assert Lease.objects.get(pk=lease.pk).stop_requested_at == asked_at


def test_an_agent_that_ignores_the_stop_is_ended_at_the_maximum_and_billed_no_further() -> None:
    """An agent that heartbeats and reports usage as if nothing happened, 138 s into a lease
    whose job may run 60 s: the marketplace asks it to stop, ends the lease without it, frees
    the GPU, and bills 60 s."""
    job = job_submit(
        renter=RenterFactory(),
        spec=JobSpec(
            kind=Job.Kind.PROCESS,
            command=["sleep", "600"],
            gpu_count=1,
            max_price_per_gpu_hour=Decimal("1.00"),
            expected_duration_s=60,
            max_duration_s=60,
        ),
    )[0]
    t0 = timezone.now() - timedelta(seconds=200)
    lease = placed_lease(job=job, price="0.5", started=t0)
    machine = Machine.objects.get(pk=lease.machine_id)
    client = _agent_client(machine)
    gpu = GPU.objects.get(lease_gpus__lease=lease)

    def beat() -> dict:  # type: ignore[type-arg]
        body = {
            "gpus": [{"uuid": gpu.uuid, "index": gpu.index, "model": gpu.model, "vram_mb": gpu.vram_mb, "idle": False}],
            "leases": [{"lease_id": lease.pk, "state": "running"}],
        }
        response = client.post("/api/agent/v1/heartbeat", body, format="json")
        assert response.status_code == 200, response.content
        return response.json()

    def usage(start_s: int, end_s: int) -> int:
        response = client.post(
            f"/api/agent/v1/leases/{lease.pk}/usage",
            {
                "report_id": f"u-{start_s}",
                "period_start": (t0 + timedelta(seconds=start_s)).isoformat(),
                "period_end": (t0 + timedelta(seconds=end_s)).isoformat(),
                "gpu_seconds": str(end_s - start_s),
            },
            format="json",
        )
        return response.status_code

    # The agent runs on past the maximum and says so.
    assert usage(0, 60) == 201
    assert usage(60, 120) == 201
    sweeps.leases_sweep(now=t0 + timedelta(seconds=75))
    # The request is stamped with the wall clock; put it where the sweep's clock is.
    Lease.objects.filter(pk=lease.pk).update(stop_requested_at=t0 + timedelta(seconds=75))
    assert [s["lease_id"] for s in beat()["stop"]] == [lease.pk]  # asked; ignored
    assert usage(120, 138) == 201

    sweeps.leases_sweep(now=t0 + timedelta(seconds=75 + sweeps.STOP_GRACE_S + 1))

    lease.refresh_from_db()
    assert (lease.status, lease.end_reason) == (Lease.Status.ENDED, "max_duration")
    assert lease.ended_at == t0 + timedelta(seconds=60)
    assert GPU.objects.get(pk=gpu.pk).state != GPU.State.LEASED  # the GPU is the owner's again
    assert Job.objects.get(pk=job.pk).status == Job.Status.FAILED
    charge = billing_services.lease_meter(
        lease_id=lease.pk, now=t0 + timedelta(seconds=60 + settings.BILLING_FINALIZE_GRACE_S + 1)
    )
    assert charge.final and charge.billable_seconds == 60
    assert charge.cumulative_micro == 500_000 * 60 // 3600  # 60 s at the lease price of 0.50 per hour
    # What the agent reports afterwards is outside the lease.
    assert usage(138, 150) == 400
    assert beat()["stop"][0]["lease_id"] == lease.pk


def _agent_client(machine: Machine) -> APIClient:
    raw = "gpm_sweep_" + secrets.token_urlsafe(16)
    Machine.objects.filter(pk=machine.pk).update(credential_digest=provider_services.secret_digest(raw))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")
    return client


def _seen_by_another_connection(read):  # type: ignore[no-untyped-def]
    """What `read()` returns on a connection of its own (another worker's view: committed rows)."""
    from django.db import connection

    seen: list[object] = []

    def other() -> None:
        try:
            seen.append(read())
        finally:
            connection.close()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(10)
    return seen[0]


@pytest.mark.django_db(transaction=True)
def test_a_lease_that_cannot_be_ended_is_skipped_and_reported_and_the_others_end(monkeypatch) -> None:
    from django.db import connection

    from core.models import PeriodicTaskState

    timeout = settings.GPGPU["LEASE_START_TIMEOUT_S"]
    first, broken, last = (placed_lease() for _ in range(3))
    Lease.objects.update(created_at=timezone.now() - timedelta(seconds=timeout + 1))
    real_lease_end = sweeps.lease_end
    first_seen_ended_elsewhere: list[str] = []

    def lease_end(*, lease_id: int, **kwargs):  # type: ignore[no-untyped-def]
        if lease_id == broken.pk:
            if connection.vendor == "postgresql":  # in-memory SQLite is not shared with another connection
                first_seen_ended_elsewhere.append(
                    _seen_by_another_connection(lambda: Lease.objects.get(pk=first.pk).status)
                )
            raise RuntimeError("the database said no")
        return real_lease_end(lease_id=lease_id, **kwargs)

    monkeypatch.setattr(sweeps, "lease_end", lease_end)

    result = sweep_leases()

    assert result["start_timeouts"] == 2
    assert result["items_failed"] == 1
    assert result["failed_items"] == [f"lease {broken.pk}: RuntimeError: the database said no"]
    statuses = dict(Lease.objects.values_list("pk", "status"))
    assert statuses == {first.pk: Lease.Status.ENDED, broken.pk: Lease.Status.ASSIGNED, last.pk: Lease.Status.ENDED}
    if connection.vendor == "postgresql":
        assert first_seen_ended_elsewhere == [Lease.Status.ENDED]  # committed before the next lease
    task = PeriodicTaskState.objects.get(name="jobs.tasks.sweep_leases")
    assert (task.last_ok, task.items_ok, task.items_failed, task.consecutive_failures) == (False, 2, 1, 1)
    assert task.last_error == f"lease {broken.pk}: RuntimeError: the database said no"

    monkeypatch.setattr(sweeps, "lease_end", real_lease_end)
    assert sweep_leases()["start_timeouts"] == 1  # the next run ends it
    task.refresh_from_db()
    assert (task.last_ok, task.consecutive_failures, task.total_failures) == (True, 0, 1)
