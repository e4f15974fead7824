"""What a heartbeat writes, and how many statements it takes: a steady fleet's heartbeats write
only what changed (benchmarks/heartbeats.py measures the rest)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.models import Job, Lease
from providers import services
from providers.models import GPU, Machine
from tests.factories import (
    MachineFactory,
    agent_client,
    capabilities_report,
    gpu_entry,
    heartbeat,
    machine_with_gpus,
    placed_lease,
)

# What the full heartbeat writes: a steady repeat is answered without it (test_heartbeat_steady).
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("full_heartbeats")]

# What a steady heartbeat of a machine without leases, windows or blackouts may send:
# authentication, then the machine's UPDATE … RETURNING (which also says whether the owner has a
# window or a blackout to read and whether the machine holds an assigned lease, which a kind it
# refuses would end), the GPU rows' lock, their active leases and the changed GPU rows (no GPU in
# a lease: no lease to start).
STEADY_HEARTBEAT_STATEMENTS = 5
_TRANSACTION_CONTROL = ("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK", "BEGIN", "COMMIT")


@pytest.fixture
def one_bucket(settings: Any) -> None:
    """Every heartbeat of the test falls in the same telemetry sample bucket."""
    settings.GPGPU = {**settings.GPGPU, "TELEMETRY_SAMPLE_INTERVAL_S": 10**9}


def statements(queries: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if not q["sql"].upper().startswith(_TRANSACTION_CONTROL)]


def gpu_writes(queries: CaptureQueriesContext) -> list[str]:
    table = GPU._meta.db_table
    return [sql for sql in statements(queries) if sql.startswith(("UPDATE", "WITH")) and f'UPDATE "{table}"' in sql]


def test_an_unchanged_gpu_is_not_written_again_within_the_sample_interval(one_bucket: None) -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    gpus = [gpu_entry("GPU-a", 0), gpu_entry("GPU-b", 1, idle=False, owner_busy=True, utilization_pct=90.0)]
    assert heartbeat(client, gpus).status_code == 200
    first = dict(GPU.objects.values_list("uuid", "last_telemetry_at"))

    with CaptureQueriesContext(connection) as queries:
        assert heartbeat(client, gpus).status_code == 200

    assert gpu_writes(queries) == []
    assert dict(GPU.objects.values_list("uuid", "last_telemetry_at")) == first


def test_only_the_gpus_whose_report_changed_are_written(one_bucket: None) -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    assert heartbeat(client, [gpu_entry("GPU-a", 0), gpu_entry("GPU-b", 1)]).status_code == 200
    before = {g.uuid: g for g in GPU.objects.all()}

    resp = heartbeat(client, [gpu_entry("GPU-a", 0), gpu_entry("GPU-b", 1, utilization_pct=55.0, temperature_c=70.0)])

    assert resp.status_code == 200
    after = {g.uuid: g for g in GPU.objects.all()}
    assert after["GPU-a"].last_telemetry_at == before["GPU-a"].last_telemetry_at
    assert (after["GPU-b"].utilization_pct, after["GPU-b"].temperature_c) == (55.0, 70.0)
    assert after["GPU-b"].last_telemetry_at > before["GPU-b"].last_telemetry_at


def test_an_unchanged_gpu_is_written_again_once_the_sample_interval_has_passed() -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    assert heartbeat(client, [gpu_entry("GPU-a", 0)]).status_code == 200
    long_ago = timezone.now() - timedelta(days=1)
    GPU.objects.update(last_telemetry_at=long_ago)

    assert heartbeat(client, [gpu_entry("GPU-a", 0)]).status_code == 200

    assert GPU.objects.get().last_telemetry_at > long_ago + timedelta(hours=23)


def test_a_state_change_is_written_even_when_the_telemetry_is_the_same(one_bucket: None) -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    assert heartbeat(client, [gpu_entry("GPU-a", 0)]).status_code == 200

    assert heartbeat(client, [gpu_entry("GPU-a", 0, idle=False, owner_busy=True)]).status_code == 200

    gpu = GPU.objects.get()
    assert (gpu.state, gpu.idle_since) == (GPU.State.OWNER_BUSY, None)


def test_a_steady_heartbeat_sends_at_most_a_fixed_number_of_statements(one_bucket: None) -> None:
    machine = MachineFactory(accepts_process=False)
    client = agent_client(machine)
    gpus = [gpu_entry(f"GPU-{i}", i, utilization_pct=float(i)) for i in range(8)]
    caps = capabilities_report()
    assert heartbeat(client, gpus, capabilities=caps).status_code == 200
    moved = [{**g, "utilization_pct": g["utilization_pct"] + 1} for g in gpus]

    with CaptureQueriesContext(connection) as queries:
        assert heartbeat(client, moved, capabilities=caps).status_code == 200

    assert len(statements(queries)) <= STEADY_HEARTBEAT_STATEMENTS, "\n".join(statements(queries))
    assert len(gpu_writes(queries)) == 1  # eight changed rows, one statement
    assert sorted(GPU.objects.values_list("utilization_pct", flat=True)) == [float(i + 1) for i in range(8)]


def test_a_heartbeat_keeps_a_machine_suspended_meanwhile_suspended_and_records_its_heartbeat() -> None:
    machine = machine_with_gpus(count=1)
    as_authenticated = Machine.objects.get(pk=machine.pk)
    Machine.objects.filter(pk=machine.pk).update(status=Machine.Status.SUSPENDED)
    gpu = machine.gpus.get()
    report = services.HeartbeatReport(
        gpus=[services.GpuReport(uuid=gpu.uuid, index=0, model=gpu.model, vram_mb=gpu.vram_mb, idle=True)]
    )

    services.machine_heartbeat(machine=as_authenticated, report=report)

    machine.refresh_from_db()
    assert machine.status == Machine.Status.SUSPENDED
    assert machine.last_heartbeat_at is not None and machine.last_heartbeat_at > as_authenticated.last_heartbeat_at


def test_changed_machine_facts_are_written_and_unchanged_ones_kept(one_bucket: None) -> None:
    machine = MachineFactory(status=Machine.Status.OFFLINE)
    client = agent_client(machine)
    assert heartbeat(client, [gpu_entry("GPU-a", 0)]).status_code == 200

    assert heartbeat(client, [gpu_entry("GPU-a", 0)], driver_version="560.1", region=None).status_code == 200

    machine.refresh_from_db()
    assert (machine.status, machine.driver_version, machine.region) == (Machine.Status.ONLINE, "560.1", "eu-west")


def test_a_reported_region_is_stored_as_the_matcher_compares_it_and_not_written_again(one_bucket: None) -> None:
    machine = MachineFactory(status=Machine.Status.OFFLINE, region="")
    client = agent_client(machine)

    assert heartbeat(client, [gpu_entry("GPU-a", 0)], region="EU-West ").status_code == 200
    machine.refresh_from_db()
    assert machine.region == "eu-west"
    with CaptureQueriesContext(connection) as queries:
        assert heartbeat(client, [gpu_entry("GPU-a", 0)], region="EU-West ", driver_version="1").status_code == 200
    updates = [q["sql"] for q in queries.captured_queries if q["sql"].startswith('UPDATE "providers_machine"')]
    assert updates and not any('"region" =' in sql for sql in updates)  # only driver_version was written


def test_another_machines_assigned_lease_adds_no_statement_to_a_steady_heartbeat(one_bucket: None) -> None:
    machine = MachineFactory(accepts_process=False)
    client = agent_client(machine)
    gpus = [gpu_entry(f"GPU-{i}", i) for i in range(2)]
    caps = capabilities_report(kinds=("container",))
    assert heartbeat(client, gpus, capabilities=caps).status_code == 200
    with CaptureQueriesContext(connection) as alone:
        assert heartbeat(client, gpus, capabilities=caps).status_code == 200
    other = machine_with_gpus(count=1)
    theirs = placed_lease(gpus=[other.gpus.get()], kind=Job.Kind.PROCESS)  # assigned, a kind this one refuses

    with CaptureQueriesContext(connection) as queries:
        assert heartbeat(client, gpus, capabilities=caps).status_code == 200

    assert len(statements(queries)) == len(statements(alone)), "\n".join(statements(queries))
    theirs.refresh_from_db()
    assert theirs.status == Lease.Status.ASSIGNED
