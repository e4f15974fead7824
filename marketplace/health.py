"""Health: is this process alive (/livez), can it serve requests (/readyz), and how is the whole
marketplace doing (/healthz, the status document).

- /livez: 200 whenever this process answers a request. It touches nothing else (no database, no
  Redis, no chain), so an orchestrator that restarts on it never restarts web for an outage of a
  dependency that a restart would not cure.
- /readyz: 200 when the database answers a query, else 503: without its database this instance
  cannot serve a single API request. Redis and the chain are not asked: without Redis the rate
  limits let requests through, and without the chain only the chain's own operations wait.
- /healthz: the status document. Each dependency (database, Celery broker, cache, chain node), the
  Celery worker's heartbeat (beat and a worker both alive), each periodic task (its last run, last
  success and consecutive failures, from core's PeriodicTaskState) and the settlement backlog.
  `status` is `down` (503) when the database cannot be reached, `degraded` (200) when something
  else is wrong (named in `problems`), else `ok` (200).

All three are public: load balancers, container health checks, uptime monitors and the agent's
`doctor` call them without credentials. So they answer states, times and counts, never a host, a
port, a URL, a user name or an error's text (a driver's message may hold any of those): a failed
check names the exception's class, and the full error goes to the log. The document's network
probes (broker, chain) run side by side and are given up after PROBE_DEADLINE_S, so /healthz
answers within a few seconds even when a dependency swallows packets. Being public, /healthz
must not hand its callers the chain node and the broker: the probes' results are shared by the
requests of one process for PROBE_SHARE_S (a request meanwhile waits for the probes already
running, or reads their results), so however many requests come, each process sends the node
one RPC and opens one broker connection per PROBE_SHARE_S at most.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.cache import DEFAULT_CACHE_ALIAS, caches
from django.db import connection
from django.db.models import Count, Min, Q
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from billing import selectors as billing_selectors
from core.middleware import DATABASE_UNAVAILABLE_ERRORS, RETRY_AFTER_S

if TYPE_CHECKING:
    # For the types only: each is imported when a probe first needs it.
    from celery import Celery

    from billing.chain import ChainClient

logger = logging.getLogger(__name__)

# The Celery worker's heartbeat (marketplace.tasks.worker_heartbeat): its interval is its beat
# entry's. A heartbeat, or a periodic task's run, older than STALE_AFTER_INTERVALS intervals means
# beat or every worker is down (or the task never gets a worker).
HEARTBEAT_TASK = "marketplace.tasks.worker_heartbeat"
STALE_AFTER_INTERVALS = 3
# A task whose last runs all failed, this many in a row, degrades the marketplace. One failed run
# (a node that blinked, one bad item) is shown but is not yet a problem.
FAILING_AFTER = 3
# The broker and chain probes run in threads and are given up after this long (what is still
# running then finishes in the background, within its own timeout).
PROBE_DEADLINE_S = 5.0
# The probes' results stand this long for the requests that follow, in this process (module
# docstring). Under a monitor's usual period (15-60 s), so each of its calls probes afresh.
PROBE_SHARE_S = 5.0
# Each broker probe: one retry after a short pause (a blip is not an outage), each attempt bounded.
BROKER_CONNECT_TIMEOUT_S = 2.0
BROKER_RETRY_PAUSE_S = 0.2
CACHE_KEY = "gpgpu:healthz"

Check = dict[str, Any]  # one check's JSON object: "status" and its figures


def _failure(dependency: str, exc: BaseException) -> Check:
    """A failed check as the public sees it (the exception's class only); the exception is logged."""
    logger.warning("health: the %s check failed: %s: %s", dependency, type(exc).__name__, exc)
    return {"status": "error", "error": type(exc).__name__}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def _age_s(moment: datetime | None, now: datetime) -> float | None:
    return round((now - moment).total_seconds(), 1) if moment else None


# --- the dependencies -------------------------------------------------------------------------


def _check_database() -> Check:
    started = time.monotonic()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any failure is reported, not raised
        check = _failure("database", exc)
    else:
        check = {"status": "ok"}
    return {**check, "vendor": connection.vendor, "latency_ms": round((time.monotonic() - started) * 1000, 1)}


def _broker_app() -> Celery:
    from marketplace.celery import app

    return app


def _broker_transport() -> str:
    # The scheme only: the URL may carry a password.
    return str(_broker_app().conf.broker_url or settings.CELERY_BROKER_URL).split("://", 1)[0]


def _check_broker() -> Check:
    try:
        with _broker_app().connection_for_write(connect_timeout=BROKER_CONNECT_TIMEOUT_S) as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=BROKER_RETRY_PAUSE_S, timeout=2 * BROKER_CONNECT_TIMEOUT_S
            )
            # A connection that opens is not enough for Redis: ask the server something.
            conn.default_channel  # noqa: B018 - opening the channel talks to the broker
    except Exception as exc:  # any failure is reported, not raised
        return {**_failure("broker", exc), "transport": _broker_transport()}
    return {"status": "ok", "transport": _broker_transport()}


