"""The rows of a `values_list` query, fetched in one go through a cursor.

Iterating a queryset costs the ORM's machinery for every row (its iterator, chunked fetches, a
converter call per column): for the matcher's read of 100,000 GPUs, about twice what fetching
and decoding the rows costs psycopg. `rows()` runs the query's own SQL and hands back the
driver's tuples. It applies no converters, so it is for queries whose columns need none on
any backend: integers, text, booleans, and values cast in SQL to one of those (a price as an
integer count of millionths, `Cast(Round(...), BigIntegerField())`); not decimals, dates,
times or JSON, which SQLite returns raw.
"""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.db.models import QuerySet


def rows(queryset: QuerySet[Any, Any]) -> list[tuple[Any, ...]]:
    """Every row of `queryset` (a `values_list` query) as the driver returns it."""
    sql, params = queryset.query.sql_with_params()
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()
