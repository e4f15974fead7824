"""core.migration_ops: AlterFieldDropIndex (a field's own index dropped, nothing else touched) and
SetFillFactor (room kept on each page, providers 0010)."""

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


HOT = ("providers_gpu", "providers_machine")


def _fillfactors() -> dict[str, str | None]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname, (SELECT option_value FROM pg_options_to_table(reloptions)"
            " WHERE option_name = 'fillfactor') FROM pg_class WHERE relname = ANY(%s)",
            [list(HOT)],
        )
        return dict(cursor.fetchall())


def _indexed_columns() -> set[tuple[str, str]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT t.relname, a.attname FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid"
            " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY(i.indkey)"
            " WHERE t.relname = ANY(%s)",
            [list(HOT)],
        )
        return set(cursor.fetchall())


@pytest.mark.django_db(transaction=True)
def test_the_hot_migration_unindexes_the_moving_columns_and_keeps_room_on_each_page_and_back() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("storage parameters are PostgreSQL's")
    before, after = ("providers", "0009_indexes_others_cover"), ("providers", "0010_hot_updates")
    _migrate([before])
    try:
        assert _fillfactors() == {"providers_gpu": None, "providers_machine": None}
        assert {("providers_gpu", "state"), ("providers_machine", "last_heartbeat_at")} <= _indexed_columns()

        _migrate([after])
        assert _fillfactors() == {"providers_gpu": "50", "providers_machine": "50"}
        moving = {("providers_gpu", c) for c in ("state", "idle_since", "utilization_pct", "last_telemetry_at")}
        moving |= {("providers_machine", "last_heartbeat_at")}
        assert not moving & _indexed_columns()

        _migrate([before])
        assert _fillfactors() == {"providers_gpu": None, "providers_machine": None}
        assert {("providers_gpu", "state"), ("providers_machine", "last_heartbeat_at")} <= _indexed_columns()
    finally:
        _migrate([("providers", _latest("providers"))])
