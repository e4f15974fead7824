"""What raw telemetry and its rollups cost on disk per GPU, and what expiring a day of it costs.

    python benchmarks/telemetry_storage.py --database-url postgres://postgres@127.0.0.1:5432/gpgpu_bench_tel --migrate

On a PostgreSQL database of its own (the migration partitions raw telemetry by time:
providers.telemetry_partitions), with G GPUs (default 1,000) on machines of 8:

1. makes the range partitions for a day D ahead (`ensure`, as beat's hourly prune does) and
   writes a full day of samples into them, one per GPU per TELEMETRY_SAMPLE_INTERVAL_S, in the
   order heartbeats write them (minute by minute, every GPU each minute), with varied values;
2. rolls the day up (`telemetry_rollup`, the beat task's code) and measures both tables' bytes
   (heap, TOAST and indexes: pg_total_relation_size after VACUUM ANALYZE);
3. writes the same day's rows again into the DEFAULT partition (a day no range partition covers)
   and times expiring each copy with the prune's own code: the partitions by DROP
   (`drop_expired`), the other copy row by row (`delete_expired_defaults`, what the prune did for
   every row before partitioning, and still does on SQLite), with the VACUUM that gives the
   deleted rows' space back, and the WAL each way writes.

It prints one JSON line last: bytes per raw row and per GPU-day, rollup bytes per GPU-day, what
a GPU keeps at the default retentions (raw for TELEMETRY_RAW_RETENTION_H plus one partition,
rollups for TELEMETRY_ROLLUP_RETENTION_D days), and the two expiries' seconds and WAL bytes. Only the measured steps
are timed. It refuses a database that holds machines unless --force; drop the database
afterwards.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from datetime import UTC, datetime, timedelta

from _django import django_setup, migrations_ready, refuse

GPUS_PER_MACHINE = 8
DAY = timedelta(days=1)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1000)
    parser.add_argument("--database-url", help="the database to use (default: DATABASE_URL)")
    parser.add_argument("--migrate", action="store_true", help="apply unapplied migrations first")
    parser.add_argument("--force", action="store_true", help="fill even if the database holds machines")
    args = parser.parse_args()
    if args.gpus < GPUS_PER_MACHINE:
        parser.error("--gpus must be at least 8")
    return args


def _fleet(gpus: int, now: datetime) -> list[int]:
    from django.contrib.auth import get_user_model
    from django.db import transaction

    from providers.models import GPU, Machine, Provider

    tag = secrets.token_hex(3)
    with transaction.atomic():
        user = get_user_model().objects.create(username=f"bench-{tag}")
        provider = Provider.objects.create(user=user, display_name=user.username)
        machines = Machine.objects.bulk_create(
            Machine(
                provider=provider,
                hostname=f"bench-{tag}-{i}",
                credential_digest=secrets.token_hex(32),
                status=Machine.Status.ONLINE,
                last_heartbeat_at=now,
            )
            for i in range(gpus // GPUS_PER_MACHINE)
        )
        created = GPU.objects.bulk_create(
            GPU(machine=m, uuid=f"GPU-{tag}-{m.pk}-{i}", index=i, model="RTX 4090", vram_mb=24576)
            for m in machines
            for i in range(GPUS_PER_MACHINE)
        )
    return [g.pk for g in created]


def _write_day(gpu_ids: list[int], day: datetime, interval_s: int) -> int:
    """A day of samples, minute-major like the heartbeats' inserts, by the database itself."""
    from django.db import connection

    from providers.models import TelemetrySample

    table = TelemetrySample._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (gpu_id, at, utilization_pct, memory_used_mb, temperature_c, power_w, state) "  # noqa: S608
            "SELECT g, %s + make_interval(secs => s), (g * 7 + s / 60) %% 101, 1024 + (g * 13 + s) %% 20000, "
            "30 + (g + s / 300) %% 50, 20 + (g * 3 + s / 60) %% 400, "
            "(ARRAY['idle', 'leased', 'owner_busy', 'idle'])[1 + (g + s / 3600) %% 4] "
            "FROM generate_series(0, 86400 - %s, %s) s CROSS JOIN unnest(%s::bigint[]) g ORDER BY s, g",
            [day, interval_s, interval_s, gpu_ids],
        )
        return int(cursor.rowcount)


def _bytes(tables: list[str]) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        total = 0
        for table in tables:
            cursor.execute(f'VACUUM ANALYZE "{table}"')
            cursor.execute("SELECT pg_total_relation_size(%s)", [table])
            total += int(cursor.fetchone()[0])
        return total


def _wal() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        return int(cursor.fetchone()[0])


