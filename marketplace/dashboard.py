"""The fleet dashboard: the operator console's home page (/admin/), staff only.

Every figure is read from what the marketplace stores; nothing is simulated or extrapolated:

- GPUs by state over time: the hourly telemetry rollups (providers.TelemetryRollup). A rollup
  row is one GPU's hour; its idle_ratio and leased_ratio are the shares of that hour's samples
  in each state, so an hour's idle GPUs are the sum of idle_ratio, leased the sum of
  leased_ratio, owner busy the rest of the GPUs that reported (samples neither idle nor leased,
  which includes the rare sample an agent reports as offline), and offline the GPUs registered
  now that sent no sample that hour. No per-GPU state history is stored beyond this, so the
  hourly resolution is the finest there is; the last point is the GPUs' state now (GPU.state).
- Idle GPU-hours offered and rented: the same rollups (each row is one GPU-hour). Offered is idle
  plus leased time (a leased GPU's time was offered and taken), rented the leased time. Lost to
  preemption: the GPU-hours of the leases that ended in the range by a preemption, from start
  (or the range's start) to end (their work since the last checkpoint is lost; counting all of it is an upper bound);
  useful is rented less that.
- Placements, preemptions and owner reclaims: jobs.Lease (created_at; ended_at with end_reason).
- Pending jobs over time: jobs.Event's status moves into and out of "pending", walked back from
  the number pending now. Waits: for each placement, lease.created_at − job.created_at.
- Revenue and fees: billing's ledger postings (charges into lease_unsettled; settlement
  confirmations into platform_fees). Settlement lag: each confirmed batch, created → confirmed.
  Chain health: the deposit watcher's cursor, the newest ledger check and the open batches.

Over a day or a week, the figures that are sums over time are read from the fleet's hourly
summary (marketplace.fleet_summary: FleetHour and FleetHourSlice, written by the summary task a
few minutes after each hour ends and whenever a source changes an hour already summarised): a week
is 168 rows plus their breakdowns by model and region, where the sources are about 1.7 million
rollup rows and 650,000 ledger entries at 10,000 GPUs. The current hour, and any hour the summary
lacks or has marked stale, is computed from the sources on each request, with the same code that
computes the summary, so each figure means the same whichever it came from. The hour range
(five-minute buckets) is computed from the sources. Read on each request as well: the GPUs' state
now, jobs pending now, the GPU-hours lost to preemption (a lease's hours are counted from the
range's start) and the chain's health. benchmarks/dashboard.py times the page.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.db import connection
from django.db.models import (
    Count,
    DateTimeField,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    QuerySet,
    Sum,
    Value,
)
from django.db.models.functions import Extract, Greatest
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.safestring import SafeString

from billing.models import ChainCursor, Settlement
from billing.selectors import ledger_check_latest
from core.charts import Series, line_chart
from jobs.models import Job, Lease
from marketplace import health
from marketplace.fleet_summary import (
    HOUR,
    PREEMPTIONS,
    bucket_figures,
    buckets_of,
    figures_by_hour,
    floor_to,
    percentile,
)
from providers.models import GPU

# name: (span, bucket)
RANGES: dict[str, tuple[timedelta, timedelta]] = {
    "hour": (HOUR, timedelta(minutes=5)),
    "day": (timedelta(days=1), HOUR),
    "week": (timedelta(days=7), HOUR),
}
DEFAULT_RANGE = "day"


@dataclass
class Chart:
    heading: str
    svg: SafeString
    source: str


@dataclass
class Dashboard:
    range: str
    since: datetime
    until: datetime
    bucket: timedelta
    time_zone: str
    figures: dict[str, Any] = field(default_factory=dict)
    charts: list[Chart] = field(default_factory=list)
    by_model: list[dict[str, Any]] = field(default_factory=list)
    by_region: list[dict[str, Any]] = field(default_factory=list)
    chain: dict[str, Any] = field(default_factory=dict)


def _figures_by_bucket(d: Dashboard) -> dict[datetime, dict[str, Any]]:
    """The summable figures over the range, per bucket: over a day or a week from the hourly
    summary, with the current hour and any hour not summarised yet from the sources; over the
    hour range (five-minute buckets) from the sources."""
    start = floor_to(d.since, d.bucket)
    if d.bucket != HOUR:
        return bucket_figures(start, d.until, d.bucket)
    return figures_by_hour(start, d.until)


def _series(name: str, buckets: list[datetime], values: Mapping[datetime, float | None]) -> Series:
    return Series(name, [(at, values.get(at, 0)) for at in buckets])


Figures = Mapping[datetime, Mapping[str, Any]]


def _total(figures: Figures, name: str) -> Any:
    return sum(f.get(name, 0) for f in figures.values())


def _merged(figures: Figures, name: str) -> dict[str, Any]:
    out: dict[str, Any] = defaultdict(int)
    for f in figures.values():
        for key, n in f.get(name, {}).items():
            out[key] += n
    return out


def _gpu_states(d: Dashboard, figures: Figures) -> Chart:
    total = GPU.objects.count()
    # An hour's rollups fall in the bucket of the hour's start whatever the bucket's length.
    by_hour = {hour: f for hour, f in figures.items() if f.get("reported")}
    points: dict[str, list[tuple[datetime, float | None]]] = defaultdict(list)
    for hour, row in sorted(by_hour.items()):
        # The hour is drawn at its middle: its rollup is the average over it.
        at = hour + HOUR / 2
        points["idle"].append((at, row["idle"]))
        points["owner busy"].append((at, max(row["reported"] - row["idle"] - row["leased"], 0.0)))
        points["leased"].append((at, row["leased"]))
        points["offline"].append((at, max(total - row["reported"], 0)))
    now_counts = dict(GPU.objects.values_list("state").annotate(n=Count("pk")).values_list("state", "n"))
    names = {GPU.State.IDLE: "idle", GPU.State.OWNER_BUSY: "owner busy", GPU.State.LEASED: "leased"}
    names[GPU.State.OFFLINE] = "offline"
    for state, name in names.items():
        points[name].append((d.until, now_counts.get(state, 0)))
    d.figures["gpus_now"] = {name: now_counts.get(state, 0) for state, name in names.items()}
    d.figures["gpus_total"] = total
    series = [Series(name, points[name]) for name in ("idle", "owner busy", "leased", "offline")]
    return Chart(
        "GPUs by state",
        line_chart(title="GPUs by state", series=series, unit="GPUs"),
        "Hourly telemetry rollups (TelemetryRollup: idle_ratio, leased_ratio; offline = GPUs registered "
        "now with no sample that hour); the last point is GPU.state now.",
    )


def _gpu_hours(d: Dashboard, figures: Figures) -> None:
    idle, leased = _total(figures, "idle"), _total(figures, "leased")
    lost = _lost_gpu_hours(Lease.objects.filter(ended_at__gte=d.since, ended_at__lt=d.until), since=d.since)
    offered = idle + leased
    d.figures.update(
        idle_offered_gpu_h=offered,
        rented_gpu_h=leased,
        useful_gpu_h=max(leased - lost, 0.0),
        lost_gpu_h=lost,
        share_rented=leased / offered if offered else None,
        share_lost=lost / leased if leased else None,
        rollup_hours_from=min((at for at, f in figures.items() if f.get("reported")), default=floor_to(d.since, HOUR)),
    )


def _lost_gpu_hours(ended: QuerySet[Lease], *, since: datetime) -> float:
    """GPU-hours of the leases in `ended` that a preemption ended, from their start (or `since`,
    when they started before the range) to their end. Summed by PostgreSQL (a week holds about
    ten thousand such leases); elsewhere here."""
    preempted = ended.filter(end_reason__in=PREEMPTIONS, started_at__isnull=False, ended_at__isnull=False)
    if connection.vendor == "postgresql":
        ran = ExpressionWrapper(
            F("ended_at") - Greatest("started_at", Value(since, output_field=DateTimeField())),
            output_field=DurationField(),
        )
        seconds = Greatest(Extract(ran, "epoch"), Value(0.0), output_field=FloatField())
        total = preempted.aggregate(s=Sum(F("gpu_count") * seconds, output_field=FloatField()))["s"]
        return (total or 0.0) / 3600
    rows = preempted.values_list("gpu_count", "started_at", "ended_at")
    return sum(
        count * max((end - max(start, since)).total_seconds(), 0.0) / 3600
        for count, start, end in rows.order_by()
        if start is not None and end is not None
    )


def _lease_events(d: Dashboard, buckets: list[datetime], figures: Figures) -> Chart:
    per_hour = HOUR / d.bucket
    d.figures["placements"] = _total(figures, "placements")
    d.figures["preemptions"] = _total(figures, "preemptions")
    d.figures["owner_reclaims"] = _total(figures, "reclaims")
    series = [
        _series(label, buckets, {at: f.get(key, 0) * per_hour for at, f in figures.items()})
        for key, label in (("placements", "placements"), ("preemptions", "preemptions"), ("reclaims", "owner reclaims"))
    ]
    return Chart(
        "Placements, preemptions and owner reclaims per hour",
        line_chart(title="Placements, preemptions and owner reclaims per hour", series=series, unit="/h"),
        "Leases created (placements) and ended (preemptions: owner reclaim, lost, machine suspended, "
        "credential revoked; owner reclaims: preempted_by_owner), per bucket scaled to an hour.",
    )


def _waits(d: Dashboard, buckets: list[datetime], figures: Figures) -> Chart:
    """Pending jobs at the end of each bucket, and the p50/p95 wait of the placements in it."""
    pending_now = Job.objects.filter(status=Job.Status.PENDING).count()
    # Walk back from now: at the end of a bucket, the jobs pending now, less those that came in
    # after it, plus those that left after it.
    pending: dict[datetime, float | None] = {}
    level = pending_now
    for at in reversed(buckets):
        pending[at] = level
        level -= figures.get(at, {}).get("in", 0) - figures.get(at, {}).get("out", 0)
    d.figures["pending_now"] = pending_now

    def minutes(at: datetime, name: str) -> float | None:
        seconds = figures.get(at, {}).get(name)
        return seconds / 60 if seconds is not None else None

    series = [
        _series("pending jobs", buckets, pending),
        Series("wait p50 (min)", [(at, minutes(at, "wait_p50")) for at in buckets]),
        Series("wait p95 (min)", [(at, minutes(at, "wait_p95")) for at in buckets]),
    ]
    return Chart(
        "Pending jobs and their wait",
        line_chart(title="Pending jobs and their wait", series=series),
        "Pending: jobs pending now, walked back through the job events' moves into and out of pending. "
        "Wait: lease.created_at − job.created_at of each placement in the bucket (a requeued job counts "
        "from its submission), in minutes.",
    )


def _money(micro: int | None) -> Decimal:
    return Decimal(micro or 0).scaleb(-settings.BILLING_TOKEN_DECIMALS)


def _revenue(d: Dashboard, buckets: list[datetime], figures: Figures) -> Chart:
    d.figures["revenue"] = _money(_total(figures, "revenue"))
    d.figures["fees"] = _money(_total(figures, "fees"))
    lags = {at: f["lags"] for at, f in figures.items() if f.get("lags")}
    all_lags = [lag for values in lags.values() for lag in values]
    d.figures["settlement_lag_p50_s"] = percentile(all_lags, 0.5) if all_lags else None
    d.figures["settlements_confirmed"] = len(all_lags)
    series = [
        _series("revenue", buckets, {at: float(_money(f.get("revenue", 0))) for at, f in figures.items()}),
        _series("fees", buckets, {at: float(_money(f.get("fees", 0))) for at, f in figures.items()}),
        Series(
            "settlement lag (min)", [(at, sum(lags[at]) / len(lags[at]) / 60 if at in lags else None) for at in buckets]
        ),
    ]
    return Chart(
        "Revenue, fees and settlement lag",
        line_chart(title="Revenue, fees and settlement lag", series=series),
        "Ledger postings: charges into lease_unsettled (revenue), settlement confirmations into "
        "platform_fees (fees), in tokens per bucket; settlement lag: mean created → confirmed of the "
        "batches confirmed in the bucket, in minutes.",
    )


def _breakdowns(d: Dashboard, figures: Figures) -> None:
    for key, target in (("model", d.by_model), ("region", d.by_region)):
        rows: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"gpu_h": 0.0, "idle": 0.0, "leased": 0.0, "placements": 0, "reclaims": 0, "revenue": None}
        )
        for f in figures.values():
            for name, (reported, idle, leased) in f.get(f"fleet_by_{key}", {}).items():
                sums = rows[name]
                sums["gpu_h"] += reported
                sums["idle"] += idle
                sums["leased"] += leased
        for name, n in _merged(figures, f"placements_by_{key}").items():
            rows[name]["placements"] = n
        for name, n in _merged(figures, f"reclaims_by_{key}").items():
            rows[name]["reclaims"] = n
        if key == "region":
            for name, micro in _merged(figures, "revenue_by_region").items():
                rows[name]["revenue"] = _money(micro)
        for name in sorted(rows):
            row = rows[name]
            offered = row["idle"] + row["leased"]
            target.append({key: name, **row, "share_rented": row["leased"] / offered if offered else None})


def _chain(d: Dashboard) -> None:
    cursor = ChainCursor.objects.filter(name="escrow").values("last_block", "updated_at").first()
    check = ledger_check_latest()
    backlog = health._settlement_backlog(d.until)
    failed = Settlement.objects.filter(status=Settlement.Status.FAILED, updated_at__gte=d.since).count()
    d.chain = {
        "watcher_block": cursor["last_block"] if cursor else None,
        "watcher_updated": cursor["updated_at"] if cursor else None,
        "ledger_check": check,
        "failed_settlements": failed,
        **backlog,
    }


def fleet_dashboard(*, range_name: str = DEFAULT_RANGE, now: datetime | None = None) -> Dashboard:
    """Every figure and chart of the dashboard over the range ending `now` (module docstring)."""
    span, step = RANGES[range_name]
    until = now or timezone.now()
    d = Dashboard(
        range=range_name,
        since=until - span,
        until=until,
        bucket=step,
        time_zone=timezone.get_current_timezone_name(),
    )
    buckets = buckets_of(d.since, d.until, step)
    figures = _figures_by_bucket(d)
    d.charts.append(_gpu_states(d, figures))
    _gpu_hours(d, figures)
    d.charts.append(_waits(d, buckets, figures))
    d.charts.append(_lease_events(d, buckets, figures))
    d.charts.append(_revenue(d, buckets, figures))
    _breakdowns(d, figures)
    _chain(d)
    return d


def console_index(request: HttpRequest) -> TemplateResponse:
    """The console's home: the fleet dashboard above the admin's list of models. Wrapped by
    admin.site.admin_view (staff only) in marketplace.urls."""
    range_name = request.GET.get("range", DEFAULT_RANGE)
    if range_name not in RANGES:
        range_name = DEFAULT_RANGE
    dashboard = fleet_dashboard(range_name=range_name)
    response = admin.site.index(request, extra_context={"dashboard": dashboard, "ranges": list(RANGES)})
    response.template_name = "marketplace/console_index.html"
    return response
