"""leases_assign on PostgreSQL: a chunk of placements is a fixed number of statements, writes the
rows the ORM path writes, and its foreign-key checks stay index scans whatever the statistics."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from jobs import services
from jobs.models import Event, Job, Lease, LeaseGPU
from jobs.services import Placement, leases_assign
from providers.models import GPU
from tests.factories import GPUFactory, JobFactory, MachineFactory

pytestmark = [pytest.mark.postgres]


@pytest.fixture(autouse=True)
def _postgres_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the set-based write is PostgreSQL's (elsewhere leases_assign writes through the ORM)")


def _fleet_and_placements(*, seed: int, jobs: int) -> list[Placement]:
    """Machines of 1 to 8 GPUs and one pending job per placement, each on a random machine's
    free GPUs (1, 2 or 4 of them), at a random price."""
    rng = random.Random(seed)
    placements = []
    for _ in range(jobs):
        count = rng.choice([1, 1, 1, 2, 4])
        machine = MachineFactory()
        gpus = [GPUFactory(machine=machine, index=i) for i in range(count + rng.randrange(3))]
        chosen = rng.sample(gpus, count)
        job = JobFactory(gpu_count=count)
        price = Decimal(rng.randrange(10, 350)) / 100
        placements.append(Placement(job.pk, machine.pk, tuple(g.pk for g in chosen), price))
    return placements


def _written(placements: list[Placement]) -> dict[str, Any]:
    """What the placements left in the database, without ids and clocks."""
    job_ids = [p.job_id for p in placements]
    gpu_ids = [g for p in placements for g in p.gpu_ids]
    lease_job = dict(Lease.objects.filter(job_id__in=job_ids).values_list("pk", "job_id"))
    ignore = {"id", "created_at", "updated_at", "lease", "lease_id"}

    def rows(qs: Any) -> list[dict[str, Any]]:
        out = []
        for row in qs.values():
            if "lease_id" in row:
                row["lease_job"] = lease_job.get(row["lease_id"])
            out.append({k: v for k, v in row.items() if k not in ignore})
        return sorted(out, key=repr)

    return {
        "jobs": rows(Job.objects.filter(pk__in=job_ids)),
        "leases": rows(Lease.objects.filter(job_id__in=job_ids)),
        "lease_gpus": rows(LeaseGPU.objects.filter(lease__job_id__in=job_ids)),
        "events": rows(Event.objects.filter(job_id__in=job_ids, kind="lease.assigned")),
        "gpus": sorted(GPU.objects.filter(pk__in=gpu_ids).values_list("pk", "state")),
        "lease_order": list(Lease.objects.filter(job_id__in=job_ids).order_by("pk").values_list("job_id", flat=True)),
    }


def _written_by(write: Any, placements: list[Placement], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Write the placements through leases_assign with `write` as its last step, note what was
    written, and roll it back."""
    with monkeypatch.context() as patch, transaction.atomic():
        patch.setattr(services, "_leases_write_set", write)
        placed = leases_assign(placements=placements)
        result = _written(placements)
        result["placed"] = sorted(placed)
        transaction.set_rollback(True)
    return result


@pytest.mark.django_db
def test_the_set_based_write_stores_exactly_what_the_orm_write_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    placements = _fleet_and_placements(seed=20260114, jobs=40)
    # One job that stopped being pending: neither path places it.
    Job.objects.filter(pk=placements[7].job_id).update(status=Job.Status.CANCELLED)

    by_set = _written_by(services._leases_write_set, placements, monkeypatch)
    by_orm = _written_by(services._leases_write_orm, placements, monkeypatch)

    assert by_set == by_orm
    assert len(by_set["placed"]) == 39
    assert by_set["lease_order"] == [p.job_id for p in placements if p is not placements[7]]
    assert {state for _, state in by_set["gpus"]} == {GPU.State.LEASED, GPU.State.IDLE}  # the cancelled job's
    assert not Lease.objects.exists()  # both rolled back


