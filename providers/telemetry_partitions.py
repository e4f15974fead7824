"""Raw telemetry in time-range partitions on PostgreSQL, so that retention drops whole tables.

At one sample a minute per GPU, raw telemetry is the marketplace's largest table by far (a fleet
of 100,000 GPUs writes 144 million rows a day). Deleting the expired rows one by one would cost
as much again in writes, WAL and vacuum as inserting them did. On PostgreSQL the table
`providers_telemetrysample` is therefore partitioned by range of `at` (native declarative
partitioning, no extension):

- one partition per TELEMETRY_PARTITION_H hours (aligned on the UTC day), named
  `providers_telemetrysample_pYYYYMMDDHH_YYYYMMDDHH` after its range, created AHEAD of time by
  `ensure` (beat's hourly prune, and the migration);
- a DEFAULT partition for any row outside them (a clock far off, or beat stopped for longer than
  AHEAD): `ensure` moves such rows into the range partition it creates for them, and prune
  deletes expired ones row by row (there are few);
- `drop_expired` drops a partition once all of its range is older than the raw retention and
  rolled up (so a sample is kept at least TELEMETRY_RAW_RETENTION_H hours, and at most one
  partition width longer).

The primary key is (id, at), since a partitioned table's unique keys must hold the partition key;
ids still come from one sequence, so `id` alone stays unique and Django keeps using it. SQLite (the
embedded default) keeps one plain table and prune deletes rows, as before.

`convert` turns the plain table of an existing deployment into this layout without holding a lock
that blocks heartbeats for longer than a few catalog updates: the scans (validating a CHECK
constraint that proves the old rows' range, building the (id, at) index) run first under locks
that let inserts through, and the old table becomes the first partition, [MINVALUE, bound), as it
is.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections, transaction
from django.db.backends.utils import CursorWrapper

from core.locks import lock_key
from providers.models import TelemetrySample

logger = logging.getLogger(__name__)

TABLE = TelemetrySample._meta.db_table
# How far past now `ensure` keeps range partitions ready: a day of slack for beat.
AHEAD = timedelta(hours=24)
# How long a partition's DROP (or the conversion's cutover) waits for its lock before trying again
# a little later: both need the table's exclusive lock, and while one waits for it behind a long
# read, the heartbeats' inserts queue behind the wait. Short waits bound that stall.
LOCK_TIMEOUT = "200ms"
LOCK_ATTEMPTS = 10
LOCK_RETRY_S = 0.5
_STAMP = "%Y%m%d%H"


@dataclass(frozen=True)
class Partition:
    name: str
    start: datetime | None  # None: MINVALUE (the table an existing deployment had)
    end: datetime


def supported(using: str = DEFAULT_DB_ALIAS) -> bool:
    return connections[using].vendor == "postgresql"


def width() -> timedelta:
    return timedelta(hours=settings.GPGPU["TELEMETRY_PARTITION_H"])


def default_partition(table: str = TABLE) -> str:
    return f"{table}_default"


def _name_pattern(table: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(table)}_p(min|\d{{10}})_(\d{{10}})$")


def _stamp(at: datetime | None) -> str:
    return "min" if at is None else at.astimezone(UTC).strftime(_STAMP)


def _parse(stamp: str) -> datetime:
    return datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)


def partition_name(start: datetime | None, end: datetime, table: str = TABLE) -> str:
    return f"{table}_p{_stamp(start)}_{_stamp(end)}"


def floor(at: datetime, step: timedelta) -> datetime:
    """The start of the partition-aligned slot containing `at` (slots tile the UTC day)."""
    day = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day + ((at - day) // step) * step


def _literal(at: datetime) -> str:
    """A timestamptz literal of an aware datetime we computed (never user input)."""
    return f"'{at.astimezone(UTC).isoformat()}'::timestamptz"


def is_partitioned(cursor: CursorWrapper, table: str = TABLE) -> bool:
    cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(%s))", [table])
    row = cursor.fetchone()
    return bool(row and row[0])


def partitions(cursor: CursorWrapper, table: str = TABLE) -> list[Partition]:
    """The range partitions of `table` this module made, by start (the DEFAULT one is not listed)."""
    cursor.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
        [table],
    )
    pattern = _name_pattern(table)
    found = []
    for (name,) in cursor.fetchall():
        match = pattern.match(name)
        if match:
            start = None if match[1] == "min" else _parse(match[1])
            found.append(Partition(name=name, start=start, end=_parse(match[2])))
    return sorted(found, key=lambda p: (p.start is not None, p.start or p.end))


def _columns(cursor: CursorWrapper, table: str) -> list[str]:
    cursor.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum",
        [table],
    )
    return [row[0] for row in cursor.fetchall()]


def _create(cursor: CursorWrapper, table: str, start: datetime, end: datetime) -> str:
    """Create and attach the range partition [start, end), moving into it any rows the DEFAULT
    partition holds for that range (PostgreSQL refuses the new range while they are there)."""
    name = partition_name(start, end, table)
    columns = ", ".join(f'"{c}"' for c in _columns(cursor, table))
    with transaction.atomic(using=cursor.db.alias):
        # First the lock ATTACH takes anyway: no heartbeat may commit a row of the range into the
        # DEFAULT partition between the move and the ATTACH (which would then refuse the range).
        # A heartbeat that was routing such a row to DEFAULT meanwhile fails its transaction
        # ("violates partition constraint") and the agent sends it again; that only happens when
        # the current slot had no partition (beat stopped for over AHEAD).
        cursor.execute(f'LOCK TABLE "{default_partition(table)}" IN ACCESS EXCLUSIVE MODE')
        cursor.execute(f'CREATE TABLE "{name}" (LIKE "{table}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS)')
        move = (
            f'WITH moved AS (DELETE FROM "{default_partition(table)}" WHERE at >= {_literal(start)} '  # noqa: S608
            f"AND at < {_literal(end)} RETURNING {columns}) "
            f'INSERT INTO "{name}" ({columns}) SELECT {columns} FROM moved'
        )  # names: the model's table and our partitions'; times: ours
        cursor.execute(move)
        cursor.execute(
            f'ALTER TABLE "{table}" ATTACH PARTITION "{name}" FOR VALUES FROM ({_literal(start)}) TO ({_literal(end)})'
        )
    return name


def ensure(*, now: datetime, using: str = DEFAULT_DB_ALIAS, table: str = TABLE) -> list[str]:
    """Make sure range partitions cover [the slot containing `now`, now + AHEAD); returns the
    names created. Idempotent, and safe to run concurrently (a transaction-scoped advisory lock
    serialises runs); a table too busy to lock within LOCK_ATTEMPTS short waits is left for the
    next run (AHEAD leaves a day of them). A range already covered, even by partitions of another
    width (the setting changed), is left as it is; new partitions fill the gaps."""
    if not supported(using):
        return []
    step = width()
    created: list[str] = []
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock_key(f"{table}.partitions")])
        if not is_partitioned(cursor, table):
            return []
        existing = partitions(cursor, table)
        at, until = floor(now, step), now + AHEAD
        while at < until:
            covering = next((p for p in existing if (p.start is None or p.start <= at) and at < p.end), None)
            if covering is not None:
                at = covering.end
                continue
            later = [p.start for p in existing if p.start is not None and p.start > at]
            end = min([floor(at, step) + step, *later])
            # ATTACH locks the DEFAULT partition exclusively while it checks it holds none of the
            # new range's rows; behind a long read, every read of the table would queue.
            if not _with_short_locks(partial(_create, cursor, table, at, end), cursor):
                logger.warning("telemetry: the table is busy; partition [%s, %s) left for a later run", at, end)
                break
            created.append(partition_name(at, end, table))
            existing.append(Partition(name=created[-1], start=at, end=end))
            at = end
    if created:
        logger.info("telemetry: created partitions %s", ", ".join(created))
    return created


def drop_expired(
    *,
    raw_cutoff: datetime,
    rollup_cutoff: datetime,
    rolled_up_until: datetime | None,
    using: str = DEFAULT_DB_ALIAS,
    table: str = TABLE,
) -> list[str]:
    """Drop the range partitions that hold only expired samples: their whole range is before
    `raw_cutoff`, and every sample in them is rolled up (none at or after `rolled_up_until`, the
    end of the last hour the rollup wrote) or older than the rollups' own retention
    (`rollup_cutoff`). Returns the names dropped. A partition whose lock is not free within
    LOCK_ATTEMPTS tries of LOCK_TIMEOUT (a long read of it) is left for the next run."""
    if not supported(using):
        return []
    dropped: list[str] = []
    with connections[using].cursor() as cursor:
        if not is_partitioned(cursor, table):
            return []
        for part in partitions(cursor, table):
            if part.end > raw_cutoff:
                continue
            if part.end > rollup_cutoff and (rolled_up_until is None or part.end > rolled_up_until):
                unrolled = f'SELECT EXISTS (SELECT 1 FROM "{part.name}" WHERE at >= %s)'  # noqa: S608
                cursor.execute(unrolled, [rolled_up_until or datetime.min.replace(tzinfo=UTC)])
                if cursor.fetchone()[0]:
                    continue  # samples the rollup has not summarised yet
            if not _with_short_locks(partial(cursor.execute, f'DROP TABLE "{part.name}"'), cursor):
                logger.warning("telemetry: partition %s is in use; dropping it on a later run", part.name)
                continue
            dropped.append(part.name)
    if dropped:
        logger.info("telemetry: dropped expired partitions %s", ", ".join(dropped))
    return dropped


def delete_expired_defaults(
    *, raw_cutoff: datetime, rollup_cutoff: datetime, using: str = DEFAULT_DB_ALIAS, table: str = TABLE
) -> int:
    """Delete the expired rows of the DEFAULT partition, row by row as SQLite's prune does: older
    than `raw_cutoff`, and rolled up (a rollup row for their GPU and hour) or older than
    `rollup_cutoff`. Returns how many went."""
    from providers.models import TelemetryRollup

    rollups = TelemetryRollup._meta.db_table
    with connections[using].cursor() as cursor:
        expired = (
            f'DELETE FROM "{default_partition(table)}" s WHERE s.at < %s AND (s.at < %s OR EXISTS ('  # noqa: S608
            f'SELECT 1 FROM "{rollups}" r WHERE r.gpu_id = s.gpu_id '
            f"AND r.hour = date_trunc('hour', s.at, 'UTC')))"
        )  # table names from the models; every value is a parameter
        cursor.execute(expired, [raw_cutoff, rollup_cutoff])
        return cursor.rowcount


def _with_short_locks(step: Callable[[], object], cursor: CursorWrapper) -> bool:
    """Run `step` in its own transaction (a savepoint inside the caller's) whose lock waits give up
    after LOCK_TIMEOUT, up to LOCK_ATTEMPTS times LOCK_RETRY_S apart; whether it ran."""
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            with transaction.atomic(using=cursor.db.alias):
                cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                step()
            return True
        except OperationalError as exc:
            if attempt == LOCK_ATTEMPTS:
                logger.info("telemetry: gave up waiting for a lock (%s)", exc)
                return False
            time.sleep(LOCK_RETRY_S)
    return False


def _bound_after(at: datetime, step: timedelta) -> datetime:
    """The first slot boundary at least an hour after `at`: rows written while the conversion
    runs (stamped with the servers' clocks) stay below it."""
    return floor(at + timedelta(hours=1), step) + step


def convert(*, now: datetime, using: str = DEFAULT_DB_ALIAS, table: str = TABLE) -> bool:
    """Turn the plain table `table` into a partitioned one, keeping its rows, ids, indexes,
    constraints and name. Returns False when it already is partitioned (then only `ensure`s).

    Runs outside a transaction (the migration is not atomic). Steps:
      1. outside any long lock: a CHECK (at < bound) added NOT VALID then validated (a scan under
         SHARE UPDATE EXCLUSIVE, which lets inserts and reads through), and a unique index on
         (id, at) built CONCURRENTLY;
      2. one short transaction under ACCESS EXCLUSIVE on the old table (each wait for it given up
         after LOCK_TIMEOUT and tried again, LOCK_ATTEMPTS times): rename it, make the (id, at)
         index its primary key, create the partitioned table under the old name (same columns,
         CHECKs, foreign keys, indexes, a sequence continuing the old ids), attach the old table
         as [MINVALUE, bound) (no scan: the validated CHECK proves the range; the indexes and
         foreign key already there are adopted, not rebuilt), and add the DEFAULT partition;
      3. `ensure` the partitions from `bound` on.
    """
    connection = connections[using]
    with connection.cursor() as cursor:
        if is_partitioned(cursor, table):
            ensure(now=now, using=using, table=table)
            return False
        bound = _bound_after(now, width())
        check, unique = f"{table}_pmin_bound", f"{table}_pmin_id_at"
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass(%s) AND conname = %s)",
            [table, check],
        )
        if cursor.fetchone()[0]:  # an earlier attempt stopped after step 1: start it again
            cursor.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT "{check}"')
        cursor.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{check}" CHECK (at < {_literal(bound)}) NOT VALID')
        cursor.execute(f'ALTER TABLE "{table}" VALIDATE CONSTRAINT "{check}"')
        cursor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{unique}"')  # left invalid by an interrupted build
        cursor.execute(f'CREATE UNIQUE INDEX CONCURRENTLY "{unique}" ON "{table}" (id, at)')
        done = _with_short_locks(lambda: _cutover(cursor, table=table, bound=bound, check=check, unique=unique), cursor)
        if not done:
            raise OperationalError(f"{table} stayed busy: its exclusive lock was not free in {LOCK_ATTEMPTS} tries")
    ensure(now=now, using=using, table=table)
    return True


