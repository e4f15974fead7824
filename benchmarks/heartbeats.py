"""Drive the agent's heartbeat (POST /api/agent/v1/heartbeat) over HTTP at several concurrencies.

    createdb -h 127.0.0.1 -U postgres gpgpu_bench
    python benchmarks/heartbeats.py --database-url postgres://postgres@127.0.0.1:5432/gpgpu_bench \\
        --redis-url redis://127.0.0.1:6379/5 --migrate --machines 1000 --concurrency 8,32,128

Registers --machines machines (a direct fill of what registration writes: a Machine row per
machine, offline, holding its credential's digest, so the real `Authorization: Machine …` check
accepts the credentials), starts granian with the project's WSGI app as docker-compose's web
does (DEBUG off, throttles on, --workers processes of --threads threads each, 3 x 4 by default,
--pool connections shared by each worker's threads where given, else one per thread; an access
log line for each request and /metrics' counts in prometheus-client's multiprocess files, unless
--no-access-log or --no-metrics-dir;
benchmarks/heartbeats_wsgi.py adds a statement count to each answer; `--server gunicorn` serves
the same app with gunicorn's gthread worker instead, for comparison) unless --url names a
running server on the same database, sends every machine's first heartbeat (its GPUs are
created then), and then, for each concurrency, keeps that many keep-alive connections busy for
--seconds, each connection heartbeating its own machines in turn (one machine is never sent two
at once).

A heartbeat is what the agent sends (gpgpu_agent.daemon.heartbeat_body): --gpus-per-machine GPUs
with full telemetry (utilization, memory, temperature and power moving a little each time: the
latest telemetry differs on every beat, as on a real machine; each machine's bodies are drawn
before each run, seven of them sent in turn, so that the load generator, on the same cores as
the server, spends its CPU sending them), the agent's idle verdicts (nine
GPUs in ten idle since a fixed time, the rest busy with their owner), the machine facts and the
container capabilities. With --leased-share X a share X of the machines (drawn with the seed) runs
a lease on all its idle GPUs, placed and started through the marketplace's own services
(jobs.services.leases_assign, lease_mark_started) after the first heartbeats, and each sends
one heartbeat listing it before the runs: their heartbeats list it as running, and its GPUs'
telemetry is a renter's workload. Without it no lease runs.
With --beat-interval S each machine heartbeats once every
S seconds on a schedule of its own (the first ones spread over S), as a fleet of agents does:
the offered load is machines / S per second, whatever the answers take; without it each
connection sends its next heartbeat as soon as the last is answered.

One JSON line per concurrency: `heartbeats_per_s`, `p50_ms`, `p95_ms`, `p99_ms` (from the
heartbeat's sending to its answer), `p99_from_due_ms` (with --beat-interval: from when it was
due, so that the wait of a heartbeat whose connection was still busy with the one before counts
too), `errors` (any
answer but 200, or a broken connection), `sql_per_heartbeat` (statements the server sent
through Django's cursors, as its answers say), `full_share` (the share of answers that sent any:
the heartbeats the full path answered, the rest steady), `rows_written_per_heartbeat` and
`commits_per_heartbeat` (PostgreSQL's pg_stat_database deltas over the run: every row any
client inserted, updated or deleted, so approximate), `generator_cpu_share` (the load
generator's CPU time over the run's wall time, in cores: what it took from the machine) and
`server_cpu_ms_per_heartbeat` (the web server's processes' CPU time over the heartbeats answered: a
figure other work on the machine does not change much, unlike the rates; null with --url),
`database_cpu_ms_per_heartbeat` (the same of every PostgreSQL process on this machine, with --url
too; null when the database runs elsewhere: other clients of it count too),
`redis_cpu_ms_per_heartbeat` (the Redis server's CPU time, from its INFO, over the heartbeats:
other clients of it count too), `stack_cpu_ms_per_heartbeat` (web, flush, PostgreSQL and Redis
together: what one heartbeat costs the deployment, the load generator's CPU left out; null when
one is unknown),
`flush_cpu_ms_per_heartbeat` (the CPU time of a process that, during the run, writes what steady
heartbeats leave in Redis every --flush-every seconds, as the liveness sweep does: their times
and their telemetry samples; and, at its start and every --fold-every seconds, folds the idle
forecasts and stores the running machines' predictions, as the fold-idle-stretches task does;
its statements count in the database's figures); and, for a run of at least two
--timeline-every windows (60 s), its `timeline`: each window's heartbeats a second, full share
and p99s (a burst of full heartbeats shows there, not in the run's averages). With --warmup S
each run lasts S seconds longer and its figures leave those first S seconds out (answers that
came in them, and the CPU and row counters are read when they end), but for `errors`,
`statuses`, `sql_per_heartbeat`, `generator_cpu_share` and `flush_cpu_ms_per_heartbeat`, which
are the whole run's; its timeline shows the whole run. The
last line is one JSON summary of them all, with the settings.

The script refuses a database that already holds machines unless --force, and deletes what it
created (machines, their GPUs and telemetry) unless --keep. Give it a database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import queue as queue_module
import random
import resource
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _django import add_server_options, django_setup, free_port, migrations_ready, refuse, web_server_argv
from _proc import children_cpu_seconds, database_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
PATH = "/api/agent/v1/heartbeat"
MACHINES_PER_PROVIDER = 20
MODELS = [("NVIDIA GeForce RTX 4090", 24564), ("NVIDIA A100-SXM4-80GB", 81920), ("NVIDIA L4", 23034)]
CAPABILITIES = {
    "kinds": ["container"],
    "container": {
        "engine": "docker",
        "engine_version": "27.3.1",
        "runtime": "runc",
        "user_namespace": True,
        "network": "filtered",
        "read_only_root": True,
        "limits": {"cpus": 8.0, "memory_mb": 32768, "pids": 4096},
    },
    "process": None,
}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--gpus-per-machine", type=int, default=8)
    parser.add_argument("--concurrency", default="8,32,128", help="comma-separated connection counts")
    parser.add_argument("--seconds", type=float, default=20, help="how long each concurrency runs")
    parser.add_argument("--database-url", help="the database (default: DATABASE_URL); PostgreSQL for figures")
    parser.add_argument("--redis-url", help="the cache, for the rate limits (default: REDIS_URL)")
    parser.add_argument("--url", help="a running server on the same database, instead of starting one")
    add_server_options(
        parser,
        workers=3,
        threads=4,
        threads_help="threads per worker, as docker-compose's web (gunicorn: over 1, the gthread worker)",
    )
    parser.add_argument("--generators", type=int, default=1, help="load generator processes")
    parser.add_argument("--keep", action="store_true", help="leave the machines in the database")
    parser.add_argument("--force", action="store_true", help="run even if the database holds machines")
    parser.add_argument("--migrate", action="store_true", help="apply unapplied migrations first")
    parser.add_argument("--seed", type=int, default=20260114)
    parser.add_argument(
        "--flush-every",
        type=float,
        default=10.0,
        help="seconds between two writes of what steady heartbeats left in Redis (the liveness sweep's, "
        "HEARTBEAT_INTERVAL_S), by a process of its own during each run",
    )
    parser.add_argument(
        "--fold-every",
        type=float,
        default=300.0,
        help="seconds between two folds of the idle forecasts, each followed by the running machines' "
        "predictions (the fold-idle-stretches task's, every 300 s), by the same process, from the start of "
        "each run; 0: never",
    )
    parser.add_argument(
        "--leased-share",
        type=float,
        default=0.0,
        help="the share of the machines that run a lease on their idle GPUs (0 to 1; default 0: none)",
    )
    parser.add_argument(
        "--beat-interval",
        type=float,
        default=0.0,
        help="each machine heartbeats at most once per this many seconds, on a schedule of its own (as agents "
        "do: machines / interval heartbeats per second offered); 0: as fast as the answers come",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=0,
        help="the server's DATABASE_POOL_MAX_SIZE: each worker's threads share a pool of at most this many "
        "database connections (0, as docker-compose's web: a connection per thread)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds at the start of each concurrency's run left out of its latencies, rates, full share and "
        "per-heartbeat CPU figures (the run lasts --warmup + --seconds; its timeline shows it all): the "
        "steady state without the run's first minutes",
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server writes a line for each request, as docker-compose's web does (to a file the run "
        "deletes; to its output, collected by Docker, there)",
    )
    parser.add_argument(
        "--metrics-dir",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server's workers count /metrics' values in prometheus-client's files (multiprocess mode), as "
        "docker-compose's web does (in a directory the run deletes); --no-metrics-dir: in each process's "
        "memory, as the runs before these options did",
    )
    parser.add_argument(
        "--timeline-every",
        type=float,
        default=60.0,
        help="a run of at least two such windows also prints its `timeline`: each window's heartbeats a "
        "second, full share and p99s (from sending and from due)",
    )
    args = parser.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.machines < 1 or not args.levels or min(args.levels) < 1:
        parser.error("--machines and every --concurrency must be at least 1")
    if not 1 <= args.gpus_per_machine <= 64:
        parser.error("--gpus-per-machine must be between 1 and 64")
    if not 0 <= args.leased_share <= 1:
        parser.error("--leased-share must be between 0 and 1")
    if args.warmup < 0 or args.seconds <= 0:
        parser.error("--seconds must be positive and --warmup at least 0")
    if max(args.levels) > args.machines:
        parser.error("each connection needs a machine of its own: --machines must be at least the concurrency")
    return args


def _setup(args: argparse.Namespace) -> None:
    django_setup(database_url=args.database_url, redis_url=args.redis_url or None)


def _check_database(args: argparse.Namespace) -> None:
    migrations_ready(migrate=args.migrate)
    from providers.models import Machine

    if not args.force and Machine.objects.exists():
        refuse("the database already holds machines; use a database of its own, or pass --force.")


def _register(args: argparse.Namespace, tag: str) -> tuple[dict[str, list[int]], list[str]]:
    """Write what machine_register writes for each machine (an offline Machine row holding its
    credential's digest); returns the ids created and the raw credentials."""
    from django.contrib.auth import get_user_model

    from providers.models import Machine, Provider
    from providers.services import MACHINE_CREDENTIAL_PREFIX, secret_digest

    user_model = get_user_model()
    n_providers = (args.machines + MACHINES_PER_PROVIDER - 1) // MACHINES_PER_PROVIDER
    users = user_model.objects.bulk_create([user_model(username=f"{tag}-p{i}") for i in range(n_providers)])
    providers = Provider.objects.bulk_create([Provider(user=u, display_name=u.username) for u in users])
    credentials = [MACHINE_CREDENTIAL_PREFIX + secrets.token_urlsafe(32) for _ in range(args.machines)]
    machines = Machine.objects.bulk_create(
        [
            Machine(
                provider=providers[i // MACHINES_PER_PROVIDER],
                hostname=f"{tag}-host-{i}",
                credential_digest=secret_digest(raw),
                agent_version="0.1.0",
                status=Machine.Status.OFFLINE,
            )
            for i, raw in enumerate(credentials)
        ],
        batch_size=2000,
    )
    created = {"users": [u.pk for u in users], "providers": [p.pk for p in providers]}
    created["machines"] = [m.pk for m in machines]
    return created, credentials


def _cleanup(created: dict[str, list[int]]) -> None:
    from django.contrib.auth import get_user_model
    from django.db import transaction

    from jobs.models import Event, Job, Lease, LeaseGPU, Renter
    from providers.models import GPU, IdleStretch, Machine, Provider, TelemetrySample

    with transaction.atomic():
        leases = Lease.objects.filter(machine__provider_id__in=created["providers"])
        Event.objects.filter(job__renter_id__in=created.get("renters", [])).delete()
        LeaseGPU.objects.filter(lease__in=leases).delete()
        leases.delete()
        Job.objects.filter(renter_id__in=created.get("renters", [])).delete()
        Renter.objects.filter(pk__in=created.get("renters", [])).delete()
        TelemetrySample.objects.filter(gpu__machine__provider_id__in=created["providers"]).delete()
        IdleStretch.objects.filter(machine__provider_id__in=created["providers"]).delete()
        GPU.objects.filter(machine__provider_id__in=created["providers"]).delete()
        Machine.objects.filter(provider_id__in=created["providers"]).delete()
        Provider.objects.filter(pk__in=created["providers"]).delete()
        get_user_model().objects.filter(pk__in=created["users"]).delete()


def _pg_counters() -> dict[str, int] | None:
    """This database's commits and rows written so far (pg_stat_database), or None off PostgreSQL.
    Backends report their counts at most once a second: wait a little before reading."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return None
    time.sleep(1.5)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
        commits, rows = cursor.fetchone()
    return {"commits": int(commits), "rows": int(rows)}


def _leases_place(args: argparse.Namespace, tag: str, created: dict[str, list[int]], machines: list[_Machine]) -> None:
    """Give a share --leased-share of the machines (drawn with the seed) a running lease on all
    their idle GPUs, through the marketplace's services, and list it in their heartbeats."""
    from decimal import Decimal

    from django.contrib.auth import get_user_model
    from django.db import transaction

    from jobs.models import Job, Renter
    from jobs.services import Placement, lease_mark_started, leases_assign
    from providers.models import GPU

    chosen = random.Random(args.seed + 1).sample(range(len(machines)), round(args.leased_share * len(machines)))
    if not chosen:
        return
    user = get_user_model().objects.create(username=f"{tag}-renter")
    created["users"].append(user.pk)
    renter = Renter.objects.create(user=user, display_name=user.username)
    created["renters"] = [renter.pk]
    gpu_ids: dict[str, int] = dict(
        GPU.objects.filter(machine_id__in=[created["machines"][i] for i in chosen]).values_list("uuid", "pk")
    )
    placements = []
    for i in chosen:
        idle = [gpu for gpu in machines[i].gpus if not gpu["busy"]]
        if not idle:
            continue
        job = Job.objects.create(
            renter=renter,
            name=f"{tag}-job-{i}",
            image="pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime",
            command=["python", "train.py"],
            gpu_count=len(idle),
            max_price_per_gpu_hour=Decimal("1.00"),
            expected_duration_s=3600,
            max_duration_s=7200,
        )
        gpus = tuple(gpu_ids[str(gpu["uuid"])] for gpu in idle)
        placements.append((i, Placement(job.pk, created["machines"][i], gpus, Decimal("0.50"))))
    with transaction.atomic():
        written = leases_assign(placements=[p for _, p in placements], actor="benchmark")
    for i, placement in placements:
        lease_id = written[placement.job_id]
        lease_mark_started(lease_id=lease_id, actor="benchmark")
        machines[i].lease_run(lease_id)


# --- the server -------------------------------------------------------------------------------


def _server_start(args: argparse.Namespace, scratch: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The web server, as docker-compose's web runs it (unless --no-access-log, --no-metrics-dir):
    its access log written to a file in `scratch`, its workers' metrics kept in prometheus-client's
    files in a directory there."""
    port = free_port()
    env = {
        **os.environ,
        "DEBUG": "false",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "DATABASE_POOL_MAX_SIZE": str(args.pool),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("METRICS_MULTIPROC_DIRS", None)
    if args.metrics_dir:
        (scratch / "metrics").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(scratch / "metrics")
    argv = web_server_argv(
        args.server,
        "heartbeats_wsgi:application",
        port=port,
        workers=args.workers,
        threads=args.threads,
        access_log=args.access_log,
    )
    with (scratch / "access.log").open("wb") as log:  # the server keeps its own descriptor
        stdout = log if args.access_log else None
        server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout)  # noqa: S603 - our own interpreter and arguments
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            refuse(f"{args.server} stopped while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, url
        except OSError:
            time.sleep(0.2)
    server.terminate()
    refuse(f"{args.server} did not start listening within 60 s")
    raise AssertionError  # unreachable


# --- the load generator -------------------------------------------------------------------------


# How many bodies of each machine a run sends in turn (their telemetry drawn apart): a machine's
# consecutive heartbeats differ, as a real one's do.
VARIANTS = 7


class _Machine:
    """One machine's heartbeat, with telemetry that moves a little on every beat."""

    def __init__(self, number: int, credential: str, gpus: int, rng: random.Random, idle_since: datetime) -> None:
        model, vram = MODELS[number % len(MODELS)]
        self.auth = f"Machine {credential}"
        self.rng = rng
        self.gpus = [
            {
                "uuid": f"GPU-{number:08x}-{index:04x}-{secrets.token_hex(6)}",
                "index": index,
                "model": model,
                "vram_mb": vram,
                "busy": rng.random() < 0.1,
            }
            for index in range(gpus)
        ]
        self.idle_since = idle_since.isoformat().replace("+00:00", "Z")
        self.leases: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []  # render()'s

    def render(self, salt: int) -> None:
        """Draw VARIANTS bodies afresh (the telemetry's random stream seeded with `salt`), which
        the machine's heartbeats then send in turn: rendered before a run, not during it, so
        that the load generator's CPU (on the same cores as the server) goes to sending."""
        self.rng.seed(salt)
        self.bodies = [self.body() for _ in range(VARIANTS)]

    def lease_run(self, lease_id: int) -> None:
        """The machine runs this lease on its idle GPUs: listed as running, their telemetry a
        renter's workload (the owner stays away: still idle since the same time)."""
        self.leases = [{"lease_id": lease_id, "state": "running"}]

    def body(self) -> bytes:
        rng = self.rng
        gpus = []
        for gpu in self.gpus:
            busy = gpu["busy"]
            working = busy or bool(self.leases)  # the owner's work, or a renter's
            gpus.append(
                {
                    "uuid": gpu["uuid"],
                    "index": gpu["index"],
                    "model": gpu["model"],
                    "vram_mb": gpu["vram_mb"],
                    "memory_used_mb": rng.randint(8000, 20000) if working else rng.randint(0, 4),
                    "utilization_pct": float(rng.randint(60, 100) if working else rng.randint(0, 1)),
                    "temperature_c": float(rng.randint(60, 80) if working else rng.randint(30, 38)),
                    "power_w": round(rng.uniform(250, 420) if working else rng.uniform(18, 30), 3),
                    "idle": not busy,
                    "idle_since": None if busy else self.idle_since,
                    "owner_busy": busy,
                }
            )
        return json.dumps(
            {
                "agent_version": "0.1.0",
                "driver_version": "550.54.15",
                "cuda_version": "12.4",
                "cpu_cores": 32,
                "region": "eu-west",
                "gpus": gpus,
                "leases": self.leases,
                "capabilities": CAPABILITIES,
            }
        ).encode()


async def _connection(
    host: str,
    port: int,
    machines: Sequence[_Machine],
    until: float,
    out: dict[str, Any],
    once: bool,
    beat_interval: float = 0.0,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    # With a beat interval, the machines' first heartbeats are spread over it, and each machine's
    # next is due one interval after its last was due (a late answer does not move the schedule).
    start = time.perf_counter()  # the clock of `started` and `ended` below
    due = [start + beat_interval * i / max(1, len(machines)) for i in range(len(machines))]
    beats = 0
    try:
        while True:
            beats += 1
            for number, machine in enumerate(machines):
                intended = None
                if beat_interval > 0 and not once:
                    intended = due[number]
                    wait = intended - time.perf_counter()
                    due[number] += beat_interval
                    if wait > 0:
                        await asyncio.sleep(wait)
                if not once and time.monotonic() >= until:
                    return
                body = machine.bodies[beats % len(machine.bodies)]
                request = f"{head}Authorization: {machine.auth}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                started = time.perf_counter()
                try:
                    writer.write(request + body)
                    status, headers = await _read_head(reader)
                    await reader.readexactly(int(headers.get("content-length", "0")))
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    out["errors"] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                ended = time.perf_counter()
                out["latencies"].append(ended - started)
                out["ended"].append(ended)
                # From when it was due: a late answer delays the connection's next heartbeats,
                # which the latency from their sending leaves out.
                out["from_due"].append(ended - min(started, intended) if intended is not None else ended - started)
                if status != 200:
                    out["errors"] += 1
                    out["statuses"][status] = out["statuses"].get(status, 0) + 1
                sql = headers.get("x-bench-sql-statements")
                if sql is not None and status == 200:
                    out["sql"] += int(sql)
                    out["counted_ended"].append(ended)
                    if int(sql) > 0:
                        out["full_ended"].append(ended)
                if headers.get("connection") == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
            if once:
                return
    finally:
        writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


# What a generator measures: a value per answer (latencies, from due, when it ended; when each
# one whose statements were counted, and each full one, ended), and counts (CPU seconds: its own).
_SERIES = ("latencies", "from_due", "ended", "counted_ended", "full_ended")
_COUNTS = ("errors", "sql", "cpu_s")


def _tally() -> dict[str, Any]:
    return {**{key: [] for key in _SERIES}, **dict.fromkeys(_COUNTS, 0), "statuses": {}}


def _generate(
    url: str,
    machines: list[_Machine],
    connections: int,
    seconds: float,
    once: bool,
    queue: Any,
    beat_interval: float = 0.0,
) -> None:
    """One generator process: `connections` keep-alive connections, each with its share of
    `machines`; puts what it measured on `queue`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    out = _tally()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    until = time.monotonic() + seconds

    async def run() -> None:
        await asyncio.gather(
            *(
                _connection(host, port, machines[i::connections], until, out, once, beat_interval)
                for i in range(connections)
            )
        )

    asyncio.run(run())
    used = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = used.ru_utime - cpu.ru_utime + used.ru_stime - cpu.ru_stime
    queue.put(out)


def _drive(
    url: str,
    machines: list[_Machine],
    concurrency: int,
    generators: int,
    seconds: float,
    once: bool = False,
    beat_interval: float = 0.0,
    warmup: float = 0.0,
    at_warmup: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run `concurrency` connections over `generators` processes (forked: they share the
    machines' bodies) for `warmup` + `seconds`, calling `at_warmup` once the warm-up is over,
    and add up what they measured."""
    from django.db import connections as db_connections

    db_connections.close_all()  # no database connection crosses the fork
    # Each run's bodies drawn afresh: a run that replayed the telemetry of the one before would
    # send reports that write nothing.
    salt = secrets.randbits(64)
    for number, machine in enumerate(machines):
        machine.render(salt + number)
    procs = min(generators, concurrency)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = []
    started = time.perf_counter()
    for p in range(procs):
        share = concurrency // procs + (1 if p < concurrency % procs else 0)
        child = context.Process(
            target=_generate, args=(url, machines[p::procs], share, warmup + seconds, once, queue, beat_interval)
        )
        child.start()
        children.append(child)
    results = []
    if at_warmup is not None:
        try:  # a generator puts what it measured when its run is over, so this waits the warm-up out
            results.append(queue.get(timeout=max(0.0, started + warmup - time.perf_counter())))
        except queue_module.Empty:
            pass
        at_warmup()
    results += [queue.get() for _ in range(len(children) - len(results))]
    wall = time.perf_counter() - started
    for child in children:
        child.join()
    total = _tally()
    for r in results:
        for key in _SERIES:
            total[key].extend(r[key])
        for key in _COUNTS:
            total[key] += r[key]
        for status, n in r["statuses"].items():
            total["statuses"][status] = total["statuses"].get(status, 0) + n
    total["wall_s"] = wall
    total["started"] = started
    total["measured_from"] = started + warmup
    return total


def _measured(run: dict[str, Any]) -> dict[str, Any]:
    """What the run answered after its warm-up (all of it without one): `latencies`,
    `from_due`, `full` (the heartbeats the full path answered) of `counted` (those whose
    statements were counted), and the `seconds` it lasted."""
    cut = run["measured_from"]
    kept = [i for i, ended in enumerate(run["ended"]) if ended >= cut]
    return {
        "latencies": [run["latencies"][i] for i in kept],
        "from_due": [run["from_due"][i] for i in kept],
        "full": sum(1 for ended in run["full_ended"] if ended >= cut),
        "counted": sum(1 for ended in run["counted_ended"] if ended >= cut),
        "seconds": run["wall_s"] - (cut - run["started"]),
    }


def _timeline(run: dict[str, Any], every: float) -> list[dict[str, Any]]:
    """The run in windows of `every` seconds (by when each answer came; perf_counter, the same
    clock in the generators' forked processes): heartbeats answered a second, the full ones'
    share, the p99 latency from sending and from due."""
    windows = max(1, round(run["wall_s"] / every))  # the run's last fraction of a second in the last
    latencies: list[list[float]] = [[] for _ in range(windows)]
    from_due: list[list[float]] = [[] for _ in range(windows)]
    full = [0] * windows
    for ended, latency, late in zip(run["ended"], run["latencies"], run["from_due"], strict=True):
        window = min(windows - 1, int((ended - run["started"]) / every))
        latencies[window].append(latency)
        from_due[window].append(late)
    for ended in run["full_ended"]:
        full[min(windows - 1, int((ended - run["started"]) / every))] += 1
    rows = []
    for window, answered in enumerate(latencies):
        span = every if window < windows - 1 else run["wall_s"] - window * every
        answered.sort()
        rows.append(
            {
                "until_s": round(window * every + span),
                "heartbeats_per_s": round(len(answered) / span, 1) if span > 0 else None,
                "full_share": round(full[window] / len(answered), 4) if answered else None,
                "p99_ms": _percentile(answered, 0.99),
                "p99_from_due_ms": _percentile(sorted(from_due[window]), 0.99),
            }
        )
    return rows


def _flush_once() -> None:
    from django.db import transaction

    from providers import heartbeat_steady

    with transaction.atomic():
        pass  # a connection, so that the flush's errors are the flush's
    heartbeat_steady.flush()


def _fold_once() -> None:
    from providers.tasks import fold_idle_stretches

    fold_idle_stretches()


def _flush_loop(every: float, fold_every: float, stop: Any, queue: Any) -> None:
    """The worker's share: what steady heartbeats leave in Redis (their times, their samples)
    written every `every` seconds, and once more at the end; the idle forecasts folded and the
    running machines' predictions stored at the start and every `fold_every` seconds (0: never);
    puts its CPU seconds on `queue`."""
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    folded_at = -math.inf
    while True:
        if fold_every > 0 and time.monotonic() - folded_at >= fold_every:
            folded_at = time.monotonic()
            _fold_once()
        if stop.wait(every):
            break
        _flush_once()
    _flush_once()
    used = resource.getrusage(resource.RUSAGE_SELF)
    queue.put(used.ru_utime - cpu.ru_utime + used.ru_stime - cpu.ru_stime)


class _Flusher:
    """A forked process running _flush_loop while a run lasts."""

    def __init__(self, every: float, fold_every: float) -> None:
        from django.db import connections as db_connections

        db_connections.close_all()  # no database connection crosses the fork
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._queue = context.Queue()
        self._process = context.Process(target=_flush_loop, args=(every, fold_every, self._stop, self._queue))
        self._process.start()

    def stop(self) -> float:
        self._stop.set()
        cpu = float(self._queue.get())
        self._process.join()
        return cpu


def _counters(server: subprocess.Popen[bytes] | None) -> dict[str, Any]:
    """The CPU seconds the web server's processes, PostgreSQL and Redis have used so far, and
    PostgreSQL's row and commit counters (None where unknown)."""
    return {
        "server": children_cpu_seconds(server.pid) if server is not None else None,
        "database": database_cpu_seconds(),
        "redis": _redis_cpu_seconds(),
        "pg": _pg_counters(),
    }


def _per_heartbeat(before: dict[str, Any], after: dict[str, Any], key: str, n: int, digits: int) -> float | None:
    """Milliseconds of a _counters CPU figure between `before` and `after` over `n` heartbeats
    (None where it is unknown)."""
    was, now = before[key], after[key]
    return round(1000 * (now - was) / n, digits) if was is not None and now is not None and n else None


def _redis_cpu_seconds() -> float | None:
    """CPU seconds (user and system) the Redis server has used so far (INFO cpu), where the
    marketplace's Redis is set and answers; None otherwise."""
    from django.conf import settings

    if not settings.REDIS_URL:
        return None
    import redis

    try:
        info = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5).info("cpu")
    except (redis.RedisError, OSError):
        return None
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _percentile(ordered: list[float], share: float) -> float | None:
    if not ordered:
        return None
    return round(1000 * ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))], 1)


