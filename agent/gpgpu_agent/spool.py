"""The write-ahead outbox: everything the agent must report goes here first, then to the marketplace.

A lease event or usage report is `put` into an SQLite file (WAL, synchronous=FULL: once `put`
returns, a crash or power cut cannot lose it), then `replay` sends the queue in the order it was
put and deletes each message once the marketplace has acknowledged it. A crash between the
acknowledgement and the delete sends that message again after the restart; the marketplace
answers a repeated event_id / report_id as a duplicate and changes nothing, so each message
takes effect exactly once. While the marketplace is unreachable the queue just grows, and
replay picks up where it stopped, in order.

Chunks of a job's output (kind "log") go through the same queue, so a lease's last output is
sent before its `exited` event. `put_log` queues a chunk and moves the lease's read position
(the `log_cursor` table: how far into the output, the next chunk's seq, the bytes not yet
shipped) in one transaction: after a crash the agent reads on from exactly where the queued
chunks end, so no byte is shipped twice or lost.

What the marketplace refuses for good (a 4xx other than 401/403, say 409 `invalid_transition`
for an `exited` event of a lease it already ended as lost) would block the queue forever: such a
message moves to the `dead` table with the refusal, and a WARNING names it. A log chunk so
refused is dropped instead (one WARNING per lease): it is output, not a report. 401 and 403 concern
the whole machine (credential revoked, machine suspended), not the message: replay stops and
keeps the queue.

The spool is bounded (`max_items`). A WARNING is logged when it passes 80 % of it. Usage reports
are refused with SpoolFull (a sentence saying why and what to do) once the queue reaches
`max_items - event_reserve`; lease lifecycle events (started, exited, preempted, failed to start)
use the reserved headroom and are never refused: they are few, and a lease's end must reach the
marketplace. Log chunks are refused sooner, once the queue holds `log_capacity` messages (half
of what usage reports may fill), so output never crowds out billing; a refused chunk stays
unread in the job's output and is queued at a later poll. One process writes a spool at a time
(an exclusive lock file beside it); `spool_stats` reads one that an agent holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from gpgpu_agent.protocols import AgentError, Rejected, Transport, TransportUnavailable

logger = logging.getLogger(__name__)

Kind = Literal["event", "usage", "log"]
KINDS: tuple[Kind, ...] = ("event", "usage", "log")
# The body field that carries each kind's idempotency key on the wire (a log chunk's is its
# integer seq, whose decimal form is the key).
KEY_FIELD: dict[str, str] = {"event": "event_id", "usage": "report_id", "log": "seq"}
MAX_KEY_CHARS = 128
WARN_FRACTION = 0.8
# The warning re-arms once the spool drains below this, so a spool hovering at 80 % does not
# log on every put.
REARM_FRACTION = 0.7
# Rejections that concern the machine, not the message: stop and keep the queue.
_MACHINE_WIDE_STATUSES = frozenset({401, 403})
_FETCH = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('event', 'usage', 'log')),
    lease_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (kind, lease_id, key)
);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    lease_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    status INTEGER NOT NULL,
    code TEXT NOT NULL,
    detail TEXT NOT NULL,
    died_at REAL NOT NULL,
    UNIQUE (kind, lease_id, key)
);
CREATE TABLE IF NOT EXISTS log_cursor (
    lease_id INTEGER PRIMARY KEY,
    offset INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    shipped INTEGER NOT NULL,
    carry BLOB NOT NULL
);
"""
# A spool written before log chunks existed: its outbox's CHECK allows events and usage only.
_OLD_OUTBOX_CHECK = "CHECK (kind IN ('event', 'usage'))"


class SpoolError(AgentError):
    """The spool cannot be used (locked by another agent, unreadable file); says which."""


