"""The Python a steady heartbeat costs web, without the web server: the marketplace's WSGI app
(marketplace.wsgi.application, the steady answer in front of Django's handler) called in this
process, one heartbeat after another.

    createdb -h 127.0.0.1 -U postgres gpgpu_bench
    python benchmarks/heartbeat_python.py --database-url postgres://postgres@127.0.0.1:5432/gpgpu_bench \\
        --redis-url redis://127.0.0.1:6379/5 --migrate

Registers --machines machines as benchmarks/heartbeats.py does (the same bodies: 8 GPUs with
full telemetry, nine in ten idle), sends each its first (full) heartbeat and a second, then
--warmup steady heartbeats, then times --calls more, the machines in turn, each a body of its own
(its telemetry moved). `heartbeats.py` measures what web spends per heartbeat with granian, HTTP
and the kernel's sockets; this measures the app's share of it alone: the difference is the
server's. With --profile it prints cProfile's top functions (which roughly doubles the time).

One JSON line: `calls`, `cpu_ms_per_heartbeat` (this process's user and system CPU over the calls:
the app's Python, the Redis client's, and the kernel's for its socket), `wall_ms_per_heartbeat`
(with the wait on Redis), `statuses`. Redis's own CPU is not in it. Give it a database and a
Redis database of its own: it refuses a database that holds machines unless --force and deletes
the rows it created; what its heartbeats left in Redis (records, queued samples) stays there.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from _django import django_setup
from heartbeats import _check_database, _cleanup, _Machine, _register


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="the database (default: DATABASE_URL)")
    parser.add_argument("--redis-url", help="Redis, where steady heartbeats are answered (default: REDIS_URL)")
    parser.add_argument("--machines", type=int, default=300)
    parser.add_argument("--calls", type=int, default=30000, help="steady heartbeats timed")
    parser.add_argument("--warmup", type=int, default=2000, help="steady heartbeats sent before the timing")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions too")
    parser.add_argument("--force", action="store_true", help="run even if the database holds machines")
    parser.add_argument("--migrate", action="store_true", help="apply unapplied migrations first")
    parser.add_argument("--seed", type=int, default=20260114)
    args = parser.parse_args()
    if args.machines < 1 or args.calls < 1 or args.warmup < 0:
        parser.error("--machines and --calls must be at least 1, --warmup at least 0")
    return args


def main() -> None:
    args = _parse()
    django_setup(database_url=args.database_url, redis_url=args.redis_url or None)
    _check_database(args)
    from django.conf import settings

    from marketplace.wsgi import application

    if not settings.REDIS_URL:
        print("steady heartbeats need Redis: pass --redis-url or set REDIS_URL", file=sys.stderr)
        sys.exit(2)
    created, credentials = _register(args, f"hp{int(time.time())}")
    rng = random.Random(args.seed)
    idle_since = datetime.now(UTC) - timedelta(hours=1)
    machines = [_Machine(i, raw, 8, random.Random(rng.random()), idle_since) for i, raw in enumerate(credentials)]
    for i, machine in enumerate(machines):
        machine.render(args.seed + i)
    host = next((h for h in settings.ALLOWED_HOSTS if h not in ("*", "") and not h.startswith(".")), "localhost")
    statuses: dict[str, int] = {}

    def heartbeat(machine: _Machine, turn: int) -> None:
        body = machine.bodies[turn % len(machine.bodies)]
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/api/agent/v1/heartbeat",
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/json",
            "HTTP_AUTHORIZATION": machine.auth,
            "HTTP_HOST": host,
            "SERVER_NAME": host,
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
        }
        status: list[str] = []

        def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            status.append(line)

        b"".join(application(environ, start_response))
        statuses[status[0]] = statuses.get(status[0], 0) + 1

    def run(calls: int, first_turn: int) -> None:
        for k in range(calls):
            heartbeat(machines[k % len(machines)], first_turn + k // len(machines))

    profile = cProfile.Profile() if args.profile else None
    try:
        run(2 * len(machines), 0)  # each machine's first (full) heartbeat, and its second
        run(args.warmup, 2)
        statuses.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        run(args.calls, 2 + args.warmup // len(machines) + 1)
        if profile is not None:
            profile.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        _cleanup(created)
    if profile is not None:
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    print(
        json.dumps(
            {
                "calls": args.calls,
                "machines": args.machines,
                "cpu_ms_per_heartbeat": round(cpu * 1000 / args.calls, 4),
                "wall_ms_per_heartbeat": round(wall * 1000 / args.calls, 4),
                "statuses": statuses,
                "profiled": bool(profile),
            }
        )
    )


if __name__ == "__main__":
    main()