def main() -> None:
    args = _parse()
    _setup(args)
    _check_database(args)
    from django.db import connection

    tag = f"hb{int(time.time())}"
    setup_started = time.perf_counter()
    created, credentials = _register(args, tag)
    rng = random.Random(args.seed)
    idle_since = datetime.now(UTC) - timedelta(hours=1)
    machines = [
        _Machine(i, raw, args.gpus_per_machine, random.Random(rng.random()), idle_since)
        for i, raw in enumerate(credentials)
    ]
    server = None
    rows: list[dict[str, Any]] = []
    scratch = tempfile.TemporaryDirectory(prefix="gpgpu-heartbeats-")
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            server, url = _server_start(args, Path(scratch.name))
        first = _drive(url, machines, min(32, args.machines), args.generators, 0, once=True)
        if first["errors"]:
            refuse(f"{first['errors']} of the first heartbeats failed (statuses {first['statuses']})")
        _leases_place(args, tag, created, machines)
        running = [m for m in machines if m.leases]
        if running:  # their first heartbeat listing the lease (the full one its assignment calls for)
            first = _drive(url, running, min(32, len(running)), args.generators, 0, once=True)
            if first["errors"]:
                refuse(f"{first['errors']} of the leased machines' first heartbeats failed ({first['statuses']})")
        setup_seconds = time.perf_counter() - setup_started
        _flush_once()  # what the setup's heartbeats left in Redis
        for concurrency in args.levels:
            marks = {"before": _counters(server)}

            def warmed_up(marks: dict[str, dict[str, Any]] = marks) -> None:
                marks["before"] = _counters(server)

            flusher = _Flusher(args.flush_every, args.fold_every)
            run = _drive(
                url,
                machines,
                concurrency,
                args.generators,
                args.seconds,
                beat_interval=args.beat_interval,
                warmup=args.warmup,
                at_warmup=warmed_up if args.warmup > 0 else None,
            )
            flush_cpu = flusher.stop()
            before, after = marks["before"], _counters(server)
            measured = _measured(run)
            n = len(measured["latencies"])
            ordered = sorted(measured["latencies"])

            counted = len(run["counted_ended"])
            row: dict[str, Any] = {
                "concurrency": concurrency,
                "heartbeats": n,
                "heartbeats_per_s": round(n / measured["seconds"], 1),
                "p50_ms": _percentile(ordered, 0.50),
                "p95_ms": _percentile(ordered, 0.95),
                "p99_ms": _percentile(ordered, 0.99),
                "p99_from_due_ms": (
                    _percentile(sorted(measured["from_due"]), 0.99) if args.beat_interval > 0 else None
                ),
                "errors": run["errors"],
                "statuses": run["statuses"],
                "sql_per_heartbeat": round(run["sql"] / counted, 2) if counted else None,
                "full_share": round(measured["full"] / measured["counted"], 4) if measured["counted"] else None,
                "rows_written_per_heartbeat": None,
                "commits_per_heartbeat": None,
                "generator_cpu_share": round(run["cpu_s"] / run["wall_s"], 2),
                "server_cpu_ms_per_heartbeat": _per_heartbeat(before, after, "server", n, 2),
                # the flusher's CPU is known for the whole run only: over the whole run's heartbeats
                "flush_cpu_ms_per_heartbeat": (
                    round(1000 * flush_cpu / len(run["latencies"]), 3) if run["latencies"] else None
                ),
                "database_cpu_ms_per_heartbeat": _per_heartbeat(before, after, "database", n, 2),
            }
            if args.warmup > 0:
                row["warmup_s"] = args.warmup
            if args.warmup + args.seconds >= 2 * args.timeline_every:
                row["timeline"] = _timeline(run, args.timeline_every)
            row["redis_cpu_ms_per_heartbeat"] = _per_heartbeat(before, after, "redis", n, 3)
            parts = [
                row[name]
                for name in (
                    "server_cpu_ms_per_heartbeat",
                    "flush_cpu_ms_per_heartbeat",
                    "database_cpu_ms_per_heartbeat",
                    "redis_cpu_ms_per_heartbeat",
                )
            ]
            row["stack_cpu_ms_per_heartbeat"] = round(sum(parts), 2) if None not in parts else None
            if before["pg"] is not None and after["pg"] is not None and n:
                row["rows_written_per_heartbeat"] = round((after["pg"]["rows"] - before["pg"]["rows"]) / n, 2)
                row["commits_per_heartbeat"] = round((after["pg"]["commits"] - before["pg"]["commits"]) / n, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        scratch.cleanup()
        if not args.keep:
            _cleanup(created)
    kind = "" if args.server == "granian" else f" {'gthread' if args.threads > 1 else 'sync'}"
    server_desc = args.url or f"{args.server}{kind} x{args.workers}"
    if args.threads > 1:
        server_desc += f" x{args.threads} threads"
    if args.pool:
        server_desc += f", a pool of {args.pool} connections a worker"
    if not args.url:
        server_desc += ", access log" if args.access_log else ", no access log"
        server_desc += ", metrics in files" if args.metrics_dir else ", metrics in memory"
    print(
        json.dumps(
            {
                "summary": rows,
                "machines": args.machines,
                "gpus_per_machine": args.gpus_per_machine,
                "seconds": args.seconds,
                "warmup_s": args.warmup,
                "beat_interval_s": args.beat_interval,
                "leased_share": args.leased_share,
                "server": server_desc,
                "generators": args.generators,
                "setup_seconds": round(setup_seconds, 1),
                "database": f"{connection.vendor}:{connection.settings_dict['NAME']}",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
