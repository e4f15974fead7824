"""The daemon's decisions, driven step by step: the fake NVIDIA driver beneath the real collector,
real short processes under the process runner, the in-memory FakeTransport and the real spool."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gpgpu_agent.daemon import Agent
from gpgpu_agent.fake_nvml import FakeNvml
from gpgpu_agent.idle import IdleDetector, no_parent
from gpgpu_agent.nvml import NvmlCollector
from gpgpu_agent.runners.process import ProcessRunner
from gpgpu_agent.spool import Spool
from gpgpu_agent.transport import Backoff, FakeTransport

OWNER_PID = 4_000_321


def _order(lease_id: int, uuid: str, seconds: float) -> dict[str, Any]:
    return {
        "lease_id": lease_id,
        "job_id": 100 + lease_id,
        "kind": "process",
        "image": "",
        "command": [sys.executable, "-c", f"import time; print('hello', flush=True); time.sleep({seconds})"],
        "env": {},
        "gpu_uuids": [uuid],
        "max_duration_s": 3600,
        "price_per_gpu_hour": "1.00",
    }


def _reply(**extra: Any) -> dict[str, Any]:
    return {"heartbeat_interval_s": 10, "server_time": datetime.now(UTC).isoformat(), "start": [], "stop": [], **extra}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Agent, FakeNvml, FakeTransport]]:
    fake = FakeNvml().install()
    fake.add_gpu("NVIDIA L4", 23034)
    transport = FakeTransport()
    agent = Agent(
        collector=NvmlCollector(),
        idle=IdleDetector(threshold_pct=10, grace_s=0, parent_of=no_parent),
        runner=ProcessRunner(tmp_path),
        transport=transport,
        outbox=Spool(tmp_path / "spool.sqlite3"),
        sign=lambda struct: "0x" + "11" * 65,
        state_dir=tmp_path,
        stop_grace_s=2,
        usage_interval_s=1,
        backoff=Backoff(base_s=0.01, cap_s=0.01),
        parent_of=no_parent,
    )
    try:
        yield agent, fake, transport
    finally:
        for lease_id in list(agent.leases):
            agent.runner.stop(lease_id, grace_s=0)
        agent.outbox.close()
        fake.uninstall()


def _start_lease(agent: Agent, fake: FakeNvml, transport: FakeTransport, seconds: float) -> int:
    uuid = fake.gpus[0].uuid
    agent.poll_once()
    transport.heartbeat_replies.append(_reply(start=[_order(1, uuid, seconds)]))
    agent.network_once()
    agent.poll_once()  # acts on the order
    assert 1 in agent.leases
    return 1


def test_owner_process_on_a_leased_gpu_stops_the_rental_and_ends_billing_when_seen(rig: Any) -> None:
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)
    pids = agent.runner.poll(1).pids

    fake.add_process(0, OWNER_PID, 1000)
    seen = datetime.now(UTC)
    started = time.monotonic()
    agent.poll_once()
    assert time.monotonic() - started <= 10
    assert all(not os.path.exists(f"/proc/{pid}/cmdline") or _zombie(pid) for pid in pids)

    agent.network_once()  # replays the spool
    events = [(k, key) for k, _, key in transport.applied if k == "event"]
    assert events == [("event", "lease-1-started"), ("event", "lease-1-preempted_by_owner")]
    body = transport._events[(1, "lease-1-preempted_by_owner")]
    assert abs(datetime.fromisoformat(body["at"].replace("Z", "+00:00")) - seen) < timedelta(seconds=1)
    assert "owner process 4000321" in body["detail"]


def test_closed_schedule_reclaims_the_rental_and_offers_nothing(rig: Any) -> None:
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)

    transport.heartbeat_replies.append(
        _reply(schedule={"available_now": False, "available_until": None, "indefinitely": False})
    )
    agent.network_once()
    agent.poll_once()
    agent.network_once()

    assert ("event", 1, "lease-1-preempted_by_owner") in transport.applied
    heartbeat = [c for c in transport.calls if c.method == "heartbeat"][-1].body
    assert heartbeat["gpus"][0]["idle"] is False
    assert heartbeat["leases"] == []


def test_reports_spooled_while_unreachable_arrive_once_in_order(rig: Any) -> None:
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 1.5)
    transport.set_down()
    deadline = time.monotonic() + 10
    while 1 in agent.leases and time.monotonic() < deadline:
        agent.poll_once()
        agent.network_once()
        time.sleep(0.2)
    assert 1 not in agent.leases
    assert agent.outbox.pending() >= 2  # usage and the exit, kept on disk

    transport.set_up()
    agent.network_once()
    agent.network_once()

    keys = [key for _, _, key in transport.applied]
    assert len(keys) == len(set(keys))
    assert keys[0] == "lease-1-started" and keys[-1] == "lease-1-exited"
    assert any(kind == "usage" for kind, _, _ in transport.applied)
    assert agent.outbox.pending() == 0


def test_stopping_the_agent_leaves_the_rental_running(rig: Any) -> None:
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)
    pids = agent.runner.poll(1).pids
    agent.request_stop()
    agent.shutdown()  # what run() does on SIGTERM
    assert all(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
