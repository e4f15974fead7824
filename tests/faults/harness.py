"""The fault suite's harness: the whole marketplace on this machine, faults one at a time, and the
checks after each (docs/faults.md).

`Suite(config).run()` (or `with suite_running(config) as suite`) starts, under a temporary
directory and on free ports:

- PostgreSQL (initdb / pg_ctl, as the `postgres` user when we are root), Redis (no persistence)
  and anvil (its chain saved in a state file, so it can be stopped and started again);
- the marketplace as separate processes: granian (as docker-compose's web), a Celery worker and
  Celery beat, with DJANGO_SETTINGS_MODULE=tests.faults.settings (short beat periods) and short
  intervals from the environment (SERVER_ENV);
- the escrow deployed (`chain_deploy`), the demo renter funded on chain (`chain_dev_fund`) and
  linked (`demo_seed --watch-chain`);
- N real agents in simulation mode (`python -m gpgpu_agent run`, registered with the demo
  provider's token), whose process jobs run in the real bubblewrap sandbox;
- a renter thread that submits short sleeping process jobs through the REST API at a steady rate
  and signs each job's budget with the renter's key (as a wallet would);
- a watcher thread that scans /proc and records every workload process of every job: job id and
  lease id (from its environment), start (from the kernel) and end. The sandbox gives a job no
  path out, so the suite sees its jobs from outside; the runs also go, one JSON line each, to
  runs.jsonl in the suite's directory.

Then a baseline, each fault of `config.faults` followed by a recovery period, and a drain; after
each a checkpoint reads the marketplace (tests.faults.probe in a subprocess), runs
`manage.py ledger_check`, and judges both with tests.faults.invariants. The result is a table and
the list of violations.

Every process it starts is stopped at the end, workloads included (they run in sessions of their
own and outlive their agents by design).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from tests.faults import invariants
from tests.faults.invariants import Bounds, Phase, Run, Violation

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
# anvil's development key #0: the operator in the suite's chain (billing.chain.client.ANVIL_DEV_KEY_0).
ANVIL_DEV_KEY_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
# Its address: also the treasury the platform's fees go to.
ANVIL_DEV_ADDRESS_0 = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
SANDBOX_SH = "/bin/sh"

# The marketplace's settings for the run: short intervals, so a fault shows and heals in seconds.
# Each can be overridden from the environment the suite runs in.
SERVER_ENV = {
    "HEARTBEAT_INTERVAL_S": "1",
    "HEARTBEAT_GRACE_BEATS": "3",
    "LEASE_FENCE_S": "10",
    "LEASE_LOST_AFTER_S": "16",
    # A small fleet: two silent machines of three are the marketplace's own outage.
    "LIVENESS_DISRUPTION_MIN_MACHINES": "2",
    "MATCH_INTERVAL_S": "1",
    "LEASE_START_TIMEOUT_S": "20",
    "BILLING_USAGE_INTERVAL_S": "1",
    "BILLING_METER_INTERVAL_S": "2",
    "SETTLEMENT_INTERVAL_S": "3",
    "SETTLEMENT_STUCK_S": "20",
    "CHAIN_WATCH_INTERVAL_S": "2",
    "CHAIN_RECEIPT_TIMEOUT_S": "20",
    "CHAIN_RPC_TIMEOUT_S": "5",
    # anvil mines only what is sent: after a rollback, the marketplace waits this long before it
    # reads the blocks above the head as gone (it sends nothing while it waits).
    "CHAIN_BEHIND_GRACE_S": "5",
    "THROTTLE_ENABLED": "false",
    "DATABASE_CONN_MAX_AGE": "60",
    "LOG_LEVEL": "INFO",
}
# Set by the suite itself; never taken from the environment it runs in.
OWN_ENV = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "REDIS_URL",
    "CHAIN_RPC_URL",
    "CHAIN_ID",
    "CHAIN_OPERATOR_KEY",
    "CHAIN_OPERATOR_KEY_FILE",
    "CHAIN_TREASURY_ADDRESS",
    "ESCROW_ADDRESS",
    "TOKEN_ADDRESS",
    "GPGPU_VAR_DIR",
    "DJANGO_SETTINGS_MODULE",
    "DEBUG",
    "SECRET_KEY",
)

FAULT_ORDER = (
    "worker-kill",
    "beat-kill",
    "web-kill",
    "agent-kill",
    "postgres-restart",
    "redis-restart",
    "agent-sigstop",
    "anvil-restart",
    "anvil-rollback",
)


def _env_float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "")
    return float(raw) if raw.strip() else default


@dataclass
class Config:
    """The run's shape. `from_env` reads GPGPU_FAULTS_* (docs/faults.md lists them)."""

    faults: list[str] = field(default_factory=lambda: list(FAULT_ORDER))
    agents: int = 3
    gpus_per_agent: int = 2
    rate_per_s: float = 0.4
    job_s: float = 3.0
    long_job_s: float = 30.0
    long_every: int = 6
    warmup_s: float = 20.0
    recovery_s: float = 20.0
    outage_s: float = 8.0
    agent_down_s: float = 4.0
    # An agent is SIGSTOPped for LEASE_LOST_AFTER_S plus this.
    sigstop_extra_s: float = 10.0
    drain_s: float = 120.0
    bounds: Bounds = field(default_factory=Bounds)
    keep: bool = False
    base_dir: Path | None = None
    server_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Config:
        only = [name.strip() for name in environ.get("GPGPU_FAULTS_ONLY", "").split(",") if name.strip()]
        skip = {name.strip() for name in environ.get("GPGPU_FAULTS_SKIP", "").split(",") if name.strip()}
        unknown = (set(only) | skip) - set(FAULT_ORDER)
        if unknown:
            raise ValueError(f"unknown fault(s) {', '.join(sorted(unknown))}; the faults are {', '.join(FAULT_ORDER)}")
        faults = [name for name in (only or FAULT_ORDER) if name not in skip]
        server_env = {name: environ.get(name, default) for name, default in SERVER_ENV.items()}
        return cls(
            faults=faults,
            agents=int(_env_float(environ, "GPGPU_FAULTS_AGENTS", 3)),
            gpus_per_agent=int(_env_float(environ, "GPGPU_FAULTS_GPUS", 2)),
            rate_per_s=_env_float(environ, "GPGPU_FAULTS_RATE", 0.4),
            job_s=_env_float(environ, "GPGPU_FAULTS_JOB_S", 3),
            long_job_s=_env_float(environ, "GPGPU_FAULTS_LONG_JOB_S", 30),
            long_every=int(_env_float(environ, "GPGPU_FAULTS_LONG_EVERY", 6)),
            warmup_s=_env_float(environ, "GPGPU_FAULTS_WARMUP_S", 20),
            recovery_s=_env_float(environ, "GPGPU_FAULTS_RECOVERY_S", 20),
            outage_s=_env_float(environ, "GPGPU_FAULTS_OUTAGE_S", 8),
            agent_down_s=_env_float(environ, "GPGPU_FAULTS_AGENT_DOWN_S", 4),
            sigstop_extra_s=_env_float(environ, "GPGPU_FAULTS_SIGSTOP_EXTRA_S", 10),
            drain_s=_env_float(environ, "GPGPU_FAULTS_DRAIN_S", 120),
            bounds=Bounds(
                bill_tolerance_s=_env_float(environ, "GPGPU_FAULTS_BILL_TOLERANCE_S", 1),
                job_stuck_s=_env_float(environ, "GPGPU_FAULTS_JOB_STUCK_S", 120),
                batch_stuck_s=_env_float(environ, "GPGPU_FAULTS_BATCH_STUCK_S", 60),
            ),
            keep=environ.get("GPGPU_FAULTS_KEEP") == "1",
            base_dir=Path(environ["GPGPU_FAULTS_DIR"]) if environ.get("GPGPU_FAULTS_DIR") else None,
            server_env=server_env,
        )


