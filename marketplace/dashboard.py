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
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.db import connection
from django.db.models import (
    Aggregate,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    Q,
    QuerySet,
    Sum,
)
from django.db.models.functions import TruncHour
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.safestring import SafeString

from billing.models import ChainCursor, LedgerAccount, LedgerEntry, Posting, Settlement
from billing.selectors import ledger_check_latest
from core.charts import Series, line_chart
from jobs.models import Event, Job, Lease
from marketplace import health
from providers.models import GPU, TelemetryRollup

HOUR = timedelta(hours=1)
# name: (span, bucket)
RANGES: dict[str, tuple[timedelta, timedelta]] = {
    "hour": (HOUR, timedelta(minutes=5)),
    "day": (timedelta(days=1), HOUR),
    "week": (timedelta(days=7), HOUR),
}
DEFAULT_RANGE = "day"
ER = Lease.EndReason
# Leases ended by something other than the job or its renter: their work since the last
# checkpoint is lost. An owner reclaim is the commonest of them.
PREEMPTIONS = (ER.PREEMPTED_BY_OWNER, ER.LOST, ER.MACHINE_SUSPENDED, ER.CREDENTIAL_REVOKED)
AK = LedgerAccount.Kind
EK = LedgerEntry.Kind


class _Percentile(Aggregate):
    """PostgreSQL's percentile_cont over a duration, in seconds."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM %(expressions)s))"
    output_field = FloatField()


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


def _floor(at: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + step * math.floor((at - epoch) / step)


def _buckets(since: datetime, until: datetime, step: timedelta) -> list[datetime]:
    out, at = [], _floor(since, step)
    while at < until:
        out.append(at)
        at += step
    return out


def _count_by_bucket(
    queryset: QuerySet[Any], stamp: str, step: timedelta, groups: Mapping[str, Q]
) -> dict[str, dict[datetime, int]]:
    """For each group (a filter), how many rows of `queryset` fall in each bucket of `stamp`:
    the database groups by the hour; finer buckets (the hour range, a few hundred rows) are
    counted here."""
    out: dict[str, dict[datetime, int]] = {name: defaultdict(int) for name in groups}
    if step == HOUR:
        rows = (
            queryset.annotate(bucket=TruncHour(stamp, tzinfo=UTC))
            .values("bucket")
            .annotate(**{name: Count("pk", filter=q) for name, q in groups.items()})
            .order_by()
        )
        for row in rows:
            for name in groups:
                out[name][row["bucket"]] += row[name]
        return out
    for name, q in groups.items():
        for (at,) in queryset.filter(q).values_list(stamp).order_by():
            out[name][_floor(at, step)] += 1
    return out


def _series(name: str, buckets: list[datetime], values: Mapping[datetime, float | None]) -> Series:
    return Series(name, [(at, values.get(at, 0)) for at in buckets])


@dataclass(frozen=True)
class _FleetHour:
    """The rollups of one hour, one GPU model and one region, summed."""

    hour: datetime
    model: str
    region: str
    reported: int
    idle: float
    leased: float


def _fleet_hours(d: Dashboard) -> list[_FleetHour]:
    """The range's rollups summed by hour, model and region: one scan of the rollups (through
    their hour index), which every rollup figure of the page is computed from."""
    rows = (
        TelemetryRollup.objects.filter(hour__gte=_floor(d.since, HOUR), hour__lt=d.until)
        .values("hour", "gpu__model", "gpu__machine__region")
        .annotate(reported=Count("pk"), idle=Sum("idle_ratio"), leased=Sum("leased_ratio"))
        .order_by()
    )
    return [
        _FleetHour(
            r["hour"], r["gpu__model"], r["gpu__machine__region"], r["reported"], r["idle"] or 0.0, r["leased"] or 0.0
        )
        for r in rows
    ]


def _gpu_states(d: Dashboard, fleet: list[_FleetHour]) -> Chart:
    total = GPU.objects.count()
    by_hour: dict[datetime, dict[str, float]] = defaultdict(lambda: {"reported": 0, "idle": 0.0, "leased": 0.0})
    for f in fleet:
        sums = by_hour[f.hour]
        sums["reported"] += f.reported
        sums["idle"] += f.idle
        sums["leased"] += f.leased
    points: dict[str, list[tuple[datetime, float | None]]] = defaultdict(list)
    for hour, row in sorted(by_hour.items()):
        # The hour is drawn at its middle: its rollup is the average over it.
        at = hour + HOUR / 2
        idle, leased = row["idle"], row["leased"]
        points["idle"].append((at, idle))
        points["owner busy"].append((at, max(row["reported"] - idle - leased, 0.0)))
        points["leased"].append((at, leased))
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


def _gpu_hours(d: Dashboard, fleet: list[_FleetHour]) -> None:
    start = _floor(d.since, HOUR)
    idle, leased = sum(f.idle for f in fleet), sum(f.leased for f in fleet)
    lost = _lost_gpu_hours(Lease.objects.filter(ended_at__gte=d.since, ended_at__lt=d.until), since=d.since)
    offered = idle + leased
    useful = max(leased - lost, 0.0)
    d.figures.update(
        idle_offered_gpu_h=offered,
        rented_gpu_h=leased,
        useful_gpu_h=useful,
        lost_gpu_h=lost,
        share_rented=leased / offered if offered else None,
        share_lost=lost / leased if leased else None,
        rollup_hours_from=start,
    )


def _lost_gpu_hours(ended: QuerySet[Lease], *, since: datetime) -> float:
    """GPU-hours of the leases in `ended` that a preemption ended, from their start (or `since`,
    when they started before the range) to their end."""
    rows = ended.filter(end_reason__in=PREEMPTIONS, started_at__isnull=False).values_list(
        "gpu_count", "started_at", "ended_at"
    )
    return sum(
        count * max((end - max(start, since)).total_seconds(), 0.0) / 3600
        for count, start, end in rows.order_by()
        if start is not None and end is not None
    )


def _lease_events(d: Dashboard, buckets: list[datetime]) -> Chart:
    placed = _count_by_bucket(
        Lease.objects.filter(created_at__gte=d.since, created_at__lt=d.until),
        "created_at",
        d.bucket,
        {"placements": Q()},
    )
    ended = _count_by_bucket(
        Lease.objects.filter(ended_at__gte=d.since, ended_at__lt=d.until),
        "ended_at",
        d.bucket,
        {"preemptions": Q(end_reason__in=PREEMPTIONS), "reclaims": Q(end_reason=ER.PREEMPTED_BY_OWNER)},
    )
    counts = {**placed, **ended}
    per_hour = HOUR / d.bucket
    d.figures["placements"] = sum(placed["placements"].values())
    d.figures["preemptions"] = sum(ended["preemptions"].values())
    d.figures["owner_reclaims"] = sum(ended["reclaims"].values())
    series = [
        _series(label, buckets, {at: n * per_hour for at, n in counts[key].items()})
        for key, label in (("placements", "placements"), ("preemptions", "preemptions"), ("reclaims", "owner reclaims"))
    ]
    return Chart(
        "Placements, preemptions and owner reclaims per hour",
        line_chart(title="Placements, preemptions and owner reclaims per hour", series=series, unit="/h"),
        "Leases created (placements) and ended (preemptions: owner reclaim, lost, machine suspended, "
        "credential revoked; owner reclaims: preempted_by_owner), per bucket scaled to an hour.",
    )


def _waits(d: Dashboard, buckets: list[datetime]) -> Chart:
    """Pending jobs at the end of each bucket, and the p50/p95 wait of the placements in it."""
    pending_now = Job.objects.filter(status=Job.Status.PENDING).count()
    moves = _count_by_bucket(
        Event.objects.filter(created_at__gte=d.since),
        "created_at",
        d.bucket,
        {
            "in": Q(to_status=Job.Status.PENDING) & ~Q(from_status=Job.Status.PENDING),
            "out": Q(from_status=Job.Status.PENDING) & ~Q(to_status=Job.Status.PENDING),
        },
    )
    # Walk back from now: at the end of a bucket, the jobs pending now, less those that came in
    # after it, plus those that left after it.
    pending: dict[datetime, float | None] = {}
    level = pending_now
    for at in reversed(buckets):
        pending[at] = level
        level -= moves["in"].get(at, 0) - moves["out"].get(at, 0)
    p50, p95 = _wait_percentiles(d)
    d.figures["pending_now"] = pending_now
    minutes = 60.0
    series = [
        _series("pending jobs", buckets, pending),
        Series("wait p50 (min)", [(at, p50[at] / minutes if at in p50 else None) for at in buckets]),
        Series("wait p95 (min)", [(at, p95[at] / minutes if at in p95 else None) for at in buckets]),
    ]
    return Chart(
        "Pending jobs and their wait",
        line_chart(title="Pending jobs and their wait", series=series),
        "Pending: jobs pending now, walked back through the job events' moves into and out of pending. "
        "Wait: lease.created_at − job.created_at of each placement in the bucket (a requeued job counts "
        "from its submission), in minutes.",
    )


def _wait_percentiles(d: Dashboard) -> tuple[dict[datetime, float], dict[datetime, float]]:
    leases = Lease.objects.filter(created_at__gte=d.since, created_at__lt=d.until)
    wait = ExpressionWrapper(F("created_at") - F("job__created_at"), output_field=DurationField())
    if connection.vendor == "postgresql" and d.bucket == HOUR:
        rows = (
            leases.annotate(bucket=TruncHour("created_at", tzinfo=UTC))
            .values("bucket")
            .annotate(p50=_Percentile(wait, fraction=0.5), p95=_Percentile(wait, fraction=0.95))
            .order_by()
        )
        return {r["bucket"]: r["p50"] for r in rows}, {r["bucket"]: r["p95"] for r in rows}
    by_bucket: dict[datetime, list[float]] = defaultdict(list)
    for at, waited in leases.annotate(wait=wait).values_list("created_at", "wait").order_by():
        by_bucket[_floor(at, d.bucket)].append(waited.total_seconds())
    return (
        {at: _percentile(w, 0.5) for at, w in by_bucket.items()},
        {at: _percentile(w, 0.95) for at, w in by_bucket.items()},
    )


def _percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks, as percentile_cont."""
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _money(micro: int | None) -> Decimal:
    return Decimal(micro or 0).scaleb(-settings.BILLING_TOKEN_DECIMALS)


