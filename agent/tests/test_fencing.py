"""Fencing: a rental never outlives the agent's contact with the marketplace by more than the fence.

The deadline files and their clock (gpgpu_agent.fencing), the process supervisor as the watchdog
(real workloads in the real sandbox), and the whole path with a real agent process
(`gpgpu-agent run --simulate`) against a small fake marketplace over HTTP: the agent is paused
with SIGSTOP, and its rental must stop once the fence passes, by nothing of the agent's; after
SIGCONT the agent reports it `exited`, `fenced:`, at the time it really ended. The container
watcher is tested with the fake engine (test_container_runner.py) and a real one
(test_container_engine.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conftest import SANDBOX_PYTHON, SandboxKit
from gpgpu_agent.credentials import MachineCredential, save_credential
from gpgpu_agent.fencing import Fence, boottime, deadline_passed
from gpgpu_agent.runners.process import ProcessRunner
from gpgpu_agent.runners.state import proc_stat
from gpgpu_agent.signing import create_key_file
from gpgpu_agent.types import LeaseSpec, RunState

AGENT_DIR = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and not stat.zombie


def host_pid(marker: str) -> int | None:
    """The host pid of the live workload whose last argument is ``marker`` (not its supervisor's
    or bwrap's, whose command lines hold it too)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            wrapper = argv[0].endswith(b"bwrap") or any(arg.endswith(b"shim.py") for arg in argv)
            if marker.encode() in argv and not wrapper and alive(int(name)):
                return int(name)
    return None


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- the deadline files -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_renewed_deadline_counts_from_when_the_heartbeat_was_sent(tmp_path: Path) -> None:
    clock = Clock()
    fence = Fence(tmp_path, fence_s=30, clock=clock)
    fence.arm(7)
    clock.now = 1010.0

    fence.renew([7], contact=1004.0)

    assert json.loads(fence.path(7).read_text())["deadline"] == 1034.0
    assert not deadline_passed(fence.path(7), now=1033.9)
    assert deadline_passed(fence.path(7), now=1034.0)


def test_a_lease_armed_after_a_heartbeat_gets_its_deadline_from_that_contact(tmp_path: Path) -> None:
    clock = Clock()
    fence = Fence(tmp_path, fence_s=30, clock=clock)
    fence.renew([], contact=1002.0)
    clock.now = 1003.0

    fence.arm(8)

    assert json.loads(fence.path(8).read_text())["deadline"] == 1032.0


def test_renewing_never_brings_back_a_deadline_the_agent_removed(tmp_path: Path) -> None:
    fence = Fence(tmp_path, fence_s=30)
    fence.arm(9)
    fence.disarm(9)

    fence.renew([9], contact=boottime())

    assert not fence.path(9).exists()
    assert not deadline_passed(fence.path(9))  # no deadline: not fenced


def test_a_deadline_written_in_another_boot_has_passed(tmp_path: Path) -> None:
    fence = Fence(tmp_path, fence_s=3600)
    fence.arm(10)
    data = json.loads(fence.path(10).read_text())
    fence.path(10).write_text(json.dumps({**data, "boot_id": "another-boot"}))

    assert deadline_passed(fence.path(10))


# --- the supervisor is the watchdog of a process lease ------------------------------------------


@pytest.fixture
def fenced_runner(tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path) -> Iterator[ProcessRunner]:
    runner = ProcessRunner(
        tmp_path / "state",
        sandbox=sandbox_kit.sandbox,
        user=sandbox_kit.user,
        cgroups=sandbox_kit.cgroups,
        limits=sandbox_kit.limits,
        work_dir=rentals_dir,
        fence_dir=tmp_path / "fence",
        fence_grace_s=1,
    )
    yield runner
    for state in runner.adopt():
        if state.running:
            runner.stop(state.lease_id, grace_s=0)
        runner.forget(state.lease_id)


def _lease(lease_id: int, script: str) -> LeaseSpec:
    return LeaseSpec(
        lease_id=lease_id,
        job_id=lease_id,
        kind="process",
        image="",
        command=(SANDBOX_PYTHON, "-u", "-c", script),
        env={},
        gpu_uuids=("GPU-aaa",),
        max_duration_s=600,
        price_per_gpu_hour="1.00",
    )


def _ended(runner: ProcessRunner, lease_id: int, timeout: float) -> RunState:
    def check() -> RunState | None:
        state = runner.poll(lease_id)
        return None if state.running else state

    return wait_for(check, timeout, f"lease {lease_id} ending")


def test_the_supervisor_stops_a_workload_whose_deadline_passes_and_records_when(
    fenced_runner: ProcessRunner, tmp_path: Path
) -> None:
    fence = Fence(tmp_path / "fence", fence_s=60)
    fence.arm(9_500_001)
    fenced_runner.start(_lease(9_500_001, "import time; print('working'); time.sleep(60)"), gpu_indexes={"GPU-aaa": 0})
    fence.set_fence_s(1.5)
    fence.renew([9_500_001], contact=boottime())  # the last contact with the marketplace
    armed = time.monotonic()

    state = _ended(fenced_runner, 9_500_001, timeout=10)

    assert 1.4 <= time.monotonic() - armed <= 4.0
    assert state.exit_code == 128 + signal.SIGTERM
    assert state.fenced_at is not None and state.ended_at is not None
    assert state.fenced_at <= state.ended_at <= state.fenced_at + timedelta(seconds=1)
    assert "fenced" in state.log_tail


def test_a_workload_that_ignores_sigterm_is_killed_after_the_fence_grace(fenced_runner: ProcessRunner, tmp_path: Path):
    fence = Fence(tmp_path / "fence", fence_s=1)
    fence.arm(9_500_002)
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('stubborn'); time.sleep(60)"
    fenced_runner.start(_lease(9_500_002, script), gpu_indexes={"GPU-aaa": 0})

    state = _ended(fenced_runner, 9_500_002, timeout=10)

    assert state.exit_code == 128 + signal.SIGKILL
    assert state.fenced_at is not None and state.ended_at is not None
    assert timedelta(seconds=0.9) <= state.ended_at - state.fenced_at <= timedelta(seconds=2.5)


def test_a_deadline_renewed_in_time_keeps_the_workload_running(fenced_runner: ProcessRunner, tmp_path: Path) -> None:
    fence = Fence(tmp_path / "fence", fence_s=60)
    fence.arm(9_500_003)
    fenced_runner.start(_lease(9_500_003, "import time; time.sleep(60)"), gpu_indexes={"GPU-aaa": 0})
    fence.set_fence_s(1)

    until = time.monotonic() + 3  # three fences: only the renewals keep it running
    while time.monotonic() < until:
        fence.renew([9_500_003], contact=boottime())
        time.sleep(0.2)

    assert fenced_runner.poll(9_500_003).running


# --- a real agent, paused -----------------------------------------------------------------------


class FakeMarket:
    """The agent API's three calls in memory, over HTTP: heartbeats are answered with
    `lease_fence_s`, a one-second interval and, once the machine shows a GPU, one start order;
    events and usage reports are kept."""

    def __init__(self, *, lease_id: int, command: list[str], fence_s: float) -> None:
        self.lease_id = lease_id
        self.command = command
        self.fence_s = fence_s
        self.stop_requested = False
        self.heartbeats = 0
        self.events: list[dict[str, Any]] = []
        self.usage: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def event(self, kind: str) -> dict[str, Any] | None:
        with self.lock:
            return next((e for e in self.events if e["type"] == kind), None)

    def _reply(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if path.endswith("/heartbeat"):
                self.heartbeats += 1
                reported = {lease["lease_id"] for lease in body.get("leases", [])}
                start = []
                started = any(e["type"] == "started" for e in self.events)
                if body.get("gpus") and not started and self.lease_id not in reported:
                    start.append(
                        {
                            "lease_id": self.lease_id,
                            "job_id": self.lease_id,
                            "kind": "process",
                            "image": "",
                            "command": self.command,
                            "env": {},
                            "gpu_uuids": [body["gpus"][0]["uuid"]],
                            "max_duration_s": 600,
                            "price_per_gpu_hour": "1.00",
                        }
                    )
                stop = [{"lease_id": self.lease_id, "reason": "cancelled"}] if self.stop_requested else []
                return 200, {
                    "heartbeat_interval_s": 1,
                    "server_time": datetime.now(UTC).isoformat(),
                    "start": start,
                    "stop": stop,
                    "lease_fence_s": self.fence_s,
                }
            if m := re.search(r"/leases/(\d+)/events$", path):
                self.events.append(body)
                return 200, {"lease_id": int(m.group(1)), "lease_status": "running", "duplicate": False}
            if m := re.search(r"/leases/(\d+)/logs$", path):
                return 201, {"lease_id": int(m.group(1)), "seq": body["seq"], "duplicate": False, "stored": True}
            if m := re.search(r"/leases/(\d+)/usage$", path):
                self.usage.append(body)
                return 201, {"id": len(self.usage), "lease_id": int(m.group(1)), "report_id": body["report_id"]}
        return 404, {"code": "not_found", "detail": path}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        market = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                status, reply = market._reply(self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


class AgentProcess:
    """`gpgpu-agent run --simulate` in a process of its own, against a FakeMarket."""

    def __init__(self, state_dir: Path, rentals_dir: Path, market: FakeMarket, *extra: str) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_credential(state_dir / "credential.json", MachineCredential(1, "gpm_" + "f" * 40, market.url))
        create_key_file(state_dir / "signing.key")
        argv = [sys.executable, "-m", "gpgpu_agent", "run", "--state-dir", str(state_dir)]
        argv += ["--marketplace-url", market.url, "--simulate", "--allow-process-jobs", "--simulate-owners-idle"]
        argv += ["--simulate-gpus", "NVIDIA L4:23034", "--rentals-dir", str(rentals_dir)]
        argv += ["--poll-interval-s", "0.2", "--idle-grace-s", "0", "--stop-grace-s", "1", "--usage-interval-s", "1"]
        argv += extra
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(AGENT_DIR), os.environ.get("PYTHONPATH", "")])}
        self.log = (state_dir / "agent.log").open("wb")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)  # noqa: S603

    @property
    def pid(self) -> int:
        return self.process.pid

    def stopped(self) -> bool:
        stat = proc_stat(self.pid)
        return stat is not None and stat.state == "T"

    def output(self) -> str:
        return (self.state_dir / "agent.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
            self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def paused_agent(
    request: pytest.FixtureRequest, tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path
) -> Iterator[tuple[AgentProcess, FakeMarket, str]]:
    """A real agent running one lease from a FakeMarket with the fence the test names."""
    fence_s, lease_id = request.param
    marker = f"gpgpu-fence-test-{lease_id}"
    command = [SANDBOX_PYTHON, "-c", "import time; print('working', flush=True); time.sleep(120)", marker]
    market = FakeMarket(lease_id=lease_id, command=command, fence_s=fence_s)
    agent = AgentProcess(tmp_path / "agent", rentals_dir, market)
    try:
        wait_for(lambda: market.event("started"), 60, f"the lease starting; the agent said:\n{agent.output()}")
        wait_for(lambda: host_pid(marker), 10, "the workload showing up")
        yield agent, market, marker
    finally:
        market.stop_requested = True  # whatever still runs is stopped by the agent itself
        with contextlib.suppress(AssertionError):
            wait_for(lambda: market.event("exited"), 15, "the lease ending")
        agent.close()
        market.close()
        if (pid := host_pid(marker)) is not None:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("paused_agent", [(3.0, 9_500_101)], indirect=True)
def test_an_agent_paused_longer_than_the_fence_has_its_rental_stopped_and_reports_it_fenced(paused_agent) -> None:
    agent, market, marker = paused_agent
    pid = host_pid(marker)
    assert pid is not None

    # Given a running rental, when its agent is paused (SIGSTOP) past the fence of 3 s …
    os.kill(agent.pid, signal.SIGSTOP)
    paused = time.monotonic()
    wait_for(lambda: not alive(pid), 15, "the rental being stopped")
    ended = datetime.now(UTC)
    stopped_after = time.monotonic() - paused

    # … then the rental is stopped by its watchdog, with the agent still paused: within the fence
    # (less the last renewal's age, a heartbeat a second) plus half a second of checking.
    assert agent.stopped()
    assert 3.0 - 1.5 <= stopped_after <= 3.0 + 2.0, stopped_after
    assert market.event("exited") is None

    # And once the agent runs again it reports the lease exited, fenced, when it really ended.
    os.kill(agent.pid, signal.SIGCONT)
    exited = wait_for(lambda: market.event("exited"), 15, f"the exited event; the agent said:\n{agent.output()}")
    assert exited["detail"].startswith("fenced:"), exited
    assert exited["exit_code"] == 128 + signal.SIGTERM
    assert abs(utc(exited["at"]) - ended) <= timedelta(seconds=1)
    time.sleep(0.5)  # any usage report still in flight
    assert market.usage, "no usage was reported"
    assert max(utc(report["period_end"]) for report in market.usage) <= utc(exited["at"])


@pytest.mark.parametrize("paused_agent", [(6.0, 9_500_102)], indirect=True)
def test_an_agent_paused_shorter_than_the_fence_leaves_its_rental_running_and_renews(paused_agent) -> None:
    agent, market, marker = paused_agent
    pid = host_pid(marker)
    assert pid is not None
    deadline_file = agent.state_dir / "fence" / f"lease-{market.lease_id}.json"
    before = json.loads(deadline_file.read_text())["deadline"]

    os.kill(agent.pid, signal.SIGSTOP)
    time.sleep(2.0)
    assert alive(pid)
    os.kill(agent.pid, signal.SIGCONT)

    # The next heartbeats move the deadline past the pause, and the rental runs on.
    wait_for(lambda: json.loads(deadline_file.read_text())["deadline"] > before + 2.0, 5, "the deadline's renewal")
    time.sleep(3.0)
    assert alive(pid)
    assert market.event("exited") is None
    assert json.loads(deadline_file.read_text())["deadline"] > boottime() + 6.0 - 2.0


# --- an agent told to stop its rentals when it stops (the demo's agents) --------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_agent_run_with_stop_rentals_on_exit_leaves_no_workload_running_when_signalled(
    sig: signal.Signals, tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path
) -> None:
    lease_id = 9_500_200 + sig
    marker = f"gpgpu-exit-test-{lease_id}"
    command = [SANDBOX_PYTHON, "-c", "import time; print('working', flush=True); time.sleep(120)", marker]
    market = FakeMarket(lease_id=lease_id, command=command, fence_s=120)
    agent = AgentProcess(tmp_path / "agent", rentals_dir, market, "--stop-rentals-on-exit")
    try:
        wait_for(lambda: market.event("started"), 60, f"the lease starting; the agent said:\n{agent.output()}")
        pid = wait_for(lambda: host_pid(marker), 10, "the workload showing up")

        # Given a running rental, when the agent is told to stop (Ctrl-C, or the demo's SIGTERM) …
        os.kill(agent.pid, sig)
        code = agent.process.wait(timeout=30)

        # … then it exits cleanly having stopped the rental and told the marketplace so.
        assert code == 0, agent.output()
        assert not alive(pid) and host_pid(marker) is None
        exited = market.event("exited")
        assert exited is not None and "agent_stopped" in exited["detail"], market.events
    finally:
        agent.close()
        market.close()
        if (left := host_pid(marker)) is not None:
            os.kill(left, signal.SIGKILL)
