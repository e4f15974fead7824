"""core.timestamps: PostgreSQL timestamps read by psycopg's compiled loader, as Django's own
loader reads them."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from psycopg.pq import Format

from core.timestamps import _COMPILED

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="a PostgreSQL connection's loader"),
    pytest.mark.skipif(_COMPILED is None, reason="psycopg's pure-Python build: Django's loader stays"),
]


def _read(values: list[datetime]) -> list[datetime]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT v FROM unnest(%s::timestamptz[]) AS v", [values])
        return [row[0] for row in cursor.fetchall()]


def test_a_connection_reads_timestamps_with_the_compiled_loader() -> None:
    connection.ensure_connection()
    loader = connection.connection.adapters.get_loader(1184, Format.TEXT)  # timestamptz, as Django's cursors read it
    assert loader.__name__ == "CompiledTzLoader"
    assert loader.timezone == connection.timezone


def test_timestamps_read_as_djangos_loader_reads_them() -> None:
    from django.db.backends.postgresql.psycopg_any import register_tzloader

    rng = random.Random(5)
    values = [datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)]
    values += [
        datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(-6 * 10**16, 2 * 10**17))
        for _ in range(500)
    ]
    ours = _read(values)
    with connection.cursor() as cursor:
        register_tzloader(connection.timezone, cursor)  # Django's own, on this cursor alone
        cursor.execute("SELECT v FROM unnest(%s::timestamptz[]) AS v", [values])
        djangos = [row[0] for row in cursor.fetchall()]
    assert ours == djangos == values
    assert {v.tzinfo for v in ours} == {v.tzinfo for v in djangos} == {connection.timezone}
