"""What the agents' doorbell costs the marketplace: N agents each holding `orders/wait` open.

    createdb -h 127.0.0.1 -U postgres gpgpu_bench
    python benchmarks/doorbell.py --database-url postgres://postgres@127.0.0.1:5432/gpgpu_bench \\
        --redis-url redis://127.0.0.1:6379/3 --migrate --agents 1000

Fills the database with N machines of one idle GPU each (their credentials made as registration
makes them), starts the web server as production would (granian, DEBUG off; a held call holds one of a
worker's blocking threads, not a process) with AGENT_ORDERS_WAIT_S=25, and has N agents hold
their doorbell from one asyncio process (each answered call is made again at once, with the new
`since`, as the agent does). Once every call is held it measures, over --hold-s seconds:

- the server's memory (RSS of granian's main process and workers, and per held call over an idle
  server's), its CPU (all of granian's processes), and the database connections open;
- then --rings times: a lease assigned to one machine by jobs.services.leases_assign (as the
  matcher does), and the time from its commit to that machine's held call answering
  `orders: true`.

`--mode redis` (the default) rings through Redis pub/sub (jobs.doorbell); `--mode poll` runs the
server without REDIS_URL, where each held call asks the database every 0.25 s: the comparison.
Prints one JSON line last. Refuses a database that holds machines unless --force; deletes what it
created unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from _django import add_server_options, django_setup, free_port, migrations_ready, refuse, web_server_argv

ROOT = Path(__file__).resolve().parent.parent
PATH = "/api/agent/v1/orders/wait"
WAIT_S = 25


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""), help="PostgreSQL")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/3"))
    parser.add_argument("--mode", choices=("redis", "poll"), default="redis")
    parser.add_argument("--agents", type=int, default=1000)
    add_server_options(
        parser, workers=2, threads=0, threads_help="threads per worker (default: its share of the agents, and 50)"
    )
    parser.add_argument(
        "--pool", type=int, default=20, help="DATABASE_POOL_MAX_SIZE per worker (0: a connection per thread)"
    )
    parser.add_argument("--hold-s", type=float, default=10.0, help="how long to measure the idle hold")
    parser.add_argument("--rings", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--migrate", action="store_true")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if not args.database_url.startswith("postgres"):
        parser.error("--database-url must name a PostgreSQL database (a held call's cost is measured there)")
    if args.agents < 1 or args.rings < 0:
        parser.error("--agents must be at least 1 and --rings at least 0")
    return args


def _setup(args: argparse.Namespace) -> None:
    os.environ["CELERY_BROKER_URL"] = args.redis_url
    django_setup(database_url=args.database_url, redis_url=args.redis_url if args.mode == "redis" else "")


def _check_database(args: argparse.Namespace) -> None:
    migrations_ready(migrate=args.migrate)
    from providers.models import Machine

    if not args.force and Machine.objects.exists():
        refuse("the database already holds machines: use a database of its own, or pass --force")


def _fill(args: argparse.Namespace, tag: str) -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    from jobs.models import Job, Renter
    from providers.models import GPU, Machine, Provider
    from providers.services import secret_digest

    users = get_user_model().objects.bulk_create(
        [get_user_model()(username=f"{tag}-provider"), get_user_model()(username=f"{tag}-renter")]
    )
    provider = Provider.objects.create(user=users[0], display_name=f"{tag} provider")
    renter = Renter.objects.create(user=users[1], display_name=f"{tag} renter")
    credentials = [f"gpm_{tag}_{i}_{secrets.token_urlsafe(12)}" for i in range(args.agents)]
    machines = Machine.objects.bulk_create(
        [
            Machine(
                provider=provider,
                hostname=f"{tag}-host-{i}",
                credential_digest=secret_digest(raw),
                status=Machine.Status.ONLINE,
                accepts_process=True,
            )
            for i, raw in enumerate(credentials)
        ],
        batch_size=2000,
    )
    gpus = GPU.objects.bulk_create(
        [
            GPU(machine=m, uuid=f"GPU-{tag}-{m.pk}", index=0, model="RTX 4090", vram_mb=24564, state=GPU.State.IDLE)
            for m in machines
        ],
        batch_size=5000,
    )
    jobs = Job.objects.bulk_create(
        [
            Job(
                renter=renter,
                name=f"{tag}-job-{i}",
                kind=Job.Kind.PROCESS,
                command=["python", "train.py"],
                gpu_count=1,
                max_price_per_gpu_hour=Decimal("1.00"),
                expected_duration_s=600,
                max_duration_s=1200,
            )
            for i in range(args.rings)
        ]
    )
    return {
        "users": [u.pk for u in users],
        "machines": [m.pk for m in machines],
        "gpus": {m.pk: g.pk for m, g in zip(machines, gpus, strict=True)},
        "credentials": dict(zip([m.pk for m in machines], credentials, strict=True)),
        "jobs": [j.pk for j in jobs],
        "provider": provider.pk,
        "renter": renter.pk,
    }


def _cleanup(made: dict[str, Any]) -> None:
    from django.contrib.auth import get_user_model

    from jobs.models import Event, Job, Lease, LeaseGPU, Renter
    from providers.models import GPU, Machine, Provider

    leases = Lease.objects.filter(job_id__in=made["jobs"])
    LeaseGPU.objects.filter(lease__in=leases).delete()
    Event.objects.filter(job_id__in=made["jobs"]).delete()
    leases.delete()
    Job.objects.filter(pk__in=made["jobs"]).delete()
    GPU.objects.filter(machine_id__in=made["machines"]).delete()
    Machine.objects.filter(pk__in=made["machines"]).delete()
    Provider.objects.filter(pk=made["provider"]).delete()
    Renter.objects.filter(pk=made["renter"]).delete()
    get_user_model().objects.filter(pk__in=made["users"]).delete()


def _server(args: argparse.Namespace, port: int, threads: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DEBUG": "false",
        "AGENT_ORDERS_WAIT_S": str(WAIT_S),
        "THROTTLE_MACHINE": "off",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "DATABASE_POOL_MAX_SIZE": str(args.pool),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    app = "marketplace.wsgi:application"
    command = web_server_argv(args.server, app, port=port, workers=args.workers, threads=threads, backlog=4096)
    # Our own server, with arguments built here.
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids += _tree(int(child))
    return pids


def _rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def _cpu_s(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _pg_connections() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 1)


class Agents:
    """N agents' doorbells over keep-alive connections, in one asyncio loop."""

    def __init__(self, port: int, credentials: dict[int, str]) -> None:
        self.port = port
        self.credentials = credentials
        self.held: set[int] = set()
        self.answered: dict[int, list[tuple[float, bool]]] = {m: [] for m in credentials}
        self.errors = 0
        self.stop = False

    async def hold(self, machine_id: int) -> None:
        since = datetime.now(UTC).isoformat()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            while not self.stop:
                body = json.dumps({"wait_s": WAIT_S, "since": since}).encode()
                writer.write(
                    (
                        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        f"Authorization: Machine {self.credentials[machine_id]}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
                    ).encode()
                    + body
                )
                await writer.drain()
                self.held.add(machine_id)
                status = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                payload = await reader.readexactly(length) if length else b""
                self.held.discard(machine_id)
                if not status.startswith(b"HTTP/1.1 200"):
                    self.errors += 1
                    await asyncio.sleep(1)
                    continue
                orders = bool(json.loads(payload).get("orders"))
                self.answered[machine_id].append((time.monotonic(), orders))
                since = datetime.now(UTC).isoformat()  # as after the heartbeat the ring asks for
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.errors += 1
            self.held.discard(machine_id)
        finally:
            writer.close()