def _revenue(d: Dashboard, buckets: list[datetime]) -> Chart:
    postings = Posting.objects.filter(entry__created_at__gte=d.since, entry__created_at__lt=d.until)
    charges = postings.filter(entry__kind=EK.CHARGE, account__kind=AK.LEASE_UNSETTLED)
    fees = postings.filter(entry__kind=EK.SETTLEMENT_CONFIRM, account__kind=AK.PLATFORM_FEES)
    sums: dict[str, dict[datetime, float]] = {}
    for name, queryset in (("revenue", charges), ("fees", fees)):
        sums[name] = defaultdict(float)
        if d.bucket == HOUR:
            rows = (
                queryset.annotate(bucket=TruncHour("entry__created_at", tzinfo=UTC))
                .values("bucket")
                .annotate(total=Sum("amount"))
                .order_by()
            )
            pairs: Iterable[tuple[datetime, int]] = ((r["bucket"], r["total"]) for r in rows)
        else:
            pairs = ((_floor(at, d.bucket), a) for at, a in queryset.values_list("entry__created_at", "amount"))
        for at, amount in pairs:
            sums[name][at] += float(_money(amount))
    d.figures["revenue"] = _money(charges.aggregate(t=Sum("amount"))["t"])
    d.figures["fees"] = _money(fees.aggregate(t=Sum("amount"))["t"])
    lags: dict[datetime, list[float]] = defaultdict(list)
    confirmed = Settlement.objects.filter(
        status=Settlement.Status.CONFIRMED, confirmed_at__gte=d.since, confirmed_at__lt=d.until
    )
    for created, done in confirmed.values_list("created_at", "confirmed_at").order_by():
        assert done is not None  # filtered on confirmed_at
        lags[_floor(done, d.bucket)].append((done - created).total_seconds())
    all_lags = [lag for values in lags.values() for lag in values]
    d.figures["settlement_lag_p50_s"] = _percentile(all_lags, 0.5) if all_lags else None
    d.figures["settlements_confirmed"] = len(all_lags)
    series = [
        _series("revenue", buckets, sums["revenue"]),
        _series("fees", buckets, sums["fees"]),
        Series(
            "settlement lag (min)", [(at, sum(lags[at]) / len(lags[at]) / 60 if lags[at] else None) for at in buckets]
        ),
    ]
    return Chart(
        "Revenue, fees and settlement lag",
        line_chart(title="Revenue, fees and settlement lag", series=series),
        "Ledger postings: charges into lease_unsettled (revenue), settlement confirmations into "
        "platform_fees (fees), in tokens per bucket; settlement lag: mean created → confirmed of the "
        "batches confirmed in the bucket, in minutes.",
    )