def _check_cache() -> Check:
    """The cache the rate limits count in (Redis when REDIS_URL is set): a write and a read."""
    cache = caches[DEFAULT_CACHE_ALIAS]
    backend = type(cache).__name__  # RedisCache, LocMemCache: the class, never the location
    try:
        cache.set(CACHE_KEY, 1, timeout=30)
        cache.get(CACHE_KEY)
    except Exception as exc:  # any failure is reported, not raised
        return {**_failure("cache", exc), "backend": backend}
    return {"status": "ok", "backend": backend}


def _chain_reader() -> ChainClient:
    from billing.authorizations import chain_reader

    return chain_reader()


def _check_chain() -> Check:
    """The node at CHAIN_RPC_URL: its chain id (checked against CHAIN_ID when that is set) and its
    head block. Runs in a probe thread: no database here."""
    try:
        client = _chain_reader()
        chain_id = client.chain_id()
        head = client.block_number()
    except Exception as exc:  # any failure is reported, not raised
        return _failure("chain", exc)
    return {"status": "ok", "chain_id": chain_id, "head_block": head}


def _watcher_last_block() -> int | None:
    """The last block the deposit watcher read (billing.deposits' cursor), None before its first run."""
    # billing.selectors has no read of the watcher's cursor: the query is here, read only.
    from billing.deposits import CURSOR_NAME
    from billing.models import ChainCursor

    return ChainCursor.objects.filter(name=CURSOR_NAME).values_list("last_block", flat=True).first()


def _start_probes(probes: dict[str, Callable[[], Check]]) -> Callable[[], dict[str, Check]]:
    """Start `probes` side by side, each in a thread; returns the function that collects their
    checks, waiting at most until PROBE_DEADLINE_S after the start: a probe still running then is
    an error "Timeout" (its thread ends on its own, within the probe's own timeout)."""
    deadline = time.monotonic() + PROBE_DEADLINE_S
    pool = ThreadPoolExecutor(max_workers=len(probes), thread_name_prefix="health-probe")
    futures = {name: pool.submit(probe) for name, probe in probes.items()}
    pool.shutdown(wait=False)

    def collect() -> dict[str, Check]:
        wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        results: dict[str, Check] = {}
        for name, future in futures.items():
            if future.done():
                results[name] = future.result()
            else:
                logger.warning("health: the %s check did not answer within %s s", name, PROBE_DEADLINE_S)
                results[name] = {"status": "error", "error": "Timeout"}
        return results

    return collect


_shared_lock = threading.Lock()
_shared: tuple[float, Callable[[], dict[str, Check]]] | None = None  # (started at, collect)


def _remote_checks() -> Callable[[], dict[str, Check]]:
    """The broker and chain probes of this request: those started by a request of this process
    less than PROBE_SHARE_S ago (their collect waits for them, up to their own deadline), else
    new ones."""
    global _shared
    with _shared_lock:
        now = time.monotonic()
        if _shared is None or now - _shared[0] >= PROBE_SHARE_S:
            _shared = (now, _start_probes({"broker": _check_broker, "chain": _check_chain}))
        return _shared[1]


def probes_forget() -> None:
    """Drop the shared probes' results: the next request probes afresh (for tests that change a
    dependency between requests)."""
    global _shared
    with _shared_lock:
        _shared = None


