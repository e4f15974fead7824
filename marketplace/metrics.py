"""/metrics: the marketplace's vital signs in Prometheus' text format, for an operator's
monitoring and alerts.

Every figure is read from the database when Prometheus scrapes, so it is the same whichever web
process answers (no per-process counters to add up across web workers) and survives
restarts: the fleet (GPUs by state, machines by status), the queue (jobs by status, the age of
the oldest pending job), each periodic task's runs, failures and last success (core's
PeriodicTaskState: matching, metering, settlement, the ledger check...), the worker's heartbeat,
the settlement backlog and the newest ledger check against the chain. When the database cannot
be asked the answer is still a 200 with `gpgpu_database_up 0` and nothing made up, so the
alert on it fires rather than a scrape error that hides why.

What leaves no row behind is counted where it happens (core.prom: heartbeats received and their
latency, the agent API's errors, match cycles) and added to every scrape, the database up or
not; with PROMETHEUS_MULTIPROC_DIR set, added up over every web and worker process.

Access: `Authorization: Bearer <METRICS_TOKEN>`. Without METRICS_TOKEN the endpoint is off (404):
the figures (fleet size, revenue backlog) are the operator's, not the public's. Like /healthz it
holds counts, states and times, never a host, an account or an address.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import datetime

from django.conf import settings
from django.db.models import Count, Min
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core import prom
from core.middleware import DATABASE_UNAVAILABLE_ERRORS
from marketplace import health

PREFIX = "gpgpu"


def _ts(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment else None


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    """One unlabelled gauge, left out when its value is unknown (None): Prometheus then has no
    sample rather than a made-up zero."""
    if value is not None:
        yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _by(name: str, doc: str, label: str, counts: dict[str, int], every: list[str]) -> Metric:
    """A gauge per value of `label`: each of `every` (zero when absent), then any other value seen."""
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
    for value in [*every, *sorted(set(counts) - set(every))]:
        family.add_metric([value], counts.get(value, 0))
    return family


class MarketplaceCollector(Collector):
    """The figures of one scrape, read at collect() time (module docstring)."""

    def collect(self) -> Iterator[Metric]:
        try:
            metrics = list(self._from_database())
        except DATABASE_UNAVAILABLE_ERRORS:
            yield from _gauge("database_up", "1 when the marketplace's database answers, else 0.", 0)
            return
        yield from _gauge("database_up", "1 when the marketplace's database answers, else 0.", 1)
        yield from metrics

    def _from_database(self) -> Iterator[Metric]:
        from jobs.models import Job, Lease
        from providers.models import GPU, Machine

        now = timezone.now()
        gpus = dict(GPU.objects.values_list("state").annotate(n=Count("pk")).values_list("state", "n"))
        yield _by("gpus", "GPUs by state.", "state", gpus, [s.value for s in GPU.State])
        machines = dict(Machine.objects.values_list("status").annotate(n=Count("pk")).values_list("status", "n"))
        yield _by("machines", "Machines by status.", "status", machines, [s.value for s in Machine.Status])
        open_jobs = Job.objects.exclude(status__in=Job.TERMINAL)
        jobs = dict(open_jobs.values_list("status").annotate(n=Count("pk")).values_list("status", "n"))
        live = [s.value for s in Job.Status if s not in Job.TERMINAL]
        yield _by("jobs", "Jobs not yet ended, by status.", "status", jobs, live)
        oldest = Job.objects.filter(status=Job.Status.PENDING).aggregate(oldest=Min("created_at"))["oldest"]
        yield GaugeMetricFamily(
            f"{PREFIX}_oldest_pending_job_age_seconds",
            "How long the oldest pending job has waited (0 when none waits).",
            value=(now - oldest).total_seconds() if oldest else 0.0,
        )
        active = Lease.objects.filter(status__in=Lease.ACTIVE).count()
        yield GaugeMetricFamily(f"{PREFIX}_leases_active", "Leases assigned or running.", value=active)
        yield from self._tasks(now)
        yield from self._settlement(now)
        yield from self._ledger()

    def _tasks(self, now: datetime) -> Iterator[Metric]:
        intervals = health._beat_intervals()
        states = health._states()
        names = sorted(set(intervals) | set(states))
        runs = CounterMetricFamily(f"{PREFIX}_task_runs", "Runs of each periodic task.", labels=["task"])
        failures = CounterMetricFamily(
            f"{PREFIX}_task_failures", "Failed runs (raised, or an item failed).", labels=["task"]
        )
        skipped = CounterMetricFamily(
            f"{PREFIX}_task_skipped", "Runs skipped because the previous run still held the lock.", labels=["task"]
        )
        consecutive = GaugeMetricFamily(
            f"{PREFIX}_task_consecutive_failures", "Failed runs since the last one that went through.", labels=["task"]
        )
        items_failed = GaugeMetricFamily(
            f"{PREFIX}_task_last_items_failed", "Items the last run skipped as failed.", labels=["task"]
        )
        last_run = GaugeMetricFamily(
            f"{PREFIX}_task_last_run_timestamp_seconds",
            "When a worker last took the task (started, finished or skipped it), Unix time.",
            labels=["task"],
        )
        last_success = GaugeMetricFamily(
            f"{PREFIX}_task_last_success_timestamp_seconds",
            "When the task's last run ended, if that run went through, Unix time.",
            labels=["task"],
        )
        interval = GaugeMetricFamily(
            f"{PREFIX}_task_interval_seconds", "How often beat sends the task.", labels=["task"]
        )
        for name in names:
            state = states.get(name)
            if name in intervals:
                interval.add_metric([name], intervals[name])
            runs.add_metric([name], state.total_runs if state else 0)
            failures.add_metric([name], state.total_failures if state else 0)
            skipped.add_metric([name], state.total_skipped if state else 0)
            consecutive.add_metric([name], state.consecutive_failures if state else 0)
            if state is None:
                continue
            items_failed.add_metric([name], state.items_failed)
            if (moment := health._last_activity(state)) is not None:
                last_run.add_metric([name], moment.timestamp())
            if state.last_ok and state.last_finished_at:
                last_success.add_metric([name], state.last_finished_at.timestamp())
        yield from (runs, failures, skipped, consecutive, items_failed, last_run, last_success, interval)
        beat = states.get(health.HEARTBEAT_TASK)
        last_beat = health._last_activity(beat) if beat else None
        yield from _gauge(
            "worker_heartbeat_age_seconds",
            "Seconds since a Celery worker last ran the heartbeat task (absent before the first).",
            (now - last_beat).total_seconds() if last_beat else None,
        )

    def _settlement(self, now: datetime) -> Iterator[Metric]:
        backlog = health._settlement_backlog(now)
        yield from _gauge("unsettled_leases", "Leases with a charge not settled on chain.", backlog["unsettled_leases"])
        ended = backlog["unsettled_ended_leases"]
        yield from _gauge("unsettled_ended_leases", "Ended leases with a charge not settled on chain.", ended)
        yield GaugeMetricFamily(
            f"{PREFIX}_oldest_unsettled_end_age_seconds",
            "Seconds since the oldest ended, still unsettled lease ended (0 when none).",
            value=backlog["oldest_unsettled_end_age_s"] or 0.0,
        )
        yield from _gauge("open_settlements", "Settlement batches not yet confirmed.", backlog["open_settlements"])
        yield GaugeMetricFamily(
            f"{PREFIX}_oldest_open_settlement_age_seconds",
            "Seconds since the oldest open settlement batch was made (0 when none).",
            value=backlog["oldest_open_settlement_age_s"] or 0.0,
        )

    def _ledger(self) -> Iterator[Metric]:
        from billing import selectors as billing_selectors

        check = billing_selectors.ledger_check_latest()
        if check is None:  # never run: no sample (an alert on absent() says so)
            return
        figures: list[tuple[str, str, float | None]] = [
            ("ledger_check_ok", "1 when the newest ledger check agreed with the chain, 0 when not.", int(check.ok)),
            ("ledger_check_differences", "Differences the newest check found.", len(check.differences or [])),
            ("ledger_check_chain_compared", "1 when it could compare with the chain.", int(check.chain_compared)),
            ("ledger_check_timestamp_seconds", "When the newest check ran, Unix time.", _ts(check.checked_at)),
            ("ledger_check_block", "The confirmed block it compared at.", check.block_number),
        ]
        for name, doc, value in figures:
            yield from _gauge(name, doc, value)


def _authorised(request: HttpRequest, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """The Prometheus exposition (module docstring); 404 when METRICS_TOKEN is not set, 401
    without the right bearer token."""
    token = settings.METRICS_TOKEN
    if not token:
        detail = "/metrics is off: set METRICS_TOKEN to turn it on."
        return JsonResponse({"code": "not_found", "detail": detail}, status=404)
    if not _authorised(request, token):
        detail = "Send Authorization: Bearer <METRICS_TOKEN>."
        response = JsonResponse({"code": "not_authenticated", "detail": detail}, status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MarketplaceCollector())
    registry.register(prom.RequestPathCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
