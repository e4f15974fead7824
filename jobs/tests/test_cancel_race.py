"""A cancel that races the start order: once an agent has been told to start a lease, a cancel
asks it to stop instead of ending the lease behind its back, so the seconds the workload ran are
billed and the agent is told to stop it; a lease whose start was never sent ends at once."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from billing import metering
from jobs import sweeps
from jobs.models import Job, Lease
from jobs.services import job_cancel
from providers import services
from providers.models import GPU, Machine
from tests.factories import JobFactory, placed_lease

pytestmark = pytest.mark.django_db

API = "/api/agent/v1/"


def agent(lease: Lease) -> tuple[APIClient, GPU]:
    raw = f"gpm_test_{secrets.token_urlsafe(16)}"
    Machine.objects.filter(pk=lease.machine_id).update(credential_digest=services.secret_digest(raw))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")
    return client, GPU.objects.get(lease_gpus__lease=lease)


def heartbeat(client: APIClient, gpu: GPU, leases: list[dict]):  # type: ignore[no-untyped-def]
    gpus = [{"uuid": gpu.uuid, "index": 0, "model": gpu.model, "vram_mb": gpu.vram_mb, "idle": False}]
    resp = client.post(API + "heartbeat", {"gpus": gpus, "leases": leases}, format="json")
    assert resp.status_code == 200, resp.content
    return resp.json()


def event(client: APIClient, lease: Lease, type_: str, at, **fields):  # type: ignore[no-untyped-def]
    body = {"event_id": secrets.token_hex(8), "type": type_, "at": at.isoformat(), **fields}
    return client.post(f"{API}leases/{lease.pk}/events", body, format="json")


def test_a_cancel_after_the_start_order_was_sent_stops_the_workload_and_bills_what_ran() -> None:
    job = JobFactory()
    lease = placed_lease(job=job)
    client, gpu = agent(lease)
    assert [order["lease_id"] for order in heartbeat(client, gpu, [])["start"]] == [lease.pk]

    job_cancel(job=job, actor="renter")  # the agent is starting it right now

    lease.refresh_from_db()
    assert (lease.status, lease.stop_reason) == (Lease.Status.ASSIGNED, "cancelled")
    # The agent's times, a little in the past (the marketplace keeps a start between the start
    # order and now, and an end between the start and now).
    Lease.objects.filter(pk=lease.pk).update(
        created_at=timezone.now() - timedelta(minutes=1), start_sent_at=timezone.now() - timedelta(seconds=45)
    )
    started = timezone.now() - timedelta(seconds=30)
    assert event(client, lease, "started", started).status_code == 200
    reply = heartbeat(client, gpu, [{"lease_id": lease.pk, "state": "running"}])
    assert reply["stop"] == [{"lease_id": lease.pk, "reason": "cancelled", "save_checkpoint": False}]
    assert reply["start"] == []
    assert event(client, lease, "exited", started + timedelta(seconds=5), exit_code=-15).status_code == 200

    lease.refresh_from_db()
    assert (lease.status, lease.end_reason) == (Lease.Status.ENDED, "cancelled")
    assert lease.started_at is not None and lease.ended_at is not None
    billed = metering.billable_seconds(
        started_at=lease.started_at, end=lease.ended_at, reported=[(lease.started_at, lease.ended_at)], slack_s=0
    )
    assert billed == 5
    assert Job.objects.get(pk=job.pk).status == Job.Status.CANCELLED


def test_a_cancel_before_any_start_order_ends_the_lease_at_once() -> None:
    job = JobFactory()
    lease = placed_lease(job=job)

    job_cancel(job=job, actor="renter")

    lease.refresh_from_db()
    assert (lease.status, lease.end_reason, lease.started_at) == (Lease.Status.ENDED, "cancelled", None)
    assert GPU.objects.get(lease_gpus__lease=lease).state == GPU.State.IDLE


def test_a_cancelled_lease_its_agent_never_started_is_ended_by_the_sweep_as_of_the_cancel() -> None:
    job = JobFactory()
    lease = placed_lease(job=job)
    client, gpu = agent(lease)
    heartbeat(client, gpu, [])
    job_cancel(job=job, actor="renter")
    assert Lease.objects.get(pk=lease.pk).status == Lease.Status.ASSIGNED

    sweeps.leases_sweep(now=timezone.now() + timedelta(seconds=sweeps.STOP_GRACE_S + 1))

    lease.refresh_from_db()
    assert (lease.status, lease.end_reason, lease.started_at) == (Lease.Status.ENDED, "cancelled", None)
    assert lease.ended_at == lease.stop_requested_at
