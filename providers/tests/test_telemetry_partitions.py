"""Raw telemetry partitioned by time on PostgreSQL (providers.telemetry_partitions): where rows
land, partitions made ahead, expiry by dropping a partition, and the conversion of an existing
deployment's plain table while heartbeats keep writing."""

from __future__ import annotations

import itertools
import re
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.test import override_settings
from django.utils import timezone

from providers import telemetry_partitions as tp
from providers.models import GPU, TelemetryRollup, TelemetrySample
from providers.telemetry import telemetry_prune, telemetry_rollup
from tests.factories import GPUFactory

pytestmark = [
    pytest.mark.skipif(connection.vendor != "postgresql", reason="partitions are PostgreSQL's"),
    pytest.mark.django_db,
]

# A day years ahead, beyond the partitions the migration made (its samples start in DEFAULT).
T = datetime(datetime.now(UTC).year + 4, 3, 2, 0, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def settings_with(**overrides: int):  # type: ignore[no-untyped-def]
    return override_settings(GPGPU={**settings.GPGPU, **overrides})


def where(sample_ids: list[int]) -> dict[int, str]:
    """The partition each sample row is stored in."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, tableoid::regclass::text FROM providers_telemetrysample WHERE id = ANY(%s)", [sample_ids]
        )
        return dict(cursor.fetchall())


def sample(gpu: GPU, at: datetime, util: float = 10.0) -> TelemetrySample:
    return TelemetrySample.objects.create(gpu=gpu, at=at, utilization_pct=util, state=GPU.State.IDLE)


def listed() -> list[tp.Partition]:
    with connection.cursor() as cursor:
        return tp.partitions(cursor)


def ranges(names: list[str] | None = None) -> list[tuple[datetime | None, datetime]]:
    """The (start, end) of the table's partitions, or of those named, by start."""
    return [(p.start, p.end) for p in listed() if names is None or p.name in names]


def test_a_sample_lands_in_the_partition_of_its_time_and_one_far_off_in_the_default() -> None:
    tp.ensure(now=timezone.now())  # as beat's prune keeps them (an earlier test may have pruned far ahead)
    gpu = GPUFactory()
    now, far = sample(gpu, timezone.now()), sample(gpu, T)

    stored = where([now.pk, far.pk])

    with connection.cursor() as cursor:
        assert tp.is_partitioned(cursor)
        (holding,) = [p for p in tp.partitions(cursor) if (p.start is None or p.start <= now.at) and now.at < p.end]
    assert stored == {now.pk: holding.name, far.pk: tp.default_partition()}
    # The ORM reads across partitions as from one table, and ids stay unique (one sequence).
    assert set(TelemetrySample.objects.filter(gpu=gpu).values_list("pk", flat=True)) == {now.pk, far.pk}


def test_partitions_are_made_a_day_ahead_on_the_slots_of_the_day_and_only_once() -> None:
    with settings_with(TELEMETRY_PARTITION_H=6):
        created = tp.ensure(now=T + timedelta(hours=3, minutes=30))
        again = tp.ensure(now=T + timedelta(hours=3, minutes=30))

    made = ranges(created)
    # From the slot holding now to past now + 24 h, back to back, each 6 h on the UTC day's slots.
    assert made == [(T + timedelta(hours=h), T + timedelta(hours=h + 6)) for h in range(0, 30, 6)]
    assert again == []


def test_a_new_width_fills_the_gaps_without_overlapping_the_partitions_already_made() -> None:
    with settings_with(TELEMETRY_PARTITION_H=6):
        tp.ensure(now=T)
    with settings_with(TELEMETRY_PARTITION_H=4):
        created = tp.ensure(now=T + timedelta(hours=20))

    made = ranges(created)
    assert made[0] == (T + timedelta(hours=24), T + timedelta(hours=28))
    assert made[-1][1] >= T + timedelta(hours=44)
    future = [r for r in ranges() if r[0] is not None and r[0] >= T]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(future))  # contiguous, no overlap


def test_rows_the_default_partition_held_move_into_the_partition_made_for_them() -> None:
    gpu = GPUFactory()
    early = [sample(gpu, T + timedelta(minutes=m), util=float(m)) for m in (5, 65, 125)]
    assert set(where([s.pk for s in early]).values()) == {tp.default_partition()}

    with settings_with(TELEMETRY_PARTITION_H=6):
        tp.ensure(now=T)

    assert set(where([s.pk for s in early]).values()) == {tp.partition_name(T, T + timedelta(hours=6))}
    moved = TelemetrySample.objects.filter(pk__in=[s.pk for s in early]).order_by("at")
    assert [(s.at, s.utilization_pct) for s in moved] == [(s.at, s.utilization_pct) for s in early]