# --- the worker, the periodic tasks and the settlement backlog (all in the database) -----------


def _beat_intervals() -> dict[str, float]:
    """Each task in the beat schedule, with how often beat sends it (seconds)."""
    # Beat entries: values of several types, as Celery reads them (settings._every writes them).
    schedule: dict[str, dict[str, Any]] = settings.CELERY_BEAT_SCHEDULE
    return {str(entry["task"]): float(entry["schedule"]) for entry in schedule.values()}


def _states() -> dict[str, Any]:
    from core.models import PeriodicTaskState

    return {state.name: state for state in PeriodicTaskState.objects.all()}


def _last_activity(state: Any) -> datetime | None:
    """When a worker last took the task: a run started or finished, or one skipped because the
    previous run still held the lock (a long run is not a dead worker)."""
    moments = [m for m in (state.last_started_at, state.last_finished_at, state.last_skipped_at) if m]
    return max(moments) if moments else None


def _worker(state: Any, interval_s: float, now: datetime) -> Check:
    """The heartbeat: `ok` when it ran within STALE_AFTER_INTERVALS intervals, `stale` when it ran
    before that, `missing` when it never ran (beat or every worker down since the first start)."""
    last = _last_activity(state) if state else None
    status = "missing" if last is None else "ok"
    if last is not None and (now - last).total_seconds() > STALE_AFTER_INTERVALS * interval_s:
        status = "stale"
    return {"status": status, "interval_s": interval_s, "last_beat_at": _iso(last), "age_s": _age_s(last, now)}


def _task(state: Any, interval_s: float, now: datetime) -> Check:
    """One periodic task: `never_run` (none recorded yet: a task due every hour waits an hour after
    beat starts), `stale` (not taken for STALE_AFTER_INTERVALS intervals), `failing` (its last
    FAILING_AFTER runs or more failed), else `ok`. `last_success_at` is the end of the last run when
    that run went through; null when it failed (PeriodicTaskState keeps no time of an earlier
    success: `consecutive_failures` says how many runs ago it was)."""
    if state is None:
        return {
            "status": "never_run",
            "interval_s": interval_s,
            "last_run_at": None,
            "last_success_at": None,
            "consecutive_failures": 0,
        }
    last = _last_activity(state)
    if last is None or (now - last).total_seconds() > STALE_AFTER_INTERVALS * interval_s:
        status = "stale"
    elif state.consecutive_failures >= FAILING_AFTER:
        status = "failing"
    else:
        status = "ok"
    return {
        "status": status,
        "interval_s": interval_s,
        "last_run_at": _iso(last),
        "last_success_at": _iso(state.last_finished_at if state.last_ok else None),
        "consecutive_failures": state.consecutive_failures,
    }


def _settlement_backlog(now: datetime) -> dict[str, Any]:
    """What waits to be settled on chain: leases whose charge is not settled yet (all of them, and
    those that ended, with the age of the oldest end) and settlement batches sent or being sent
    but not confirmed (with the age of the oldest)."""
    # billing.selectors has no aggregate of the backlog (leases_unsettled is the settlement
    # engine's capped list, oldest lease first, not oldest end first): the queries are here, over
    # billing's models, read only. The unsettled money is billing's lease_unsettled accounts, as
    # leases_unsettled reads it.
    from billing.models import LedgerAccount, Settlement
    from jobs.models import Lease

    ended = Q(lease__status=Lease.Status.ENDED)
    leases = LedgerAccount.objects.filter(kind=LedgerAccount.Kind.LEASE_UNSETTLED, balance__gt=0).aggregate(
        unsettled=Count("pk"),
        ended=Count("pk", filter=ended),
        oldest_end=Min("lease__ended_at", filter=ended),
    )
    open_statuses = (Settlement.Status.PENDING, Settlement.Status.SUBMITTED)
    batches = Settlement.objects.filter(status__in=open_statuses).aggregate(open=Count("pk"), oldest=Min("created_at"))
    return {
        "unsettled_leases": leases["unsettled"],
        "unsettled_ended_leases": leases["ended"],
        "oldest_unsettled_end_age_s": _age_s(leases["oldest_end"], now),
        "open_settlements": batches["open"],
        "oldest_open_settlement_age_s": _age_s(batches["oldest"], now),
    }


