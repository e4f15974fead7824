"""core.migration_ops.AlterFieldDropIndex: a field's own index dropped, nothing else touched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = [pytest.mark.postgres]

BEFORE = [("providers", "0008_machine_idle_analogs"), ("jobs", "0010_lease_time_indexes")]
AFTER = [("providers", "0009_indexes_others_cover"), ("jobs", "0011_indexes_others_cover")]
DROPPED = {
    "providers_gpu_state_4c0e8c5a",
    "providers_gpu_state_4c0e8c5a_like",
    "providers_gpu_machine_id_d7cc402e",
    "jobs_job_status_383f1641",
    "jobs_job_status_383f1641_like",
    "jobs_lease_machine_id_5040a754",
    "jobs_leasegpu_lease_id_d519bff7",
}
TABLES = ("providers_gpu", "jobs_job", "jobs_lease", "jobs_leasegpu")


def _migrate(targets: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


def _indexes() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = ANY(%s)", [list(TABLES)])
        return {row[0] for row in cursor.fetchall()}


def _foreign_keys() -> dict[str, int]:
    """Each foreign-key constraint of the tables by name, with its oid (a constraint dropped and
    added again gets a new one)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname, oid FROM pg_constraint WHERE contype = 'f' AND conrelid = ANY(%s::regclass[])",
            [list(TABLES)],
        )
        return {name: int(oid) for name, oid in cursor.fetchall()}


@pytest.fixture
def before_the_migrations() -> Iterator[None]:
    if connection.vendor != "postgresql":
        pytest.skip("the indexes' twins and the foreign keys' checks are PostgreSQL's")
    _migrate(BEFORE)
    try:
        yield
    finally:
        _migrate([*AFTER, ("jobs", _latest("jobs")), ("providers", _latest("providers"))])


def _latest(app: str) -> str:
    executor = MigrationExecutor(connection)
    return max(name for label, name in executor.loader.graph.leaf_nodes() if label == app)


@pytest.mark.django_db(transaction=True)
def test_the_covered_indexes_go_and_the_foreign_keys_are_not_made_again(before_the_migrations: None) -> None:
    indexes, foreign_keys = _indexes(), _foreign_keys()
    assert DROPPED <= indexes

    _migrate(AFTER)

    assert _indexes() == indexes - DROPPED
    # The constraints are the same objects: not dropped and added again (which checks every
    # row of the table under a lock that holds its writes).
    assert _foreign_keys() == foreign_keys

    _migrate(BEFORE)  # and back: the indexes made again
    assert _indexes() == indexes