class SpoolFull(SpoolError):
    """The spool has no room left for usage reports; the message says how full and what to do."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the marketplace refused for good, kept for the provider to inspect."""

    seq: int
    kind: str
    lease_id: int
    key: str
    body: dict[str, object]
    attempts: int
    status: int
    code: str
    detail: str
    died_at: float


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What one replay did. `stopped`: the error that ended it early (TransportUnavailable, or a
    machine-wide Rejected such as 403 machine_suspended) or, without stop_on_unavailable, the
    last one that held back a lease's messages; None when every message it tried got an answer."""

    sent: int
    dead: int
    pending: int
    stopped: AgentError | None = None


@dataclass(frozen=True, slots=True)
class SpoolStats:
    events: int
    usage: int
    dead: int
    oldest_created_at: float | None  # unix time of the oldest pending message
    logs: int = 0

    @property
    def pending(self) -> int:
        return self.events + self.usage + self.logs


@dataclass(frozen=True, slots=True)
class LogCursor:
    """How far a lease's output has been queued: `offset` into the output (the runner's
    position), the `seq` the next chunk takes, the bytes `shipped` so far (against the cap) and
    the `carry`, bytes read but held back (an unfinished character, or what could be the start
    of a secret)."""

    offset: int = 0
    seq: int = 0
    shipped: int = 0
    carry: bytes = b""