def _cutover(cursor: CursorWrapper, *, table: str, bound: datetime, check: str, unique: str) -> None:
    """Step 2 of `convert`, inside the caller's short-lock transaction."""
    old = partition_name(None, bound, table)
    cursor.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
    cursor.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = to_regclass(%s) "
        "AND contype = 'f'",
        [table],
    )
    foreign_keys: Sequence[tuple[str, str]] = cursor.fetchall()
    cursor.execute(
        "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "WHERE x.indrelid = to_regclass(%s) AND NOT x.indisprimary AND i.relname <> %s",
        [table, unique],
    )
    indexes: Sequence[tuple[str, str]] = cursor.fetchall()
    cursor.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'p'",
        [table],
    )
    (primary_key,) = cursor.fetchone()
    cursor.execute(f'SELECT max(id) FROM "{table}"')  # noqa: S608
    (last_id,) = cursor.fetchone()

    cursor.execute(f'ALTER TABLE "{table}" RENAME TO "{old}"')
    cursor.execute(f'ALTER TABLE "{old}" DROP CONSTRAINT "{primary_key}"')
    cursor.execute(f'ALTER TABLE "{old}" ADD CONSTRAINT "{old}_pkey" PRIMARY KEY USING INDEX "{unique}"')
    cursor.execute(f'ALTER TABLE "{old}" ALTER COLUMN id DROP IDENTITY IF EXISTS')
    for index, _ in indexes:
        cursor.execute(f'ALTER INDEX "{index}" RENAME TO "{index[:50]}_pmin"')

    sequence = f"{table}_id_seq"
    cursor.execute(
        f'CREATE TABLE "{table}" (LIKE "{old}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (at)'
    )
    cursor.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT "{check}"')
    cursor.execute(f'CREATE SEQUENCE "{sequence}" AS bigint OWNED BY "{table}".id')
    cursor.execute("SELECT setval(%s, %s, %s)", [sequence, last_id or 1, last_id is not None])
    cursor.execute(f"""ALTER TABLE "{table}" ALTER COLUMN id SET DEFAULT nextval('"{sequence}"')""")
    cursor.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{table}_pkey" PRIMARY KEY (id, at)')
    for name, definition in foreign_keys:
        cursor.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition}')
    for _, definition in indexes:
        cursor.execute(definition)  # its ON names the table, now the partitioned one
    cursor.execute(f'ALTER TABLE "{table}" ATTACH PARTITION "{old}" FOR VALUES FROM (MINVALUE) TO ({_literal(bound)})')
    cursor.execute(f'ALTER TABLE "{old}" DROP CONSTRAINT "{check}"')
    cursor.execute(f'CREATE TABLE "{default_partition(table)}" PARTITION OF "{table}" DEFAULT')
