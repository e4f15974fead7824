"""What a lease's GPUs did while it held them, for its renter: per-GPU utilisation and memory over
the lease, downsampled (providers.utilization), and the mean utilisation of a job's GPUs, so a
renter sees a job that leaves its GPUs idle.

Only telemetry sampled while the GPU was the lease's counts: its GPUs, from its start to its end
(now while it runs). Where raw samples have been pruned (older than TELEMETRY_RAW_RETENTION_H),
hourly rollups stand in, and the lease's first and last hour may then hold samples from just
outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db.models import Count, DateTimeField, ExpressionWrapper, F, FloatField, Sum, Value
from django.db.models.functions import Coalesce, TruncHour
from django.utils import timezone

from jobs.models import Lease
from providers.models import GPU, TelemetryRollup, TelemetrySample
from providers.utilization import bucket_size_s, gpus_telemetry_buckets, raw_complete_from, raw_readable

DEFAULT_POINTS = 120
MAX_POINTS = 1000


@dataclass(frozen=True, slots=True)
class TelemetryPoint:
    at: datetime
    resolution_s: int
    samples: int
    utilization_avg: float | None
    utilization_max: float | None
    memory_used_max_mb: int | None


@dataclass(frozen=True, slots=True)
class GpuTelemetry:
    gpu_id: int
    uuid: str
    index: int
    model: str
    utilization_mean: float | None
    points: list[TelemetryPoint] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LeaseTelemetry:
    lease_id: int
    since: datetime | None
    until: datetime | None
    running: bool
    bucket_s: int
    points_max: int
    gpus: list[GpuTelemetry]


def lease_telemetry(*, lease: Lease, points: int = DEFAULT_POINTS, now: datetime | None = None) -> LeaseTelemetry:
    """The telemetry of each of the lease's GPUs over [started_at, ended_at or now), in at most
    `points` buckets of equal width (1 ≤ points ≤ MAX_POINTS; the caller validates), oldest
    first. A lease that never started has no range and no points. Two queries for the samples,
    whatever the lease's length; the lease's GPUs are read from `lease.gpus` (prefetched by
    jobs.selectors.lease_get_for_renter)."""
    now = now or timezone.now()
    gpus = sorted(lease.gpus.all(), key=lambda gpu: gpu.index)
    since = lease.started_at
    until = lease.ended_at or now if since is not None else None
    running = lease.status != Lease.Status.ENDED
    if since is None or until is None:
        return LeaseTelemetry(
            lease_id=lease.pk,
            since=None,
            until=None,
            running=running,
            bucket_s=bucket_size_s(since=now, until=now, points=points),
            points_max=points,
            gpus=[_gpu(gpu, []) for gpu in gpus],
        )
    size_s, buckets = gpus_telemetry_buckets(
        gpu_ids=[gpu.pk for gpu in gpus], since=since, until=until, points=points, now=now
    )
    series: dict[int, list[TelemetryPoint]] = {gpu.pk: [] for gpu in gpus}
    sums: dict[int, tuple[float, int]] = {}
    for b in buckets:
        series[b.gpu_id].append(
            TelemetryPoint(
                at=since + timedelta(seconds=b.index * size_s),
                resolution_s=b.resolution_s,
                samples=b.samples,
                utilization_avg=b.utilization_avg,
                utilization_max=b.utilization_max,
                memory_used_max_mb=b.memory_used_max_mb,
            )
        )
        total, n = sums.get(b.gpu_id, (0.0, 0))
        sums[b.gpu_id] = (total + b.utilization_sum, n + b.utilization_samples)
    return LeaseTelemetry(
        lease_id=lease.pk,
        since=since,
        until=until,
        running=running,
        bucket_s=size_s,
        points_max=points,
        gpus=[_gpu(gpu, series[gpu.pk], sums.get(gpu.pk)) for gpu in gpus],
    )


def _gpu(gpu: GPU, points: list[TelemetryPoint], sums: tuple[float, int] | None = None) -> GpuTelemetry:
    total, n = sums or (0.0, 0)
    return GpuTelemetry(
        gpu_id=gpu.pk,
        uuid=gpu.uuid,
        index=gpu.index,
        model=gpu.model,
        utilization_mean=total / n if n else None,
        points=points,
    )


def job_gpu_utilization_mean(*, job_id: int, now: datetime | None = None) -> float | None:
    """The mean utilisation (percent) of the job's GPUs over all its leases: every sample of a
    lease's GPU taken while the lease held it weighs the same (an hourly rollup, as many samples
    as it summarised). None when there are none (no lease started, or no telemetry yet). One
    query, whatever the number of leases."""
    now = now or timezone.now()
    split = raw_complete_from(now=now)
    lease_end = Coalesce(F("gpu__lease_gpus__lease__ended_at"), Value(now, output_field=DateTimeField()))
    # One filter() call each: the conditions on the lease share one join (the same lease).
    raw = TelemetrySample.objects.filter(
        gpu__lease_gpus__lease__job_id=job_id,
        at__gte=F("gpu__lease_gpus__lease__started_at"),
        at__lt=lease_end,
    ).filter(raw_readable(split=split))
    rollups = TelemetryRollup.objects.filter(
        gpu__lease_gpus__lease__job_id=job_id,
        hour__gte=TruncHour("gpu__lease_gpus__lease__started_at", tzinfo=UTC),
        hour__lt=lease_end,
        utilization_avg__isnull=False,
    ).filter(hour__lt=split)
    # Both sums in one statement (UNION ALL of two one-row GROUP BYs over the job's id).
    raw_sums = (
        raw.values("gpu__lease_gpus__lease__job_id")
        .annotate(
            total=Sum("utilization_pct", output_field=FloatField()),
            n=Count("utilization_pct"),
        )
        .values_list("total", "n")
        .order_by()
    )
    rolled_sums = (
        rollups.values("gpu__lease_gpus__lease__job_id")
        .annotate(
            total=Sum(ExpressionWrapper(F("utilization_avg") * F("samples"), output_field=FloatField())),
            n=Sum("samples"),
        )
        .values_list("total", "n")
        .order_by()
    )
    rows = list(raw_sums.union(rolled_sums, all=True))
    total = sum(float(row_total or 0.0) for row_total, _ in rows)
    n = sum(int(row_n or 0) for _, row_n in rows)
    return total / n if n else None