# --- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.2) -> float:
    """Poll `condition` until it holds; RuntimeError naming `what` after `timeout_s`."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if condition():
                return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(step_s)


def rpc(url: str, method: str, params: list[Any] | None = None, timeout_s: float = 5.0) -> Any:
    """One JSON-RPC call to the node; RuntimeError with the node's error."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - our node
        answer = json.loads(response.read())
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


def _postgres_bin() -> Path:
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if not versions:
        raise RuntimeError("PostgreSQL's initdb not found (apt install postgresql, or set PG_BIN)")
    return Path(versions[-1])


def _anvil_bin() -> Path:
    if os.environ.get("ANVIL_BIN"):
        return Path(os.environ["ANVIL_BIN"])
    path = ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
    if not path.is_file():
        raise RuntimeError("anvil not found (npm ci at the repository root, or set ANVIL_BIN)")
    return path


def requirements_missing() -> str:
    """What this machine lacks to run the suite, in words ("" when nothing)."""
    missing = []
    for what, find in (
        ("PostgreSQL (initdb, pg_ctl)", _postgres_bin),
        ("anvil (npm ci)", _anvil_bin),
    ):
        try:
            find()
        except RuntimeError:
            missing.append(what)
    for command in ("redis-server", "bwrap"):
        if shutil.which(command) is None:
            missing.append(command)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("a `postgres` user to run PostgreSQL as (we are root)")
    return ", ".join(missing)


class Proc:
    """A child process in its own session, its output appended to a log file; restartable."""

    def __init__(self, name: str, argv: list[str], *, env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        # Held down by a fault: the supervisor leaves it alone meanwhile.
        self.held = False
        self.lock = threading.RLock()

    def start(self) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._log.write(f"\n===== {time.strftime('%H:%M:%S')} starting {self.name}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(  # noqa: S603 - our own commands
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int, *, group: bool = True) -> None:
        """Send `sig` to the process (and its process group: granian's and Celery's children)."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.process.pid, sig)
            else:
                os.kill(self.process.pid, sig)

    def kill(self) -> None:
        """kill -9 of the whole group, and reap it."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)
            # Children reparented elsewhere (a prefork pool) are in the same group: gone too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None


# --- the servers ------------------------------------------------------------------------------


class Postgres:
    """A PostgreSQL cluster of our own (trust auth on 127.0.0.1), run as `postgres` when we are root
    (initdb refuses root)."""

    def __init__(self, base: Path, port: int) -> None:
        self.bin = _postgres_bin()
        self.dir = base / "postgres"
        self.data = self.dir / "data"
        self.port = port
        self.log_path = self.dir / "postgres.log"
        self.user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.url = f"postgres://gpgpu@127.0.0.1:{port}/gpgpu"

    def _run(self, argv: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        done = subprocess.run(  # noqa: S603 - our own commands
            argv, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=self.dir, **kwargs
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {(done.stderr or done.stdout).strip()[-800:]}")
        return done

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "gpgpu",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        self.start()
        self._run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "gpgpu", "gpgpu"])

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])

    def running(self) -> bool:
        done = subprocess.run(  # noqa: S603
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "status"], capture_output=True, check=False
        )
        return done.returncode == 0