def main() -> None:
    args = _parse()
    django_setup(database_url=args.database_url)
    from django.conf import settings
    from django.db import connection
    from django.db.models import Max

    if connection.vendor != "postgresql":
        refuse("raw telemetry is partitioned on PostgreSQL only: give the benchmark a PostgreSQL database")
    migrations_ready(migrate=args.migrate)
    from providers import telemetry_partitions as tp
    from providers.models import Machine, TelemetryRollup
    from providers.telemetry import telemetry_rollup

    if not args.force and Machine.objects.exists():
        refuse("the database already holds machines: give the benchmark a database of its own, or pass --force")
    connection.ensure_connection()
    connection.connection.autocommit = True  # VACUUM, and the partitions' DDL committed as it goes

    cfg = settings.GPGPU
    interval_s = cfg["TELEMETRY_SAMPLE_INTERVAL_S"]
    now = datetime.now(UTC)
    gpu_ids = _fleet(args.gpus, now)
    # Days far enough ahead that no partition the migration made covers them.
    day = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=30)
    other_day = day + timedelta(days=30)

    made = tp.ensure(now=day)
    made += tp.ensure(now=day + timedelta(hours=23))
    started = time.perf_counter()
    rows = _write_day(gpu_ids, day, interval_s)
    write_s = time.perf_counter() - started
    with connection.cursor() as cursor:
        parts = [p for p in tp.partitions(cursor) if p.start is not None and day <= p.start < day + DAY]
    raw_bytes = _bytes([p.name for p in parts])

    rollups_before = _bytes([TelemetryRollup._meta.db_table])
    telemetry_rollup(now=day + DAY, since=day)
    rollup_rows = TelemetryRollup.objects.filter(hour__gte=day, hour__lt=day + DAY).count()
    rollup_bytes = _bytes([TelemetryRollup._meta.db_table]) - rollups_before

    copy_rows = _write_day(gpu_ids, other_day, interval_s)  # into DEFAULT: no partition covers it
    _bytes([tp.default_partition()])  # vacuumed and analysed, as the partitions were
    telemetry_rollup(now=other_day + DAY, since=other_day)

    # Both days past the raw retention (and a partition's width), both rolled up.
    expired_at = other_day + DAY + timedelta(hours=cfg["TELEMETRY_RAW_RETENTION_H"] + cfg["TELEMETRY_PARTITION_H"])
    raw_cutoff = expired_at - timedelta(hours=cfg["TELEMETRY_RAW_RETENTION_H"])
    rollup_cutoff = expired_at - timedelta(days=cfg["TELEMETRY_ROLLUP_RETENTION_D"])
    latest = TelemetryRollup.objects.aggregate(m=Max("hour"))["m"]
    wal = _wal()
    started = time.perf_counter()
    dropped = tp.drop_expired(
        raw_cutoff=raw_cutoff, rollup_cutoff=rollup_cutoff, rolled_up_until=latest + timedelta(hours=1)
    )
    drop_s = time.perf_counter() - started
    drop_wal = _wal() - wal
    wal = _wal()
    started = time.perf_counter()
    deleted = tp.delete_expired_defaults(raw_cutoff=raw_cutoff, rollup_cutoff=rollup_cutoff)
    delete_s = time.perf_counter() - started
    started = time.perf_counter()
    _bytes([tp.default_partition()])  # the dead rows' space back: the rest of a row delete's cost
    vacuum_s = time.perf_counter() - started
    delete_wal = _wal() - wal
    if deleted != copy_rows or not set(p.name for p in parts) <= set(dropped):
        refuse(f"expiry did not take the whole day: {deleted} of {copy_rows} rows, dropped {dropped}")

    g = args.gpus
    raw_per_gpu_day = raw_bytes / g
    width_h = cfg["TELEMETRY_PARTITION_H"]
    kept_raw = raw_per_gpu_day * (cfg["TELEMETRY_RAW_RETENTION_H"] + width_h) / 24
    kept_rollups = rollup_bytes / g * cfg["TELEMETRY_ROLLUP_RETENTION_D"]
    print(
        json.dumps(
            {
                "gpus": g,
                "sample_interval_s": interval_s,
                "partition_h": width_h,
                "day_partitions": len(parts),
                "raw_rows_per_gpu_day": rows / g,
                "raw_bytes_per_row": round(raw_bytes / rows, 1),
                "raw_bytes_per_gpu_day": round(raw_per_gpu_day),
                "rollup_rows_per_gpu_day": rollup_rows / g,
                "rollup_bytes_per_gpu_day": round(rollup_bytes / g),
                "raw_retention_h": cfg["TELEMETRY_RAW_RETENTION_H"],
                "rollup_retention_d": cfg["TELEMETRY_ROLLUP_RETENTION_D"],
                "kept_raw_bytes_per_gpu": round(kept_raw),
                "kept_rollup_bytes_per_gpu": round(kept_rollups),
                "write_day_s": round(write_s, 2),
                "expire_day_by_drop_s": round(drop_s, 3),
                "expire_day_by_drop_wal_bytes": drop_wal,
                "expire_day_by_row_delete_s": round(delete_s, 2),
                "vacuum_after_row_delete_s": round(vacuum_s, 2),
                "expire_day_by_row_delete_wal_bytes": delete_wal,
                "partitions_made": len(made),
            }
        )
    )


if __name__ == "__main__":
    main()