class Spool:
    """An on-disk, ordered, bounded outbox of lease events and usage reports (module docstring).

    Thread-safe: `put` may run while another thread replays; one replay runs at a time (a
    second concurrent call returns at once, having sent nothing)."""

    def __init__(self, path: str | os.PathLike[str], max_items: int = 100_000, *, event_reserve: int | None = None):
        if max_items < 2:
            raise ValueError("max_items must be at least 2.")
        self.path = Path(path)
        self.max_items = max_items
        self.event_reserve = event_reserve if event_reserve is not None else max(1, max_items // 10)
        if not 0 < self.event_reserve < max_items:
            raise ValueError("event_reserve must be between 1 and max_items - 1.")
        self.usage_capacity = max_items - self.event_reserve
        self.log_capacity = max(1, self.usage_capacity // 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_exclusively(self.path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before put() returns (NORMAL in WAL mode may lose the
            # last commits on power loss).
            self._db.execute("PRAGMA synchronous=FULL")
            _migrate(self._db)
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._lock_file.close()
            raise SpoolError(f"Spool {self.path} cannot be opened: {exc}.") from None
        self._lock = threading.Lock()
        self._replaying = threading.Lock()
        self._log_refused: set[int] = set()
        self._count: int = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._warned = self._count >= WARN_FRACTION * self.max_items
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            self._lock_file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------

    def put(self, kind: Kind, lease_id: int, key: str, body: Mapping[str, object]) -> bool:
        """Queue one message durably; True if queued, False if a message with this (kind,
        lease_id, key) is already queued or was dead-lettered (idempotent by key).

        `key` is the message's idempotency key and must equal its body's `event_id` (events) or
        `report_id` (usage). Raises SpoolFull for a usage report when the spool has no room left
        for one; events are always accepted."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}.")
        text = self._checked(kind, key, body)
        with self._lock:
            self._check_open()
            if self._known(kind, lease_id, key):
                return False
            if kind == "log" and self._count >= self.log_capacity:
                raise SpoolFull(self._full_message("log chunk", key, lease_id))
            if kind == "usage" and self._count >= self.usage_capacity:
                raise SpoolFull(self._full_message("usage report", key, lease_id))
            self._db.execute(
                "INSERT INTO outbox (kind, lease_id, key, body, created_at) VALUES (?, ?, ?, ?, ?)",
                (kind, lease_id, key, text, time.time()),
            )
            self._count += 1
            self._warn_if_filling(kind)
        return True

    def put_log(self, lease_id: int, body: Mapping[str, object], *, cursor: LogCursor) -> bool:
        """Queue one chunk of a lease's output (its body's `seq` is its key) and record `cursor`,
        the lease's read position after it, in one transaction; True if queued, False if that
        seq was already queued (the cursor is still recorded). Raises SpoolFull, recording
        nothing, once the queue holds `log_capacity` messages."""
        key = str(body.get("seq"))
        text = self._checked("log", key, body)
        with self._lock, self._transaction():
            if self._known("log", lease_id, key):
                self._cursor_write(lease_id, cursor)
                return False
            if self._count >= self.log_capacity:
                raise SpoolFull(self._full_message("log chunk", key, lease_id))
            self._db.execute(
                "INSERT INTO outbox (kind, lease_id, key, body, created_at) VALUES ('log', ?, ?, ?, ?)",
                (lease_id, key, text, time.time()),
            )
            self._cursor_write(lease_id, cursor)
            self._count += 1
            self._warn_if_filling("log")
        return True

    def log_cursor(self, lease_id: int) -> LogCursor:
        """Where the lease's output was last queued up to (a fresh cursor when never)."""
        with self._lock:
            self._check_open()
            row = self._db.execute(
                "SELECT offset, seq, shipped, carry FROM log_cursor WHERE lease_id = ?", (lease_id,)
            ).fetchone()
        return LogCursor(row[0], row[1], row[2], bytes(row[3])) if row else LogCursor()

    def log_cursor_set(self, lease_id: int, cursor: LogCursor) -> None:
        """Record the lease's read position when a read queued no chunk (all of it held back)."""
        with self._lock:
            self._check_open()
            self._cursor_write(lease_id, cursor)

    def log_cursor_forget(self, lease_id: int) -> None:
        """Drop the lease's read position (its output is gone); its queued chunks stay queued."""
        with self._lock:
            self._check_open()
            self._db.execute("DELETE FROM log_cursor WHERE lease_id = ?", (lease_id,))

    def _cursor_write(self, lease_id: int, cursor: LogCursor) -> None:
        """Caller holds self._lock."""
        self._db.execute(
            "INSERT OR REPLACE INTO log_cursor (lease_id, offset, seq, shipped, carry) VALUES (?, ?, ?, ?, ?)",
            (lease_id, cursor.offset, cursor.seq, cursor.shipped, cursor.carry),
        )

    @staticmethod
    def _checked(kind: str, key: str, body: Mapping[str, object]) -> str:
        """The body as JSON, once kind, key and the body's key field agree (else ValueError)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}.")
        if not key or len(key) > MAX_KEY_CHARS:
            raise ValueError(f"key must be 1 to {MAX_KEY_CHARS} characters.")
        field_value = body.get(KEY_FIELD[kind])
        if kind == "log":
            if not isinstance(field_value, int) or isinstance(field_value, bool) or str(field_value) != key:
                raise ValueError(f"A log body's seq must be an integer equal to its key {key!r}.")
        elif field_value != key:
            raise ValueError(f"A {kind} body's {KEY_FIELD[kind]} must equal its key {key!r}.")
        return json.dumps(dict(body), separators=(",", ":"), allow_nan=False)

    def _known(self, kind: str, lease_id: int, key: str) -> bool:
        """Caller holds self._lock."""
        return bool(
            self._db.execute(
                "SELECT 1 FROM outbox WHERE kind = ? AND lease_id = ? AND key = ? "
                "UNION ALL SELECT 1 FROM dead WHERE kind = ? AND lease_id = ? AND key = ? LIMIT 1",
                (kind, lease_id, key, kind, lease_id, key),
            ).fetchone()
        )

    def _full_message(self, what: str, key: str, lease_id: int) -> str:
        capacity = self.log_capacity if what == "log chunk" else self.usage_capacity
        return (
            f"The spool {self.path} is full ({self._count} messages waiting; {what}s may fill "
            f"{capacity} of its {self.max_items}), so {what} {key!r} of lease {lease_id} "
            "was not recorded. The marketplace has not acknowledged anything for a long time: check the "
            "connection (`gpgpu-agent doctor`), or raise the spool's size."
        )

    def _warn_if_filling(self, kind: str) -> None:
        """Caller holds self._lock."""
        if self._count > self.max_items and kind == "event":
            logger.error(
                "Spool %s holds %d messages, over its limit of %d: lifecycle events are still kept, "
                "but the marketplace has been unreachable for a long time.",
                self.path,
                self._count,
                self.max_items,
            )
        elif not self._warned and self._count >= WARN_FRACTION * self.max_items:
            self._warned = True
            logger.warning(
                "Spool %s is %d%% full (%d of %d messages waiting for the marketplace); at %d, new usage "
                "reports will be refused. Check the connection to the marketplace (`gpgpu-agent doctor`).",
                self.path,
                100 * self._count // self.max_items,
                self._count,
                self.max_items,
                self.usage_capacity,
            )

    # -- sending -------------------------------------------------------------------------------

    def replay(
        self, transport: Transport, *, limit: int | None = None, stop_on_unavailable: bool = True
    ) -> ReplayResult:
        """Send queued messages in the order they were put, each until acknowledged.

        Deletes a message once the marketplace has acknowledged it (a duplicate counts), moves
        one the marketplace refuses for good to the dead table (WARNING logged) and goes on.
        Stops at the first TransportUnavailable, or a 401/403 (machine-wide) Rejected, keeping
        that message first in line; with stop_on_unavailable=False it instead holds back the
        rest of that lease's messages (their order within a lease matters) and goes on with
        other leases'. Sends at most `limit` messages. Returns at once, having sent nothing, if
        another thread is replaying."""
        if not self._replaying.acquire(blocking=False):
            return ReplayResult(sent=0, dead=0, pending=self.pending(), stopped=None)
        try:
            return self._replay(transport, limit=limit, stop_on_unavailable=stop_on_unavailable)
        finally:
            self._replaying.release()

    def _replay(self, transport: Transport, *, limit: int | None, stop_on_unavailable: bool) -> ReplayResult:
        sent = dead = 0
        after = 0
        held_leases: set[int] = set()
        stopped: AgentError | None = None
        held_for: TransportUnavailable | None = None
        while stopped is None and (limit is None or sent + dead < limit):
            batch = self._fetch(after)
            if not batch:
                break
            for seq, kind, lease_id, key, text in batch:
                after = seq
                if limit is not None and sent + dead >= limit:
                    break
                if lease_id in held_leases:
                    continue
                body = json.loads(text)
                try:
                    if kind == "event":
                        transport.lease_event(lease_id, body)
                    elif kind == "log":
                        transport.lease_log(lease_id, body)
                    else:
                        transport.lease_usage(lease_id, body)
                except TransportUnavailable as exc:
                    self._note_failure(seq, str(exc))
                    if stop_on_unavailable:
                        stopped = exc
                        break
                    held_leases.add(lease_id)
                    held_for = exc
                    continue
                except Rejected as exc:
                    if exc.status in _MACHINE_WIDE_STATUSES:
                        self._note_failure(seq, str(exc))
                        stopped = exc
                        break
                    dead += 1
                    if kind == "log":
                        self._drop_log(seq, lease_id, key, exc)
                        continue
                    self._bury(seq, exc)
                    logger.warning(
                        "The marketplace refused %s %r of lease %d for good (%d %s: %s); it is kept in the "
                        "spool's dead letters and will not be sent again.",
                        "event" if kind == "event" else "usage report",
                        key,
                        lease_id,
                        exc.status,
                        exc.code,
                        exc.detail,
                    )
                    continue
                self._delete(seq)
                sent += 1
        return ReplayResult(sent=sent, dead=dead, pending=self.pending(), stopped=stopped or held_for)

    def _drop_log(self, seq: int, lease_id: int, key: str, exc: Rejected) -> None:
        """A log chunk refused for good is dropped, not kept as a dead letter (a marketplace
        without the logs endpoint answers every one 404: megabytes of them), and logged once
        per lease."""
        self._delete(seq)
        quiet = lease_id in self._log_refused
        self._log_refused.add(lease_id)
        logger.log(
            logging.DEBUG if quiet else logging.WARNING,
            "The marketplace refused log chunk %s of lease %d (%d %s: %s); it is dropped%s.",
            key,
            lease_id,
            exc.status,
            exc.code,
            exc.detail,
            "" if quiet else ", and so are this lease's next refused chunks, without another warning",
        )

    def _fetch(self, after: int) -> list[tuple[int, str, int, str, str]]:
        with self._lock:
            self._check_open()
            return self._db.execute(
                "SELECT seq, kind, lease_id, key, body FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, _FETCH),
            ).fetchall()

    def _delete(self, seq: int) -> None:
        with self._lock:
            self._check_open()
            if self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount:
                self._count -= 1
            self._rearm()

    def _note_failure(self, seq: int, error: str) -> None:
        with self._lock:
            self._check_open()
            self._db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?", (error[:1000], seq)
            )

    def _bury(self, seq: int, exc: Rejected) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO dead (seq, kind, lease_id, key, body, created_at, attempts, status, code, "
                "detail, died_at) SELECT seq, kind, lease_id, key, body, created_at, attempts + 1, ?, ?, ?, ? "
                "FROM outbox WHERE seq = ?",
                (exc.status, exc.code[:200], exc.detail[:1000], time.time(), seq),
            )
            if self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount:
                self._count -= 1
            self._rearm()

    def _rearm(self) -> None:
        if self._warned and self._count < REARM_FRACTION * self.max_items:
            self._warned = False

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Caller holds self._lock."""
        self._check_open()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"Spool {self.path} is closed.")

    # -- reading -------------------------------------------------------------------------------

    def pending(self) -> int:
        """Messages waiting to be sent."""
        with self._lock:
            return self._count

    def stats(self) -> SpoolStats:
        with self._lock:
            self._check_open()
            return _stats(self._db)

    def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The most recent messages the marketplace refused for good, newest first."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT seq, kind, lease_id, key, body, attempts, status, code, detail, died_at FROM dead "
                "ORDER BY died_at DESC, seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            DeadLetter(seq, kind, lease, key, json.loads(body), attempts, status, code, detail, died)
            for seq, kind, lease, key, body, attempts, status, code, detail, died in rows
        ]