@pytest.mark.usefixtures("telemetry_partitions_restored")
@pytest.mark.django_db(transaction=True)  # a partition is dropped in a later transaction than its writes
def test_a_partition_goes_once_its_whole_range_is_past_retention_and_rolled_up() -> None:
    gpu = GPUFactory()
    with settings_with(TELEMETRY_PARTITION_H=6, TELEMETRY_RAW_RETENTION_H=12):
        tp.ensure(now=T)
        for h in range(6):  # [T, T+6h)
            sample(gpu, T + timedelta(hours=h, minutes=10))
        second = [sample(gpu, T + timedelta(hours=h, minutes=10)) for h in range(6, 12)]  # [T+6h, T+12h)
        telemetry_rollup(now=T + timedelta(hours=6))  # the first partition's hours only

        # A day after T: both partitions' ranges are past the 12 h retention, the second not rolled up.
        telemetry_prune(now=T + timedelta(hours=24))
        kept_after_first = set(TelemetrySample.objects.filter(gpu=gpu).values_list("pk", flat=True))
        names_after_first = {name for name in where(list(kept_after_first)).values()}

        telemetry_rollup(now=T + timedelta(hours=24))
        telemetry_prune(now=T + timedelta(hours=24))
        kept_after_second = TelemetrySample.objects.filter(gpu=gpu).count()

    assert kept_after_first == {s.pk for s in second}
    assert names_after_first == {tp.partition_name(T + timedelta(hours=6), T + timedelta(hours=12))}
    assert kept_after_second == 0
    assert tp.partition_name(T, T + timedelta(hours=6)) not in {p.name for p in listed()}
    # The summaries outlive the raw rows: one per hour of the twelve.
    assert TelemetryRollup.objects.filter(gpu=gpu).count() == 12


@pytest.mark.usefixtures("telemetry_partitions_restored")
@pytest.mark.django_db(transaction=True)
def test_a_partition_inside_the_retention_is_kept_whole_even_when_rolled_up() -> None:
    gpu = GPUFactory()
    with settings_with(TELEMETRY_PARTITION_H=6, TELEMETRY_RAW_RETENTION_H=12):
        tp.ensure(now=T)
        rows = [sample(gpu, T + timedelta(hours=h, minutes=10)) for h in range(6)]
        telemetry_rollup(now=T + timedelta(hours=17))
        # 17 h after T the retention's cutoff (T+5h) is inside the partition [T, T+6h).
        telemetry_prune(now=T + timedelta(hours=17))

    # Every sample is kept, even those past the retention: at most one partition width longer.
    assert TelemetrySample.objects.filter(gpu=gpu).count() == len(rows)