@pytest.mark.django_db
def test_a_caller_holding_the_jobs_and_gpus_writes_the_same_rows_without_reading_them_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`held` (the matcher's chunks, which locked the pending jobs and the GPUs): the same rows
    and the same machines' heartbeats made full ones, in fewer statements."""
    from providers import heartbeat_steady

    placements = _fleet_and_placements(seed=7, jobs=30)
    forgotten: list[set[int]] = []
    monkeypatch.setattr(heartbeat_steady, "forget", lambda machine_ids: forgotten.append(set(machine_ids)))

    def written(*, held: bool) -> tuple[dict[str, Any], int]:
        with transaction.atomic(), CaptureQueriesContext(connection) as queries:
            if held:  # as marketplace.matching._chunk_write holds them
                list(Job.objects.filter(pk__in=[p.job_id for p in placements]).select_for_update())
                list(GPU.objects.filter(pk__in=[g for p in placements for g in p.gpu_ids]).select_for_update())
            statements = len(queries)
            placed = leases_assign(placements=placements, held=held)
            statements = len(queries) - statements
            result = _written(placements)
            result["placed"] = sorted(placed)
            transaction.set_rollback(True)
        return result, statements

    (unheld, unheld_statements), (held, held_statements) = written(held=False), written(held=True)
    assert held == unheld
    assert len(held["placed"]) == 30
    assert forgotten[0] == forgotten[1] == {p.machine_id for p in placements}
    # The pending jobs' read and the GPUs' lock (in a savepoint: three statements) are not made.
    assert held_statements == unheld_statements - 4


@pytest.mark.django_db
def test_a_chunk_of_placements_is_written_in_the_same_few_statements_whatever_its_size() -> None:
    small = _fleet_and_placements(seed=1, jobs=3)
    large = _fleet_and_placements(seed=2, jobs=120)

    with CaptureQueriesContext(connection) as for_small:
        assert len(leases_assign(placements=small)) == 3
    with CaptureQueriesContext(connection) as for_large:
        assert len(leases_assign(placements=large)) == 120

    assert len(for_large) == len(for_small) <= 9
    assert Lease.objects.count() == 123
    assert LeaseGPU.objects.filter(active=True).count() == sum(len(p.gpu_ids) for p in small + large)
    assert Event.objects.filter(kind="lease.assigned").count() == 123
    assert Job.objects.filter(status=Job.Status.SCHEDULED, attempts=1).count() == 123


@pytest.mark.django_db(transaction=True)
def test_lease_foreign_key_checks_are_index_scans_even_when_statistics_say_the_table_is_empty() -> None:
    """Statistics taken while jobs_lease was empty (autovacuum off, or a benchmark's ANALYZE)
    made PostgreSQL check each new lease GPU and event against jobs_lease with a sequential
    scan, a plan it then kept for the connection: every later commit scanned the whole table
    once per row. The checks' plans, shown by auto_explain at commit, are index scans."""
    connection.ensure_connection()
    with connection.cursor() as cursor:
        for table in ("jobs_event", "jobs_leasegpu", "jobs_lease"):
            cursor.execute(f"ANALYZE {table}")
        try:
            cursor.execute("LOAD 'auto_explain'")
        except Exception:  # a server without the module, or a role that may not load it
            pytest.skip("auto_explain cannot be loaded here")
        cursor.execute("SET auto_explain.log_min_duration = 0")
        cursor.execute("SET auto_explain.log_nested_statements = on")
        cursor.execute("SET auto_explain.log_level = notice")
    plans: list[str] = []
    connection.connection.add_notice_handler(lambda diagnostic: plans.append(diagnostic.message_primary or ""))
    try:
        for seed in range(3):
            placements = _fleet_and_placements(seed=seed, jobs=5)
            with transaction.atomic():
                assert len(leases_assign(placements=placements)) == 5
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET auto_explain.log_min_duration = -1")

    checks = [plan for plan in plans if 'FROM ONLY "public"."jobs_lease" x WHERE "id"' in plan]
    assert checks, "no foreign-key check against jobs_lease was seen"
    assert all("Index Scan using jobs_lease_pkey" in plan for plan in checks), checks[0]
    assert not any("Seq Scan" in plan for plan in checks)
