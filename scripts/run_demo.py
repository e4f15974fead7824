"""Run the whole marketplace on this machine and supervise it (started by scripts/demo).

Migrates the database, seeds the demo users, then starts the web server, a Celery worker,
Celery beat and N provider agents (`gpgpu-agent run --simulate`: the real agent over simulated
GPUs whose owners come and go), each in its own process group. Each agent keeps its state under
var/demo/agents/<n>/ (credential, signing key, agent.toml, spool), so a re-run reuses the same
machines instead of registering new ones. Prints where to
look and a curl that submits a job. Ctrl-C (or SIGTERM) stops every child, the agents stopping
their rentals on the way out (`--stop-rentals-on-exit`), and exits 0; if a
child dies on its own, the others are stopped and the exit status is 1.

The database and broker are the embedded defaults (SQLite and a filesystem broker under
var/) unless DATABASE_URL / CELERY_BROKER_URL are set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
sys.path.insert(0, str(ROOT))

from billing.chain.anvil import anvil_binary, rpc_wait  # noqa: E402 - needs ROOT on sys.path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/demo", description="Run the marketplace with a simulated fleet.")
    parser.add_argument("--port", type=int, default=8000, help="web server port on 127.0.0.1 (default 8000)")
    parser.add_argument("--machines", type=int, default=4, help="simulated provider agents (default 4)")
    parser.add_argument("--time-scale", type=float, default=5.0, help="speed-up of owner patterns (default 5)")
    parser.add_argument("--verbose", action="store_true", help="show every process's log here, not only the fleet's")
    parser.add_argument("--chain-port", type=int, default=8545, help="local anvil chain port (default 8545)")
    args = parser.parse_args()
    if not 1 <= args.port <= 65535 or not 1 <= args.machines <= 64 or not args.time_scale > 0:
        parser.error("--port must be 1-65535, --machines 1-64, --time-scale positive")
    if not 1 <= args.chain_port <= 65535 or args.chain_port == args.port:
        parser.error("--chain-port must be 1-65535 and differ from --port")
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


# The GPUs of each demo machine in turn (the agent's simulate_gpus setting).
DEMO_MACHINES = [
    "NVIDIA GeForce RTX 4090:24564",
    "NVIDIA L4:23034,NVIDIA L4:23034",
    "NVIDIA A100-SXM4-80GB:81920",
    "NVIDIA GeForce RTX 4090:24564,NVIDIA GeForce RTX 4090:24564",
]
AGENT = [PYTHON, "-m", "gpgpu_agent"]


def agent_prepare(n: int, *, url: str, provider_token: str, agents_dir: Path, time_scale: float, env: dict) -> Path:
    """Machine n's state dir, with its agent.toml, registered once (re-runs reuse it)."""
    state_dir = agents_dir / str(n)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The leases' work directories: outside the (0700) state dir, so the rental user may pass.
    rentals_dir = agents_dir.parent / "rentals" / str(n)
    gpus = DEMO_MACHINES[(n - 1) % len(DEMO_MACHINES)]
    (state_dir / "agent.toml").write_text(
        f"# Written by scripts/demo for simulated machine {n}.\n"
        f'marketplace_url = "{url}"\n'
        "simulate = true\n"
        f'simulate_gpus = "{gpus}"\n'
        f"time_scale = {time_scale}\n"
        "idle_grace_s = 10\n"
        "usage_interval_s = 15\n"
        f'hostname = "demo-rig-{n}"\n'
        "# The demo's machines opt in to process jobs (sandboxed; a real machine runs containers only\n"
        "# unless its owner sets this) and run no containers.\n"
        "allow_process_jobs = true\n"
        'container_engine = "none"\n'
        f'rentals_dir = "{rentals_dir}"\n'
    )
    if os.geteuid() == 0:
        # As root the jobs run as the rental user: create it and the directories (idempotent).
        subprocess.run(  # noqa: S603 - our own command
            [*AGENT, "setup", "--state-dir", str(state_dir)], cwd=ROOT, env=env, check=True, capture_output=True
        )
    else:
        rentals_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (state_dir / "credential.json").exists():
        subprocess.run(  # noqa: S603 - our own command
            [*AGENT, "register", "--state-dir", str(state_dir), "--provider-token", provider_token],
            cwd=ROOT,
            env=env,
            check=True,
        )
    return state_dir


