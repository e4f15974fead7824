"""How soon a renter sees a job run: submit → running, submit → succeeded, cancel → stopped.

    python benchmarks/dispatch.py                 # 4 simulated machines, production intervals
    python benchmarks/dispatch.py --machines 2 --sequential 3 --burst 6

Starts the whole marketplace as the demo does (scripts/run_demo.py: SQLite, the filesystem
broker, a local anvil chain, the budget signer and simulated agents whose owners never use their
GPUs) in a scratch var directory, with the production intervals (heartbeats every 10 s, matching
every 5 s) unless --heartbeat-s / --match-s say otherwise. Then, as a renter with the API:

- sequential: submits a 2-second process job, signs its budget at once (as gpgpu-client does),
  waits for it to succeed, and so on;
- burst: submits (and signs) `--burst` such jobs at once;
- cancel: submits a long job, cancels it once it runs, and waits for its lease to end (the agent
  has stopped the process and reported it).

Times are the renter's: when a poll of the job list (every POLL_S) first shows the status. A job
that is never seen running (it ran between two polls) counts as running when it is seen
succeeded. Prints one JSON line: p50/p95 (seconds) of each, and how many jobs were seen running.
Needs anvil (npm ci) and bubblewrap, like the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from demo_budget_signer import ApiError, Marketplace, job_authorize  # noqa: E402 - needs scripts/ on sys.path
from eth_account import Account  # noqa: E402

POLL_S = 0.1
JOB_S = 2
STATUSES = "pending,scheduled,running,succeeded,failed,cancelled"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 2), "p95": round(p95, 2)}


def job_body(seconds: float) -> dict[str, Any]:
    return {
        "kind": "process",
        "command": ["python3", "-c", f"import time; time.sleep({seconds})"],
        "gpu_count": 1,
        "max_price_per_gpu_hour": "2.00",
        "expected_duration_s": 60,
        "max_duration_s": 900,
    }


class Renter:
    def __init__(self, api: Marketplace, account: Any) -> None:
        self.api = api
        self.account = account

    def submit(self, seconds: float) -> tuple[int, float]:
        submitted = time.monotonic()
        job = self.api.request("POST", "/api/v1/jobs/", job_body(seconds))
        job_authorize(self.api, self.account, int(job["id"]))
        return int(job["id"]), submitted

    def statuses(self) -> dict[int, str]:
        page = self.api.request("GET", f"/api/v1/jobs/?status={STATUSES}&limit=100")
        return {int(job["id"]): str(job["status"]) for job in page["results"]}

    def watch(self, submitted: dict[int, float], timeout_s: float) -> dict[int, dict[str, float]]:
        """Poll until every job has finished: {job: {"running": s, "succeeded": s}} since submit."""
        seen: dict[int, dict[str, float]] = {job: {} for job in submitted}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any("finished" not in s for s in seen.values()):
            now = time.monotonic()
            for job, status in self.statuses().items():
                if job not in seen:
                    continue
                if status == "running":
                    seen[job].setdefault("running", now - submitted[job])
                elif status in ("succeeded", "failed", "cancelled"):
                    seen[job].setdefault("finished", now - submitted[job])
                    seen[job].setdefault(status, now - submitted[job])
            time.sleep(POLL_S)
        return seen


def measure(renter: Renter, *, sequential: int, burst: int, timeout_s: float) -> dict[str, Any]:
    rows: dict[str, list[dict[str, float]]] = {"sequential": [], "burst": []}
    for _ in range(sequential):
        job, at = renter.submit(JOB_S)
        rows["sequential"].extend(renter.watch({job: at}, timeout_s).values())
    jobs = dict(renter.submit(JOB_S) for _ in range(burst))
    rows["burst"].extend(renter.watch(jobs, timeout_s).values())

    result: dict[str, Any] = {}
    for name, seen in rows.items():
        running = [s.get("running", s.get("succeeded")) for s in seen]
        result[name] = {
            "jobs": len(seen),
            "seen_running": sum("running" in s for s in seen),
            "succeeded": sum("succeeded" in s for s in seen),
            "submit_to_running_s": percentiles([r for r in running if r is not None]),
            "submit_to_succeeded_s": percentiles([s["succeeded"] for s in seen if "succeeded" in s]),
        }

    stops: list[float] = []
    for _ in range(3):
        job, at = renter.submit(600)
        deadline = time.monotonic() + timeout_s
        while renter.statuses().get(job) != "running" and time.monotonic() < deadline:
            time.sleep(POLL_S)
        cancelled = time.monotonic()
        renter.api.request("POST", f"/api/v1/jobs/{job}/cancel/", {})
        while time.monotonic() < deadline:
            leases = renter.api.request("GET", f"/api/v1/jobs/{job}/leases/")
            items = leases["results"] if isinstance(leases, dict) else leases
            if items and all(lease["status"] == "ended" for lease in items):
                stops.append(time.monotonic() - cancelled)
                break
            time.sleep(POLL_S)
    result["cancel"] = {"jobs": 3, "stopped": len(stops), "cancel_to_stopped_s": percentiles(stops)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--machines", type=int, default=4)
    parser.add_argument("--sequential", type=int, default=5)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--heartbeat-s", type=float, default=10)
    parser.add_argument("--match-s", type=float, default=5)
    parser.add_argument("--timeout-s", type=float, default=120)
    args = parser.parse_args()

    var_dir = Path(tempfile.mkdtemp(prefix="gpgpu-dispatch-"))
    var_dir.chmod(0o755)  # the rental user passes through it to the rentals directory
    port, chain_port = free_port(), free_port()
    env = {
        **os.environ,
        "GPGPU_VAR_DIR": str(var_dir),
        # This checkout's agent, whatever the environment's editable install points at.
        "PYTHONPATH": os.pathsep.join([str(ROOT / "agent"), os.environ.get("PYTHONPATH", "")]),
        "HEARTBEAT_INTERVAL_S": f"{args.heartbeat_s:g}",
        "MATCH_INTERVAL_S": f"{args.match_s:g}",
        # Owners who never come back: every GPU is free, so the figures are the dispatch path's.
        "GPGPU_AGENT_SIMULATE_OWNERS_IDLE": "true",
        "GPGPU_AGENT_IDLE_GRACE_S": "0",
    }
    argv = [sys.executable, str(ROOT / "scripts" / "run_demo.py"), "--port", str(port)]
    argv += ["--chain-port", str(chain_port), "--machines", str(args.machines)]
    log = (var_dir / "demo.log").open("wb")
    demo = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        credentials, key = var_dir / "demo" / "credentials.json", var_dir / "demo" / "renter.key"
        api: Marketplace | None = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and demo.poll() is None:
            if b"GPGPU marketplace is running" in (var_dir / "demo.log").read_bytes():
                api = Marketplace(f"http://127.0.0.1:{port}", json.loads(credentials.read_text())["renter"]["token"])
                break
            time.sleep(0.5)
        if api is None:
            print(f"the demo did not come up; see {var_dir / 'demo.log'}", file=sys.stderr)
            return 1
        renter = Renter(api, Account.from_key(key.read_text().strip()))
        # The machines' first heartbeats: wait until a first job runs, then measure.
        warm, at = renter.submit(0.1)
        renter.watch({warm: at}, 120)
        result = measure(renter, sequential=args.sequential, burst=args.burst, timeout_s=args.timeout_s)
        settings = {"machines": args.machines, "heartbeat_s": args.heartbeat_s, "match_s": args.match_s}
        print(json.dumps({"settings": settings, **result}), flush=True)
        return 0
    except ApiError as error:
        print(f"the marketplace answered: {error}; see {var_dir}", file=sys.stderr)
        return 1
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(60)
        except subprocess.TimeoutExpired:
            demo.kill()
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