# --- the views ---------------------------------------------------------------------------------


def _unavailable(response: JsonResponse) -> JsonResponse:
    response["Retry-After"] = str(RETRY_AFTER_S)
    return response


@require_GET
def livez(request: HttpRequest) -> JsonResponse:
    """200 {"status": "alive"}: this process answers. Depends on nothing else."""
    return JsonResponse({"status": "alive"})


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """200 {"status": "ready", ...} when the database answers a query; 503 {"status": "unready",
    ...} with Retry-After when it does not. Nothing but the database is asked."""
    database = _check_database()
    if database["status"] != "ok":
        return _unavailable(JsonResponse({"status": "unready", "checks": {"database": database}}, status=503))
    return JsonResponse({"status": "ready", "checks": {"database": database}})


def _ledger() -> dict[str, Any]:
    """The newest ledger check (billing.ledger_check): agreed, differs (how many differences, not
    what: they name accounts), or never run."""
    check = billing_selectors.ledger_check_latest()
    if check is None:
        return {"status": "never_run"}
    return {
        "status": "ok" if check.ok else "differs",
        "checked_at": _iso(check.checked_at),
        "chain_compared": check.chain_compared,
        "block_number": check.block_number,
        "differences": len(check.differences or []),
    }


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The status document (module docstring; README "Health and status" shows one)."""
    started = time.monotonic()
    # The network probes go first, in threads (or shared: _remote_checks); the database's reads
    # meanwhile, here.
    remote = _remote_checks()
    now = timezone.now()
    database = _check_database()
    cache_check = _check_cache()
    intervals = _beat_intervals()
    heartbeat_interval = intervals.pop(HEARTBEAT_TASK)
    # What only the database knows: unknown, not made up, when it cannot be asked.
    worker: Check = {"status": "unknown", "interval_s": heartbeat_interval, "last_beat_at": None, "age_s": None}
    tasks: dict[str, Check] = {name: {"status": "unknown", "interval_s": s} for name, s in sorted(intervals.items())}
    settlement: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    watcher_block: int | None = None
    if database["status"] == "ok":
        try:
            states = _states()
            worker, tasks, settlement, watcher_block, ledger = (
                _worker(states.get(HEARTBEAT_TASK), heartbeat_interval, now),
                {name: _task(states.get(name), s, now) for name, s in sorted(intervals.items())},
                _settlement_backlog(now),
                _watcher_last_block(),
                _ledger(),
            )
        except DATABASE_UNAVAILABLE_ERRORS as exc:  # it went away since the check: down after all
            database = {**database, **_failure("database", exc)}
    checks = {"database": database, **remote(), "cache": cache_check, "worker": worker}
    chain = checks["chain"]
    if chain["status"] == "ok":
        # How far the deposit watcher is behind the node's head (it reads CHAIN_CONFIRMATIONS deep,
        # so CHAIN_CONFIRMATIONS - 1 is as close as it gets).
        chain["lag_blocks"] = chain["head_block"] - watcher_block if watcher_block is not None else None
    checks = {name: checks[name] for name in ("database", "broker", "cache", "chain", "worker")}

    problems = [name for name in ("broker", "cache", "chain") if checks[name]["status"] != "ok"]
    problems += ["worker"] if checks["worker"]["status"] in {"stale", "missing"} else []
    problems += [f"task:{name}" for name, task in tasks.items() if task["status"] in {"stale", "failing"}]
    problems += ["ledger"] if ledger is not None and ledger["status"] == "differs" else []
    down = database["status"] != "ok"
    body = {
        "status": "down" if down else "degraded" if problems else "ok",
        "problems": ["database", *problems] if down else problems,
        "server_time": _iso(now),
        "checks": checks,
        "tasks": tasks,
        "settlement": settlement,
        "ledger": ledger,
        "seconds": round(time.monotonic() - started, 3),
    }
    if down:
        return _unavailable(JsonResponse(body, status=503))
    return JsonResponse(body)
