"""GPU telemetry over time: hourly rollups of the raw samples, retention, and history reads.

Raw samples (providers.TelemetrySample) arrive with every heartbeat, at most one per GPU per
TELEMETRY_SAMPLE_INTERVAL_S, stamped with the server's clock. Each completed hour of them is
summarised into one TelemetryRollup row per GPU; raw rows are kept TELEMETRY_RAW_RETENTION_H
hours (and only once their hour is rolled up), rollups TELEMETRY_ROLLUP_RETENTION_D days. On
PostgreSQL the raw samples are partitioned by time and expire a partition at a time
(providers.telemetry_partitions).

Beat runs `telemetry_rollup` every few minutes and `telemetry_prune` hourly (providers.tasks).
Both are idempotent: running either twice, or concurrently with ingestion, changes nothing
that a single run would not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Avg, Count, DateTimeField, Exists, ExpressionWrapper, Max, Min, OuterRef, Q, QuerySet
from django.db.models.functions import TruncHour
from django.utils import timezone

from providers import telemetry_partitions
from providers.errors import ValidationFailed
from providers.models import GPU, TelemetryRollup, TelemetrySample
from providers.signals import rollups_written

HOUR = timedelta(hours=1)
# The longest range gpu_history answers: one point per hour, about 8,800 points at most.
HISTORY_MAX_SPAN = timedelta(days=366)
_UPSERT_BATCH = 1000

# The columns a rollup row carries besides its key (gpu, hour).
ROLLUP_FIELDS = (
    "samples",
    "utilization_avg",
    "utilization_max",
    "memory_used_max_mb",
    "temperature_max_c",
    "power_avg_w",
    "idle_ratio",
    "leased_ratio",
)


def hour_floor(at: datetime) -> datetime:
    """The start of the UTC hour containing `at` (an aware datetime)."""
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


# Rows of aggregates: the stubs type their values loosely.
def _hourly_aggregates(samples: QuerySet[TelemetrySample]) -> QuerySet[TelemetrySample, Mapping[str, Any]]:
    """One row per (gpu_id, hour) of `samples`, computed by the database: a GROUP BY over
    date_trunc('hour', at), never a loop over raw rows in Python."""
    return (
        samples.annotate(hour=TruncHour("at", tzinfo=UTC))
        .values("gpu_id", "hour")
        .annotate(
            n=Count("id"),
            util_avg=Avg("utilization_pct"),
            util_max=Max("utilization_pct"),
            mem_max=Max("memory_used_mb"),
            temp_max=Max("temperature_c"),
            power_avg=Avg("power_w"),
            n_idle=Count("id", filter=Q(state=GPU.State.IDLE)),
            n_leased=Count("id", filter=Q(state=GPU.State.LEASED)),
        )
        .order_by("gpu_id", "hour")
    )


# `row`: one of _hourly_aggregates' rows.
def _point(row: Mapping[str, Any]) -> dict[str, object]:
    """An aggregate row as rollup field values."""
    n = row["n"]
    return {
        "samples": n,
        "utilization_avg": row["util_avg"],
        "utilization_max": row["util_max"],
        "memory_used_max_mb": row["mem_max"],
        "temperature_max_c": row["temp_max"],
        "power_avg_w": row["power_avg"],
        "idle_ratio": row["n_idle"] / n if n else 0.0,
        "leased_ratio": row["n_leased"] / n if n else 0.0,
    }


def _batched(rows: Iterable[TelemetryRollup], size: int) -> Iterator[list[TelemetryRollup]]:
    batch: list[TelemetryRollup] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _rollup_start(*, before: datetime) -> datetime | None:
    """Where a routine rollup starts: the latest hour already rolled up (recomputed, since a
    heartbeat stamped just before the hour ended may have committed after that hour's first
    rollup), or the earliest raw sample when nothing is rolled up yet."""
    latest = TelemetryRollup.objects.filter(hour__lt=before).aggregate(m=Max("hour"))["m"]
    if latest is not None:
        return latest
    earliest = TelemetrySample.objects.filter(at__lt=before).aggregate(m=Min("at"))["m"]
    return hour_floor(earliest) if earliest is not None else None


def _write_rollups(*, start: datetime, end: datetime, overwrite: bool) -> int:
    """Roll up the samples in [start, end); existing rows are recomputed when `overwrite`,
    otherwise left alone. Returns how many (gpu, hour) summaries were computed."""
    rows = _hourly_aggregates(TelemetrySample.objects.filter(at__gte=start, at__lt=end))
    rollups = (TelemetryRollup(gpu_id=row["gpu_id"], hour=row["hour"], **_point(row)) for row in rows.iterator())
    # bulk_create's options, of several types.
    conflict: dict[str, Any] = (
        {"update_conflicts": True, "unique_fields": ["gpu", "hour"], "update_fields": list(ROLLUP_FIELDS)}
        if overwrite
        else {"ignore_conflicts": True}
    )
    computed = 0
    for batch in _batched(rollups, _UPSERT_BATCH):
        TelemetryRollup.objects.bulk_create(batch, **conflict)
        computed += len(batch)
    return computed


def telemetry_rollup(*, now: datetime | None = None, since: datetime | None = None) -> int:
    """Summarise raw samples into one TelemetryRollup per GPU per completed hour; returns the
    number of (gpu, hour) summaries computed.

    Only hours that ended before `now` are rolled up. By default the hours from the latest one
    already rolled up onwards are (re)computed; `since` takes every hour from the one
    containing it (a backfill). Rows are upserted on (gpu, hour), so re-running gives the same
    rows. An hour that began before the raw retention window may have lost raw samples to
    telemetry_prune, so its rollup is created if missing but never recomputed from what is left.
    """
    now = now or timezone.now()
    end = hour_floor(now)
    start = hour_floor(since) if since is not None else _rollup_start(before=end)
    if start is None or start >= end:
        return 0
    raw_cutoff = now - timedelta(hours=settings.GPGPU["TELEMETRY_RAW_RETENTION_H"])
    # The first hour no prune can have touched: prune's cutoff is never later than ours.
    complete_from = hour_floor(raw_cutoff) + (HOUR if raw_cutoff != hour_floor(raw_cutoff) else timedelta(0))
    written = 0
    with transaction.atomic():
        if start < complete_from:
            written += _write_rollups(start=start, end=min(complete_from, end), overwrite=False)
        if complete_from < end:
            written += _write_rollups(start=max(start, complete_from), end=end, overwrite=True)
        if written:
            rollups_written.send(sender=TelemetryRollup, start=start, end=end)
    return written


def telemetry_prune(*, now: datetime | None = None) -> int:
    """Delete raw samples older than TELEMETRY_RAW_RETENTION_H hours whose hour is rolled up,
    and rollups older than TELEMETRY_ROLLUP_RETENTION_D days; returns how many rows were deleted
    one by one.

    A raw sample whose hour has no rollup is kept (the next rollup will summarise it), unless
    it is older than the rollup retention too: its rollup would be deleted at once, so keeping
    it would only let the table grow.

    On PostgreSQL raw samples live in time-range partitions (providers.telemetry_partitions):
    this first makes sure partitions are ready for the next day, then drops the partitions whose
    whole range is expired (not counted in the return value: dropping a table does not count
    its rows), and deletes row by row only in the DEFAULT partition. A sample there is kept at
    least the raw retention and at most one partition width (TELEMETRY_PARTITION_H) longer.
    """
    now = now or timezone.now()
    raw_cutoff = now - timedelta(hours=settings.GPGPU["TELEMETRY_RAW_RETENTION_H"])
    rollup_cutoff = hour_floor(now - timedelta(days=settings.GPGPU["TELEMETRY_ROLLUP_RETENTION_D"]))
    if telemetry_partitions.supported():
        telemetry_partitions.ensure(now=now)
        latest = TelemetryRollup.objects.aggregate(m=Max("hour"))["m"]
        telemetry_partitions.drop_expired(
            raw_cutoff=raw_cutoff,
            rollup_cutoff=rollup_cutoff,
            rolled_up_until=latest + HOUR if latest is not None else None,
        )
        with transaction.atomic():
            samples_deleted = telemetry_partitions.delete_expired_defaults(
                raw_cutoff=raw_cutoff, rollup_cutoff=rollup_cutoff
            )
            rollups_deleted, _ = TelemetryRollup.objects.filter(hour__lt=rollup_cutoff).delete()
        return samples_deleted + rollups_deleted
    sample_hour = TruncHour(ExpressionWrapper(OuterRef("at"), output_field=DateTimeField()), tzinfo=UTC)
    rolled_up = TelemetryRollup.objects.filter(gpu_id=OuterRef("gpu_id"), hour=sample_hour)
    with transaction.atomic():
        samples_deleted, _ = TelemetrySample.objects.filter(
            Q(Exists(rolled_up)) | Q(at__lt=rollup_cutoff), at__lt=raw_cutoff
        ).delete()
        rollups_deleted, _ = TelemetryRollup.objects.filter(hour__lt=rollup_cutoff).delete()
    return samples_deleted + rollups_deleted


# Each point's values are of its key's type (the docstring lists them).
def gpu_history(*, gpu: GPU, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Hourly telemetry of one GPU for the hours overlapping [since, until), oldest first.

    Each point: {"hour", "samples", "utilization_avg", "utilization_max", "memory_used_max_mb",
    "temperature_max_c", "power_avg_w", "idle_ratio", "leased_ratio", "partial"}. Rolled-up
    hours come from TelemetryRollup; hours after the GPU's latest rollup (the current hour,
    and any the rollup task has not reached yet) are computed from raw samples and marked
    "partial": True. Hours with no samples have no point. Raises ValidationFailed when
    `until` is not after `since` or the range is longer than HISTORY_MAX_SPAN.
    """
    if since.tzinfo is None or until.tzinfo is None:
        raise ValidationFailed("since and until must carry a time zone.")
    if until <= since:
        raise ValidationFailed("until must be after since.")
    if until - since > HISTORY_MAX_SPAN:
        raise ValidationFailed(f"The range may span at most {HISTORY_MAX_SPAN.days} days.")
    start = hour_floor(since)
    points = [
        {"hour": r["hour"], **{f: r[f] for f in ROLLUP_FIELDS}, "partial": False}
        for r in TelemetryRollup.objects.filter(gpu=gpu, hour__gte=start, hour__lt=until)
        .order_by("hour")
        .values("hour", *ROLLUP_FIELDS)
    ]
    latest = TelemetryRollup.objects.filter(gpu=gpu).aggregate(m=Max("hour"))["m"]
    raw_start = max(start, latest + HOUR) if latest is not None else start
    if raw_start < until:
        raw = TelemetrySample.objects.filter(gpu=gpu, at__gte=raw_start, at__lt=until)
        points.extend({"hour": row["hour"], **_point(row), "partial": True} for row in _hourly_aggregates(raw))
    return points
