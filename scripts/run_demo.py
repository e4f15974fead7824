"""Run the whole marketplace on this machine and supervise it (started by scripts/demo).

Migrates the database, seeds the demo users, then starts the web server, a Celery worker,
Celery beat and a simulated provider fleet, each in its own process group. Prints where to
look and a curl that submits a job. Ctrl-C (or SIGTERM) stops every child and exits 0; if a
child dies on its own, the others are stopped and the exit status is 1.

The database and broker are the embedded defaults (SQLite and a filesystem broker under
var/) unless DATABASE_URL / CELERY_BROKER_URL are set.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STOP_GRACE_S = 10.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/demo", description="Run the marketplace with a simulated fleet.")
    parser.add_argument("--port", type=int, default=8000, help="web server port on 127.0.0.1 (default 8000)")
    parser.add_argument("--machines", type=int, default=4, help="simulated provider machines (default 4)")
    parser.add_argument("--time-scale", type=float, default=5.0, help="speed-up of owner patterns (default 5)")
    parser.add_argument("--verbose", action="store_true", help="show every process's log here, not only the fleet's")
    args = parser.parse_args()
    if not 1 <= args.port <= 65535 or not 1 <= args.machines <= 64 or not args.time_scale > 0:
        parser.error("--port must be 1-65535, --machines 1-64, --time-scale positive")
    return args


class Child:
    """A supervised process in its own process group, its output on our terminal or in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], *, log_dir: Path, to_terminal: bool) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] | None = None
        if to_terminal:
            out = None
        else:
            self._log = self.log_path.open("ab")
            out = self._log
        self.process = subprocess.Popen(  # noqa: S603 - our own commands
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )

    def signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def stop_all(children: list[Child]) -> None:
    """SIGTERM every child's process group (the fleet first, the web server last), wait, then
    SIGKILL what is left."""
    for child in reversed(children):
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in reversed(children):
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"[demo] {child.name} did not stop in {STOP_GRACE_S:.0f} s; killing it", flush=True)
            child.signal(signal.SIGKILL)
            child.process.wait()
        child.close()


def wait_for_web(url: str, web: Child, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and web.process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:  # noqa: S310 - our own URL
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def banner(url: str, credentials: dict, log_dir: Path) -> str:
    renter = credentials["renter"]["token"]
    provider = credentials["provider"]["token"]
    admin = credentials["admin"]
    job = json.dumps(
        {
            "kind": "process",
            "command": ["python3", "-c", 'import time; print("training"); time.sleep(5)'],
            "gpu_count": 1,
            "max_price_per_gpu_hour": "2.00",
            "expected_duration_s": 60,
            "max_duration_s": 300,
        }
    )
    return f"""
================================================================================
 GPGPU marketplace is running
   API docs   {url}/api/docs/
   Admin      {url}/admin/   (user {admin["username"]}, password {admin["password"]})
   Health     {url}/healthz
   Logs       {log_dir}/  (web, worker, beat)

 Renter token:   {renter}
 Provider token: {provider}

 Submit a job (the simulated fleet runs it):

   curl -s -X POST {url}/api/v1/jobs/ \\
     -H "Authorization: Token {renter}" \\
     -H "Content-Type: application/json" \\
     -H "Idempotency-Key: demo-job-1" \\
     -d '{job}'

 Then follow it (put the id from the reply in place of 1):

   curl -s {url}/api/v1/jobs/1/ -H "Authorization: Token {renter}"
   curl -s {url}/api/v1/jobs/1/events/ -H "Authorization: Token {renter}"

 Press Ctrl-C to stop everything.
================================================================================
""".strip("\n")


def main() -> int:
    args = parse_args()
    env = dict(os.environ)
    env["DEBUG"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    # A livelier demo than the production defaults (10 s heartbeats, 5 s matching); both can
    # still be set from the environment.
    env.setdefault("HEARTBEAT_INTERVAL_S", "5")
    env.setdefault("MATCH_INTERVAL_S", "2")
    var_dir = Path(env.get("GPGPU_VAR_DIR", ROOT / "var"))
    log_dir = var_dir / "demo" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    credentials_path = var_dir / "demo" / "credentials.json"
    url = f"http://127.0.0.1:{args.port}"
    manage = [PYTHON, "manage.py"]

    print("[demo] migrating the database...", flush=True)
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)  # noqa: S603
    subprocess.run(  # noqa: S603
        [*manage, "demo_seed", "--credentials-file", str(credentials_path)],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    credentials = json.loads(credentials_path.read_text())

    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    children: list[Child] = []

    def start(name: str, argv: list[str], *, to_terminal: bool = False) -> Child:
        child = Child(name, argv, env, log_dir=log_dir, to_terminal=to_terminal or args.verbose)
        children.append(child)
        return child

    celery = [PYTHON, "-m", "celery", "-A", "marketplace"]
    try:
        web = start("web", [*manage, "runserver", f"127.0.0.1:{args.port}", "--noreload"])
        start("worker", [*celery, "worker", "--pool=threads", "--concurrency=2", "--loglevel=INFO"])
        start("beat", [*celery, "beat", "--loglevel=INFO", "--schedule", str(var_dir / "celerybeat-schedule")])
        print(f"[demo] starting the web server on {url} ...", flush=True)
        if not wait_for_web(url, web):
            print(f"[demo] the web server did not come up; see {web.log_path}", file=sys.stderr, flush=True)
            stop_all(children)
            return 1
        start(
            "fleet",
            [
                PYTHON,
                "-m",
                "simulator",
                "--api",
                url,
                "--credentials",
                str(credentials_path),
                "--machines",
                str(args.machines),
                "--time-scale",
                str(args.time_scale),
            ],
            to_terminal=True,
        )
        print(banner(url, credentials, log_dir), flush=True)
        while not stopping:
            for child in children:
                code = child.process.poll()
                if code is not None:
                    print(f"[demo] {child.name} exited with status {code}; stopping the rest", file=sys.stderr)
                    stop_all(children)
                    return 1
            time.sleep(0.5)
    except BaseException:
        stop_all(children)
        raise
    print("\n[demo] stopping...", flush=True)
    stop_all(children)
    print("[demo] stopped.", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
