"""`field__any=ids`: a filter on a list of integer ids sent as ONE array parameter.

`field__in=ids` makes Django prepare every id as a field value and PostgreSQL's client-side
binding quote each one into the statement text: at thousands of ids (the matcher's locks and
reads, a cycle at 100,000 GPUs) that is a tenth of a cycle's CPU. `field__any=ids` sends
`field = ANY(%s::bigint[])` with the ids as one array on PostgreSQL (the plan is the same index
scan), and an IN list elsewhere (SQLite: callers keep lists under its 999-parameter limit, as
they do for IN). Integer ids only: they are passed as they are, not prepared per field.
Registered on every field, foreign keys included, by CoreConfig.ready.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Lookup
from django.db.models.sql.compiler import SQLCompiler


class AnyOf(Lookup):
    lookup_name = "any"
    prepare_rhs = False

    def get_prep_lookup(self) -> list[int]:
        rhs: Iterable[Any] = self.rhs
        ids = list(rhs)
        for value in ids:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"__any takes integer ids, not {value!r}")
        return ids

    def as_sql(self, compiler: SQLCompiler, connection: BaseDatabaseWrapper) -> tuple[str, tuple[Any, ...]]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        ids: list[int] = self.rhs
        if connection.vendor == "postgresql":
            return f"{lhs} = ANY(%s::bigint[])", (*lhs_params, ids)
        if not ids:
            return "1 = 0", ()
        return f"{lhs} IN ({', '.join(['%s'] * len(ids))})", (*lhs_params, *ids)