def chain_prepare(*, env: dict[str, str], var_dir: Path, chain: Child, credentials_path: Path) -> dict:
    """Wait for the local chain, deploy the escrow on first start (chain_deploy is idempotent),
    make sure the demo renter (key in var/demo/renter.key, 0600) has tokens deposited in it, link
    that key's address to the demo renter and credit the deposit in the ledger."""
    rpc_wait(env["CHAIN_RPC_URL"], timeout_s=30, process=chain.process)
    manage = [PYTHON, "manage.py"]
    deployed = subprocess.run(  # noqa: S603 - our own command
        [*manage, "chain_deploy", "--json"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    deployment = json.loads(deployed.stdout)
    renter_key = var_dir / "demo" / "renter.key"
    subprocess.run(  # noqa: S603 - our own command
        [*manage, "chain_dev_fund", "--renter-key-file", str(renter_key), "--create-key", "--amount", "1000"],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # Link the key's address to the demo renter and credit its deposit now (the beat task
    # billing.tasks.watch_chain does the same every CHAIN_WATCH_INTERVAL_S), so the banner's curl
    # is admitted at once instead of getting 402 insufficient_funds.
    seeded = subprocess.run(  # noqa: S603 - our own command
        [
            *manage,
            "demo_seed",
            "--credentials-file",
            str(credentials_path),
            "--renter-key-file",
            str(renter_key),
            "--watch-chain",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    balance = next((line.strip() for line in seeded.stdout.splitlines() if line.strip().startswith("balance")), "")
    return {**deployment, "renter_key": str(renter_key), "balance": balance}


def banner(url: str, credentials: dict, log_dir: Path, chain: dict | None = None) -> str:
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
    if chain:
        chain_lines = (
            f"   Chain      {chain['rpc_url']} (anvil, chain {chain['chain_id']}; state in var/chain/)\n"
            f"   Escrow     {chain['escrow']}\n"
            f"   Token      {chain['token']}  (mock stablecoin, 6 decimals)\n"
            f"   Renter key {chain['renter_key']}  (1000 tokens deposited in the escrow, wallet linked)\n"
            f"   Money      renter {chain['balance'].removeprefix('balance').strip()}\n"
            f"              a signer (log: signer.log) signs each job's budget with the renter key; charges\n"
            f"              are metered every {chain['meter_s']} s and settled on chain "
            f"every {chain['settle_s']} s\n"
        )
    else:
        chain_lines = "   Chain      none (install Node.js and run `npm ci` for the local anvil chain)\n"
    return f"""
================================================================================
 GPGPU marketplace is running
   API docs   {url}/api/docs/
   Admin      {url}/admin/   (user {admin["username"]}, password {admin["password"]})
   Health     {url}/healthz
   Logs       {log_dir}/  (web, worker, beat)
   Agents     var/demo/agents/<n>/  (`gpgpu-agent status --state-dir var/demo/agents/1`)
{chain_lines}
 Renter token:   {renter}
 Provider token: {provider}

 Submit a job (one of the provider agents runs it):

   curl -s -X POST {url}/api/v1/jobs/ \\
     -H "Authorization: Token {renter}" \\
     -H "Content-Type: application/json" \\
     -H "Idempotency-Key: demo-job-1" \\
     -d '{job}'

 Or with the renter's command line (client/, `gpgpu` in .venv/bin):

   .venv/bin/gpgpu login --url {url} --token {renter}
   .venv/bin/gpgpu search available
   .venv/bin/gpgpu run --command 'python3 -c "print(42)"' --gpus 1 --max-price 2.00 \\
     --duration 1m --max-duration 5m --follow

 Then follow it (put the id from the reply in place of 1):

   curl -s {url}/api/v1/jobs/1/ -H "Authorization: Token {renter}"
   curl -s {url}/api/v1/jobs/1/events/ -H "Authorization: Token {renter}"

 And the money: the renter's balance and charges, the settlements on chain, the provider's earnings:

   curl -s {url}/api/v1/billing/balance/ -H "Authorization: Token {renter}"
   curl -s {url}/api/v1/billing/charges/ -H "Authorization: Token {renter}"
   curl -s {url}/api/v1/billing/settlements/ -H "Authorization: Token {renter}"
   curl -s {url}/api/v1/billing/earnings/ -H "Authorization: Token {provider}"

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
    # The agents' doorbell (docs/agent-api.md, orders/wait): runserver gives each held call a
    # thread, so a lease reaches its machine at once instead of at the next heartbeat.
    env.setdefault("AGENT_ORDERS_WAIT_S", "25")
    # Settle on chain every 20 s instead of every 2 minutes, so a job's payment shows up quickly.
    env.setdefault("SETTLEMENT_INTERVAL_S", "20")
    # The demo's own anvil is one node that never lags: a head below what the database holds is its
    # saved state, older than the database after an unclean stop, and is read as gone at once
    # (billing.rewind.node_behind_wait) rather than after 5 minutes of sending nothing.
    env.setdefault("CHAIN_BEHIND_GRACE_S", "0")
    # Every demo machine registers from this one address on the first run.
    env.setdefault("THROTTLE_REGISTER", "1000/min")
    var_dir = Path(env.get("GPGPU_VAR_DIR", ROOT / "var"))
    log_dir = var_dir / "demo" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    credentials_path = var_dir / "demo" / "credentials.json"
    url = f"http://127.0.0.1:{args.port}"
    manage = [PYTHON, "manage.py"]

    if shutil.which("bwrap") is None:
        print(
            "[demo] warning: bubblewrap is not installed (apt install bubblewrap): the simulated machines run\n"
            "       renters' process jobs only inside its sandbox, so every job will wait unplaced.",
            flush=True,
        )
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
        chain_info: dict | None = None
        if anvil_binary() is not None:
            env.setdefault("CHAIN_RPC_URL", f"http://127.0.0.1:{args.chain_port}")
            chain_state = var_dir / "chain" / "anvil-state.json"
            print(f"[demo] starting the local chain on {env['CHAIN_RPC_URL']} ...", flush=True)
            chain = start(
                "chain",
                [PYTHON, "-m", "billing.chain.anvil", "--port", str(args.chain_port), "--state", str(chain_state)],
            )
            try:
                prepared = chain_prepare(env=env, var_dir=var_dir, chain=chain, credentials_path=credentials_path)
                chain_info = {**prepared, "rpc_url": env["CHAIN_RPC_URL"]}
                chain_info["meter_s"] = env.get("BILLING_METER_INTERVAL_S", "30")
                chain_info["settle_s"] = env["SETTLEMENT_INTERVAL_S"]
            except (RuntimeError, subprocess.CalledProcessError) as error:
                detail = getattr(error, "stderr", None) or error
                print(f"[demo] the chain did not come up: {detail}; see {chain.log_path}", file=sys.stderr, flush=True)
                stop_all(children)
                return 1
        else:
            print("[demo] anvil not found (npm ci): running without a chain", file=sys.stderr, flush=True)
        web = start("web", [*manage, "runserver", f"127.0.0.1:{args.port}", "--noreload"])
        start("worker", [*celery, "worker", "--pool=threads", "--concurrency=2", "--loglevel=INFO"])
        start("beat", [*celery, "beat", "--loglevel=INFO", "--schedule", str(var_dir / "celerybeat-schedule")])
        print(f"[demo] starting the web server on {url} ...", flush=True)
        if not wait_for_web(url, web):
            print(f"[demo] the web server did not come up; see {web.log_path}", file=sys.stderr, flush=True)
            stop_all(children)
            return 1
        agents_dir = var_dir / "demo" / "agents"
        for n in range(1, args.machines + 1):
            state_dir = agent_prepare(
                n,
                url=url,
                provider_token=credentials["provider"]["token"],
                agents_dir=agents_dir,
                time_scale=args.time_scale,
                env=env,
            )
            # Ctrl-C stops the demo's rentals too (a real agent leaves them for its next start).
            agent_run = [*AGENT, "run", "--state-dir", str(state_dir), "--stop-rentals-on-exit"]
            start(f"agent-{n}", agent_run, to_terminal=True)
        if chain_info is not None:
            signer = [PYTHON, str(ROOT / "scripts" / "demo_budget_signer.py"), "--url", url]
            signer += ["--credentials-file", str(credentials_path), "--key-file", chain_info["renter_key"]]
            start("signer", signer)
        print(banner(url, credentials, log_dir, chain_info), flush=True)
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
