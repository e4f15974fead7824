"""The rows of a `values_list` query, fetched in one go through a cursor.

Iterating a queryset costs the ORM's machinery for every row (its iterator, chunked fetches, a
converter call per column): for the matcher's read of 100,000 GPUs, about twice what fetching
and decoding the rows costs psycopg. `rows()` runs the query's own SQL, compiled for the
queryset's database, and hands back the driver's tuples. It applies no converters, so it is for
queries whose columns need none on any backend: integers, text, and values cast in SQL to one of
those (a price as an integer count of millionths, `Cast(Round(...), BigIntegerField())`); not
booleans, decimals, dates, times or JSON, which SQLite returns raw.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db import connections
from django.db.models import QuerySet


def rows(queryset: QuerySet[Any, Any]) -> list[tuple[Any, ...]]:
    """Every row of `queryset` (a `values_list` query) as the driver returns it."""
    try:
        sql, params = queryset.query.get_compiler(using=queryset.db).as_sql()
    except EmptyResultSet:  # a filter that can match nothing (`pk__in=[]`): the ORM sends no query either
        return []
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()
