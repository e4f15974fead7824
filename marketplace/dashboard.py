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

Over a day or a week, the figures of hours that ended more than SETTLED_AFTER ago are computed
once and kept in Django's cache (_figures_by_bucket); the rest are read each time. A week of
10,000 GPUs is about 1.7 million rollup rows and 650,000 ledger entries: scanning them on every
request takes seconds (benchmarks/dashboard.py).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.core.cache import cache
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

logger = logging.getLogger(__name__)
HOUR = timedelta(hours=1)
# name: (span, bucket)
RANGES: dict[str, tuple[timedelta, timedelta]] = {
    "hour": (HOUR, timedelta(minutes=5)),
    "day": (timedelta(days=1), HOUR),
    "week": (timedelta(days=7), HOUR),
}
DEFAULT_RANGE = "day"
# Hours that ended longer ago than this no longer change: their figures are cached.
SETTLED_AFTER = timedelta(hours=2)
CACHE_TTL_S = 8 * 24 * 3600
# Spans up to this long look their ledger entries up before their postings (_postings).
SHORT_SPAN = timedelta(hours=6)
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


def _in_buckets(rows: Iterable[tuple[datetime, Any]], step: timedelta) -> dict[datetime, list[Any]]:
    out: dict[datetime, list[Any]] = defaultdict(list)
    for at, value in rows:
        out[_floor(at, step)].append(value)
    return out


def _grouped(
    queryset: QuerySet[Any], stamp: str, step: timedelta, *, by: tuple[str, ...] = (), **aggregates: Any
) -> list[dict[str, Any]]:
    """Rows of `aggregates` per bucket of `stamp` ("bucket": the bucket's start) and the fields
    `by`. The database groups by the hour; other buckets (five minutes in the hour range: a few
    hundred rows) are summed here from one row per object, so only aggregates that sum (Count,
    Sum) may be given."""
    if step == HOUR:
        return list(
            queryset.annotate(bucket=TruncHour(stamp, tzinfo=UTC))
            .values("bucket", *by)
            .annotate(**aggregates)
            .order_by()
        )
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in queryset.values("pk", *by).annotate(at=F(stamp), **aggregates).order_by():
        at = _floor(row["at"], step)
        bucket = out.setdefault((at, *(row[f] for f in by)), {"bucket": at, **{f: row[f] for f in by}})
        for name in aggregates:
            bucket[name] = bucket.get(name, 0) + (row[name] or 0)
    return list(out.values())


def _postings(start: datetime, end: datetime, kind: str, account: str) -> QuerySet[Posting]:
    """The postings into `account` accounts of the `kind` entries made in [start, end). Over a
    few hours the entries are looked up first (their created_at index), then their postings (the
    entry_id index): joined in one query, PostgreSQL scans every posting instead."""
    entries = LedgerEntry.objects.filter(created_at__gte=start, created_at__lt=end, kind=kind)
    if end - start <= SHORT_SPAN:
        ids = list(entries.values_list("pk", flat=True))
        return Posting.objects.filter(entry_id__in=ids, account__kind=account)
    return Posting.objects.filter(entry__in=entries, account__kind=account)


def _add(into: dict[str, Any], name: str, key: str, n: int) -> None:
    by = into.setdefault(name, {})
    by[key or "—"] = by.get(key or "—", 0) + n


