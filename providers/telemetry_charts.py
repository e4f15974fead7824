"""Per-GPU telemetry as charts for the console's machine and lease pages (read only).

Raw samples (providers.TelemetrySample, one a minute per GPU, kept TELEMETRY_RAW_RETENTION_H
hours) are averaged into at most MAX_POINTS buckets per GPU; where a range has no raw sample
left (older than the raw retention), the hourly rollups (providers.TelemetryRollup) are drawn
instead, and the chart says which.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from django.utils.safestring import SafeString

from core.charts import Series, line_chart
from providers.models import GPU, TelemetryRollup, TelemetrySample

MAX_POINTS = 120
MIN_BUCKET = timedelta(minutes=1)
# (raw sample field, rollup field, heading, unit)
METRICS = (
    ("utilization_pct", "utilization_avg", "Utilisation", "%"),
    ("memory_used_mb", "memory_used_max_mb", "Memory used", "MB"),
    ("temperature_c", "temperature_max_c", "Temperature", "°C"),
    ("power_w", "power_avg_w", "Power", "W"),
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _label(gpu: GPU) -> str:
    return f"GPU {gpu.index} ({gpu.model})"


def gpu_telemetry_charts(
    *, gpus: Sequence[GPU], since: datetime, until: datetime, metrics: Sequence[str] = ()
) -> list[tuple[str, SafeString]]:
    """One (heading, svg) per metric (all four, or those raw fields named in `metrics`), one
    series per GPU, over [since, until)."""
    wanted = [m for m in METRICS if not metrics or m[0] in metrics]
    by_id = {gpu.pk: gpu for gpu in gpus}
    bucket = max((until - since) / MAX_POINTS, MIN_BUCKET)
    raw = TelemetrySample.objects.filter(gpu_id__in=by_id, at__gte=since, at__lt=until).order_by()
    sums: dict[tuple[str, int, datetime], list[float]] = defaultdict(list)
    for row in raw.values_list("gpu_id", "at", *(m[0] for m in wanted)).iterator():
        at = EPOCH + bucket * ((row[1] - EPOCH) // bucket) + bucket / 2
        for (field, *_), value in zip(wanted, row[2:], strict=True):
            if value is not None:
                sums[(field, row[0], at)].append(float(value))
    source = f"telemetry samples, mean per {int(bucket.total_seconds())} s"
    if not sums:
        rollups = TelemetryRollup.objects.filter(gpu_id__in=by_id, hour__gte=since - timedelta(hours=1), hour__lt=until)
        for row in rollups.values_list("gpu_id", "hour", *(m[1] for m in wanted)).order_by():
            for (field, *_), value in zip(wanted, row[2:], strict=True):
                if value is not None:
                    sums[(field, row[0], row[1] + timedelta(minutes=30))].append(float(value))
        source = "hourly telemetry rollups (raw samples no longer kept)"
    charts = []
    for field, _, heading, unit in wanted:
        points: dict[int, list[tuple[datetime, float | None]]] = defaultdict(list)
        for (f, gpu_id, at), values in sorted(sums.items(), key=lambda item: item[0][2]):
            if f == field:
                points[gpu_id].append((at, sum(values) / len(values)))
        series = [Series(_label(gpu), points.get(gpu.pk, [])) for gpu in gpus]
        charts.append((f"{heading} ({source})", line_chart(title=heading, series=series, unit=unit)))
    return charts
