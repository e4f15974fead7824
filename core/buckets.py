"""Equal time buckets computed by the database, so a chart's downsampling is a GROUP BY and never
a loop over rows in Python. PostgreSQL and SQLite (the two databases the project runs on)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import BigIntegerField, Func
from django.db.models.sql.compiler import SQLCompiler


def epoch_s(at: datetime) -> int:
    """Whole seconds since the Unix epoch of an aware datetime, rounded down."""
    return int(at.astimezone(UTC).timestamp() // 1)


class EpochBucket(Func):
    """The index of the `size_s`-second bucket, counted from `origin`, that a datetime column
    falls in: (whole seconds of the value − whole seconds of origin) // size_s. A value before
    `origin` gives a negative index on PostgreSQL and rounds towards zero on SQLite: callers
    clamp such rows themselves."""

    output_field = BigIntegerField()

    # Func's own signature: the column and the options.
    def __init__(self, expression: Any, *, origin: datetime, size_s: int, **extra: Any) -> None:
        if origin.tzinfo is None:
            raise ValueError("origin must carry a time zone")
        if size_s < 1:
            raise ValueError("size_s must be a positive number of seconds")
        self.origin_s = epoch_s(origin)
        self.size_s = int(size_s)
        super().__init__(expression, **extra)

    # Func.as_sql's signature: the template options are not used.
    def as_sql(self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, *args: Any, **extra: Any) -> Any:
        raise NotImplementedError(f"EpochBucket has no SQL for {connection.vendor}")

    def as_postgresql(self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any) -> Any:
        sql, params = compiler.compile(self.get_source_expressions()[0])
        return (
            f"CAST(FLOOR((FLOOR(EXTRACT(EPOCH FROM {sql})) - %s) / %s) AS BIGINT)",
            (*params, self.origin_s, self.size_s),
        )

    def as_sqlite(self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any) -> Any:
        # Django stores an aware datetime as UTC text, which strftime('%s') reads; integer division.
        sql, params = compiler.compile(self.get_source_expressions()[0])
        return f"((CAST(strftime('%%s', {sql}) AS INTEGER) - %s) / %s)", (*params, self.origin_s, self.size_s)
