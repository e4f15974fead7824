"""PostgreSQL timestamps read by psycopg's compiled loader.

Django reads every `timestamptz` through a loader of its own (`BaseTzLoader`, to give the value
the connection's time zone), a subclass of psycopg's pure-Python `TimestamptzLoader`: about 4 µs
a value, where psycopg's compiled loader (psycopg-binary's or psycopg-c's, which a subclass
cannot extend) takes a third of that. The matcher reads tens of thousands a cycle (its pending
jobs' submission times, its machines' idle stretches: 5 % of a cycle at 100,000 GPUs), every
list of the API a few per row. `use_compiled_loader` registers, on each new PostgreSQL
connection, a loader that calls the compiled one and gives the value the connection's time zone
as Django's does: the same datetimes, the same tzinfo object. Without a compiled implementation
(psycopg's pure-Python build) it leaves Django's loader in place.
"""

from __future__ import annotations

import importlib
from datetime import datetime, tzinfo
from typing import Any

import psycopg
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg.adapt import Loader


def _compiled_loader() -> Any:
    """psycopg's compiled TimestamptzLoader (psycopg-binary's or psycopg-c's), or None."""
    implementation = psycopg.pq.__impl__
    if implementation not in ("binary", "c"):
        return None
    return importlib.import_module(f"psycopg_{implementation}._psycopg").TimestamptzLoader


_COMPILED = _compiled_loader()


def _loader_for(zone: tzinfo | None) -> type:
    class CompiledTzLoader(Loader):
        # Django's create_cursor compares this with the connection's zone before registering its own.
        timezone = zone

        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._load = _COMPILED(oid, context).load

        def load(self, data: Any) -> datetime:
            return self._load(data).replace(tzinfo=self.timezone)

    return CompiledTzLoader


_LOADERS: dict[tzinfo | None, type] = {}


def use_compiled_loader(sender: object, connection: BaseDatabaseWrapper, **kwargs: object) -> None:
    """`connection_created` receiver: the compiled timestamptz loader on a PostgreSQL connection."""
    if connection.vendor != "postgresql" or _COMPILED is None:
        return
    zone = connection.timezone
    loader = _LOADERS.get(zone)
    if loader is None:
        loader = _LOADERS[zone] = _loader_for(zone)
    connection.connection.adapters.register_loader("timestamptz", loader)


__all__ = ["use_compiled_loader"]
