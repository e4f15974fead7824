"""Machines that stop heartbeating go offline and their leases end as lost."""

from __future__ import annotations

import secrets
import threading
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Job, Lease
from providers import services
from providers.models import GPU, Machine
from tests.factories import MachineFactory, machine_with_gpus, placed_lease

pytestmark = pytest.mark.django_db

on_postgres = pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql", reason="needs PostgreSQL"
)


def grace() -> timedelta:
    return timedelta(seconds=settings.GPGPU["HEARTBEAT_INTERVAL_S"] * settings.GPGPU["HEARTBEAT_GRACE_BEATS"])


def silent_machine(*, gpus: int = 2) -> Machine:
    machine = machine_with_gpus(count=gpus)
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now() - grace() - timedelta(seconds=1))
    return machine


def test_silent_machine_goes_offline_and_its_leases_are_lost() -> None:
    machine = silent_machine()
    g0, g1 = machine.gpus.order_by("index")
    interruptible = placed_lease(gpus=[g0], interruptible=True, started=True)
    fragile = placed_lease(gpus=[g1], interruptible=False)

    assert services.machines_mark_silent_offline() == 1

    machine.refresh_from_db()
    assert machine.status == Machine.Status.OFFLINE
    assert set(machine.gpus.values_list("state", flat=True)) == {GPU.State.OFFLINE}
    interruptible.refresh_from_db()
    fragile.refresh_from_db()
    assert (interruptible.status, interruptible.end_reason) == ("ended", "lost")
    assert (fragile.status, fragile.end_reason) == ("ended", "lost")
    assert interruptible.job.status == Job.Status.PENDING
    fragile_job = Job.objects.get(pk=fragile.job_id)
    assert fragile_job.status == Job.Status.FAILED
    assert "lost" in fragile_job.failure_reason


def test_lost_lease_ends_at_the_last_heartbeat_so_the_silence_is_not_billed() -> None:
    machine = machine_with_gpus(count=1)
    started = timezone.now() - timedelta(minutes=30)
    lease = placed_lease(machine=machine, started=started)
    last_heartbeat = timezone.now() - grace() - timedelta(minutes=10)
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=last_heartbeat)

    services.machines_mark_silent_offline()

    lease.refresh_from_db()
    assert lease.end_reason == "lost"
    assert lease.ended_at == last_heartbeat


def test_machine_that_heartbeats_in_time_stays_online() -> None:
    machine = machine_with_gpus(count=1)
    lease = placed_lease(machine=machine, started=True)
    # Just inside the grace period.
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now() - grace() + timedelta(seconds=2))

    assert services.machines_mark_silent_offline() == 0

    machine.refresh_from_db()
    assert machine.status == Machine.Status.ONLINE
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RUNNING


def test_sweep_leaves_offline_and_suspended_machines_alone() -> None:
    old = timezone.now() - timedelta(days=1)
    offline = MachineFactory(status=Machine.Status.OFFLINE, last_heartbeat_at=old)
    suspended = MachineFactory(status=Machine.Status.SUSPENDED, last_heartbeat_at=old)

    assert services.machines_mark_silent_offline() == 0

    assert Machine.objects.get(pk=offline.pk).status == Machine.Status.OFFLINE
    assert Machine.objects.get(pk=suspended.pk).status == Machine.Status.SUSPENDED


def test_sweeping_twice_is_harmless() -> None:
    machine = silent_machine(gpus=1)
    lease = placed_lease(machine=machine, started=True)
    services.machines_mark_silent_offline()
    lease.refresh_from_db()
    ended_at = lease.ended_at

    assert services.machines_mark_silent_offline() == 0
    lease.refresh_from_db()
    assert lease.ended_at == ended_at


def test_machine_back_after_going_silent_is_online_and_told_to_stop_its_lost_lease() -> None:
    machine = silent_machine(gpus=1)
    gpu = machine.gpus.get()
    lease = placed_lease(gpus=[gpu], started=True)
    services.machines_mark_silent_offline()
    raw = "gpm_" + secrets.token_urlsafe(16)
    Machine.objects.filter(pk=machine.pk).update(credential_digest=services.secret_digest(raw))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")

    resp = client.post(
        "/api/agent/v1/heartbeat",
        {
            "gpus": [{"uuid": gpu.uuid, "index": 0, "model": gpu.model, "vram_mb": gpu.vram_mb, "idle": False}],
            "leases": [{"lease_id": lease.pk, "state": "running"}],
        },
        format="json",
    )

    assert resp.status_code == 200
    assert resp.json()["stop"] == [{"lease_id": lease.pk, "reason": "lost"}]
    machine.refresh_from_db()
    assert machine.status == Machine.Status.ONLINE
    gpu.refresh_from_db()
    assert gpu.state == GPU.State.OWNER_BUSY  # busy with the job it was told to stop, not leased


@on_postgres
@pytest.mark.django_db(transaction=True)
def test_heartbeat_landing_during_the_sweep_keeps_the_machine_online() -> None:
    """The heartbeat holds the machine's row lock when the sweep tries to move it; the sweep's
    conditional update then sees the fresh heartbeat and leaves the machine alone."""
    machine = silent_machine(gpus=1)
    lease = placed_lease(machine=machine, started=True)
    locked, release = threading.Event(), threading.Event()
    swept: list[int] = []

    def heartbeat_in_progress() -> None:
        try:
            with transaction.atomic():
                Machine.objects.select_for_update().get(pk=machine.pk)
                Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now())
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    def sweep() -> None:
        try:
            swept.append(services.machines_mark_silent_offline())
        finally:
            connection.close()

    hb = threading.Thread(target=heartbeat_in_progress)
    hb.start()
    assert locked.wait(10)
    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    sweeper.join(0.5)  # the sweep is now waiting for the row lock
    release.set()
    hb.join()
    sweeper.join()

    assert swept == [0]
    assert Machine.objects.get(pk=machine.pk).status == Machine.Status.ONLINE
    assert Lease.objects.get(pk=lease.pk).status == Lease.Status.RUNNING