@pytest.mark.usefixtures("telemetry_partitions_restored")
@pytest.mark.django_db(transaction=True)
def test_a_long_read_defers_the_drop_and_the_heartbeats_inserts_wait_only_a_short_lock_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DROP needs the table's exclusive lock (and ATTACH the DEFAULT partition's); behind a long
    read either would queue every heartbeat's insert (or every read) for as long as the read
    lasts. Each waits LOCK_TIMEOUT at a time instead, gives up after LOCK_ATTEMPTS, and is done on
    a later run."""
    monkeypatch.setattr(tp, "LOCK_ATTEMPTS", 3)
    monkeypatch.setattr(tp, "LOCK_RETRY_S", 0.3)
    gpu = GPUFactory()
    with settings_with(TELEMETRY_PARTITION_H=6, TELEMETRY_RAW_RETENTION_H=12):
        tp.ensure(now=T)
        sample(gpu, T + timedelta(minutes=10))
        telemetry_rollup(now=T + timedelta(hours=6))
    expired = {"raw_cutoff": T + timedelta(hours=12), "rollup_cutoff": T - HOUR, "rolled_up_until": T + 6 * HOUR}
    name = tp.partition_name(T, T + timedelta(hours=6))
    db = connection.settings_dict
    params = {"host": db["HOST"], "port": db["PORT"] or 5432, "user": db["USER"], "dbname": db["NAME"]}
    waits: list[float] = []
    stop = threading.Event()

    def heartbeats() -> None:
        with psycopg.connect(**params, autocommit=True) as conn:
            while not stop.is_set():
                started = time.perf_counter()
                conn.execute(
                    "INSERT INTO providers_telemetrysample (at, state, gpu_id) VALUES (now(), 'idle', %s)", [gpu.pk]
                )
                waits.append(time.perf_counter() - started)
                time.sleep(0.01)

    with psycopg.connect(**params) as reader:  # a long read of telemetry (a chart of the year), open
        reader.execute("SELECT count(*) FROM providers_telemetrysample").fetchone()
        writer = threading.Thread(target=heartbeats)
        writer.start()
        try:
            deferred = tp.drop_expired(**expired)
            with settings_with(TELEMETRY_PARTITION_H=6):
                not_made = tp.ensure(now=T + timedelta(days=3))  # ATTACH waits for the same read
        finally:
            stop.set()
            writer.join()
        reader.rollback()
    dropped_later = tp.drop_expired(**expired)

    assert deferred == [] and not_made == []
    assert name in dropped_later
    with settings_with(TELEMETRY_PARTITION_H=6):
        assert tp.ensure(now=T + timedelta(days=3))  # made once the read is over
    # Each wait of the DROP lasts LOCK_TIMEOUT (0.2 s); an insert never waits much longer (slack for a
    # loaded machine), against the read's whole length (here 1.5 s) were the DROP to wait it out.
    assert waits and max(waits) < 1.0


@pytest.mark.usefixtures("telemetry_partitions_restored")
@pytest.mark.django_db(transaction=True)
def test_an_existing_plain_table_is_partitioned_as_it_is_written_to_without_a_scan_under_its_lock() -> None:
    """The table as Django's first migration made it, with rows, and a heartbeat inserting
    samples all through the conversion: every row is kept with its id, the old rows become one
    partition without being scanned or re-indexed under the exclusive lock, and the table takes
    new rows in its new partitions with ids that continue the old ones."""
    gpu = GPUFactory()
    table = "conv_samples"
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE conv_samples (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
            "at timestamptz NOT NULL, "
            "utilization_pct double precision NULL, memory_used_mb integer NULL CHECK (memory_used_mb >= 0), "
            "temperature_c double precision NULL, power_w double precision NULL, state varchar(16) NOT NULL, "
            "gpu_id bigint NOT NULL REFERENCES providers_gpu (id) DEFERRABLE INITIALLY DEFERRED)"
        )
        cursor.execute("CREATE INDEX conv_samples_gpu ON conv_samples (gpu_id)")
        cursor.execute("CREATE INDEX conv_samples_gpu_at ON conv_samples (gpu_id, at)")
        cursor.execute("CREATE INDEX conv_samples_at ON conv_samples (at)")
        cursor.execute(
            "INSERT INTO conv_samples (at, utilization_pct, state, gpu_id) "
            "SELECT now() - make_interval(mins => i), i %% 100, 'idle', %s FROM generate_series(1, 20000) i",
            [gpu.pk],
        )
    stop, inserted, errors = threading.Event(), [], []

    def heartbeats() -> None:
        db = settings.DATABASES["default"]
        with psycopg.connect(
            host=db["HOST"],
            port=db["PORT"] or 5432,
            user=db["USER"],
            dbname=connection.settings_dict["NAME"],
            autocommit=True,
        ) as conn:
            while not stop.is_set():
                try:
                    row = conn.execute(
                        "INSERT INTO conv_samples (at, state, gpu_id) VALUES (now(), 'idle', %s) RETURNING id",
                        [gpu.pk],
                    ).fetchone()
                    inserted.append(row[0])
                except psycopg.Error as exc:  # a heartbeat that failed
                    errors.append(exc)

    notices: list[str] = []
    raw = connection.connection
    raw.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    writer = threading.Thread(target=heartbeats)
    writer.start()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET client_min_messages = debug1")
        now = timezone.now()
        assert tp.convert(now=now, table=table) is True
        stop.set()
        writer.join()
        with connection.cursor() as cursor:
            cursor.execute("RESET client_min_messages")
            assert tp.is_partitioned(cursor, table)
            cursor.execute("SELECT count(*), max(id), count(DISTINCT id) FROM conv_samples")
            count, top, distinct = cursor.fetchone()
            new = "INSERT INTO conv_samples (at, state, gpu_id) VALUES (now(), 'idle', %s) RETURNING id"
            cursor.execute(new, [gpu.pk])
            (next_id,) = cursor.fetchone()
            parts = [p.name for p in tp.partitions(cursor, table)]
        old = tp.partition_name(None, tp._bound_after(now, tp.width()), table)

        assert errors == []
        assert len(inserted) > 0
        assert count == distinct == 20000 + len(inserted)
        assert next_id == top + 1
        assert parts[0] == old and len(parts) > 1
        # PostgreSQL's own account: the old rows' range came from the validated CHECK, and no index
        # of the old table was built again.
        assert f'partition constraint for table "{old}" is implied by existing constraints' in notices
        assert not [n for n in notices if re.match(rf'building index ".*" on table "{old}"', n)]
        # The foreign key still holds on the new partitions.
        with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("INSERT INTO conv_samples (at, state, gpu_id) VALUES (now(), 'idle', -1)")
        # Converting again only makes partitions.
        assert tp.convert(now=now, table=table) is False
    finally:
        stop.set()
        writer.join()
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS conv_samples CASCADE")