def _bucket_figures(start: datetime, end: datetime, step: timedelta) -> dict[datetime, dict[str, Any]]:
    """Every figure of the page that is a sum over time, per bucket of [start, end): what the
    settled hours' cache keeps (the module docstring names the sources)."""
    out: dict[datetime, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    rollups = (
        TelemetryRollup.objects.filter(hour__gte=_floor(start, HOUR), hour__lt=end)
        .values("hour", "gpu__model", "gpu__machine__region")
        .annotate(reported=Count("pk"), idle=Sum("idle_ratio"), leased=Sum("leased_ratio"))
        .order_by()
    )
    for u in rollups:
        out[_floor(u["hour"], step)].setdefault("fleet", []).append(
            (u["hour"], u["gpu__model"], u["gpu__machine__region"], u["reported"], u["idle"] or 0.0, u["leased"] or 0.0)
        )
    created = Lease.objects.filter(created_at__gte=start, created_at__lt=end)
    ended = Lease.objects.filter(ended_at__gte=start, ended_at__lt=end)
    for r in _grouped(created, "created_at", step, n=Count("pk")):
        out[r["bucket"]]["placements"] += r["n"]
    for r in _grouped(
        ended,
        "ended_at",
        step,
        preemptions=Count("pk", filter=Q(end_reason__in=PREEMPTIONS)),
        reclaims=Count("pk", filter=Q(end_reason=ER.PREEMPTED_BY_OWNER)),
    ):
        out[r["bucket"]]["preemptions"] += r["preemptions"]
        out[r["bucket"]]["reclaims"] += r["reclaims"]
    reclaimed = ended.filter(end_reason=ER.PREEMPTED_BY_OWNER)
    for key, path in (("model", "lease_gpus__gpu__model"), ("region", "machine__region")):
        for r in _grouped(created, "created_at", step, by=(path,), n=Count("pk", distinct=True)):
            _add(out[r["bucket"]], f"placements_by_{key}", r[path], r["n"])
        for r in _grouped(reclaimed, "ended_at", step, by=(path,), n=Count("pk", distinct=True)):
            _add(out[r["bucket"]], f"reclaims_by_{key}", r[path], r["n"])
    for r in _grouped(
        Event.objects.filter(created_at__gte=start, created_at__lt=end),
        "created_at",
        step,
        moved_in=Count("pk", filter=Q(to_status=Job.Status.PENDING) & ~Q(from_status=Job.Status.PENDING)),
        moved_out=Count("pk", filter=Q(from_status=Job.Status.PENDING) & ~Q(to_status=Job.Status.PENDING)),
    ):
        out[r["bucket"]]["in"] += r["moved_in"]
        out[r["bucket"]]["out"] += r["moved_out"]
    for at, (p50, p95) in _wait_percentiles(start, end, step).items():
        out[at]["wait_p50"], out[at]["wait_p95"] = p50, p95
    charges = _postings(start, end, EK.CHARGE, AK.LEASE_UNSETTLED)
    by_account = _grouped(charges, "entry__created_at", step, by=("account_id",), total=Sum("amount"))
    # The accounts' regions in a query of their own: joined to the postings, PostgreSQL would
    # scan every account, lease and machine.
    regions = dict(
        LedgerAccount.objects.filter(pk__in={r["account_id"] for r in by_account}).values_list(
            "pk", "lease__machine__region"
        )
    )
    for r in by_account:
        out[r["bucket"]]["revenue"] += r["total"] or 0
        _add(out[r["bucket"]], "revenue_by_region", regions.get(r["account_id"]) or "", r["total"] or 0)
    fees = _postings(start, end, EK.SETTLEMENT_CONFIRM, AK.PLATFORM_FEES)
    for r in _grouped(fees, "entry__created_at", step, total=Sum("amount")):
        out[r["bucket"]]["fees"] += r["total"] or 0
    confirmed = Settlement.objects.filter(
        status=Settlement.Status.CONFIRMED, confirmed_at__gte=start, confirmed_at__lt=end
    )
    for created_at, done in confirmed.values_list("created_at", "confirmed_at").order_by():
        assert done is not None  # filtered on confirmed_at
        out[_floor(done, step)].setdefault("lags", []).append((done - created_at).total_seconds())
    return {at: dict(figures) for at, figures in out.items()}


def _cache_key(hour: datetime) -> str:
    return f"dashboard:hour:{int(hour.timestamp())}"


def dashboard_cache_forget(*, now: datetime | None = None) -> None:
    """Drop the cached figures of every hour a range can show (tests: each has a database of
    its own, but the cache outlives it)."""
    until = _floor(now or timezone.now(), HOUR)
    span = max(span for span, _ in RANGES.values()) + 2 * HOUR
    cache.delete_many([_cache_key(at) for at in _buckets(until - span, until + HOUR, HOUR)])


def _figures_by_bucket(d: Dashboard) -> dict[datetime, dict[str, Any]]:
    """_bucket_figures over the range. Over a day or a week, the hours that ended more than
    SETTLED_AFTER ago are read from the cache when there (computed once, kept CACHE_TTL_S):
    nothing writes rows into such an hour any more (ledger entries, events and leases are
    stamped when written; an hour's rollups are recomputed only until the next hour's are
    written). The rest, and the hour range, are read from the database each time."""
    start = _floor(d.since, d.bucket)
    if d.bucket != HOUR:
        return _bucket_figures(start, d.until, d.bucket)
    settled = max(min(_floor(d.until - SETTLED_AFTER, HOUR), d.until), start)
    keys = {_cache_key(at): at for at in _buckets(start, settled, HOUR) if at < settled}
    try:
        found = cache.get_many(list(keys))
    except Exception:  # the cache (Redis) is down: compute it all
        logger.warning("dashboard: the cache is unavailable", exc_info=True)
        found = {}
    out = {keys[key]: value for key, value in found.items()}
    missing = sorted(at for at in keys.values() if at not in out)
    if missing:
        fresh = _bucket_figures(missing[0], missing[-1] + HOUR, HOUR)
        wanted = set(missing)
        try:
            cache.set_many({key: fresh.get(at, {}) for key, at in keys.items() if at in wanted}, CACHE_TTL_S)
        except Exception:
            logger.warning("dashboard: the cache is unavailable", exc_info=True)
        out.update({at: fresh.get(at, {}) for at in missing})
    out.update(_bucket_figures(settled, d.until, HOUR))
    return out


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


def _fleet(figures: Figures) -> list[tuple[datetime, str, str, int, float, float]]:
    return [row for f in figures.values() for row in f.get("fleet", [])]


def _gpu_states(d: Dashboard, figures: Figures) -> Chart:
    total = GPU.objects.count()
    by_hour: dict[datetime, dict[str, float]] = defaultdict(lambda: {"reported": 0, "idle": 0.0, "leased": 0.0})
    for hour, _, _, reported, idle, leased in _fleet(figures):
        sums = by_hour[hour]
        sums["reported"] += reported
        sums["idle"] += idle
        sums["leased"] += leased
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
    fleet = _fleet(figures)
    idle, leased = sum(row[4] for row in fleet), sum(row[5] for row in fleet)
    lost = _lost_gpu_hours(Lease.objects.filter(ended_at__gte=d.since, ended_at__lt=d.until), since=d.since)
    offered = idle + leased
    d.figures.update(
        idle_offered_gpu_h=offered,
        rented_gpu_h=leased,
        useful_gpu_h=max(leased - lost, 0.0),
        lost_gpu_h=lost,
        share_rented=leased / offered if offered else None,
        share_lost=lost / leased if leased else None,
        rollup_hours_from=min((row[0] for row in fleet), default=_floor(d.since, HOUR)),
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


def _wait_percentiles(start: datetime, end: datetime, step: timedelta) -> dict[datetime, tuple[float, float]]:
    leases = Lease.objects.filter(created_at__gte=start, created_at__lt=end)
    wait = ExpressionWrapper(F("created_at") - F("job__created_at"), output_field=DurationField())
    if connection.vendor == "postgresql" and step == HOUR:
        rows = (
            leases.annotate(bucket=TruncHour("created_at", tzinfo=UTC))
            .values("bucket")
            .annotate(p50=_Percentile(wait, fraction=0.5), p95=_Percentile(wait, fraction=0.95))
            .order_by()
        )
        return {r["bucket"]: (r["p50"], r["p95"]) for r in rows}
    pairs = leases.annotate(wait=wait).values_list("created_at", "wait").order_by()
    waits = _in_buckets(((at, waited.total_seconds()) for at, waited in pairs), step)
    return {at: (_percentile(w, 0.5), _percentile(w, 0.95)) for at, w in waits.items()}


def _percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks, as percentile_cont."""
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _money(micro: int | None) -> Decimal:
    return Decimal(micro or 0).scaleb(-settings.BILLING_TOKEN_DECIMALS)


def _revenue(d: Dashboard, buckets: list[datetime], figures: Figures) -> Chart:
    d.figures["revenue"] = _money(_total(figures, "revenue"))
    d.figures["fees"] = _money(_total(figures, "fees"))
    lags = {at: f["lags"] for at, f in figures.items() if f.get("lags")}
    all_lags = [lag for values in lags.values() for lag in values]
    d.figures["settlement_lag_p50_s"] = _percentile(all_lags, 0.5) if all_lags else None
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
    fleet = _fleet(figures)
    for key, column, target in (("model", 1, d.by_model), ("region", 2, d.by_region)):
        rows: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"gpu_h": 0.0, "idle": 0.0, "leased": 0.0, "placements": 0, "reclaims": 0, "revenue": None}
        )
        for fleet_row in fleet:
            sums = rows[str(fleet_row[column]) or "—"]
            sums["gpu_h"] += fleet_row[3]
            sums["idle"] += fleet_row[4]
            sums["leased"] += fleet_row[5]
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
    buckets = _buckets(d.since, d.until, step)
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
