"""The fleet's figures per hour: computed from their sources, kept in the hourly summary
(FleetHour, FleetHourSlice), and read back for the dashboard (marketplace.dashboard, whose module
docstring says what each figure means).

`bucket_figures` computes every figure of the dashboard that is a sum over time, per bucket, from
the sources: the telemetry rollups, leases, job events, ledger postings and settlements. A week of
10,000 GPUs is about 1.7 million rollup rows and 650,000 ledger entries, seconds of work; so each
hour that has ended is computed once and written to the summary (`fleet_hours_summarise`), and the
dashboard reads a week as 168 rows plus their breakdowns (`figures_by_hour`), computing from the
sources only the hours the summary lacks: the current one, and any not summarised yet or marked
stale.

Who writes and when (marketplace.tasks):
- the beat entry `summarise-fleet` every few minutes recomputes the hours that ended within
  RECENT (a row stamped just before an hour ended may commit just after it; the telemetry rollup of
  an hour is written minutes after it ends) and every hour of the last SUMMARY_DAYS that has no row
  or a stale one: this is also how a new deployment fills the summary (or `manage.py
  fleet_summarise`, which recomputes any span);
- the sources' apps say when they change an hour that may be summarised already, through their
  signals (they may not import the marketplace, .importlinter): providers' `rollups_written` (the
  rollup task's hours, including a late or backfilled rollup) and jobs' `lease_ended` (a lease
  ended back in an earlier hour, e.g. at a lost machine's last heartbeat). The marketplace marks
  those hours stale in the writer's transaction (`fleet_hours_mark_stale`) and asks for a run soon.
  A stale hour is computed from the sources until it is recomputed, so such a change is on the
  page at once. Ledger entries (billing's metering and settlement), job events, placements and
  settlements are stamped when written, so they can only land in an hour already summarised by
  committing just after it ended: RECENT recomputes those hours on every run, and until then
  (one beat interval at most) the page may lack such a row.

Recomputing an hour replaces its rows: running it twice gives the same rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Count, F, Q, QuerySet, Sum
from django.db.models.functions import TruncHour, TruncMinute
from django.utils import timezone

from billing.models import LedgerAccount, LedgerEntry, Posting, Settlement
from core import soon
from jobs.models import Event, Job, Lease
from marketplace.models import FleetHour, FleetHourSlice
from providers.models import TelemetryRollup

HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
# Hours that ended this recently are recomputed on every run of the summary task.
RECENT = timedelta(hours=2)
# A run asked for by a change to a summarised hour waits this long, so that a burst of changes
# (a rollup run, leases ended together) is summarised once.
COALESCE_S = 5.0
# A run asked for while another holds the lock runs again this often, this many times.
LOCKED_TRIES, LOCKED_RETRY_S = 5, 30.0
_QUEUED_KEY = "marketplace.fleet_summary.run_queued"
# How far back the summary task fills hours that have no row (the dashboard's longest range).
SUMMARY_DAYS = 7
ER = Lease.EndReason
# Leases ended by something other than the job or its renter: their work since the last
# checkpoint is lost. An owner reclaim is the commonest of them.
PREEMPTIONS = (ER.PREEMPTED_BY_OWNER, ER.LOST, ER.MACHINE_SUSPENDED, ER.CREDENTIAL_REVOKED)
AK = LedgerAccount.Kind
EK = LedgerEntry.Kind
NO_KEY = "—"
# Spans up to this long are read along the indexes (_along_indexes).
SHORT_SPAN = timedelta(hours=6)
# The breakdowns: the figures' names per dimension of FleetHourSlice.
DIMENSIONS = (FleetHourSlice.Dimension.MODEL, FleetHourSlice.Dimension.REGION)

Figures = dict[str, Any]


def floor_to(at: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + step * math.floor((at - epoch) / step)


def buckets_of(since: datetime, until: datetime, step: timedelta) -> list[datetime]:
    out, at = [], floor_to(since, step)
    while at < until:
        out.append(at)
        at += step
    return out


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks, as percentile_cont."""
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _grouped(
    queryset: QuerySet[Any], stamp: str, step: timedelta, *, by: tuple[str, ...] = (), **aggregates: Any
) -> list[dict[str, Any]]:
    """Rows of `aggregates` per bucket of `stamp` ("bucket": the bucket's start) and the fields
    `by`. The database groups by the hour, or by the minute for buckets of whole minutes that
    divide an hour (five minutes in the hour range), which are summed here; other buckets are
    summed here from one row per object. So only aggregates that sum (Count, Sum) may be given."""
    if step == HOUR:
        return list(
            queryset.annotate(bucket=TruncHour(stamp, tzinfo=UTC))
            .values("bucket", *by)
            .annotate(**aggregates)
            .order_by()
        )
    if step % MINUTE == timedelta(0) and HOUR % step == timedelta(0):
        rows = queryset.annotate(at=TruncMinute(stamp, tzinfo=UTC)).values("at", *by).annotate(**aggregates).order_by()
    else:
        rows = queryset.values("pk", *by).annotate(at=F(stamp), **aggregates).order_by()
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        at = floor_to(row["at"], step)
        bucket = out.setdefault((at, *(row[f] for f in by)), {"bucket": at, **{f: row[f] for f in by}})
        for name in aggregates:
            bucket[name] = bucket.get(name, 0) + (row[name] or 0)
    return list(out.values())