def spool_stats(path: str | os.PathLike[str]) -> SpoolStats | None:
    """Counts of a spool file, read-only and without its lock (for `gpgpu-agent status` while
    the daemon runs); None when there is no spool file yet."""
    target = Path(path)
    if not target.exists():
        return None
    db = sqlite3.connect(f"{target.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return _stats(db)
    finally:
        db.close()


def _stats(db: sqlite3.Connection) -> SpoolStats:
    counts = dict(db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
    oldest = db.execute("SELECT MIN(created_at) FROM outbox").fetchone()[0]
    dead = db.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
    return SpoolStats(
        events=counts.get("event", 0),
        usage=counts.get("usage", 0),
        dead=dead,
        oldest_created_at=oldest,
        logs=counts.get("log", 0),
    )


def _migrate(db: sqlite3.Connection) -> None:
    """Let a spool written before log chunks existed take them: its outbox is rebuilt with the
    wider CHECK, its messages and their order kept (one transaction)."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'outbox'").fetchone()
    if row is None or _OLD_OUTBOX_CHECK not in row[0]:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE outbox RENAME TO outbox_old")
        db.execute(_SCHEMA.split(";")[0])
        db.execute("INSERT INTO outbox SELECT * FROM outbox_old")
        db.execute("DROP TABLE outbox_old")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _lock_exclusively(path: Path) -> TextIO:
    """Hold `<spool>.lock` for the life of the Spool: two agents replaying one spool would send
    its messages twice and out of order."""
    handle = open(f"{path}.lock", "a+")  # held open until close()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SpoolError(f"Spool {path} is in use by another agent process (it holds {path}.lock).") from None
    return handle
