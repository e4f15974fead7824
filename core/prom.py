"""Request-path metrics: what happens in a request or a task and leaves no row to read at scrape
time (heartbeats received and how long they took, the agent API's errors, match cycles). They
are counted where they happen, by any app (this module is in core so every layer may import
it), and /metrics (marketplace.metrics) adds them to the figures it reads from the database.

One process or many:

- Without PROMETHEUS_MULTIPROC_DIR (tests, the demo, `runserver`) the counts live in this
  process's memory (REGISTRY) and /metrics shows this process's counts.
- With PROMETHEUS_MULTIPROC_DIR (docker-compose's `web` and `worker`), prometheus-client's
  multiprocess mode: every process writes its values to files in that directory (the choice is
  made when prometheus_client is first imported, so the variable must be in the environment
  before the process starts), and /metrics adds up the files of every directory in
  METRICS_MULTIPROC_DIRS (default: PROMETHEUS_MULTIPROC_DIR alone), and of their immediate
  subdirectories. Compose gives web and the Celery worker a directory each on one shared volume
  and has web read both: the match cycles run in the worker, the heartbeats in granian's
  workers. Each replica of a scaled service writes into a subdirectory named after its
  container's hostname (two containers' processes may share a pid, and the files are named by
  pid), and empties it when it starts (web's and worker's commands), since the files of a
  previous run would otherwise be added to the new one's. A removed replica's files stay and
  keep adding its counts: counters never go back.

Only counters and histograms: they add up across processes without asking which are alive.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
READ_DIRS_ENV = "METRICS_MULTIPROC_DIRS"


def _multiproc_dir_ready() -> None:
    """Make PROMETHEUS_MULTIPROC_DIR when it is set and missing: prometheus-client opens its files
    there as each metric below is created, and a missing directory would stop the process at
    import with a bare FileNotFoundError (a one-off `manage.py` command run with web's
    environment outside its container, say)."""
    path = os.environ.get(MULTIPROC_DIR_ENV, "")
    if not path:
        return
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"{MULTIPROC_DIR_ENV}={path!r} is not a directory this process can make: {exc}") from exc


_multiproc_dir_ready()

# No `<name>_created` series: multiprocess mode has none, and the same scrape should look the
# same in both modes (in the classic text format they are extra gauges nothing here reads).
disable_created_metrics()

# This process's metrics; never prometheus_client's global REGISTRY (whose process and platform
# collectors would describe one web worker as if it were the marketplace).
REGISTRY = CollectorRegistry(auto_describe=True)

HEARTBEAT_OUTCOMES = ("ok", "refused", "error")
HEARTBEATS = Counter(
    "gpgpu_agent_heartbeats",
    "Agent heartbeats received, by outcome: ok (answered 2xx), refused (401, 403 or 429: turned away "
    "before the report was read) or error (any other answer, or the request failed).",
    ["outcome"],
    registry=REGISTRY,
)
HEARTBEAT_SECONDS = Histogram(
    "gpgpu_agent_heartbeat_seconds",
    "Time the marketplace took to answer an agent heartbeat, whatever the outcome.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
AGENT_API_ERRORS = Counter(
    "gpgpu_agent_api_errors",
    "Error answers (4xx and 5xx) under /api/agent/, by the error body's code.",
    ["code"],
    registry=REGISTRY,
)
MATCH_CYCLES = Counter("gpgpu_match_cycles", "Match cycles run to the end.", registry=REGISTRY)
MATCH_CYCLE_SECONDS = Histogram(
    "gpgpu_match_cycle_seconds",
    "How long a match cycle took.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
MATCH_PLACEMENTS = Counter("gpgpu_match_placements", "Jobs match cycles placed on GPUs.", registry=REGISTRY)

# Every outcome from the start, at zero: rate() then has a series to work on before the first
# refusal, and an alert on "no ok heartbeats" is not silenced by the series being absent.
for _outcome in HEARTBEAT_OUTCOMES:
    HEARTBEATS.labels(_outcome)


def heartbeat_outcome(status_code: int) -> str:
    """The `outcome` label for a heartbeat answered with `status_code`."""
    if 200 <= status_code < 300:
        return "ok"
    if status_code in (401, 403, 429):
        return "refused"
    return "error"


def heartbeat_observe(*, outcome: str, seconds: float) -> None:
    """Count one heartbeat (`outcome` one of HEARTBEAT_OUTCOMES) and the time its answer took."""
    HEARTBEATS.labels(outcome).inc()
    HEARTBEAT_SECONDS.observe(seconds)


def agent_api_error_count(*, code: str) -> None:
    """Count one error answer of the agent API, by its error code."""
    AGENT_API_ERRORS.labels(code).inc()


def match_cycle_observe(*, seconds: float, placed: int) -> None:
    """Count one finished match cycle, its duration and the jobs it placed."""
    MATCH_CYCLES.inc()
    MATCH_CYCLE_SECONDS.observe(seconds)
    if placed:
        MATCH_PLACEMENTS.inc(placed)


def multiprocess_dirs() -> list[str]:
    """The directories /metrics adds up; empty when this process is not in multiprocess mode."""
    own = os.environ.get(MULTIPROC_DIR_ENV, "").strip()
    if not own:
        return []
    listed = [d.strip() for d in os.environ.get(READ_DIRS_ENV, "").split(",") if d.strip()]
    return listed or [own]


class RequestPathCollector(Collector):
    """The request-path metrics for a scrape: the files of every process in multiprocess mode,
    else this process's REGISTRY (module docstring)."""

    def __init__(self, dirs: Iterable[str] | None = None) -> None:
        self.dirs = list(multiprocess_dirs() if dirs is None else dirs)

    def collect(self) -> Iterator[Metric]:
        if not self.dirs:
            yield from REGISTRY.collect()
            return
        # A directory's own files, and its subdirectories' (one per replica of a scaled service).
        files = [
            path
            for d in self.dirs
            for pattern in ("*.db", os.path.join("*", "*.db"))
            for path in sorted(glob.glob(os.path.join(d, pattern)))
        ]
        yield from MultiProcessCollector.merge(files, accumulate=True)
