"""Named locks for periodic work, so two runs of one sweep never overlap.

One mechanism, held across commits (a sweep commits item by item while it holds the lock) and
never waited for: `try_lock(name)` yields False at once when the lock is held elsewhere.

- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on the caller's connection, keyed
  by a 64-bit hash of the name; released with `pg_advisory_unlock`, or by the server when the
  connection ends, so a killed worker never leaves it held. (Session locks need a session: not
  for a pooler in transaction mode.) A session that ends under its holder (a failover, a server
  restart) releases the lock too, while the holder runs on: `lock_check(name)` tells, with no
  query (core.periodic asks it before each item; billing before each transaction it sends).
- SQLite in a file: an exclusive `flock` on VAR_DIR/locks/<name>.lock, which the kernel drops when
  the process dies. An in-memory database (the tests') lives in one process, so the process-wide
  registry below is its whole lock, and parallel test runs never see each other's locks.

Not re-entrant, on either backend: a name this process already holds yields False (PostgreSQL's
own advisory locks would let the same session take one twice).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.backends.base.base import BaseDatabaseWrapper

if TYPE_CHECKING:
    from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteDatabaseWrapper

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,150}$")
# Names held by this process (any thread).
_held: set[str] = set()
_held_guard = threading.Lock()


def lock_key(name: str) -> int:
    """The advisory lock key of `name`: a stable signed 64-bit hash."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


@contextmanager
def try_lock(name: str, *, using: str = DEFAULT_DB_ALIAS) -> Iterator[bool]:
    """Try to take the lock `name` without waiting; yields whether it was taken, and releases it on
    exit. Opens no transaction: what the body writes commits as the body decides."""
    if not _NAME.match(name):
        raise ValueError(f"lock name {name!r}: letters, digits, '_', '.' and '-' only")
    with _held_guard:
        if name in _held:
            taken_here = False
        else:
            _held.add(name)
            taken_here = True
    if not taken_here:
        yield False
        return
    try:
        connection = connections[using]
        if connection.vendor == "postgresql":
            backend = _advisory_lock(name, connection)
        elif connection.vendor == "sqlite" and cast("SQLiteDatabaseWrapper", connection).is_in_memory_db():
            backend = _process_lock()
        else:
            backend = _file_lock(name)
        with backend as acquired:
            yield acquired
    finally:
        with _held_guard:
            _held.discard(name)


@contextmanager
def _process_lock() -> Iterator[bool]:
    yield True


class LockLost(Exception):
    """The database session that held a lock ended while its holder ran on (a failover, a server
    restart, the network): the server released the lock with it, and another run may hold it
    now. The holder must stop before it does anything the lock guards."""


# PostgreSQL locks held by this process: name → (alias, the driver connection whose session
# holds it). Django opens a new connection, a new session, after the old one broke.
_sessions: dict[str, tuple[str, object]] = {}


def lock_check(name: str) -> None:
    """Raise LockLost when this process holds `name` as a PostgreSQL session lock and the session
    that took it is gone (Django's connection is another one now). Costs no query. A lock this
    process does not hold that way (a file lock, one not taken here) passes."""
    held = _sessions.get(name)
    if held is None:
        return
    alias, session = held
    if connections[alias].connection is not session:
        raise LockLost(f"lock {name}: the database session that held it ended; another run may hold it now")


@contextmanager
def _advisory_lock(name: str, connection: BaseDatabaseWrapper) -> Iterator[bool]:
    key = lock_key(name)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
        (acquired,) = cursor.fetchone()
    if not acquired:
        yield False
        return
    session = connection.connection
    _sessions[name] = (connection.alias, session)
    try:
        yield True
    finally:
        _sessions.pop(name, None)
        if connection.connection is session:  # else the session is gone, and the lock with it
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", [key])
            except DatabaseError:
                # The session is broken (or its transaction aborted): ending it releases the lock.
                logger.warning("lock %s: could not unlock; closing the connection to release it", name, exc_info=True)
                connection.close()


@contextmanager
def _file_lock(name: str) -> Iterator[bool]:
    path = Path(settings.VAR_DIR) / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