def _add(into: dict[str, Any], name: str, key: str, n: Any) -> None:
    by = into.setdefault(name, {})
    by[key or NO_KEY] = by.get(key or NO_KEY, 0) + n


def _add_fleet(into: dict[str, Any], name: str, key: str, reported: int, idle: float, leased: float) -> None:
    sums = into.setdefault(name, {}).setdefault(str(key) or NO_KEY, [0, 0.0, 0.0])
    sums[0] += reported
    sums[1] += idle
    sums[2] += leased


def bucket_figures(start: datetime, end: datetime, step: timedelta) -> dict[datetime, Figures]:
    """Every figure of the dashboard that is a sum over time, per bucket of [start, end), from
    the sources (the module docstring). A bucket's figures: "reported", "idle", "leased" (the
    rollups of the hour: rows and the sums of idle_ratio and leased_ratio; only in a bucket that
    has rollups, which an hour's rollups fall in whatever the step) and "fleet_by_model" /
    "fleet_by_region" (the same, {key: [reported, idle, leased]}); "placements",
    "preemptions", "reclaims", "placements_by_model|region", "reclaims_by_model|region"; "in",
    "out" (job moves into and out of pending); "wait_p50", "wait_p95" (seconds); "revenue",
    "revenue_by_region", "fees" (token micro-units); "lags" (settlement lags, seconds)."""
    out: dict[datetime, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    rollups = (
        TelemetryRollup.objects.filter(hour__gte=floor_to(start, HOUR), hour__lt=end)
        .values("hour", "gpu__model", "gpu__machine__region")
        .annotate(reported=Count("pk"), idle=Sum("idle_ratio"), leased=Sum("leased_ratio"))
        .order_by()
    )
    for u in rollups:
        f = out[floor_to(u["hour"], step)]
        idle, leased = u["idle"] or 0.0, u["leased"] or 0.0
        f["reported"] += u["reported"]
        f["idle"] += idle
        f["leased"] += leased
        _add_fleet(f, "fleet_by_model", u["gpu__model"], u["reported"], idle, leased)
        _add_fleet(f, "fleet_by_region", u["gpu__machine__region"], u["reported"], idle, leased)
    _lease_figures(out, start, end, step)
    for r in _grouped(
        Event.objects.filter(created_at__gte=start, created_at__lt=end),
        "created_at",
        step,
        moved_in=Count("pk", filter=Q(to_status=Job.Status.PENDING) & ~Q(from_status=Job.Status.PENDING)),
        moved_out=Count("pk", filter=Q(from_status=Job.Status.PENDING) & ~Q(to_status=Job.Status.PENDING)),
    ):
        out[r["bucket"]]["in"] += r["moved_in"]
        out[r["bucket"]]["out"] += r["moved_out"]
    for at, region, total in _ledger_sums(start, end, step, EK.CHARGE, AK.LEASE_UNSETTLED, by_region=True):
        out[at]["revenue"] += total
        _add(out[at], "revenue_by_region", region or "", total)
    for at, _, total in _ledger_sums(start, end, step, EK.SETTLEMENT_CONFIRM, AK.PLATFORM_FEES, by_region=False):
        out[at]["fees"] += total
    confirmed = Settlement.objects.filter(
        status=Settlement.Status.CONFIRMED, confirmed_at__gte=start, confirmed_at__lt=end
    )
    for created_at, done in confirmed.values_list("created_at", "confirmed_at").order_by():
        assert done is not None  # filtered on confirmed_at
        out[floor_to(done, step)].setdefault("lags", []).append((done - created_at).total_seconds())
    return {at: dict(figures) for at, figures in out.items()}


@contextmanager
def _along_indexes(start: datetime, end: datetime) -> Iterator[None]:
    """Over SHORT_SPAN or less (the current hour, on every request), PostgreSQL is told to follow
    the indexes (nested loops) for the queries run inside: left to itself it hashes a whole table
    (every posting, every lease_unsettled account, every lease's GPU row) to join an hour's few
    hundred rows, a cost that grows with the history kept rather than with the hour (a week of
    10,000 GPUs: 5-7 ms for an hour's leases against 13-26, 30 ms for its charges against
    250-400). Elsewhere, or over a longer span, the planner chooses."""
    if connection.vendor != "postgresql" or end - start > SHORT_SPAN:
        yield
        return
    # In a transaction of its own (SET LOCAL ends with it), and put back as found in case the
    # caller's transaction is the one (atomic() then makes a savepoint). On an error nothing is
    # put back by hand: the rollback of that transaction or savepoint undoes the settings too,
    # and a statement sent after the error would only hide it.
    with transaction.atomic(), connection.cursor() as cursor:
        # The target list is evaluated in order: the settings as found, then turned off.
        cursor.execute(
            "SELECT current_setting('enable_hashjoin'), current_setting('enable_mergejoin'),"
            " set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
        )
        found = cursor.fetchone()[:2]
        yield
        cursor.execute(
            "SELECT set_config('enable_hashjoin', %s, true), set_config('enable_mergejoin', %s, true)", found
        )


def _ledger_sums(
    start: datetime, end: datetime, step: timedelta, kind: str, account: str, *, by_region: bool
) -> list[tuple[datetime, str | None, int]]:
    """(bucket, region, amount) sums of the postings into `account` accounts of the `kind`
    entries made in [start, end); the region is that of the account's lease's machine, None
    unless `by_region`. One query, from the entries (their created_at index) along foreign keys
    (_along_indexes)."""
    postings = Posting.objects.filter(
        entry__created_at__gte=start, entry__created_at__lt=end, entry__kind=kind, account__kind=account
    )
    path = "account__lease__machine__region"
    by = (path,) if by_region else ()
    with _along_indexes(start, end):
        return [
            (r["bucket"], r[path] if by_region else None, r["total"] or 0)
            for r in _grouped(postings, "entry__created_at", step, by=by, total=Sum("amount"))
        ]


def _lease_figures(out: dict[datetime, dict[str, Any]], start: datetime, end: datetime, step: timedelta) -> None:
    """Placements (leases created), their waits, preemptions and owner reclaims (leases ended),
    per bucket and by GPU model and region, into `out`: two queries, one row per lease and GPU,
    counted here (a lease on GPUs of two models counts once in each model and once in all)."""
    placed: dict[datetime, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    waits: dict[datetime, dict[int, float]] = defaultdict(dict)
    created = Lease.objects.filter(created_at__gte=start, created_at__lt=end).values_list(
        "pk", "created_at", "job__created_at", "machine__region", "lease_gpus__gpu__model"
    )
    ended = Lease.objects.filter(ended_at__gte=start, ended_at__lt=end).values_list(
        "pk", "ended_at", "end_reason", "machine__region", "lease_gpus__gpu__model"
    )
    with _along_indexes(start, end):
        created_rows = list(created.order_by())
        ended_rows = list(ended.order_by())
    for pk, at, submitted, region, model in created_rows:
        bucket = placed[floor_to(at, step)]
        bucket[""].add(pk)
        bucket[f"region:{region or NO_KEY}"].add(pk)
        bucket[f"model:{model or NO_KEY}"].add(pk)
        waits[floor_to(at, step)][pk] = (at - submitted).total_seconds()
    for at, leases in placed.items():
        out[at]["placements"] += len(leases.pop(""))
        for key, ids in leases.items():
            dimension, name = key.split(":", 1)
            _add(out[at], f"placements_by_{dimension}", name, len(ids))
    for at, by_lease in waits.items():
        values = list(by_lease.values())
        out[at]["wait_p50"], out[at]["wait_p95"] = percentile(values, 0.5), percentile(values, 0.95)
    ended_leases: dict[datetime, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for pk, stamp, reason, region, model in ended_rows:
        assert stamp is not None  # filtered on ended_at
        bucket = ended_leases[floor_to(stamp, step)]
        bucket["ended"].add(pk)
        if reason in PREEMPTIONS:
            bucket["preemptions"].add(pk)
        if reason == ER.PREEMPTED_BY_OWNER:
            bucket["reclaims"].add(pk)
            bucket[f"region:{region or NO_KEY}"].add(pk)
            bucket[f"model:{model or NO_KEY}"].add(pk)
    for at, leases in ended_leases.items():
        out[at]["preemptions"] += len(leases.pop("preemptions", ()))
        out[at]["reclaims"] += len(leases.pop("reclaims", ()))
        leases.pop("ended")
        for key, ids in leases.items():
            dimension, name = key.split(":", 1)
            _add(out[at], f"reclaims_by_{dimension}", name, len(ids))


# The summary: one FleetHour per hour, one FleetHourSlice per hour, dimension and key.


def _hour_row(hour: datetime, f: Figures, computed_at: datetime) -> FleetHour:
    return FleetHour(
        hour=hour,
        gpus_reported=f.get("reported", 0),
        idle_gpu_h=f.get("idle", 0.0),
        leased_gpu_h=f.get("leased", 0.0),
        placements=f.get("placements", 0),
        preemptions=f.get("preemptions", 0),
        reclaims=f.get("reclaims", 0),
        pending_in=f.get("in", 0),
        pending_out=f.get("out", 0),
        wait_p50_s=f.get("wait_p50"),
        wait_p95_s=f.get("wait_p95"),
        revenue_micro=f.get("revenue", 0),
        fees_micro=f.get("fees", 0),
        settlement_lags_s=f.get("lags", []),
        computed_at=computed_at,
    )


def _slice_rows(hour: datetime, f: Figures) -> Iterator[FleetHourSlice]:
    for dimension in DIMENSIONS:
        fleet = f.get(f"fleet_by_{dimension}", {})
        placements = f.get(f"placements_by_{dimension}", {})
        reclaims = f.get(f"reclaims_by_{dimension}", {})
        revenue = f.get("revenue_by_region", {}) if dimension == FleetHourSlice.Dimension.REGION else {}
        for key in sorted({*fleet, *placements, *reclaims, *revenue}):
            reported, idle, leased = fleet.get(key, (0, 0.0, 0.0))
            yield FleetHourSlice(
                hour=hour,
                dimension=dimension,
                key=key,
                gpus_reported=reported,
                idle_gpu_h=idle,
                leased_gpu_h=leased,
                placements=placements.get(key, 0),
                reclaims=reclaims.get(key, 0),
                revenue_micro=revenue.get(key),
            )


def _hour_figures(row: dict[str, Any]) -> Figures:
    """A FleetHour's values() as bucket_figures gives them (figures that are zero or absent
    there are left out here too)."""
    f: Figures = {}
    if row["gpus_reported"]:
        f.update(reported=row["gpus_reported"], idle=row["idle_gpu_h"], leased=row["leased_gpu_h"])
    for name, column in (
        ("placements", "placements"),
        ("preemptions", "preemptions"),
        ("reclaims", "reclaims"),
        ("in", "pending_in"),
        ("out", "pending_out"),
        ("revenue", "revenue_micro"),
        ("fees", "fees_micro"),
    ):
        if row[column]:
            f[name] = row[column]
    if row["wait_p50_s"] is not None:
        f["wait_p50"], f["wait_p95"] = row["wait_p50_s"], row["wait_p95_s"]
    if row["settlement_lags_s"]:
        f["lags"] = row["settlement_lags_s"]
    return f


def _add_slice(f: Figures, s: dict[str, Any]) -> None:
    dimension, key = s["dimension"], s["key"]
    if s["gpus_reported"]:
        f.setdefault(f"fleet_by_{dimension}", {})[key] = [s["gpus_reported"], s["idle_gpu_h"], s["leased_gpu_h"]]
    if s["placements"]:
        f.setdefault(f"placements_by_{dimension}", {})[key] = s["placements"]
    if s["reclaims"]:
        f.setdefault(f"reclaims_by_{dimension}", {})[key] = s["reclaims"]
    if s["revenue_micro"] is not None:
        f.setdefault("revenue_by_region", {})[key] = s["revenue_micro"]


_HOUR_FIELDS = (
    "hour",
    "gpus_reported",
    "idle_gpu_h",
    "leased_gpu_h",
    "placements",
    "preemptions",
    "reclaims",
    "pending_in",
    "pending_out",
    "wait_p50_s",
    "wait_p95_s",
    "revenue_micro",
    "fees_micro",
    "settlement_lags_s",
)
_SLICE_FIELDS = (
    "hour",
    "dimension",
    "key",
    "gpus_reported",
    "idle_gpu_h",
    "leased_gpu_h",
    "placements",
    "reclaims",
    "revenue_micro",
)


def figures_by_hour(start: datetime, until: datetime) -> dict[datetime, Figures]:
    """bucket_figures(start, until, HOUR), `start` on the hour: the hours that have ended from
    the summary where it has a fresh row, the others (the current hour, and hours not summarised
    yet or stale) from the sources."""
    ended = max(floor_to(until, HOUR), start)
    out: dict[datetime, Figures] = {}
    rows = FleetHour.objects.filter(hour__gte=start, hour__lt=ended, stale=False, computed_at__isnull=False)
    for row in rows.values(*_HOUR_FIELDS).order_by():
        out[row["hour"]] = _hour_figures(row)
    summarised = set(out)
    if out:
        slices = FleetHourSlice.objects.filter(hour__gte=min(out), hour__lt=max(out) + HOUR)
        for s in slices.values(*_SLICE_FIELDS).order_by():
            if s["hour"] in out:
                _add_slice(out[s["hour"]], s)
    for run_start, run_end in _runs([at for at in buckets_of(start, ended, HOUR) if at not in summarised]):
        out.update(bucket_figures(run_start, run_end, HOUR))
    if ended < until:
        out.update(bucket_figures(ended, until, HOUR))
    # An hour with nothing in it is absent, as from bucket_figures.
    return {at: f for at, f in out.items() if f}


def _runs(hours: list[datetime]) -> Iterator[tuple[datetime, datetime]]:
    """Sorted hours as [start, end) spans of consecutive hours."""
    run: list[datetime] = []
    for at in hours:
        if run and at != run[-1] + HOUR:
            yield run[0], run[-1] + HOUR
            run = []
        run.append(at)
    if run:
        yield run[0], run[-1] + HOUR


def fleet_hours_summarise(*, start: datetime, end: datetime, now: datetime | None = None) -> int:
    """Compute the summary of every hour in [start, end) that has ended by `now` and replace its
    rows; returns how many hours. Idempotent.

    A stale mark is cleared before the sources are read, so a source written while this runs
    either is read or marks the hour stale again (fleet_hours_mark_stale): a summary never hides a
    change that came after it was computed. An hour first summarised here gets a placeholder row
    first, for the same reason."""
    now = now or timezone.now()
    start, end = floor_to(start, HOUR), min(floor_to(end, HOUR), floor_to(now, HOUR))
    hours = buckets_of(start, end, HOUR)
    if not hours:
        return 0
    FleetHour.objects.bulk_create(
        [FleetHour(hour=at, computed_at=None, stale=True) for at in hours], ignore_conflicts=True
    )
    FleetHour.objects.filter(hour__gte=start, hour__lt=end, stale=True).update(stale=False)
    computed_at = timezone.now()
    figures = bucket_figures(start, end, HOUR)
    with transaction.atomic():
        FleetHour.objects.bulk_create(
            [_hour_row(at, figures.get(at, {}), computed_at) for at in hours],
            update_conflicts=True,
            unique_fields=["hour"],
            update_fields=[f for f in _HOUR_FIELDS if f != "hour"] + ["computed_at"],
        )
        FleetHourSlice.objects.filter(hour__gte=start, hour__lt=end).delete()
        FleetHourSlice.objects.bulk_create(
            [s for at in hours for s in _slice_rows(at, figures.get(at, {}))], batch_size=1000
        )
    return len(hours)


def fleet_hours_mark_stale(*, start: datetime, end: datetime) -> int:
    """Mark the summarised hours that overlap [start, end) stale: their sources changed (the
    module docstring). Runs in the caller's transaction; returns how many rows. Rows already
    stale are written too: the row lock makes a summary run that is about to clear the mark wait
    for the caller's commit, and then read what it wrote."""
    return FleetHour.objects.filter(hour__gte=floor_to(start, HOUR), hour__lt=end).update(stale=True)


def fleet_hours_due(*, now: datetime | None = None) -> list[datetime]:
    """The hours the summary task recomputes: those that ended within RECENT, and those of the
    last SUMMARY_DAYS with no row, a placeholder or a stale one."""
    now = now or timezone.now()
    end = floor_to(now, HOUR)
    start = end - timedelta(days=SUMMARY_DAYS)
    fresh = set(
        FleetHour.objects.filter(hour__gte=start, hour__lt=end, stale=False, computed_at__isnull=False).values_list(
            "hour", flat=True
        )
    )
    return [at for at in buckets_of(start, end, HOUR) if at not in fresh or at >= floor_to(now - RECENT, HOUR)]


def fleet_summary_run(*, now: datetime | None = None) -> dict[str, int]:
    """One run of the summary task: the due hours (fleet_hours_due), span by span."""
    now = now or timezone.now()
    due = fleet_hours_due(now=now)
    hours = 0
    for run_start, run_end in _runs(due):
        hours += fleet_hours_summarise(start=run_start, end=run_end, now=now)
    return {"hours": hours}


def fleet_summary_request_soon() -> None:
    """Ask for a summary task run within about COALESCE_S seconds of the caller's commit
    (core.soon: one run per burst; the beat entry stays the safety net)."""

    def send() -> None:
        from marketplace.tasks import summarise_fleet_soon

        summarise_fleet_soon.apply_async(countdown=COALESCE_S, expires=300)

    soon.request_soon(key=_QUEUED_KEY, send=send, what="fleet summary")


def fleet_summary_request_clear() -> None:
    """Called by the requested run as it starts: a request from now on asks for another run."""
    soon.request_clear(key=_QUEUED_KEY, what="fleet summary")


def fleet_hours_changed(*, start: datetime, end: datetime, now: datetime | None = None) -> None:
    """The sources of the hours overlapping [start, end) changed (a signal of the app that
    wrote them, marketplace.apps): mark the summarised ones stale, in the caller's transaction,
    and ask for a run once it commits. Nothing to do for hours that have not ended."""
    end = min(end, floor_to(now or timezone.now(), HOUR))
    if start < end and fleet_hours_mark_stale(start=start, end=end):
        fleet_summary_request_soon()