def _breakdowns(d: Dashboard, fleet: list[_FleetHour]) -> None:
    leases = Lease.objects.filter(created_at__gte=d.since, created_at__lt=d.until)
    ended = Lease.objects.filter(ended_at__gte=d.since, ended_at__lt=d.until, end_reason=ER.PREEMPTED_BY_OWNER)
    for key, lease_path, target in (
        ("model", "lease_gpus__gpu__model", d.by_model),
        ("region", "machine__region", d.by_region),
    ):
        rows: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"gpu_h": 0.0, "idle": 0.0, "leased": 0.0, "placements": 0, "reclaims": 0, "revenue": None}
        )
        for f in fleet:
            row = rows[(f.model if key == "model" else f.region) or "—"]
            row["gpu_h"] += f.reported
            row["idle"] += f.idle
            row["leased"] += f.leased
        for r in leases.values(lease_path).annotate(n=Count("pk", distinct=True)).order_by():
            rows[r[lease_path] or "—"]["placements"] = r["n"]
        for r in ended.values(lease_path).annotate(n=Count("pk", distinct=True)).order_by():
            rows[r[lease_path] or "—"]["reclaims"] = r["n"]
        if key == "region":
            charges = Posting.objects.filter(
                entry__created_at__gte=d.since,
                entry__created_at__lt=d.until,
                entry__kind=EK.CHARGE,
                account__kind=AK.LEASE_UNSETTLED,
            )
            for r in charges.values("entry__lease__machine__region").annotate(t=Sum("amount")).order_by():
                rows[r["entry__lease__machine__region"] or "—"]["revenue"] = _money(r["t"])
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
    buckets = _buckets(d.since, d.until, step)
    fleet = _fleet_hours(d)
    d.charts.append(_gpu_states(d, fleet))
    _gpu_hours(d, fleet)
    d.charts.append(_waits(d, buckets))
    d.charts.append(_lease_events(d, buckets))
    d.charts.append(_revenue(d, buckets))
    _breakdowns(d, fleet)
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