def _ring(made: dict[str, Any], machine_id: int, job_id: int) -> float:
    """Assign a lease on the machine's GPU as the matcher does; returns when it committed."""
    from django.db import transaction

    from jobs.services import Placement, leases_assign

    with transaction.atomic():
        leases_assign(
            placements=[
                Placement(
                    job_id=job_id,
                    machine_id=machine_id,
                    gpu_ids=(made["gpus"][machine_id],),
                    price_per_gpu_hour=Decimal("1.00"),
                )
            ]
        )
    return time.monotonic()


async def _measure(
    args: argparse.Namespace, made: dict[str, Any], server: subprocess.Popen[bytes], port: int
) -> dict[str, Any]:
    pids = _tree(server.pid)
    idle_rss_kb = _rss_kb(pids)
    agents = Agents(port, made["credentials"])
    tasks = []
    started = time.monotonic()
    for machine_id in made["machines"]:
        tasks.append(asyncio.create_task(agents.hold(machine_id)))
        if len(tasks) % 50 == 0:
            await asyncio.sleep(0.05)  # as agents come online: not all in one instant
    while len(agents.held) < args.agents and time.monotonic() - started < 60:
        await asyncio.sleep(0.2)
    held_after_s = time.monotonic() - started
    await asyncio.sleep(1.0)
    pids = _tree(server.pid)
    cpu_before, wall_before = _cpu_s(pids), time.monotonic()
    client_cpu_before = time.process_time()
    connections = []
    while time.monotonic() - wall_before < args.hold_s:
        await asyncio.sleep(1.0)
        connections.append(await asyncio.to_thread(_pg_connections))
    hold_wall = time.monotonic() - wall_before
    server_cpu_pct = 100 * (_cpu_s(pids) - cpu_before) / hold_wall
    client_cpu_pct = 100 * (time.process_time() - client_cpu_before) / hold_wall
    rss_kb = _rss_kb(pids)
    held_during = len(agents.held)

    latencies: list[float] = []
    rng = random.Random(args.seed)
    for job_id, machine_id in zip(made["jobs"], rng.sample(made["machines"], args.rings), strict=True):
        before = len(agents.answered[machine_id])
        committed = await asyncio.to_thread(_ring, made, machine_id, job_id)
        deadline = time.monotonic() + WAIT_S + 5
        while time.monotonic() < deadline:
            answers = agents.answered[machine_id][before:]
            rung = [at for at, orders in answers if orders]
            if rung:
                latencies.append(max(0.0, rung[0] - committed))
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
    agents.stop = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "agents": args.agents,
        "mode": args.mode,
        "workers": args.workers,
        "server": args.server,
        "threads": args.threads,
        "pool": args.pool,
        "held": held_during,
        "all_held_after_s": round(held_after_s, 1),
        "server_rss_mb": round(rss_kb / 1024, 1),
        "server_rss_idle_mb": round(idle_rss_kb / 1024, 1),
        "rss_kb_per_held_call": round((rss_kb - idle_rss_kb) / max(1, held_during), 1),
        "server_cpu_pct": round(server_cpu_pct, 1),
        "load_generator_cpu_pct": round(client_cpu_pct, 1),
        "pg_connections_max": max(connections) if connections else None,
        "rings": len(latencies),
        "rings_missed": args.rings - len(latencies),
        "ring_to_answer_p50_ms": _percentile(latencies, 0.5),
        "ring_to_answer_p95_ms": _percentile(latencies, 0.95),
        "ring_to_answer_max_ms": _percentile(latencies, 1.0),
        "errors": agents.errors,
    }


def main() -> int:
    args = _args()
    args.threads = args.threads or (args.agents // args.workers + 50)
    _setup(args)
    _check_database(args)
    tag = f"bell{secrets.token_hex(3)}"
    fill_started = time.monotonic()
    made = _fill(args, tag)
    setup_s = time.monotonic() - fill_started
    port = free_port()
    server = _server(args, port, args.threads)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                sys.exit(f"{args.server} exited: " + (server.stderr.read().decode()[-2000:] if server.stderr else ""))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"{args.server} did not start listening within 60 s")
                time.sleep(0.2)
        time.sleep(2.0)  # the workers have booted
        result = asyncio.run(_measure(args, made, server, port))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        if not args.keep:
            _cleanup(made)
    result["setup_seconds"] = round(setup_s, 1)
    print(json.dumps(result))
    return 0 if result["rings_missed"] == 0 and result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
