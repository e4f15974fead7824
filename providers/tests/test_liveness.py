"""Machines that stop heartbeating go offline, and much later their leases end as lost; the
marketplace's own outages and disrupted zones are not blamed on the machines."""

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


def lost_after() -> timedelta:
    return timedelta(seconds=settings.GPGPU["LEASE_LOST_AFTER_S"])


def silent_machine(*, gpus: int = 2, for_: timedelta | None = None) -> Machine:
    """A machine whose last heartbeat is `for_` ago (by default just past the grace)."""
    machine = machine_with_gpus(count=gpus)
    quiet = for_ if for_ is not None else grace() + timedelta(seconds=1)
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now() - quiet)
    return machine


def sweep(*, at: timedelta = timedelta(0)) -> services.LivenessSweep:
    return services.machines_liveness_sweep(now=timezone.now() + at)


def heartbeating(count: int) -> list[Machine]:
    machines = [MachineFactory(status=Machine.Status.ONLINE) for _ in range(count)]
    Machine.objects.filter(pk__in=[m.pk for m in machines]).update(last_heartbeat_at=timezone.now())
    return machines


def test_a_silent_machine_goes_offline_at_the_grace_and_its_leases_keep_running() -> None:
    machine = silent_machine()
    g0 = machine.gpus.order_by("index").first()
    lease = placed_lease(gpus=[g0], interruptible=True, started=True)

    assert sweep().offline == 1

    machine.refresh_from_db()
    assert machine.status == Machine.Status.OFFLINE
    assert set(machine.gpus.values_list("state", flat=True)) == {GPU.State.OFFLINE}
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RUNNING  # the agent may only be cut off: its fence decides
    assert Job.objects.get(pk=lease.job_id).status == Job.Status.RUNNING


def test_leases_end_as_lost_only_after_the_agents_fence_and_its_margin() -> None:
    assert settings.GPGPU["LEASE_LOST_AFTER_S"] > settings.GPGPU["LEASE_FENCE_S"]
    machine = silent_machine(for_=lost_after() - timedelta(seconds=5))
    g0, g1 = machine.gpus.order_by("index")
    interruptible = placed_lease(gpus=[g0], interruptible=True, started=True)
    fragile = placed_lease(gpus=[g1], interruptible=False)
    assert sweep().leases_lost == 0
    assert Lease.objects.filter(status=Lease.Status.ENDED).count() == 0

    result = sweep(at=timedelta(seconds=10))

    assert result.leases_lost == 2
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
    last_heartbeat = timezone.now() - lost_after() - timedelta(minutes=10)
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=last_heartbeat)

    sweep()

    lease.refresh_from_db()
    assert lease.end_reason == "lost"
    assert lease.ended_at == last_heartbeat


def test_machine_that_heartbeats_in_time_stays_online() -> None:
    machine = machine_with_gpus(count=1)
    lease = placed_lease(machine=machine, started=True)
    # Just inside the grace period.
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now() - grace() + timedelta(seconds=2))

    assert sweep().offline == 0

    machine.refresh_from_db()
    assert machine.status == Machine.Status.ONLINE
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RUNNING


def test_sweep_leaves_offline_and_suspended_machines_alone() -> None:
    old = timezone.now() - timedelta(days=1)
    offline = MachineFactory(status=Machine.Status.OFFLINE, last_heartbeat_at=old)
    suspended = MachineFactory(status=Machine.Status.SUSPENDED, last_heartbeat_at=old)

    assert sweep().offline == 0

    assert Machine.objects.get(pk=offline.pk).status == Machine.Status.OFFLINE
    assert Machine.objects.get(pk=suspended.pk).status == Machine.Status.SUSPENDED


def test_sweeping_twice_is_harmless() -> None:
    machine = silent_machine(gpus=1, for_=lost_after() + timedelta(seconds=1))
    lease = placed_lease(machine=machine, started=True)
    assert sweep().leases_lost == 1
    lease.refresh_from_db()
    ended_at = lease.ended_at

    again = sweep(at=timedelta(seconds=1))
    assert (again.offline, again.leases_lost) == (0, 0)
    lease.refresh_from_db()
    assert lease.ended_at == ended_at


def agent_client(machine: Machine) -> APIClient:
    raw = "gpm_" + secrets.token_urlsafe(16)
    Machine.objects.filter(pk=machine.pk).update(credential_digest=services.secret_digest(raw))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")
    return client


def heartbeat(client: APIClient, gpu: GPU, lease: Lease):  # type: ignore[no-untyped-def]
    return client.post(
        "/api/agent/v1/heartbeat",
        {
            "gpus": [{"uuid": gpu.uuid, "index": 0, "model": gpu.model, "vram_mb": gpu.vram_mb, "idle": False}],
            "leases": [{"lease_id": lease.pk, "state": "running"}],
        },
        format="json",
    )


