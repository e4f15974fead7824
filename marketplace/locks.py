"""Named locks for periodic sweepers, so two beat-triggered runs never overlap.

On PostgreSQL: a transaction-level advisory lock (released at commit or rollback, and by the
server if the worker dies). On SQLite, writers are serialised by the database itself
(transactions begin IMMEDIATE), so the lock is the transaction.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection, transaction


def _key(name: str) -> int:
    # A stable signed 32-bit key per name.
    return zlib.crc32(name.encode()) - 2**31


@contextmanager
def try_lock(name: str) -> Iterator[bool]:
    """Open a transaction and try to take the lock `name`; yields False (and does nothing
    else) when another worker holds it."""
    with transaction.atomic():
        if connection.vendor != "postgresql":
            yield True
            return
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [_key(name)])
            (acquired,) = cursor.fetchone()
        yield bool(acquired)