class Cluster:
    """Every server and process of one run, under `base`."""

    def __init__(self, config: Config, base: Path, log: Callable[[str], None]) -> None:
        self.config = config
        self.base = base
        self.log = log
        self.run_id = secrets.token_hex(3)
        self.logs = base / "logs"
        self.var = base / "var"
        self.shared = base / "shared"
        for directory in (self.logs, self.var, self.shared):
            directory.mkdir(parents=True)
        self.postgres = Postgres(base, free_port())
        self.redis_port = free_port()
        self.anvil_port = free_port()
        self.web_port = free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.chain_url = f"http://127.0.0.1:{self.anvil_port}"
        self.anvil_state = base / "chain" / "anvil-state.json"
        self.anvil_state.parent.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in OWN_ENV and not k.startswith("PYTEST")}
        env.update(config.server_env)
        env.update(
            {
                "PYTHONPATH": f"{ROOT / 'agent'}{os.pathsep}{ROOT}",
                "PYTHONUNBUFFERED": "1",
                "DJANGO_SETTINGS_MODULE": "tests.faults.settings",
                "DEBUG": "false",
                "SECRET_KEY": secrets.token_urlsafe(50),
                "DATABASE_URL": self.postgres.url,
                "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "CELERY_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "CHAIN_RPC_URL": self.chain_url,
                "CHAIN_OPERATOR_KEY": ANVIL_DEV_KEY_0,
                "CHAIN_TREASURY_ADDRESS": ANVIL_DEV_ADDRESS_0,
                "GPGPU_VAR_DIR": str(self.var),
            }
        )
        self.env = env
        self.redis = Proc(
            "redis",
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(base),
            ],
            env=env,
            log_path=self.logs / "redis.log",
        )
        self.anvil = Proc(
            "anvil",
            [
                str(_anvil_bin()),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.anvil_port),
                "--silent",
                "--state",
                str(self.anvil_state),
                "--state-interval",
                "1",
            ],
            env=env,
            log_path=self.logs / "anvil.log",
        )
        celery = [PYTHON, "-m", "celery", "-A", "marketplace"]
        self.web = Proc(
            "web",
            [
                PYTHON,
                "-m",
                "granian",
                "--interface",
                "wsgi",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.web_port),
                "--workers",
                "2",
                "--blocking-threads",
                "4",
                "--http",
                "1",
                "--no-ws",
                "--respawn-failed-workers",
                "--workers-kill-timeout",
                "3",
                "--access-log",
                "--log-config",
                "core/access_log.json",
                "marketplace.wsgi:application",
            ],
            env=env,
            log_path=self.logs / "web.log",
        )
        self.worker = Proc(
            "worker",
            [*celery, "worker", "--loglevel=INFO", "--concurrency=2", "--hostname", f"faults-{self.run_id}@%h"],
            env=env,
            log_path=self.logs / "worker.log",
        )
        self.beat = Proc(
            "beat",
            [*celery, "beat", "--loglevel=INFO", "--schedule", str(self.var / "celerybeat-schedule")],
            env=env,
            log_path=self.logs / "beat.log",
        )
        self.agents: list[Proc] = []
        self.agent_dirs: list[Path] = []
        self.credentials: dict[str, Any] = {}
        self.renter_key = ""
        self.machine_ids: dict[int, int] = {}

    # -- commands ------------------------------------------------------------------------------

    def manage(
        self, *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 300
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(  # noqa: S603 - our own command
            [PYTHON, "manage.py", *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return done

    def manage_ok(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        done = self.manage(*args, env=env)
        if done.returncode != 0:
            raise RuntimeError(
                f"manage.py {args[0]} failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}"
            )
        return done.stdout

    def probe(self, *, ledger_check_tries: int = 0) -> dict[str, Any]:
        """A tests.faults.probe snapshot; with `ledger_check_tries`, also `manage.py ledger_check`'s
        verdict (under "ledger_check")."""
        done = subprocess.run(  # noqa: S603 - our own command
            [PYTHON, "-m", "tests.faults.probe", "--ledger-check-tries", str(ledger_check_tries)],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the probe failed: {done.stderr[-1500:]}")
        return json.loads(done.stdout)

    # -- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        self.postgres.init()
        self.redis.start()
        self.anvil.start()
        self.redis_wait()
        self.anvil_wait()
        self.log(
            f"  servers up in {time.monotonic() - t0:.1f} s (postgres :{self.postgres.port}, "
            f"redis :{self.redis_port}, anvil :{self.anvil_port})"
        )
        self.manage_ok("migrate", "--noinput", "-v", "0")
        credentials_path = self.shared / "credentials.json"
        self.manage_ok("demo_seed", "--credentials-file", str(credentials_path))
        self.manage_ok("chain_deploy", "--dev-token", "--json")
        key_path = self.shared / "renter.key"
        # chain_dev_fund mints the mock stablecoin: a development-only command (DEBUG).
        self.manage_ok(
            "chain_dev_fund",
            "--renter-key-file",
            str(key_path),
            "--create-key",
            "--amount",
            "1000",
            env={"DEBUG": "true"},
        )
        self.manage_ok(
            "demo_seed",
            "--credentials-file",
            str(credentials_path),
            "--renter-key-file",
            str(key_path),
            "--watch-chain",
        )
        self.credentials = json.loads(credentials_path.read_text())
        self.renter_key = key_path.read_text().strip()
        self.log(f"  database migrated, escrow deployed, renter funded in {time.monotonic() - t0:.1f} s")
        for proc in (self.web, self.worker, self.beat):
            proc.start()
        self.web_wait(90)
        for n in range(self.config.agents):
            self.agent_add(n)
        for agent in self.agents:
            agent.start()
        wait_until(self.machines_online, 60, "every agent's machine online", step_s=0.5)
        self.log(f"  marketplace and {len(self.agents)} agents up in {time.monotonic() - t0:.1f} s")

    def redis_wait(self, timeout_s: float = 20) -> None:
        import redis

        wait_until(lambda: redis.Redis(port=self.redis_port, socket_timeout=1).ping(), timeout_s, "redis answering")

    def anvil_wait(self, timeout_s: float = 30) -> None:
        wait_until(lambda: rpc(self.chain_url, "eth_chainId", timeout_s=1) is not None, timeout_s, "anvil answering")

    def web_wait(self, timeout_s: float = 60) -> float:
        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=3) as response:  # noqa: S310
                return response.status == 200

        return wait_until(healthy, timeout_s, "the web server answering /healthz", step_s=0.5)

    def machines_online(self) -> bool:
        request = urllib.request.Request(  # noqa: S310 - our marketplace
            f"{self.url}/api/v1/machines/?limit=100",
            headers={"Authorization": f"Token {self.credentials['provider']['token']}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            machines = json.loads(response.read())["results"]
        online = [m for m in machines if m["status"] == "online"]
        return len(online) >= len(self.agents)

    def agent_add(self, n: int) -> None:
        """Machine n: its state dir and agent.toml, registered with the demo provider's token."""
        state_dir = self.base / "agents" / str(n)
        state_dir.mkdir(parents=True, mode=0o700)
        rentals = self.base / "rentals" / str(n)
        gpus = ",".join(["NVIDIA GeForce RTX 4090:24564"] * self.config.gpus_per_agent)
        (state_dir / "agent.toml").write_text(
            f'marketplace_url = "{self.url}"\n'
            "simulate = true\n"
            f'simulate_gpus = "{gpus}"\n'
            "simulate_owners_idle = true\n"
            "idle_grace_s = 0\n"
            "poll_interval_s = 0.5\n"
            "usage_interval_s = 1\n"
            "stop_grace_s = 2\n"
            f'hostname = "faults-rig-{n}"\n'
            "allow_process_jobs = true\n"
            'container_engine = "none"\n'
            f'rentals_dir = "{rentals}"\n'
        )
        agent = [PYTHON, "-m", "gpgpu_agent"]
        if os.geteuid() == 0:
            # As root the jobs run as the rental user: create it and the directories (idempotent).
            done = subprocess.run(  # noqa: S603
                [*agent, "setup", "--state-dir", str(state_dir)],
                cwd=ROOT,
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"gpgpu-agent setup failed: {done.stdout[-1500:]}{done.stderr[-500:]}")
        else:
            rentals.mkdir(parents=True, exist_ok=True, mode=0o700)
        done = subprocess.run(  # noqa: S603
            [
                *agent,
                "register",
                "--state-dir",
                str(state_dir),
                "--provider-token",
                self.credentials["provider"]["token"],
            ],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"gpgpu-agent register failed: {done.stderr[-1500:]}")
        self.machine_ids[n] = int(json.loads((state_dir / "credential.json").read_text())["machine_id"])
        self.agent_dirs.append(state_dir)
        self.agents.append(
            Proc(
                f"agent-{n}",
                [*agent, "run", "--state-dir", str(state_dir)],
                env=self.env,
                log_path=self.logs / f"agent-{n}.log",
            )
        )

    def close(self) -> None:
        for proc in [*self.agents, self.beat, self.worker, self.web]:
            with contextlib.suppress(Exception):
                proc.close()
        workloads_kill(str(self.base), self.marker_prefix)
        for proc in (self.anvil, self.redis):
            with contextlib.suppress(Exception):
                proc.close()
        with contextlib.suppress(Exception):
            if self.postgres.running():
                self.postgres.stop("immediate")

    def usage_refusals(self) -> list[tuple[float, int, int]]:
        """(when, lease, status) of every usage report the web server answered with a 4xx, from its
        access log: signed usage the marketplace will never bill."""
        found = []
        with contextlib.suppress(OSError), self.web.log_path.open(errors="replace") as log:
            for line in log:
                if (refusal := usage_refusal(line)) is not None:
                    found.append(refusal)
        return found

    @property
    def marker_prefix(self) -> str:
        return f"gpgpu-faults-{self.run_id}:"


# An access log line of granian's default format for a refused usage report:
# [2026-12-05 05:31:06 +0000] 127.0.0.1 - "POST /api/agent/v1/leases/7/usage HTTP/1.1" 401 72.525
_USAGE_REFUSED = re.compile(
    r'^\[(?P<time>[^\]]+)\] \S+ - "POST /api/agent/v1/leases/(?P<lease>\d+)/usage [^"]*" (?P<status>4\d\d) '
)


def usage_refusal(line: str) -> tuple[float, int, int] | None:
    """(when, lease, status) of a web access log line that refused a usage report (a 4xx), else None."""
    match = _USAGE_REFUSED.search(line)
    if match is None:
        return None
    when = datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S %z").timestamp()
    return when, int(match["lease"]), int(match["status"])


def workloads_kill(base: str, marker_prefix: str) -> int:
    """SIGKILL every process of this run's workloads: their supervisors (their argv names a file
    in our agents' state dirs) and the workloads (their argv ends with our marker)."""
    killed = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        argv = _cmdline(int(name))
        if argv and (any(base in arg for arg in argv) or argv[-1].startswith(marker_prefix)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(name), signal.SIGKILL)
                killed += 1
    return killed


# --- what the kernel shows ----------------------------------------------------------------------


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


_CLK_TCK = os.sysconf("SC_CLK_TCK")
# The kernel's thread creator: every kernel thread is its child.
_KTHREADD = 2


def _boot_time() -> float:
    """The Unix time the kernel booted, to the clock tick: /proc's start times count from it
    (on CLOCK_BOOTTIME; /proc/stat's btime is rounded to the second)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start ticks) of a process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k: v for k, v in pairs}


@dataclass
class _Live:
    job_id: int
    lease_id: int
    pid: int
    ticks: int
    start: float
    last_seen: float
    planned_s: float
    agent: int | None


class Watcher(threading.Thread):
    """Scans /proc every `interval_s` for this run's workloads (a `/bin/sh -c … <marker>` whose
    marker is `<prefix><n>:<planned seconds>`) and records each one's run: job and lease (from its
    environment), start (its start time in the kernel), last seen alive, end."""

    def __init__(self, marker_prefix: str, agent_dirs: list[Path], runs_path: Path, interval_s: float = 0.1) -> None:
        super().__init__(name="faults-watcher", daemon=True)
        self.prefix = marker_prefix
        self.agent_dirs = [str(d) for d in agent_dirs]
        self.runs_path = runs_path
        self.interval_s = interval_s
        self.boot = _boot_time()
        self._lock = threading.Lock()
        self._live: dict[int, _Live] = {}
        self._done: list[Run] = []
        self._ignored: set[int] = set()
        self._halt = threading.Event()
        self.scans = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def runs(self) -> list[Run]:
        with self._lock:
            live = [
                Run(r.job_id, r.lease_id, r.pid, r.start, r.last_seen, None, r.planned_s, r.agent)
                for r in self._live.values()
            ]
            return [*self._done, *live]

    def running(self) -> list[Run]:
        return [run for run in self.runs() if run.end is None]

    def run(self) -> None:
        with self.runs_path.open("a") as out:
            while not self._halt.is_set():
                try:
                    self._scan(out)
                except Exception as error:  # a scan that fails is retried next time
                    print(f"[faults] watcher: {type(error).__name__}: {error}", file=sys.stderr)
                self._halt.wait(self.interval_s)

    def _scan(self, out: IO[str]) -> None:
        now = time.time()
        pids = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        self._ignored &= pids
        found: dict[int, _Live] = {}
        for pid in pids - self._ignored - set(self._live):
            argv = _cmdline(pid)
            if argv is None:
                continue
            if argv and argv[0] == SANDBOX_SH and argv[-1].startswith(self.prefix):
                stat = _stat(pid)
                if stat is not None and (stat[1] in self._live or stat[1] in found or _cmdline(stat[1]) == argv):
                    # A fork of the workload's shell (`sleep` before its exec): part of the same run.
                    self._ignored.add(pid)
                    continue
                live = self._track(pid, argv, now)
                if live is not None:
                    found[pid] = live
            elif not argv:
                # Empty: a kernel thread, a zombie, or a process inside execve (its new image's
                # arguments are not mapped yet; a tight poll reads that about half the time).
                # Only the first two are settled; the third may be a workload a moment later.
                stat = _stat(pid)
                if stat is None or stat[0] == "Z" or stat[1] == _KTHREADD or pid == _KTHREADD:
                    self._ignored.add(pid)
            elif not any("bwrap" in a or a.endswith("shim.py") for a in argv):
                # Not a workload, and not a process that may yet exec one (bwrap, the supervisor).
                self._ignored.add(pid)
        with self._lock:
            for pid, live in list(self._live.items()):
                stat = _stat(pid) if pid in pids else None
                if stat is not None and stat[0] != "Z" and stat[2] == live.ticks:
                    live.last_seen = now
                    continue
                run = Run(live.job_id, live.lease_id, pid, live.start, live.last_seen, now, live.planned_s, live.agent)
                self._done.append(run)
                del self._live[pid]
                out.write(json.dumps(run.as_json()) + "\n")
                out.flush()
            self._live.update(found)
        self.scans += 1

    def _track(self, pid: int, argv: list[str], now: float) -> _Live | None:
        stat = _stat(pid)
        env = _environ(pid)
        if stat is None or "GPGPU_JOB_ID" not in env:
            return None
        try:
            planned = float(argv[-1].rsplit(":", 1)[1])
        except ValueError:
            planned = 0.0
        return _Live(
            job_id=int(env["GPGPU_JOB_ID"]),
            lease_id=int(env.get("GPGPU_LEASE_ID", "0")),
            pid=pid,
            ticks=stat[2],
            start=self.boot + stat[2] / _CLK_TCK,
            last_seen=now,
            planned_s=planned,
            agent=self._agent_of(pid),
        )

    def _agent_of(self, pid: int) -> int | None:
        """Which agent started it: its supervisor's argv names a file in that agent's state dir."""
        for _ in range(8):
            stat = _stat(pid)
            if stat is None or stat[1] <= 1:
                return None
            pid = stat[1]
            argv = _cmdline(pid) or []
            for n, directory in enumerate(self.agent_dirs):
                if any(arg.startswith(directory + os.sep) for arg in argv):
                    return n
        return None


# --- the renter ---------------------------------------------------------------------------------


class Renter(threading.Thread):
    """Submits a job every 1/rate seconds through the REST API (retrying one submission with its
    Idempotency-Key while the marketplace is down) and signs each job's budget with the renter's
    wallet key. Every refused or failed request is counted by (status, body kind)."""

    def __init__(self, cluster: Cluster, config: Config) -> None:
        super().__init__(name="faults-renter", daemon=True)
        from eth_account import Account

        self.cluster = cluster
        self.config = config
        self.url = cluster.url
        self.token = cluster.credentials["renter"]["token"]
        self.account = Account.from_key(cluster.renter_key)
        self._halt = threading.Event()
        self.submitted: dict[str, int] = {}
        self.unsigned: list[int] = []
        self.failures: Counter[str] = Counter()
        self.failure_log: list[tuple[float, str]] = []
        self.n = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(60)

    def request(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - our marketplace
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raw = error.read()
            kind = "json"
            try:
                payload = json.loads(raw)
            except ValueError:
                payload, kind = {"raw": raw[:200].decode(errors="replace")}, "not json"
            self._fail(
                f"{method} {error.code} {kind}"
                + (f" {payload.get('code')}" if isinstance(payload, dict) and payload.get("code") else "")
            )
            return error.code, payload
        except (urllib.error.URLError, OSError) as error:
            self._fail(f"{method} unreachable ({type(getattr(error, 'reason', error)).__name__})")
            return 0, None

    def _fail(self, what: str) -> None:
        self.failures[what] += 1
        self.failure_log.append((time.time(), what))

    def command(self, n: int) -> tuple[list[str], float]:
        long = self.config.long_every > 0 and n % self.config.long_every == 0
        seconds = self.config.long_job_s if long else self.config.job_s
        script = (
            f'echo "faults job $GPGPU_JOB_ID lease $GPGPU_LEASE_ID: sleeping {seconds:g} s"; '
            f'sleep {seconds:g}; echo "faults job $GPGPU_JOB_ID: done"'
        )
        return [SANDBOX_SH, "-c", script, f"{self.cluster.marker_prefix}{n}:{seconds:g}"], seconds

    def submit(self, n: int) -> None:
        command, seconds = self.command(n)
        key = f"faults-{self.cluster.run_id}-{n}"
        body = {
            "name": f"faults {n}",
            "kind": "process",
            "command": command,
            "gpu_count": 1,
            "max_price_per_gpu_hour": "2.00",
            "expected_duration_s": int(seconds) + 30,
            # The marketplace takes at most 10 + max_duration_s / 10 usage reports per lease
            # (jobs.ingestion.usage_reports_max) and the agents report every second: room for all.
            "max_duration_s": max(int(seconds) + 90, 10 * (int(seconds) + 20)),
        }
        deadline = time.monotonic() + 30
        while not self._halt.is_set() and time.monotonic() < deadline:
            status, answer = self.request("POST", "/api/v1/jobs/", body, headers={"Idempotency-Key": key})
            if status in (200, 201):
                self.submitted[key] = int(answer["id"])
                self.unsigned.append(int(answer["id"]))
                return
            if 400 <= status < 500 and status not in (408, 429):
                return
            time.sleep(0.5)

    def sign(self, job_id: int) -> bool:
        from eth_account.messages import encode_typed_data

        address = self.account.address.lower()
        status, offer = self.request("GET", f"/api/v1/jobs/{job_id}/budget-authorization/?address={address}")
        if status != 200:
            return 400 <= status < 500  # refused for good: nothing to retry
        stored = offer.get("authorization")
        if stored and not stored.get("rejected_reason"):
            return True
        typed = offer["typed_data"]
        signed = self.account.sign_message(encode_typed_data(full_message=typed))
        status, _ = self.request(
            "PUT",
            f"/api/v1/jobs/{job_id}/budget-authorization/",
            {
                "renter_address": address,
                "max_amount": int(typed["message"]["maxAmount"]),
                "deadline": int(typed["message"]["deadline"]),
                "signature": "0x" + bytes(signed.signature).hex(),
            },
        )
        return status == 200 or 400 <= status < 500

    def run(self) -> None:
        period = 1.0 / self.config.rate_per_s
        next_at = sign_after = time.monotonic()
        while not self._halt.is_set():
            if time.monotonic() >= next_at:
                self.n += 1
                self.submit(self.n)
                next_at = max(next_at + period, time.monotonic())
            if time.monotonic() >= sign_after:
                sign_after = self._sign_waiting()
            self._halt.wait(0.05)
        # Stopped: no more jobs, but the ones submitted are signed, as a renter's client signs
        # right after it submits (a job left unsigned would wait, admitted, for ever).
        deadline = time.monotonic() + 30
        while self.unsigned and time.monotonic() < deadline:
            if time.monotonic() >= sign_after:
                sign_after = self._sign_waiting()
            time.sleep(0.05)

    def _sign_waiting(self) -> float:
        """Sign the submitted jobs not signed yet; when to try again."""
        for job_id in list(self.unsigned):
            if not self.sign(job_id):
                return time.monotonic() + 1.0  # the marketplace is down: try again in a second
            self.unsigned.remove(job_id)
        return time.monotonic()


# --- faults -------------------------------------------------------------------------------------


class Suite:
    """One run: the cluster, the watcher, the renter, the phases and what each found."""

    def __init__(self, config: Config, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        self.base = Path(tempfile.mkdtemp(prefix="gpgpu-faults-", dir=config.base_dir))
        # PostgreSQL (as `postgres`) and the rental user pass through it.
        os.chmod(self.base, 0o711)  # noqa: S103 - pass-through only
        self.cluster = Cluster(config, self.base, log)
        self.watcher: Watcher | None = None
        self.renter: Renter | None = None
        self.phases: list[Phase] = []
        self.violations: list[Violation] = []
        self.observations: list[Violation] = []
        self._seen: set[str] = set()
        self.snapshot: dict[str, Any] = {}
        self.started = time.monotonic()
        # Processes that exited on their own and were started again: (when, name, status).
        self.restarts: list[tuple[float, str, int]] = []
        self._supervising = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="faults-supervisor", daemon=True)

    def _supervise(self) -> None:
        """What the deployment's process manager does (docker-compose `restart: unless-stopped`, the
        agent's systemd unit): start again a marketplace process or agent that exited on its own.
        Each restart is reported."""
        while not self._supervising.wait(0.5):
            for proc in [self.cluster.web, self.cluster.worker, self.cluster.beat, *self.cluster.agents]:
                with proc.lock:
                    if proc.held or proc.process is None or proc.process.poll() is None:
                        continue
                    status = proc.process.returncode
                    self.restarts.append((time.time(), proc.name, status))
                    self.log(f"[faults] {proc.name} exited on its own (status {status}); starting it again")
                    time.sleep(1)
                    proc.start()

    # -- faults: each injects, waits and heals, and returns notes ------------------------------

    def _victim(self, min_left_s: float, *, ending_within_s: float = 0.0, wait_s: float = 30.0) -> tuple[int, str]:
        """An agent with a workload that will still run `min_left_s` from now and, with
        `ending_within_s`, preferably also one that ends within that many seconds (waiting up to
        `wait_s`, the second wish dropped halfway); else agent 0."""
        assert self.watcher is not None
        started = time.monotonic()
        while time.monotonic() - started < wait_s:
            now = time.time()
            running = self.watcher.running()
            for run in sorted(running, key=lambda r: -(r.start + r.planned_s)):
                if run.agent is None or run.start + run.planned_s - now < min_left_s:
                    continue
                left = run.start + run.planned_s - now
                why = f"job {run.job_id} (lease {run.lease_id}) running on it, {left:.0f} s left"
                if ending_within_s <= 0:
                    return run.agent, why
                ending = [
                    r for r in running if r.agent == run.agent and 0.5 < r.start + r.planned_s - now < ending_within_s
                ]
                if ending:
                    return (
                        run.agent,
                        f"{why}; job {ending[0].job_id} due to end "
                        f"{ending[0].start + ending[0].planned_s - now:.1f} s from now",
                    )
                if time.monotonic() - started > wait_s / 2:
                    return run.agent, why
            time.sleep(0.1)
        return 0, "no workload long enough was running on any agent"

    @contextlib.contextmanager
    def _down(self, proc: Proc) -> Iterator[None]:
        """Hold `proc` away from the supervisor while a fault has it down; start it again after."""
        with proc.lock:
            proc.held = True
        try:
            yield
        finally:
            with proc.lock:
                if not proc.alive():
                    proc.start()
                proc.held = False

    def fault_worker_kill(self) -> list[str]:
        with self._down(self.cluster.worker):
            self.cluster.worker.kill()
            time.sleep(self.config.outage_s)
        return [f"worker killed -9, restarted after {self.config.outage_s:g} s"]

    def fault_beat_kill(self) -> list[str]:
        with self._down(self.cluster.beat):
            self.cluster.beat.kill()
            time.sleep(self.config.outage_s)
        return [f"beat killed -9, restarted after {self.config.outage_s:g} s"]

    def fault_web_kill(self) -> list[str]:
        with self._down(self.cluster.web):
            self.cluster.web.kill()
            time.sleep(self.config.outage_s)
        took = self.cluster.web_wait(60)
        return [f"web killed -9, restarted after {self.config.outage_s:g} s, healthy {took:.1f} s later"]

    def fault_agent_kill(self) -> list[str]:
        # Preferably one with a workload that ends early in the outage, too: its exit can be known
        # only from the supervisor's record once the agent is back.
        n, why = self._victim(self.config.agent_down_s + 3, ending_within_s=max(1.0, self.config.agent_down_s / 2))
        with self._down(self.cluster.agents[n]):
            self.cluster.agents[n].kill()
            time.sleep(self.config.agent_down_s)
        return [f"agent {n} killed -9 ({why}), restarted after {self.config.agent_down_s:g} s"]

    def fault_postgres_restart(self) -> list[str]:
        self.cluster.postgres.stop("fast")
        time.sleep(self.config.outage_s)
        self.cluster.postgres.start()
        return [f"postgres stopped (fast), started again after {self.config.outage_s:g} s"]

    def fault_redis_restart(self) -> list[str]:
        self.cluster.redis.stop()
        time.sleep(self.config.outage_s)
        self.cluster.redis.start()
        self.cluster.redis_wait()
        return [f"redis stopped (nothing persisted), started again after {self.config.outage_s:g} s"]

    def fault_agent_sigstop(self) -> list[str]:
        lost_after = float(self.cluster.env["LEASE_LOST_AFTER_S"])
        hold = lost_after + self.config.sigstop_extra_s
        n, why = self._victim(hold - 2)
        with self._down(self.cluster.agents[n]):
            self.cluster.agents[n].signal(signal.SIGSTOP, group=False)
            time.sleep(hold)
            self.cluster.agents[n].signal(signal.SIGCONT, group=False)
        return [f"agent {n} SIGSTOPped for {hold:g} s (LEASE_LOST_AFTER_S {lost_after:g}; {why})"]

    def fault_anvil_restart(self) -> list[str]:
        self.cluster.anvil.stop()
        time.sleep(self.config.outage_s)
        self.cluster.anvil.start()
        self.cluster.anvil_wait()
        head_before = int(rpc(self.cluster.chain_url, "eth_blockNumber"), 16)
        return [
            f"anvil stopped (state saved), started again from its state after {self.config.outage_s:g} s, "
            f"at block {head_before}"
        ]

    def fault_anvil_rollback(self) -> list[str]:
        """Take a snapshot of the chain (evm_snapshot), wait for the next `Settled` event and for the
        marketplace to hold that settlement confirmed, then revert the chain to the snapshot
        (evm_revert): the settlement, and whatever else was mined since, is gone from the chain."""
        url = self.cluster.chain_url
        deployment = json.loads(next((self.cluster.var / "chain").glob("deployment-*.json")).read_text())
        topic = "0x" + _keccak("Settled(uint256,uint256,uint256)")
        snapshot_id = rpc(url, "evm_snapshot")
        snapshot_block = int(rpc(url, "eth_blockNumber"), 16)
        deadline = time.monotonic() + 60
        logs: list[dict[str, Any]] = []
        while not logs and time.monotonic() < deadline:
            found = rpc(
                url,
                "eth_getLogs",
                [{"address": deployment["escrow"], "topics": [topic], "fromBlock": hex(snapshot_block)}],
            )
            logs = [log for log in found if int(log["blockNumber"], 16) > snapshot_block]
            time.sleep(0.2)
        if not logs:
            raise RuntimeError("no settlement was mined within 60 s: nothing to roll back")
        block = int(logs[0]["blockNumber"], 16)
        tx_hash = logs[0]["transactionHash"]
        # Roll back once the marketplace holds it confirmed (its worst moment), or after 20 s.
        deadline = time.monotonic() + 20
        recorded = "not recorded confirmed within 20 s"
        while time.monotonic() < deadline:
            settlements = self.cluster.probe()["settlements"]
            mine = next((b for b in settlements if b["tx_hash"].lower() == tx_hash.lower()), None)
            if mine is not None and mine["status"] == "confirmed":
                recorded = f"settlement {mine['id']}, confirmed in the ledger"
                break
            time.sleep(0.5)
        head = int(rpc(url, "eth_blockNumber"), 16)
        if not rpc(url, "evm_revert", [snapshot_id]):
            raise RuntimeError(f"evm_revert to snapshot {snapshot_id} was refused")
        after = int(rpc(url, "eth_blockNumber"), 16)
        receipt = rpc(url, "eth_getTransactionReceipt", [tx_hash])
        return [
            f"settlement tx {tx_hash[:12]}… ({recorded}) mined in block {block}; chain reverted from block "
            f"{head} to the snapshot at block {snapshot_block} (now {after}); "
            f"its receipt now: {'gone' if receipt is None else 'still there'}"
        ]

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> bool:
        """The whole run; True when no invariant was broken."""
        config = self.config
        self.log(f"[faults] run in {self.base} (faults: {', '.join(config.faults) or 'none'})")
        self.cluster.start()
        self._supervisor.start()
        self.watcher = Watcher(self.cluster.marker_prefix, self.cluster.agent_dirs, self.cluster.shared / "runs.jsonl")
        self.watcher.start()
        self.renter = Renter(self.cluster, config)
        self.renter.start()
        phase = self._phase("baseline")
        time.sleep(config.warmup_s)
        self._checkpoint(phase)
        for name in config.faults:
            phase = self._phase(name)
            t0 = time.monotonic()
            try:
                phase.notes += getattr(self, "fault_" + name.replace("-", "_"))()
            except Exception as error:  # the system did not come back as it should: a finding, go on
                text = f"{name}: the harness could not inject or heal it: {type(error).__name__}: {error}"
                self.violations.append(Violation(invariants.HARNESS, time.time(), text, f"harness:{name}"))
                phase.notes.append(text)
            self.log(f"[faults] {name}: {'; '.join(phase.notes)} ({time.monotonic() - t0:.0f} s)")
            time.sleep(config.recovery_s)
            self._checkpoint(phase)
        self.renter.stop()
        phase = self._phase("drain")
        self._drain()
        self._checkpoint(phase, final=True)
        phase.end = time.time()
        self.watcher.stop()
        return not self.violations

    def _phase(self, name: str) -> Phase:
        now = time.time()
        if self.phases:
            self.phases[-1].end = now
        phase = Phase(name, start=now)
        self.phases.append(phase)
        return phase

    def _checkpoint(self, phase: Phase, *, final: bool = False) -> None:
        assert self.watcher is not None
        t0 = time.monotonic()
        try:
            snapshot = self.cluster.probe(ledger_check_tries=3)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
            text = f"the marketplace could not be read after {phase.name}: {error}"
            self.violations.append(Violation(invariants.HARNESS, time.time(), text, f"probe:{phase.name}"))
            self.log(f"[faults] checkpoint after {phase.name}: {text}")
            return
        self.snapshot = snapshot
        (self.cluster.shared / f"snapshot-{len(self.phases):02d}-{phase.name}.json").write_text(json.dumps(snapshot))
        check = snapshot["ledger_check"]
        cp = invariants.checkpoint(
            self.watcher.runs(),
            self.snapshot,
            self.config.bounds,
            ledger_check_ok=check["ok"],
            ledger_check_output="\n".join(check["persistent"]) or check["output"],
            final=final,
        )
        phase.checkpoint = cp
        fresh = []
        for violation in cp.violations:
            # Runs and charges are events: one finding each. The ledger and stuck rows are states:
            # one finding per checkpoint that sees them.
            key = (
                violation.key
                if violation.kind in (invariants.RAN_TWICE, invariants.BILLING)
                else f"{phase.name}:{violation.key}"
            )
            if key not in self._seen:
                self._seen.add(key)
                fresh.append(violation)
        self.violations += fresh
        for observation in cp.observations:
            if observation.key not in self._seen:
                self._seen.add(observation.key)
                self.observations.append(observation)
                self.log(f"           (not a violation) {observation}")
        state = "ok" if not fresh else f"{len(fresh)} new violation(s)"
        self.log(
            f"[faults] checkpoint after {phase.name}: {state} ({time.monotonic() - t0:.1f} s, probe "
            f"{self.snapshot['probe_s']:.1f} s, ledger_check tries {check['tries']})"
        )
        for violation in fresh:
            self.log(f"           {violation}")

    def _drain(self) -> None:
        """Wait until every job is terminal, every lease finally metered and settled, every budget
        released on chain, or `drain_s` passes."""
        deadline = time.monotonic() + self.config.drain_s
        said = time.monotonic()
        waiting = "the marketplace could not be read"
        while time.monotonic() < deadline:
            try:
                waiting = _waiting(self.cluster.probe())
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
                waiting = f"the marketplace could not be read: {str(error)[-300:]}"
                time.sleep(3)
                continue
            if not waiting:
                self.log(f"[faults] drained in {self.config.drain_s - (deadline - time.monotonic()):.0f} s")
                return
            if time.monotonic() - said > 20:
                self.log(f"[faults] draining: {waiting}")
                said = time.monotonic()
            time.sleep(3)
        self.log(f"[faults] not drained after {self.config.drain_s:g} s: {waiting}")

    def report(self) -> str:
        if self.snapshot and self.phases:
            table = invariants.render(invariants.rows(self.phases, self.snapshot, self.violations))
        else:
            table = "(no checkpoint could read the marketplace: no table)"
        lines = [table, ""]
        for phase in self.phases:
            if phase.notes:
                lines.append(f"{phase.name}: {'; '.join(phase.notes)}")
        usage_refusals = self.cluster.usage_refusals()
        for phase in self.phases:
            during = [(t, what) for t, what in (self.renter.failure_log if self.renter else []) if _within(phase, t)]
            if during:
                counts = Counter(what for _, what in during)
                lines.append(
                    f"{phase.name}: the renter's failed requests: "
                    + ", ".join(f"{what} ×{n}" for what, n in sorted(counts.items()))
                )
            for t, name, status in self.restarts:
                if _within(phase, t):
                    lines.append(f"{phase.name}: {name} exited on its own (status {status}) and was started again")
            refused = [(lease, status) for t, lease, status in usage_refusals if _within(phase, t)]
            if refused:
                statuses = Counter(status for _, status in refused)
                lines.append(
                    f"{phase.name}: usage reports the marketplace refused: "
                    + ", ".join(f"{status} ×{n}" for status, n in sorted(statuses.items()))
                    + f" (leases {', '.join(str(x) for x in sorted({lease for lease, _ in refused}))})"
                )
            agent_of = {machine: n for n, machine in self.cluster.machine_ids.items()}
            for lease in self.snapshot.get("leases", []):
                if lease["end_reason"] == "lost" and _within(phase, lease.get("ended_recorded_at") or 0):
                    lines.append(
                        f"{phase.name}: lease {lease['id']} (job {lease['job_id']}, agent "
                        f"{agent_of.get(lease['machine_id'], '?')}) ended lost as of {lease['ended_at']:.1f}, "
                        + (
                            f"started {lease['started_at']:.1f}"
                            if lease["started_at"]
                            else "its start never reached the marketplace"
                        )
                        + f": {lease.get('end_detail') or '-'}"
                    )
        if self.watcher is not None:
            runs = self.watcher.runs()
            lines.append(f"workload runs seen: {len(runs)} ({self.watcher.scans} scans of /proc)")
        lines.append(f"total {time.monotonic() - self.started:.0f} s; logs in {self.cluster.logs}")
        for observation in self.observations:
            where = next((p.name for p in self.phases if _within(p, observation.at)), "?")
            lines.append(f"{where}: {observation}")
        if self.violations:
            # What the worker said went wrong, in the report itself: a CI run keeps no logs.
            lines.append(f"\nthe worker's warnings and errors (the last {LOG_TAIL_LINES}):")
            lines += [f"  {line}" for line in log_warnings(self.cluster.logs / "worker.log", LOG_TAIL_LINES)]
            lines.append(f"\n{len(self.violations)} violation(s):")
            for violation in self.violations:
                where = next((p.name for p in self.phases if _within(p, violation.at)), "?")
                lines.append(f"  ({where}) {violation}")
        return "\n".join(lines)

    def close(self) -> None:
        self._supervising.set()
        if self._supervisor.is_alive():
            self._supervisor.join(10)
        for thread in (self.renter, self.watcher):
            if thread is not None and thread.is_alive():
                with contextlib.suppress(Exception):
                    thread.stop()
        self.cluster.close()
        if not self.config.keep:
            shutil.rmtree(self.base, ignore_errors=True)


LOG_TAIL_LINES = 80


def log_warnings(path: Path, limit: int) -> list[str]:
    """The last `limit` WARNING, ERROR and CRITICAL lines of a log (each cut to 400 characters); []
    when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    found = [line[:400] for line in text.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)]
    return found[-limit:]


def _within(phase: Phase, t: float) -> bool:
    return phase.start <= t < (phase.end or float("inf"))


def _waiting(snapshot: Mapping[str, Any]) -> str:
    """What the drain still waits for, in words ("" when nothing)."""
    jobs = [j for j in snapshot["jobs"] if j["status"] not in invariants.TERMINAL]
    leases = [
        lease
        for lease in snapshot["leases"]
        if lease["status"] != "ended" or (lease["charge"] and not lease["charge"]["final"])
    ]
    batches = snapshot["money"]["in_flight"]
    by_kind = snapshot["money"]["ledger"]["by_kind"]
    unsettled = by_kind.get("lease_unsettled", 0) + by_kind.get("in_settlement", 0)
    unreleased = [
        j
        for j in snapshot["jobs"]
        if j["status"] in invariants.TERMINAL
        and j.get("budget")
        and j["budget"]["status"] == "reserved"
        and not j["budget"]["released_on_chain"]
    ]
    # A budget still being reserved (a batch in flight, or sent again after a rollback) is about
    # to leave the renter's available balance on chain, and to come back once its job is released.
    reserving = [j for j in snapshot["jobs"] if j.get("budget") and j["budget"]["status"] == "reserving"]
    parts = []
    if jobs:
        parts.append(f"{len(jobs)} jobs not terminal")
    if leases:
        parts.append(f"{len(leases)} leases not finally metered")
    if batches:
        parts.append(f"settlements in flight {batches}")
    if unsettled:
        parts.append(f"{unsettled} micro unsettled")
    if unreleased:
        parts.append(f"{len(unreleased)} budgets not released on chain")
    if reserving:
        parts.append(f"{len(reserving)} budgets being reserved")
    return ", ".join(parts)


def _keccak(text: str) -> str:
    from eth_utils import keccak

    return keccak(text=text).hex()


@contextlib.contextmanager
def suite_running(config: Config, log: Callable[[str], None] = print) -> Iterator[Suite]:
    suite = Suite(config, log)
    try:
        yield suite
    finally:
        suite.close()
