"""What the benchmarks that run the marketplace's own code share: Django set up on the database
(and Redis) they are given, a database checked before it is filled, a free port, the web server
started as docker-compose's web runs it (or gunicorn, to compare).

Each script is run as `python benchmarks/<name>.py`, so this directory is on sys.path and
`import _django` finds this module."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent


def django_setup(*, database_url: str | None = None, redis_url: str | None = None) -> None:
    """Django on `database_url` (else DATABASE_URL) and `redis_url` (else REDIS_URL), with DEBUG
    off (production code paths), a throwaway signing key and warnings-only logs."""
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    if redis_url is not None:
        os.environ["REDIS_URL"] = redis_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def refuse(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(2)


def migrations_ready(*, migrate: bool) -> None:
    """Apply unapplied migrations when `migrate`, else refuse to go on with them."""
    from django.core.management import call_command
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    if executor.migration_plan(executor.loader.graph.leaf_nodes()):
        if not migrate:
            refuse("the database has unapplied migrations: run `python manage.py migrate` or pass --migrate")
        call_command("migrate", verbosity=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVERS = ("granian", "gunicorn")


def add_server_options(parser: argparse.ArgumentParser, *, workers: int, threads: int, threads_help: str) -> None:
    """--server, --workers and --threads, for `web_server_argv`."""
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="granian",
        help="the web server: granian, as docker-compose's web, or gunicorn (gthread) to compare",
    )
    parser.add_argument("--workers", type=int, default=workers, help="the server's worker processes")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)


def web_server_argv(
    server: str, app: str, *, port: int, workers: int, threads: int, backlog: int = 1024, access_log: bool = False
) -> list[str]:
    """The command line of `server` serving the WSGI `app` ("module:callable") on 127.0.0.1:`port`
    with `workers` processes of `threads` threads (granian: its blocking threads; gunicorn: the
    gthread worker over 1), warnings-only logs, and with `access_log` an access log on standard
    output (granian's as compose's web configures it, the agents' answered heartbeats left out;
    gunicorn's, every request). granian's options are docker-compose's web's; keep-alive connections stay
    open (granian keeps them; gunicorn is told 60 s)."""
    if server == "gunicorn":
        argv = [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
        argv += ["--backlog", str(backlog), "--keep-alive", "60", "--timeout", "120", "--log-level", "warning"]
        if threads > 1:
            argv += ["--worker-class", "gthread", "--threads", str(threads)]
        return [*argv, "--access-logfile", "-"] if access_log else argv
    argv = [sys.executable, "-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", str(workers), "--blocking-threads", str(threads), "--backlog", str(backlog)]
    # Requests a worker takes at once: the default (backlog / workers) may be under its threads.
    argv += ["--backpressure", str(max(threads, backlog // workers)), "--http", "1", "--no-ws"]
    if access_log:  # as compose's web: the agents' answered heartbeats left out (core/access_log.py)
        argv += ["--access-log", "--log-config", str(ROOT / "core" / "access_log.json")]
    return [*argv, "--log-level", "warning", app]