def test_machine_back_before_its_leases_are_lost_keeps_running_them() -> None:
    machine = silent_machine(gpus=1)
    gpu = machine.gpus.get()
    lease = placed_lease(gpus=[gpu], started=True)
    assert sweep().offline == 1

    resp = heartbeat(agent_client(machine), gpu, lease)

    assert resp.status_code == 200
    assert resp.json()["stop"] == []
    assert resp.json()["lease_fence_s"] == settings.GPGPU["LEASE_FENCE_S"]
    machine.refresh_from_db()
    assert machine.status == Machine.Status.ONLINE
    gpu.refresh_from_db()
    assert gpu.state == GPU.State.LEASED
    assert Lease.objects.get(pk=lease.pk).status == Lease.Status.RUNNING


def test_machine_back_after_its_leases_were_lost_is_online_and_told_to_stop_them() -> None:
    machine = silent_machine(gpus=1, for_=lost_after() + timedelta(seconds=1))
    gpu = machine.gpus.get()
    lease = placed_lease(gpus=[gpu], started=True)
    sweep()

    resp = heartbeat(agent_client(machine), gpu, lease)

    assert resp.status_code == 200
    assert resp.json()["stop"] == [{"lease_id": lease.pk, "reason": "lost", "save_checkpoint": False}]
    machine.refresh_from_db()
    assert machine.status == Machine.Status.ONLINE
    gpu.refresh_from_db()
    assert gpu.state == GPU.State.OWNER_BUSY  # busy with the job it was told to stop, not leased


def test_after_the_marketplaces_own_outage_no_machine_is_blamed_for_its_silence() -> None:
    """The sweep did not run for a minute (its database was down): every machine looks silent,
    but the grace and the lost delay start again from the marketplace's recovery."""
    machine = silent_machine(gpus=1, for_=timedelta(seconds=70))
    lease = placed_lease(machine=machine, started=True)
    services.machines_liveness_sweep(now=timezone.now() - timedelta(seconds=65))  # the last run before

    result = sweep()

    assert (result.blind, result.offline, result.leases_lost) == (True, 0, 0)
    assert Machine.objects.get(pk=machine.pk).status == Machine.Status.ONLINE
    # Still silent a whole grace after the recovery: offline, the lease still running.
    for step in range(1, 4):
        sweep(at=timedelta(seconds=10 * step))
    assert Machine.objects.get(pk=machine.pk).status == Machine.Status.OFFLINE
    assert Lease.objects.get(pk=lease.pk).status == Lease.Status.RUNNING
    # LEASE_LOST_AFTER_S after the recovery (not after its last heartbeat): lost.
    seconds = int(lost_after().total_seconds())
    for at in range(40, seconds + 11, 10):
        sweep(at=timedelta(seconds=at))
    assert Lease.objects.get(pk=lease.pk).end_reason == "lost"


def test_a_whole_fleet_silent_at_once_is_the_marketplaces_fault_not_the_machines() -> None:
    few = settings.GPGPU["LIVENESS_DISRUPTION_MIN_MACHINES"]
    machines = heartbeating(few)
    sweep()
    # Nobody's heartbeat arrives any more (the web tier is down), for longer than the grace.
    Machine.objects.update(last_heartbeat_at=timezone.now() - grace() - timedelta(seconds=5))

    result = sweep(at=timedelta(seconds=10))

    assert (result.blind, result.offline) == (True, 0)
    assert set(Machine.objects.filter(pk__in=[m.pk for m in machines]).values_list("status", flat=True)) == {
        Machine.Status.ONLINE
    }


def test_a_disrupted_zone_keeps_its_leases_for_the_hold_then_loses_them() -> None:
    few = settings.GPGPU["LIVENESS_DISRUPTION_MIN_MACHINES"]
    heartbeating(few)
    zone = [silent_machine(gpus=1, for_=lost_after() + timedelta(seconds=1)) for _ in range(few + 1)]
    leases = [placed_lease(machine=m, started=True) for m in zone]

    # One clock for the whole test: the ninety sweeps below take seconds of real time on a slow
    # machine, and the hold is measured from the first sweep's `now`, not from the wall clock.
    start = timezone.now()
    result = services.machines_liveness_sweep(now=start)

    assert (result.disrupted, result.held, result.leases_lost) == (True, few + 1, 0)
    assert {m.status for m in Machine.objects.filter(pk__in=[m.pk for m in zone])} == {Machine.Status.OFFLINE}
    assert set(Lease.objects.filter(pk__in=[x.pk for x in leases]).values_list("status", flat=True)) == {"running"}

    # The rest of the fleet keeps heartbeating; the zone's leases are kept for the hold, then lost.
    hold = settings.GPGPU["LIVENESS_DISRUPTION_HOLD_S"]
    lost_at = {}
    for at in range(10, hold + 31, 10):
        now = start + timedelta(seconds=at)
        Machine.objects.exclude(pk__in=[m.pk for m in zone]).update(last_heartbeat_at=now)
        result = services.machines_liveness_sweep(now=now)
        if result.leases_lost:
            lost_at[at] = result.leases_lost
    assert len(lost_at) == 1
    ((at, count),) = lost_at.items()
    assert hold <= at <= hold + 20
    assert count == few + 1
    assert set(Lease.objects.filter(pk__in=[x.pk for x in leases]).values_list("end_reason", flat=True)) == {"lost"}


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
            swept.append(services.machines_liveness_sweep().offline)
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
