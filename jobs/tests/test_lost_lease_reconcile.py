"""An agent cut off long enough for its leases to be declared lost comes back and tells how its
workloads ended: the marketplace records its truth instead of refusing it, finishes a job whose
workload had exited 0 rather than running it again, and takes the usage it ran up to its fence."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Event, Job, Lease, UsageReport
from providers import services
from providers.models import Machine
from tests.factories import machine_with_gpus, placed_lease

pytestmark = pytest.mark.django_db

API = "/api/agent/v1/"


def lost_lease(**job_fields: Any) -> tuple[Lease, APIClient]:
    """A running lease on a machine silent past LEASE_LOST_AFTER_S, swept: ended as lost."""
    machine = machine_with_gpus(count=1)
    started = timezone.now() - timedelta(minutes=20)
    lease = placed_lease(machine=machine, started=started, **job_fields)
    last_heartbeat = timezone.now() - timedelta(seconds=settings.GPGPU["LEASE_LOST_AFTER_S"] + 5)
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=last_heartbeat)
    assert services.machines_liveness_sweep().leases_lost == 1
    lease.refresh_from_db()
    assert (lease.status, lease.end_reason, lease.ended_at) == ("ended", "lost", last_heartbeat)
    raw = f"gpm_test_{secrets.token_urlsafe(16)}"
    Machine.objects.filter(pk=machine.pk).update(credential_digest=services.secret_digest(raw))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")
    return lease, client


def exited(client: APIClient, lease: Lease, *, at, exit_code: int = 0, detail: str = "", event_id: str = "e-1"):  # type: ignore[no-untyped-def]
    body = {"event_id": event_id, "type": "exited", "at": at.isoformat(), "exit_code": exit_code, "detail": detail}
    return client.post(f"{API}leases/{lease.pk}/events", body, format="json")


def test_a_workload_that_exited_0_while_cut_off_finishes_its_job_instead_of_running_again() -> None:
    lease, client = lost_lease(interruptible=True)
    assert Job.objects.get(pk=lease.job_id).status == Job.Status.PENDING  # re-queued by the loss

    resp = exited(client, lease, at=lease.ended_at + timedelta(seconds=20))
    again = exited(client, lease, at=lease.ended_at + timedelta(seconds=20))

    assert (resp.status_code, again.status_code) == (200, 200)  # not 409 invalid_transition
    job = Job.objects.get(pk=lease.job_id)
    assert (job.status, job.exit_code) == (Job.Status.SUCCEEDED, 0)
    reported = Event.objects.filter(lease_id=lease.pk, kind="lease.reported_after_loss")
    assert reported.count() == 1
    assert reported.get().detail["exit_code"] == 0
    lease.refresh_from_db()
    assert lease.end_reason == "lost"  # the charge stays what the marketplace knew


def test_a_lost_lease_takes_one_account_of_its_workloads_end_and_refuses_others() -> None:
    """A workload ends once: further ends under new event ids would add audit rows without limit
    and rewrite the renter's output tail at any later time."""
    lease, client = lost_lease()
    at = lease.ended_at + timedelta(seconds=20)
    body = {"event_id": "e-1", "type": "exited", "at": at.isoformat(), "exit_code": 0, "log_tail": "the end"}

    first = client.post(f"{API}leases/{lease.pk}/events", body, format="json")
    others = [
        client.post(
            f"{API}leases/{lease.pk}/events", {**body, "event_id": f"e-{n}", "log_tail": "rewritten"}, format="json"
        )
        for n in (2, 3)
    ]
    preempted = client.post(
        f"{API}leases/{lease.pk}/events",
        {"event_id": "e-4", "type": "preempted_by_owner", "at": at.isoformat()},
        format="json",
    )

    assert first.status_code == 200
    assert [r.status_code for r in (*others, preempted)] == [409, 409, 409]
    assert {r.json()["code"] for r in (*others, preempted)} == {"invalid_transition"}
    assert Event.objects.filter(lease_id=lease.pk, kind="lease.reported_after_loss").count() == 1
    assert Lease.objects.get(pk=lease.pk).log_tail == "the end"
    assert exited(client, lease, at=at).status_code == 200  # the first one's repeat: a duplicate


def test_a_fenced_workload_leaves_its_job_queued_to_run_again() -> None:
    lease, client = lost_lease(interruptible=True)
    fence = settings.GPGPU["LEASE_FENCE_S"]

    at = lease.ended_at + timedelta(seconds=fence)
    resp = exited(client, lease, at=at, exit_code=143, detail="fenced: no contact with the marketplace")

    assert resp.status_code == 200
    assert Job.objects.get(pk=lease.job_id).status == Job.Status.PENDING
    assert Event.objects.filter(lease_id=lease.pk, kind="lease.reported_after_loss").count() == 1


def test_an_exit_reported_after_the_job_was_placed_again_changes_nothing_of_the_new_run() -> None:
    lease, client = lost_lease(interruptible=True)
    job = Job.objects.get(pk=lease.job_id)
    second = placed_lease(job=job, started=True)

    assert exited(client, lease, at=lease.ended_at + timedelta(seconds=5)).status_code == 200

    assert Job.objects.get(pk=job.pk).status == Job.Status.RUNNING
    assert Lease.objects.get(pk=second.pk).status == Lease.Status.RUNNING


def test_usage_the_cut_off_agent_ran_up_to_its_fence_is_taken_and_none_past_it() -> None:
    lease, client = lost_lease()
    fence = settings.GPGPU["LEASE_FENCE_S"]

    def usage(start, seconds: int):  # type: ignore[no-untyped-def]
        body = {
            "report_id": secrets.token_hex(6),
            "period_start": start.isoformat(),
            "period_end": (start + timedelta(seconds=seconds)).isoformat(),
            "gpu_seconds": f"{seconds}.000",
            "signature": "0x" + "ab" * 65,
        }
        return client.post(f"{API}leases/{lease.pk}/usage", body, format="json")

    inside = usage(lease.ended_at + timedelta(seconds=fence - 60), 60)
    past = usage(lease.ended_at + timedelta(seconds=fence + 30), 60)

    assert inside.status_code in (200, 201), inside.json()
    assert past.status_code == 400
    assert past.json()["code"] == "usage_period_outside_lease"
    assert UsageReport.objects.filter(lease=lease).count() == 1
