"""What GPUs did over a span of time, read for the people who pay and earn: a renter's chart of
its lease's GPUs (downsampled into at most N buckets) and a provider's idle hours per day.

Reads only; providers.telemetry writes the rows. Raw samples (one per GPU per
TELEMETRY_SAMPLE_INTERVAL_S) are read where they are complete, from `raw_complete_from` on;
before it telemetry_prune may have deleted them, and the hourly rollups are read instead. Every
grouping is done by the database (a GROUP BY over a bucket or day expression); Python only
merges the two parts and shapes the answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db.models import Count, DateTimeField, Exists, ExpressionWrapper, F, FloatField, Max, OuterRef, Q, Sum
from django.db.models.functions import TruncDate, TruncHour

from core.buckets import EpochBucket
from providers.models import GPU, TelemetryRollup, TelemetrySample

HOUR = timedelta(hours=1)
HOUR_S = 3600
_N = TypeVar("_N", int, float)


def _hour_floor(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def raw_readable(*, split: datetime) -> Q:
    """The raw samples to read, given `split` (raw_complete_from, or later): every one from
    `split` on, and before it those whose hour has no rollup yet (the rollup task has not reached
    them; telemetry_prune keeps them). The others are read through their hour's rollup, so no
    sample is counted twice. For a TelemetrySample queryset."""
    sample_hour = TruncHour(ExpressionWrapper(OuterRef("at"), output_field=DateTimeField()), tzinfo=UTC)
    rolled_up = TelemetryRollup.objects.filter(gpu_id=OuterRef("gpu_id"), hour=sample_hour)
    return Q(at__gte=split) | Q(~Exists(rolled_up))


def raw_complete_from(*, now: datetime) -> datetime:
    """The first hour whose raw samples telemetry_prune cannot have touched: from here on the raw
    rows are all there; before it, read the hourly rollups (as providers.telemetry.telemetry_rollup
    reasons)."""
    cutoff = now - timedelta(hours=settings.GPGPU["TELEMETRY_RAW_RETENTION_H"])
    floor = _hour_floor(cutoff)
    return floor if floor == cutoff else floor + HOUR


@dataclass(slots=True)
class TelemetryBucket:
    """One GPU's telemetry over one bucket. `utilization_avg` is the mean of the samples that
    reported utilisation (an hourly rollup weighs as many samples as it summarised);
    `resolution_s` is how finely the data behind it was kept: the bucket's width for raw samples,
    at least an hour where rollups were read."""

    gpu_id: int
    index: int
    samples: int
    utilization_sum: float
    utilization_samples: int
    utilization_max: float | None
    memory_used_max_mb: int | None
    resolution_s: int

    @property
    def utilization_avg(self) -> float | None:
        return self.utilization_sum / self.utilization_samples if self.utilization_samples else None

    def absorb(self, other: TelemetryBucket) -> None:
        self.samples += other.samples
        self.utilization_sum += other.utilization_sum
        self.utilization_samples += other.utilization_samples
        self.utilization_max = _max(self.utilization_max, other.utilization_max)
        self.memory_used_max_mb = _max(self.memory_used_max_mb, other.memory_used_max_mb)
        self.resolution_s = max(self.resolution_s, other.resolution_s)


def _max(a: _N | None, b: _N | None) -> _N | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def bucket_size_s(*, since: datetime, until: datetime, points: int) -> int:
    """The width in whole seconds of buckets counted from `since` so that [since, until) needs at
    most `points` of them; never finer than one sample interval."""
    span_s = max(math.ceil((until - since).total_seconds()), 1)
    return max(math.ceil(span_s / points), settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"])


def gpus_telemetry_buckets(
    *, gpu_ids: Sequence[int], since: datetime, until: datetime, points: int, now: datetime
) -> tuple[int, list[TelemetryBucket]]:
    """The telemetry of the GPUs over [since, until), in buckets of equal width counted from
    `since` (bucket i starts at since + i × width): (width in seconds, buckets ordered by GPU
    and index). At most `points` buckets per GPU; a bucket with no samples is absent.

    Raw samples are read from raw_complete_from(now) on, cut exactly at `since` and `until`.
    Before that the hourly rollups of the hours overlapping the range are read (the first and
    last such hour may hold samples from just outside it), and the raw samples of any hour not
    rolled up yet (raw_readable). Two queries, each one GROUP BY (gpu, bucket) over the
    (gpu, at) and (gpu, hour) indexes."""
    if until <= since or not gpu_ids:
        return bucket_size_s(since=since, until=max(until, since), points=points), []
    size_s = bucket_size_s(since=since, until=until, points=points)
    split = max(since, min(raw_complete_from(now=now), until))
    buckets: dict[tuple[int, int], TelemetryBucket] = {}

    raw = (
        TelemetrySample.objects.filter(gpu_id__in=list(gpu_ids), at__gte=since, at__lt=until)
        .filter(raw_readable(split=split))
        .annotate(bucket=EpochBucket("at", origin=since, size_s=size_s))
        .values("gpu_id", "bucket")
        .annotate(
            n=Count("id"),
            util_sum=Sum("utilization_pct"),
            util_n=Count("utilization_pct"),
            util_max=Max("utilization_pct"),
            mem_max=Max("memory_used_mb"),
        )
        .order_by()
    )
    for row in raw:
        _add(buckets, row, resolution_s=size_s)

    if since < split:
        rolled = (
            TelemetryRollup.objects.filter(gpu_id__in=list(gpu_ids), hour__gte=_hour_floor(since), hour__lt=split)
            .annotate(bucket=EpochBucket("hour", origin=since, size_s=size_s))
            .values("gpu_id", "bucket")
            .annotate(
                n=Sum("samples"),
                util_sum=Sum(F("utilization_avg") * F("samples"), output_field=FloatField()),
                util_n=Sum("samples", filter=Q(utilization_avg__isnull=False)),
                util_max=Max("utilization_max"),
                mem_max=Max("memory_used_max_mb"),
            )
            .order_by()
        )
        for row in rolled:
            _add(buckets, row, resolution_s=max(size_s, HOUR_S))

    return size_s, [buckets[key] for key in sorted(buckets)]


# `row`: one of gpus_telemetry_buckets' aggregate rows (values of loosely typed aggregates).
def _add(buckets: dict[tuple[int, int], TelemetryBucket], row: Mapping[str, Any], *, resolution_s: int) -> None:
    # The hour that began before `since` has a negative index (or 0, rounded on SQLite): bucket 0.
    index = max(int(row["bucket"]), 0)
    bucket = TelemetryBucket(
        gpu_id=row["gpu_id"],
        index=index,
        samples=int(row["n"] or 0),
        utilization_sum=float(row["util_sum"] or 0.0),
        utilization_samples=int(row["util_n"] or 0),
        utilization_max=row["util_max"],
        memory_used_max_mb=row["mem_max"],
        resolution_s=resolution_s,
    )
    key = (bucket.gpu_id, index)
    if key in buckets:
        buckets[key].absorb(bucket)
    else:
        buckets[key] = bucket


def machine_idle_hours_by_day(*, machine_id: int, since: datetime, until: datetime, now: datetime) -> dict[date, float]:
    """Hours the machine's GPUs were idle (offered and not rented: state `idle` when sampled) on
    each UTC day of [since, until), summed over its GPUs: each sample in state idle counts one
    TELEMETRY_SAMPLE_INTERVAL_S (an hourly rollup, its idle share of the samples it summarised).
    Time the machine sent no telemetry counts as not idle. Days without any are absent. Two
    queries, one GROUP BY day each."""
    interval_h = settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"] / HOUR_S
    split = max(since, min(raw_complete_from(now=now), until))
    idle_samples: dict[date, float] = {}
    for day, n in (
        TelemetrySample.objects.filter(gpu__machine_id=machine_id, state=GPU.State.IDLE, at__gte=since, at__lt=until)
        .filter(raw_readable(split=split))
        .annotate(day=TruncDate("at", tzinfo=UTC))
        .values("day")
        .annotate(n=Count("id"))
        .values_list("day", "n")
        .order_by()
    ):
        idle_samples[day] = idle_samples.get(day, 0.0) + n
    if since < split:
        for day, n in (
            TelemetryRollup.objects.filter(gpu__machine_id=machine_id, hour__gte=_hour_floor(since), hour__lt=split)
            .annotate(day=TruncDate("hour", tzinfo=UTC))
            .values("day")
            .annotate(n=Sum(F("idle_ratio") * F("samples"), output_field=FloatField()))
            .values_list("day", "n")
            .order_by()
        ):
            idle_samples[day] = idle_samples.get(day, 0.0) + float(n or 0.0)
    return {day: n * interval_h for day, n in idle_samples.items()}
