"""The whole HTTP path: a renter submits a job through the REST API, the matcher places it, a
simulated machine (simulator.fleet, in a background thread) picks it up from its heartbeat over
the agent API, really runs the command, and reports back; the renter sees the outcome through
GET /api/v1/jobs/{id}/.

Runs against pytest-django's live_server. On SQLite the test database lives in memory and the
live server shares its one connection with this thread, so the machine's ticks and this
thread's work take turns (a lock); on PostgreSQL they run freely.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from django.db import connection

from jobs.models import UsageReport
from marketplace.matching import match_cycle
from simulator.fleet import fleet_register
from simulator.owner_usage import NeverBusy
from tests.factories import ProviderFactory, RenterFactory, token_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

DEADLINE_S = 60.0


class Owner(NeverBusy):
    """An owner the test can send to the GPU and away again."""

    def __init__(self) -> None:
        super().__init__()
        self.using = False

    def busy(self) -> bool:
        return self.using


@pytest.fixture
def marketplace(live_server: Any, settings: Any) -> Iterator[dict[str, Any]]:
    """A live marketplace with one renter and one provider whose one-GPU machine runs in a
    background thread; yields what the tests need and stops the machine afterwards."""
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_INTERVAL_S": 1}
    renter_token = token_for(RenterFactory().user)
    provider_token = token_for(ProviderFactory().user)
    fleet = fleet_register(
        live_server.url, provider_token=provider_token, count=1, rng=random.Random(4), owners_never_busy=True
    )
    machine = fleet.machines[0]
    del machine.spec.gpus[1:]  # one GPU, so the job's placement is known
    owner = Owner()
    machine.spec.gpus[0].owner = owner
    turn = threading.Lock() if connection.vendor == "sqlite" else contextlib.nullcontext()
    machine_step = machine.step

    def step_in_turn() -> None:
        with turn:
            machine_step()

    machine.step = step_in_turn  # type: ignore[method-assign]
    machine.tick_s = 0.2
    fleet.start()
    session = requests.Session()
    session.headers["Authorization"] = f"Token {renter_token}"
    try:
        yield {"url": live_server.url, "session": session, "turn": turn, "owner": owner, "fleet": fleet}
    finally:
        fleet.stop()
        session.close()
        assert not any(t.is_alive() for t in fleet.threads), "the simulated machine did not stop"


def _call(m: dict[str, Any], method: str, path: str, **kwargs: Any) -> requests.Response:
    with m["turn"]:
        return m["session"].request(method, f"{m['url']}{path}", timeout=10, **kwargs)


def _submit(m: dict[str, Any], command: list[str], key: str) -> dict[str, Any]:
    body = {
        "kind": "process",
        "command": command,
        "gpu_count": 1,
        "max_price_per_gpu_hour": "2.00",
        "expected_duration_s": 60,
        "max_duration_s": 300,
    }
    response = _call(m, "POST", "/api/v1/jobs/", json=body, headers={"Idempotency-Key": key})
    assert response.status_code == 201, response.text
    return response.json()


def _wait_for(m: dict[str, Any], job_id: int, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Run match cycles and read the job until `done(job)`; fail after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    seen: list[str] = []
    while time.monotonic() < deadline:
        with m["turn"]:
            match_cycle()
        job = _call(m, "GET", f"/api/v1/jobs/{job_id}/").json()
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        if done(job):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} went through {seen} and did not get there within {DEADLINE_S} s")


def _event_kinds(m: dict[str, Any], job_id: int) -> list[str]:
    return [e["kind"] for e in _call(m, "GET", f"/api/v1/jobs/{job_id}/events/").json()["results"]]


def test_job_submitted_over_http_runs_on_a_simulated_machine_and_succeeds(marketplace: dict[str, Any]) -> None:
    command = [
        sys.executable,
        "-c",
        "import os, time; print('training on GPU', os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(1.5)",
    ]
    job = _submit(marketplace, command, key="e2e-success")
    assert job["status"] == "pending"

    job = _wait_for(marketplace, job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))

    assert job["status"] == "succeeded", job
    assert job["exit_code"] == 0
    assert _event_kinds(marketplace, job["id"]) == [
        "job.created",
        "lease.assigned",
        "lease.started",
        "lease.ended",
        "job.succeeded",
    ]
    leases = _call(marketplace, "GET", f"/api/v1/jobs/{job['id']}/leases/").json()["results"]
    assert [lease["end_reason"] for lease in leases] == ["succeeded"]
    lease = _call(marketplace, "GET", f"/api/v1/leases/{leases[0]['id']}/").json()
    # The command really ran, on the leased GPU's index, and its output came back.
    assert "training on GPU 0" in lease["log_tail"]
    # Usage was reported for billing, never more than the lease's GPU time.
    reports = list(UsageReport.objects.filter(lease_id=lease["id"]))
    assert reports
    assert all(r.gpu_seconds <= _seconds(r.period_end - r.period_start) for r in reports)


def _seconds(delta: timedelta) -> Decimal:
    return Decimal(delta // timedelta(microseconds=1)) / Decimal(1_000_000)


def test_cancelling_a_running_job_stops_its_process_on_the_machine(marketplace: dict[str, Any], tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    command = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)",
    ]
    job = _submit(marketplace, command, key="e2e-cancel")
    _wait_for(marketplace, job["id"], lambda j: j["status"] == "running" and pid_file.exists())
    pid = int(pid_file.read_text())

    response = _call(marketplace, "POST", f"/api/v1/jobs/{job['id']}/cancel/")
    assert response.status_code == 200, response.text

    lease = _wait_lease_end(marketplace, job["id"])
    assert lease["end_reason"] == "cancelled"
    assert _call(marketplace, "GET", f"/api/v1/jobs/{job['id']}/").json()["status"] == "cancelled"
    assert not _alive(pid), "the job's process is still running after the cancel"


def test_job_is_requeued_when_the_owner_comes_back(marketplace: dict[str, Any]) -> None:
    job = _submit(marketplace, [sys.executable, "-c", "import time; time.sleep(120)"], key="e2e-preempt")
    _wait_for(marketplace, job["id"], lambda j: j["status"] == "running")

    marketplace["owner"].using = True

    lease = _wait_lease_end(marketplace, job["id"])
    assert lease["end_reason"] == "preempted_by_owner"
    job = _call(marketplace, "GET", f"/api/v1/jobs/{job['id']}/").json()
    # Interruptible (the default): back in the queue, waiting for an idle GPU.
    assert job["status"] == "pending"
    assert "job.requeued" in _event_kinds(marketplace, job["id"])


def _wait_lease_end(m: dict[str, Any], job_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        leases = _call(m, "GET", f"/api/v1/jobs/{job_id}/leases/").json()["results"]
        if leases and leases[0]["status"] == "ended":
            return leases[0]
        time.sleep(0.2)
    pytest.fail(f"the lease of job {job_id} did not end within {DEADLINE_S} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True
