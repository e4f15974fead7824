"""Real database outages for tests: the default connection pointed, for one block, at a database
that is not there (a PostgreSQL port nobody listens on, an SQLite file that cannot be opened) or
at a throwaway PostgreSQL cluster that a test then stops. The driver raises what it raises in
production; nothing is mocked."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dj_database_url
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.utils import load_backend


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def default_database(url: str, **options: Any) -> Iterator[BaseDatabaseWrapper]:
    """Within the block, the default database alias is a new connection to `url` (OPTIONS:
    `options`); the test's own connection is put back afterwards, untouched (its transaction
    included). Nothing connects until a query is made."""
    original = connections[DEFAULT_DB_ALIAS]
    parsed = dj_database_url.parse(url)
    settings_dict = {**original.settings_dict, **parsed, "OPTIONS": options, "CONN_MAX_AGE": 0}
    wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, DEFAULT_DB_ALIAS)
    connections[DEFAULT_DB_ALIAS] = wrapper
    try:
        yield wrapper
    finally:
        with contextlib.suppress(Exception):
            wrapper.close()
        connections[DEFAULT_DB_ALIAS] = original


def postgres_down_url(*, password: str) -> str:
    """A PostgreSQL DSN, with a password, on a port nobody listens on."""
    return f"postgres://gpgpu_outage:{password}@127.0.0.1:{free_port()}/gpgpu_outage"


def sqlite_unopenable_url(directory: str) -> str:
    """An SQLite database file SQLite cannot open: in a directory that does not exist (a vanished
    volume). Permission bits would not do: the tests may run as root, who reads any file."""
    return f"sqlite:///{os.path.join(directory, 'gone', 'gpgpu.sqlite3')}"


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@dataclass
class ThrowawayPostgres:
    """A PostgreSQL cluster of its own (trust authentication, 127.0.0.1 only), in a temporary
    directory; `stop()` shuts it down at once, as a crash or a failover would."""

    directory: str
    port: int
    _run_as: list[str]
    _pg_ctl: str

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run(  # noqa: S603 - argv, no shell
            [*self._run_as, self._pg_ctl, "stop", "-D", f"{self.directory}/data", "-m", "immediate", "-w"],
            check=False,
            capture_output=True,
            timeout=60,
        )


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres | None]:
    """Start a throwaway cluster (None when initdb and pg_ctl are not installed, or when running as
    root without a `postgres` user to run them as); stopped and deleted on exit."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        yield None
        return
    run_as: list[str] = []
    directory = tempfile.mkdtemp(prefix="gpgpu-pg-")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(directory, ignore_errors=True)
            yield None
            return
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    cluster = ThrowawayPostgres(directory=directory, port=port, _run_as=run_as, _pg_ctl=pg_ctl)
    try:
        subprocess.run(  # noqa: S603 - argv, no shell
            [*run_as, initdb, "-D", f"{directory}/data", "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(  # noqa: S603 - argv, no shell
            [*run_as, pg_ctl, "start", "-D", f"{directory}/data", "-o", options, "-l", f"{directory}/log", "-w"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
