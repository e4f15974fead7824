"""core.migration_ops: AlterFieldDropIndex (a field's own index dropped, nothing else touched) and
SetFillFactor (room kept on each page, providers 0010), AddConstraintOnline (jobs 0012)."""

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


def _index_definitions(tables: tuple[str, ...]) -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s)", [list(tables)])
        return dict(cursor.fetchall())


@pytest.mark.django_db(transaction=True)
def test_a_new_lease_and_a_marketplace_event_write_no_entry_that_no_query_reads_and_keys_stay_unique() -> None:
    """jobs 0012: the lease status's and the event key's pattern twins go, and the indexes of
    mostly-NULL columns leave the NULLs out; a repeated event key is still refused."""
    if connection.vendor != "postgresql":
        pytest.skip("the indexes' twins and partial indexes are PostgreSQL's")
    from jobs.models import Event, Job, Renter

    tables = ("jobs_lease", "jobs_event")
    before, after = ("jobs", "0011_indexes_others_cover"), ("jobs", "0012_index_entries_not_written")
    _migrate([before])
    try:
        old = _index_definitions(tables)
        foreign_keys = _foreign_keys()
        assert {"jobs_lease_status_681d0c43_like", "lease_ended_at", "jobs_event_idempotency_key_a0e2466b_like"} <= set(
            old
        )

        _migrate([after])
        new = _index_definitions(tables)
        # The key's unique index was named by CREATE TABLE (…_key) or by an earlier way back (…_uniq).
        (old_unique,) = (n for n, d in old.items() if d.startswith("CREATE UNIQUE") and d.endswith("(idempotency_key)"))
        assert set(old) - set(new) == {
            "jobs_lease_status_681d0c43",
            "jobs_lease_status_681d0c43_like",
            "lease_ended_at",
            "jobs_event_idempotency_key_a0e2466b_like",
            old_unique,
        }
        assert set(new) - set(old) == {"lease_status", "lease_ended", "event_unique_idempotency_key"}
        assert new["lease_status"].endswith("USING btree (status)")
        assert new["lease_ended"].endswith("USING btree (ended_at) WHERE (ended_at IS NOT NULL)")
        assert new["event_unique_idempotency_key"].startswith("CREATE UNIQUE INDEX")
        assert new["event_unique_idempotency_key"].endswith("WHERE (idempotency_key IS NOT NULL)")
        assert _foreign_keys() == foreign_keys

        from django.contrib.auth import get_user_model
        from django.db import IntegrityError, transaction

        user = get_user_model().objects.create_user(username="keys", password="x")
        renter = Renter.objects.create(user=user, display_name="keys")
        job = Job.objects.create(
            renter=renter, gpu_count=1, max_price_per_gpu_hour="1", expected_duration_s=60, max_duration_s=60
        )
        Event.objects.create(job=job, kind="a", idempotency_key=None)
        Event.objects.create(job=job, kind="b", idempotency_key=None)  # no key: as many as written
        Event.objects.create(job=job, kind="c", idempotency_key="agent:1:event:9")
        with pytest.raises(IntegrityError), transaction.atomic():
            Event.objects.create(job=job, kind="c", idempotency_key="agent:1:event:9")
        Event.objects.all().delete()
        job.delete()
        renter.delete()
        user.delete()

        _migrate([before])  # and back
        back = _index_definitions(tables)
        assert set(back) - {"jobs_event_idempotency_key_a0e2466b_uniq"} == set(old) - {old_unique}
        assert back["jobs_event_idempotency_key_a0e2466b_uniq"].endswith("USING btree (idempotency_key)")
    finally:
        _migrate([("jobs", _latest("jobs"))])
