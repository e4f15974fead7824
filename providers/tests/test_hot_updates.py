"""The GPU and machine rows move all the time (leases, owners, the latest telemetry, heartbeat
times); on PostgreSQL those UPDATEs are HOT: the new version written on the row's own page and
no index touched (migration providers 0010: no index on the columns that move, room kept on
each page). An index on one of them, or pages left full, makes each such UPDATE write a new
entry in every index of the table. The migration itself: core/tests/test_migration_ops.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from django.db import connection

from jobs import services as job_services
from jobs.models import Lease
from providers.models import GPU, Machine
from tests.factories import MachineFactory, agent_client, gpu_entry, heartbeat, machine_with_gpus, placed_lease

pytestmark = [pytest.mark.postgres]


@dataclass
class Updates:
    rows: int = 0
    hot: int = 0


def _counts(table: str) -> tuple[int, int]:
    """Rows this transaction updated in `table` so far, and how many of them were HOT."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_stat_get_xact_tuples_updated(%s::regclass), pg_stat_get_xact_tuples_hot_updated(%s::regclass)",
            [table, table],
        )
        rows, hot = cursor.fetchone()
        return int(rows), int(hot)


@contextmanager
def updates_of(model: type[GPU] | type[Machine]) -> Iterator[Updates]:
    if connection.vendor != "postgresql":
        pytest.skip("HOT updates are PostgreSQL's")
    table = model._meta.db_table
    seen = Updates()
    rows, hot = _counts(table)
    yield seen
    after_rows, after_hot = _counts(table)
    seen.rows, seen.hot = after_rows - rows, after_hot - hot


@pytest.mark.django_db
def test_a_lease_and_its_end_move_the_gpu_rows_without_writing_an_index() -> None:
    machine = machine_with_gpus(count=4)
    with updates_of(GPU) as leased:
        lease = placed_lease(machine=machine, gpus=4)
    assert set(GPU.objects.filter(machine=machine).values_list("state", flat=True)) == {GPU.State.LEASED}
    assert leased.rows == 4
    assert leased.hot == 4

    with updates_of(GPU) as released:
        job_services.lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    assert set(GPU.objects.filter(machine=machine).values_list("state", flat=True)) == {GPU.State.OWNER_BUSY}
    assert released.rows == 4
    assert released.hot == 4


@pytest.mark.django_db
def test_a_heartbeat_moves_its_machine_and_gpu_rows_without_writing_an_index() -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    gpus = [gpu_entry(f"GPU-hot-{i}", i) for i in range(8)]
    assert heartbeat(client, gpus).status_code == 200  # registers the GPUs (inserts)

    # The next one: new telemetry on every GPU, two owners back, a later time on the machine.
    back = {"utilization_pct": 87.0, "temperature_c": 70.0, "idle": False}
    gpus = [{**g, **back} if g["index"] < 2 else {**g, "power_w": 31.0} for g in gpus]
    with updates_of(GPU) as gpu_rows, updates_of(Machine) as machine_rows:
        assert heartbeat(client, gpus).status_code == 200
    states = dict(GPU.objects.filter(machine=machine).values_list("index", "state"))
    assert states[0] == states[1] == GPU.State.OWNER_BUSY
    assert states[2] == GPU.State.IDLE
    assert gpu_rows.rows >= 8
    assert gpu_rows.hot == gpu_rows.rows
    assert machine_rows.rows >= 1
    assert machine_rows.hot == machine_rows.rows
