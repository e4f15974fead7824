"""The daemon's decisions, driven step by step: the fake NVIDIA driver beneath the real collector,
real short processes in the real process sandbox (a machine that accepts process jobs only), the
in-memory FakeTransport and the real spool."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pynvml
import pytest

from conftest import SANDBOX_PYTHON, SandboxKit
from gpgpu_agent.checkpoint import CheckpointError
from gpgpu_agent.credentials import rotation_mark_path, rotation_pending
from gpgpu_agent.daemon import Agent
from gpgpu_agent.fencing import boottime
from gpgpu_agent.idle import IdleDetector, no_parent
from gpgpu_agent.leases import BLIND_RECLAIM_S, REDACTED, scrub_secrets, secret_variants
from gpgpu_agent.nvml import NvmlCollector
from gpgpu_agent.protocol import STOP_SAVE_CHECKPOINT
from gpgpu_agent.protocols import RunnerError, TransportUnavailable
from gpgpu_agent.runners.common import UnknownLeaseError
from gpgpu_agent.runners.kinds import PROCESS_OFF, KindRunner
from gpgpu_agent.runners.process import ProcessRunner
from gpgpu_agent.spool import Spool
from gpgpu_agent.transport import Backoff, FakeTransport
from gpgpu_agent_testing.fake_nvml import FakeNvml

OWNER_PID = 4_000_321
CREDENTIAL = "gpm_" + "c" * 40
PRIVATE_KEY = "ab" * 32


def _order(lease_id: int, uuid: str, seconds: float, *, script: str | None = None) -> dict[str, Any]:
    return {
        "lease_id": lease_id,
        "job_id": 100 + lease_id,
        "kind": "process",
        "image": "",
        "command": [SANDBOX_PYTHON, "-c", script or f"import time; print('hello', flush=True); time.sleep({seconds})"],
        "env": {},
        "gpu_uuids": [uuid],
        "max_duration_s": 3600,
        "price_per_gpu_hour": "1.00",
    }


def _reply(**extra: Any) -> dict[str, Any]:
    return {"heartbeat_interval_s": 10, "server_time": datetime.now(UTC).isoformat(), "start": [], "stop": [], **extra}


class SlowStart:
    """A runner whose `start` first waits, as one pulling a large image does."""

    def __init__(self, runner: KindRunner, delay_s: float) -> None:
        self.runner = runner
        self.delay_s = delay_s

    def start(self, spec: Any, **options: Any) -> Any:
        time.sleep(self.delay_s)
        return self.runner.start(spec, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def _agent(
    tmp_path: Path,
    sandbox_kit: SandboxKit,
    rentals_dir: Path,
    transport: FakeTransport,
    *,
    backoff: Backoff | None = None,
    fenced: bool = False,
    start_delay_s: float = 0.0,
    idle_grace_s: float = 0.0,
    **options: Any,
) -> Agent:
    """An agent over the state in tmp_path (a second one over the same state is the first one
    restarted). ``fenced``: its runner's supervisors watch the leases' fence deadlines."""
    process = ProcessRunner(
        tmp_path,
        sandbox=sandbox_kit.sandbox,
        user=sandbox_kit.user,
        cgroups=sandbox_kit.cgroups,
        limits=sandbox_kit.limits,
        work_dir=rentals_dir,
        fence_dir=tmp_path / "fence" if fenced else None,
        fence_grace_s=1,
    )
    runner = KindRunner(
        runners={"process": process},
        accepts={"process"},
        refused={"container": "container jobs are off on this machine (container_engine = none)"},
    )
    return Agent(
        collector=NvmlCollector(),
        idle=IdleDetector(threshold_pct=10, grace_s=idle_grace_s, parent_of=no_parent),
        runner=SlowStart(runner, start_delay_s) if start_delay_s else runner,
        transport=transport,
        outbox=Spool(tmp_path / "spool.sqlite3"),
        sign=lambda struct: "0x" + "11" * 65,
        state_dir=tmp_path,
        stop_grace_s=2,
        usage_interval_s=1,
        backoff=backoff or Backoff(base_s=0.01, cap_s=0.01),
        parent_of=no_parent,
        secrets=secret_variants(credential=CREDENTIAL, private_key_hex="0x" + PRIVATE_KEY),
        **options,
    )


@pytest.fixture
def rig(tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path) -> Iterator[tuple[Agent, FakeNvml, FakeTransport]]:
    fake = FakeNvml().install()
    fake.add_gpu("NVIDIA L4", 23034)
    transport = FakeTransport()
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport)
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


def _ordered(agent: Agent, transport: FakeTransport, *orders: dict[str, Any]) -> None:
    """The next heartbeat's reply orders these starts, and the next poll acts on them."""
    transport.heartbeat_replies.append(_reply(start=list(orders)))
    agent.network_once()
    agent.poll_once()


def _left_running(agent: Agent, fake: FakeNvml, transport: FakeTransport, seconds: float) -> Agent:
    """Lease 1 started, then the agent stopped: the rental runs on for the next agent to adopt."""
    _start_lease(agent, fake, transport, seconds)
    agent.request_stop()
    agent.shutdown()
    return agent


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


@pytest.fixture
def clocked_rig(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path
) -> Iterator[tuple[Agent, FakeNvml, FakeTransport, list[datetime]]]:
    """The rig with the agent's clock in the test's hands (now[0])."""
    fake = FakeNvml().install()
    fake.add_gpu("NVIDIA L4", 23034)
    transport = FakeTransport()
    now = [datetime(2026, 3, 2, 12, 0, tzinfo=UTC)]
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, clock=lambda: now[0])
    try:
        yield agent, fake, transport, now
    finally:
        for lease_id in list(agent.leases):
            agent.runner.stop(lease_id, grace_s=0)
        agent.outbox.close()
        fake.uninstall()


def test_a_leased_gpu_whose_processes_stay_unlisted_goes_back_to_the_owner(clocked_rig: Any) -> None:
    """While NVML cannot list a leased GPU's processes, the owner's return cannot be seen (the
    utilisation is the renter's): the rental ran on for as long as the listing failed. A failure
    shorter than BLIND_RECLAIM_S is ridden out, and one that clears counts afresh next time."""
    agent, fake, transport, now = clocked_rig
    _start_lease(agent, fake, transport, 300)
    pids = agent.runner.poll(1).pids
    step = timedelta(seconds=BLIND_RECLAIM_S - 1)
    fake.fail_field(0, "graphics_processes", pynvml.NVML_ERROR_UNKNOWN)
    agent.poll_once()
    now[0] += step
    agent.poll_once()
    fake.heal_field(0, "graphics_processes")
    agent.poll_once()
    fake.fail_field(0, "compute_processes", pynvml.NVML_ERROR_UNKNOWN)
    agent.poll_once()
    now[0] += step
    agent.poll_once()
    assert 1 in agent.leases and agent.runner.poll(1).running  # two hiccups: it runs on

    now[0] += timedelta(seconds=1)
    agent.poll_once()
    agent.network_once()

    assert 1 not in agent.leases
    assert all(not os.path.exists(f"/proc/{pid}/cmdline") or _zombie(pid) for pid in pids)
    detail = transport._events[(1, "lease-1-preempted_by_owner")]["detail"]
    assert detail.startswith(f"the owner's processes could not be seen on GPU 0 for {BLIND_RECLAIM_S:.0f} s")


def test_a_rental_removed_on_the_machine_is_reported_ended_not_forgotten_in_silence(rig: Any) -> None:
    """Its workload and records gone (as `docker rm -f` leaves a container lease), the agent
    forgot the lease without a word: the marketplace kept it running until its maximum duration,
    its GPUs held and its job never run again. It is reported ended by the machine's side, at
    the last time it was seen running."""
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)
    agent.poll_once()
    seen = agent.leases[1].running_seen_at
    process = agent.runner.runners["process"]
    process.stop(1, grace_s=0)
    process.forget(1)
    agent.poll_once()
    agent.network_once()

    assert 1 not in agent.leases
    body = transport._events[(1, "lease-1-preempted_by_owner")]
    assert body["detail"].startswith("its workload is gone from the machine (")
    assert seen is not None and abs(_at(body) - seen) < timedelta(seconds=1)
    assert [c for c in transport.calls if c.method == "heartbeat"][-1].body["leases"] == []


def test_a_rental_whose_records_went_while_the_agent_was_stopped_is_reported_ended(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport()
    first = _left_running(_agent(tmp_path, sandbox_kit, rentals_dir, transport), gpu, transport, 300)
    process = first.runner.runners["process"]
    process.stop(1, grace_s=0)
    process.forget(1)  # removed while no agent ran

    second = _agent(tmp_path, sandbox_kit, rentals_dir, transport)
    try:
        second.adopt()
        second.network_once()
    finally:
        _close(second)

    assert 1 not in second.leases
    assert transport._events[(1, "lease-1-preempted_by_owner")]["detail"].startswith(
        "its workload is gone from the machine (no runner record of it is left)"
    )


def test_a_blind_spell_under_an_ended_lease_is_not_counted_against_the_next_one(clocked_rig: Any) -> None:
    """Lease 1 ended while its GPU's process list could not be read; lease 2 started on the GPU in
    the same poll the first was finished in. Its one later blind sample was counted from the first
    lease's spell, and the new rental was taken away at once."""
    agent, fake, transport, now = clocked_rig
    _start_lease(agent, fake, transport, 0.2)
    fake.fail_field(0, "compute_processes", pynvml.NVML_ERROR_UNKNOWN)
    agent.poll_once()  # lease 1's GPU blind from now
    _wait(lambda: not agent.runner.poll(1).running, 10, "lease 1 ending")
    fake.heal_field(0, "compute_processes")
    now[0] += timedelta(seconds=BLIND_RECLAIM_S)
    transport.heartbeat_replies.append(_reply(start=[_order(2, fake.gpus[0].uuid, 300)]))
    agent.network_once()
    agent.poll_once()  # lease 1 finished, lease 2 started
    assert list(agent.leases) == [2]

    fake.fail_field(0, "compute_processes", pynvml.NVML_ERROR_UNKNOWN)
    now[0] += timedelta(seconds=1)
    agent.poll_once()
    assert 2 in agent.leases and agent.runner.poll(2).running


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


# --- what the machine accepts, and its secrets --------------------------------------------------


def test_each_heartbeat_says_which_kinds_the_machine_accepts_and_how_it_isolates_them(rig: Any) -> None:
    agent, _fake, transport = rig
    agent.poll_once()
    agent.network_once()

    capabilities = [c for c in transport.calls if c.method == "heartbeat"][-1].body["capabilities"]

    assert capabilities["kinds"] == ["process"]
    assert capabilities["container"] is None
    assert capabilities["process"]["sandbox"] == "bubblewrap"
    assert capabilities["process"]["network"] == "none"
    assert capabilities["process"]["user"] == ("gpgpu-rental" if os.geteuid() == 0 else "")
    assert capabilities["refused"] == {"container": "container jobs are off on this machine (container_engine = none)"}


def test_a_kind_the_machine_does_not_accept_fails_to_start_with_the_reason(rig: Any) -> None:
    agent, fake, transport = rig
    agent.poll_once()
    order = {**_order(2, fake.gpus[0].uuid, 1), "kind": "container", "image": "alpine:3.20"}
    transport.heartbeat_replies.append(_reply(start=[order]))
    agent.network_once()
    agent.poll_once()
    agent.network_once()

    body = transport._events[(2, "lease-2-failed_to_start")]
    assert body["detail"] == "container jobs are off on this machine (container_engine = none)"
    assert 2 not in agent.leases


def test_a_start_order_for_a_gpu_another_lease_holds_fails_to_start(rig: Any) -> None:
    """The marketplace never places two leases on one GPU; an order that would (a bug, a
    compromised marketplace) is not obeyed: two renters' jobs would share a GPU."""
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, seconds=30)
    transport.heartbeat_replies.append(_reply(start=[_order(2, fake.gpus[0].uuid, 30)]))
    agent.network_once()
    agent.poll_once()
    agent.network_once()

    body = transport._events[(2, "lease-2-failed_to_start")]
    assert body["detail"] == "GPU 0 is in lease 1 already"
    assert list(agent.leases) == [1]


def test_a_start_on_a_gpu_the_owner_came_back_to_without_a_listed_process_fails_to_start(rig: Any) -> None:
    """The marketplace places from the GPU's last heartbeat; by the start the owner may be back.
    A start checked only the owner's listed processes: an owner whose work shows in the GPU's
    utilisation but in no process NVML lists had a renter's job started on the GPU they were
    using."""
    agent, fake, transport = rig
    agent.poll_once()
    transport.heartbeat_replies.append(_reply(start=[_order(2, fake.gpus[0].uuid, 30)]))
    agent.network_once()
    fake.set_utilization(0, 85)  # the owner is back between the heartbeat and the start
    agent.poll_once()
    agent.network_once()

    body = transport._events[(2, "lease-2-failed_to_start")]
    assert body["detail"] == "the owner is using GPU 0 (utilisation 85% ≥ 10%)"
    assert 2 not in agent.leases
    with pytest.raises(UnknownLeaseError):  # nothing was started
        agent.runner.poll(2)


@pytest.fixture
def graced(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> Iterator[tuple[Agent, FakeNvml, FakeTransport]]:
    """A freshly started agent whose idle detector asks for 60 s of quiet."""
    transport = FakeTransport()
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, idle_grace_s=60)
    try:
        yield agent, gpu, transport
    finally:
        _close(agent)


def test_a_restarted_agent_starts_a_lease_placed_before_it_in_its_first_grace_period(graced: Any) -> None:
    """A detector just started has seen no owner: its first grace period is not the owner's
    return. The marketplace goes on sending a lease placed before the agent restarted; refused
    for that grace period, it cost the job one of its attempts although nobody had been seen."""
    agent, gpu, transport = graced
    agent.poll_once()
    _ordered(agent, transport, _order(5, gpu.gpus[0].uuid, 30))
    assert 5 in agent.leases
    assert not [key for _, _, key in transport.applied if "failed_to_start" in key]


def test_a_start_within_the_grace_period_after_the_owner_left_fails_to_start(graced: Any) -> None:
    agent, gpu, transport = graced
    agent.poll_once()
    gpu.set_utilization(0, 85)  # the owner, seen by this agent
    agent.poll_once()
    gpu.set_utilization(0, 0)  # and gone again, moments before the start
    _ordered(agent, transport, _order(6, gpu.gpus[0].uuid, 30))
    agent.network_once()
    detail = transport._events[(6, "lease-6-failed_to_start")]["detail"]
    assert detail.startswith("GPU 0 is not idle (quiet for ") and detail.endswith(" of the 60 s grace period)")
    assert 6 not in agent.leases


def test_a_start_on_a_gpu_whose_processes_cannot_be_listed_fails_to_start(rig: Any) -> None:
    """Without its process list nothing tells the owner's work from the renter's once the job
    runs (the utilisation is then the renter's): the GPU is not vouched idle, and the start is
    refused rather than run where the owner's return would go unseen."""
    agent, fake, transport = rig
    agent.poll_once()
    transport.heartbeat_replies.append(_reply(start=[_order(3, fake.gpus[0].uuid, 30)]))
    agent.network_once()
    fake.fail_field(0, "compute_processes", pynvml.NVML_ERROR_NO_PERMISSION)
    agent.poll_once()
    agent.network_once()

    detail = transport._events[(3, "lease-3-failed_to_start")]["detail"]
    assert detail.startswith("GPU 0 is not idle (its processes could not be listed (compute_processes:")
    assert 3 not in agent.leases

    fake.heal_field(0, "compute_processes")  # readable again, and the owner still away: it starts
    agent.poll_once()
    transport.heartbeat_replies.append(_reply(start=[_order(4, fake.gpus[0].uuid, 30)]))
    agent.network_once()
    agent.poll_once()
    assert 4 in agent.leases


def test_a_runner_failing_unexpectedly_fails_the_start_and_the_poll_goes_on(rig: Any, monkeypatch: Any) -> None:
    """An error the runner did not foresee (an argument list over the kernel's limit) escaped the
    start: the fence stayed armed, no failed_to_start was sent, the rest of the poll was skipped,
    and the marketplace sent the same start again on every heartbeat."""
    agent, fake, transport = rig
    agent.poll_once()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(7, "Argument list too long")

    monkeypatch.setattr(agent.runner, "start", broken)
    transport.heartbeat_replies.append(_reply(start=[_order(3, fake.gpus[0].uuid, 30)]))
    agent.network_once()
    agent.poll_once()
    agent.network_once()

    body = transport._events[(3, "lease-3-failed_to_start")]
    assert body["detail"] == "the runner failed: OSError: [Errno 7] Argument list too long"
    assert 3 not in agent.leases


def test_a_process_order_on_a_machine_that_did_not_opt_in_fails_to_start(tmp_path: Path) -> None:
    runner = KindRunner(
        runners={"process": ProcessRunner(tmp_path, sandbox=None)}, accepts=set(), refused={"process": PROCESS_OFF}
    )
    spec_order = _order(3, "GPU-x", 1)
    from gpgpu_agent.leases import lease_spec_from_order

    with pytest.raises(Exception, match="allow_process_jobs = false"):
        runner.start(lease_spec_from_order(spec_order), gpu_indexes={"GPU-x": 0})
    assert runner.capabilities() == {
        "kinds": [],
        "container": None,
        "process": None,
        "refused": {"process": PROCESS_OFF},
    }


def test_secrets_a_job_prints_never_reach_the_marketplace(rig: Any) -> None:
    agent, fake, transport = rig
    script = f"print('cred {CREDENTIAL} key 0x{PRIVATE_KEY.upper()} bare {PRIVATE_KEY} ok', flush=True)"
    agent.poll_once()
    transport.heartbeat_replies.append(_reply(start=[_order(4, fake.gpus[0].uuid, 0, script=script)]))
    agent.network_once()
    deadline = time.monotonic() + 10
    while 4 not in agent.done and time.monotonic() < deadline:
        agent.poll_once()
        time.sleep(0.05)
    agent.network_once()

    tail = transport._events[(4, "lease-4-exited")]["log_tail"]
    assert CREDENTIAL not in tail and PRIVATE_KEY not in tail.lower()
    assert tail.strip() == f"cred {REDACTED} key 0x{REDACTED} bare {REDACTED} ok"


def test_scrubbing_finds_every_occurrence_in_any_letter_case() -> None:
    secrets = secret_variants(credential=CREDENTIAL, private_key_hex=PRIVATE_KEY)
    text = f"{CREDENTIAL}{CREDENTIAL.upper()} {PRIVATE_KEY[:10]} {PRIVATE_KEY}"

    assert scrub_secrets(text, secrets) == f"{REDACTED}{REDACTED} {PRIVATE_KEY[:10]} {REDACTED}"


def test_scrubbing_is_not_thrown_off_by_characters_whose_lower_case_is_longer() -> None:
    """A job printed 40 "İ" (two characters lower-cased) before the credential: the scrub found it
    in the lower-cased text, cut the original at the wrong place, and the credential went out whole."""
    secrets = secret_variants(credential=CREDENTIAL, private_key_hex=PRIVATE_KEY)
    text = "İ" * 40 + CREDENTIAL + " İİ " + PRIVATE_KEY.upper() + " tail"

    assert scrub_secrets(text, secrets) == "İ" * 40 + REDACTED + " İİ " + REDACTED + " tail"


def test_a_revoked_credential_stops_the_rentals_and_the_agent_says_why(rig: Any) -> None:
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)
    pids = agent.runner.poll(1).pids
    transport.reject_all(401, "credential_revoked", "This machine's credential was revoked by its provider.")

    agent.network_once()
    assert agent.stopping
    assert agent.revoked == "This machine's credential was revoked by its provider."
    agent.shutdown()  # what run() does once stopping

    assert all(not os.path.exists(f"/proc/{pid}/cmdline") or _zombie(pid) for pid in pids)
    assert agent.leases == {}
    status = (agent.state_dir / "status.json").read_text()
    assert "revoked by its provider" in status


def test_a_suspended_machine_stops_its_rentals_at_once_not_when_their_fence_runs_out(rig: Any) -> None:
    """The marketplace ends a suspended machine's leases and places their jobs again at once; the
    agent only logged the 403 and ran them on until their fence (120 s): the same job twice."""
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)
    pids = agent.runner.poll(1).pids
    transport.reject_all(403, "machine_suspended", "This machine is suspended: abuse report.")

    agent.network_once()
    agent.poll_once()

    assert agent.leases == {} and not agent.stopping  # it keeps asking, to see an unsuspend
    assert all(not os.path.exists(f"/proc/{pid}/cmdline") or _zombie(pid) for pid in pids)


def test_a_heartbeat_refused_while_the_credential_is_rotated_here_waits_for_the_new_one(
    rig: Any, tmp_path: Path
) -> None:
    # `rotate-credential` marks the rotation before the marketplace swaps the credential and
    # clears the mark once the new one is in the file: a heartbeat refused in between must not end
    # the agent (it did, under load, in an end-to-end run).
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)
    credential_path = tmp_path / "credential.json"
    rotation_mark_path(credential_path).touch()
    agent.rotation_pending = lambda: rotation_pending(credential_path)
    transport.reject_all(401, "credential_revoked", "This machine's credential was replaced by a newer credential.")

    agent.network_once()
    assert not agent.stopping and agent.revoked is None
    assert agent.leases  # still renting

    rotation_mark_path(credential_path).unlink()  # the rotation is over and the file still holds the old one
    agent.network_once()
    assert agent.stopping and agent.revoked is not None
    agent.shutdown()


def test_the_agent_stops_a_lease_at_its_maximum_without_being_told(rig: Any) -> None:
    agent, fake, transport = rig
    order = {**_order(5, fake.gpus[0].uuid, 300), "max_duration_s": 1}
    agent.poll_once()
    transport.heartbeat_replies.append(_reply(start=[order]))
    agent.network_once()
    agent.poll_once()
    pids = agent.runner.poll(5).pids
    started = time.monotonic()
    while 5 in agent.leases and time.monotonic() - started < 15:
        agent.poll_once()  # no stop order ever comes from the marketplace
        time.sleep(0.1)
    agent.network_once()

    assert 5 not in agent.leases
    assert all(not os.path.exists(f"/proc/{pid}/cmdline") or _zombie(pid) for pid in pids)
    body = transport._events[(5, "lease-5-exited")]
    assert body["exit_code"] == 124 and body["detail"] == "killed after max_duration_s"
    ran = datetime.fromisoformat(body["at"].replace("Z", "+00:00")) - datetime.fromisoformat(
        transport._events[(5, "lease-5-started")]["at"].replace("Z", "+00:00")
    )
    assert timedelta(seconds=1) <= ran <= timedelta(seconds=1 + 2 + 1)  # the maximum, the stop grace, a poll


# --- times across restarts, retries, fencing ------------------------------------------------------


@pytest.fixture
def gpu() -> Iterator[FakeNvml]:
    fake = FakeNvml().install()
    fake.add_gpu("NVIDIA L4", 23034)
    try:
        yield fake
    finally:
        fake.uninstall()


def _close(agent: Agent) -> None:
    """Stop what a test left running, close the spool."""
    for lease_id in list(agent.leases):
        agent.runner.stop(lease_id, grace_s=0)
    agent.outbox.close()


def _at(body: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(body["at"]).replace("Z", "+00:00"))


def _usage_ends(transport: FakeTransport, lease_id: int) -> list[datetime]:
    return [
        datetime.fromisoformat(str(body["period_end"]).replace("Z", "+00:00"))
        for (lease, _key), (_row, body) in transport._usage.items()
        if lease == lease_id
    ]


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.02)


def test_a_lease_that_ended_while_the_agent_was_stopped_is_reported_at_its_real_end(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport()
    first = _agent(tmp_path, sandbox_kit, rentals_dir, transport)
    _start_lease(first, gpu, transport, 1.5)
    pids = first.runner.poll(1).pids
    first.request_stop()
    first.shutdown()  # the agent stops; the rental runs on, and ends while no agent runs

    _wait(lambda: not any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids), 10, "the job ending")
    ended = datetime.now(UTC)
    time.sleep(3)
    second = _agent(tmp_path, sandbox_kit, rentals_dir, transport)  # the agent's next start
    try:
        second.adopt()
        second.poll_once()
        second.network_once()
    finally:
        _close(second)

    body = transport._events[(1, "lease-1-exited")]
    assert body["exit_code"] == 0
    assert abs(_at(body) - ended) <= timedelta(seconds=1)  # not when the agent came back
    assert _usage_ends(transport, 1) and max(_usage_ends(transport, 1)) <= _at(body)


def test_retries_never_wait_longer_than_the_heartbeat_interval_the_marketplace_gave(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport(heartbeat_interval_s=4)
    slowest = Backoff(base_s=1, cap_s=60, rand=lambda: 0.999999)
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, backoff=slowest)
    try:
        agent.poll_once()
        agent.network_once()  # the marketplace asks for a heartbeat every 4 s
        transport.set_down(retry_after_s=300)

        waits = []
        for _ in range(12):
            agent.network_once()
            waits.append(agent.next_heartbeat_in_s)
    finally:
        _close(agent)

    assert max(waits) <= 4.0  # its grace is 3 intervals: a machine back is heard from in time
    assert waits[-1] > 3.5


def test_retries_wait_at_most_ten_seconds_before_the_marketplace_said_anything(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport()
    transport.set_down()
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, backoff=Backoff(rand=lambda: 0.999999))
    try:
        agent.poll_once()
        waits = []
        for _ in range(12):
            agent.network_once()
            waits.append(agent.next_heartbeat_in_s)
    finally:
        _close(agent)

    assert 9.5 < max(waits) <= 10.0


def test_heartbeats_and_retries_come_at_least_three_times_per_lease_fence(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport(heartbeat_interval_s=10)
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, backoff=Backoff(rand=lambda: 0.999999))
    try:
        agent.poll_once()
        transport.heartbeat_replies.append(_reply(lease_fence_s=6))
        agent.network_once()
        beat = agent.next_heartbeat_in_s
        transport.set_down()
        waits = []
        for _ in range(8):
            agent.network_once()
            waits.append(agent.next_heartbeat_in_s)
    finally:
        _close(agent)

    assert 1.9 < beat <= 2.0
    assert max(waits) <= 2.0


def test_an_event_is_sent_as_soon_as_it_is_spooled_not_at_the_next_heartbeat(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport(heartbeat_interval_s=30)
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, poll_interval_s=0.1)
    transport.heartbeat_replies.append(_reply(heartbeat_interval_s=30, start=[_order(1, gpu.gpus[0].uuid, 300)]))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        # The lease starts after the heartbeat that ordered it; its `started` goes out at once.
        _wait(lambda: ("event", 1, "lease-1-started") in transport.applied, 5, "the started event arriving")
        assert [c.method for c in transport.calls if c.outcome == "ok"].count("heartbeat") == 1
    finally:
        agent.request_stop()
        thread.join(30)
        _close(agent)


def test_a_lease_ordered_between_heartbeats_starts_when_the_doorbell_rings_not_at_the_next_heartbeat(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport(heartbeat_interval_s=30, doorbell_held=True)
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, poll_interval_s=0.1)
    transport.heartbeat_replies.append(_reply(heartbeat_interval_s=30))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: agent.last_heartbeat["ok"], 5, "the first heartbeat")
        _wait(lambda: len(transport.doorbell_calls) >= 1, 5, "the doorbell call")
        first_since = transport.doorbell_calls[-1]["since"]

        # The marketplace places a lease on this machine: its held call answers, the agent
        # heartbeats at once and gets the order, 30 s before its next heartbeat was due.
        transport.heartbeat_replies.append(_reply(heartbeat_interval_s=30, start=[_order(1, gpu.gpus[0].uuid, 300)]))
        rang = time.monotonic()
        transport.doorbell.put({"orders": True, "wait_s": 25})
        _wait(lambda: ("event", 1, "lease-1-started") in transport.applied, 3, "the lease starting")

        assert time.monotonic() - rang < 3
        assert [c.method for c in transport.calls if c.outcome == "ok"].count("heartbeat") == 2
        # The next call asks only for orders newer than that heartbeat.
        _wait(lambda: transport.doorbell_calls[-1]["since"] != first_since, 3, "a doorbell call after the heartbeat")
    finally:
        agent.request_stop()
        thread.join(30)
        _close(agent)


def test_an_unexpected_doorbell_failure_is_logged_and_retried_after_a_heartbeat_interval(
    rig: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent, _fake, transport = rig

    def broken(body: Any) -> Any:
        raise TypeError("a bug in the doorbell call")

    monkeypatch.setattr(transport, "orders_wait", broken)
    with caplog.at_level(logging.ERROR, logger="gpgpu_agent"):
        pause = agent.doorbell_once()

    assert pause == agent.beat_s  # the loop goes on, no faster than the heartbeat
    assert "orders doorbell call failed" in caplog.text


def test_an_order_is_acted_on_as_soon_as_the_heartbeat_brings_it_not_at_the_next_poll(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport(heartbeat_interval_s=30, doorbell_held=True)
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, poll_interval_s=2.0)
    transport.heartbeat_replies.append(_reply(heartbeat_interval_s=30))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: agent.last_heartbeat["ok"], 5, "the first heartbeat")
        time.sleep(0.3)  # the poll loop has just gone to sleep for its 2 s
        transport.heartbeat_replies.append(_reply(heartbeat_interval_s=30, start=[_order(1, gpu.gpus[0].uuid, 300)]))
        rang = time.monotonic()
        transport.doorbell.put({"orders": True, "wait_s": 25})
        _wait(lambda: ("event", 1, "lease-1-started") in transport.applied, 5, "the lease starting")

        assert time.monotonic() - rang < 1.2  # not up to a 2 s poll interval later
    finally:
        agent.request_stop()
        thread.join(30)
        _close(agent)


def test_each_heartbeat_renews_the_deadlines_of_the_leases_it_reported_but_not_one_asked_to_stop(
    rig: Any, tmp_path: Path
) -> None:
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)
    agent.poll_once()  # lease 1 is in the next heartbeat
    deadline_file = tmp_path / "fence" / "lease-1.json"

    transport.heartbeat_replies.append(_reply(lease_fence_s=40))
    sent = boottime()
    agent.network_once()
    renewed = json.loads(deadline_file.read_text())["deadline"]
    transport.heartbeat_replies.append(_reply(lease_fence_s=40, stop=[{"lease_id": 1, "reason": "cancelled"}]))
    time.sleep(0.2)
    agent.network_once()

    assert sent + 40 <= renewed <= boottime() + 40
    assert json.loads(deadline_file.read_text())["deadline"] == renewed  # the marketplace is ending it
    agent.poll_once()  # acts on the stop
    assert not deadline_file.exists()  # gone with the lease


def test_without_lease_fence_s_in_the_reply_the_fence_is_120_seconds(rig: Any, tmp_path: Path) -> None:
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)
    agent.poll_once()

    agent.network_once()  # the fake's reply has no lease_fence_s

    deadline = json.loads((tmp_path / "fence" / "lease-1.json").read_text())["deadline"]
    assert agent.fence.fence_s == 120
    assert boottime() + 119 <= deadline <= boottime() + 120


def test_a_rental_cut_off_from_the_marketplace_past_the_fence_is_stopped_and_reported_fenced(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport()
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, fenced=True)
    try:
        agent.poll_once()
        transport.heartbeat_replies.append(_reply(start=[_order(1, gpu.gpus[0].uuid, 300)], lease_fence_s=2))
        last_contact = time.monotonic()
        agent.network_once()
        agent.poll_once()
        assert 1 in agent.leases

        # The marketplace becomes unreachable; the agent runs on but cannot renew the deadline.
        transport.set_down()
        while 1 in agent.leases and time.monotonic() - last_contact < 10:
            agent.poll_once()
            agent.network_once()
            time.sleep(0.1)
        stopped_after = time.monotonic() - last_contact
        transport.set_up()
        agent.network_once()
    finally:
        _close(agent)

    assert 1.9 <= stopped_after <= 2 + 0.5 + 1.5  # the fence, the watchdog's check, a poll
    body = transport._events[(1, "lease-1-exited")]
    assert body["detail"].startswith("fenced:"), body
    assert body["exit_code"] == 143
    assert max(_usage_ends(transport, 1)) <= _at(body)


class _AgentDied(BaseException):
    """The agent's process ending where it is raised (nothing after it runs)."""


def test_a_workload_started_just_before_the_agent_died_is_adopted_with_its_gpus_and_reclaimed(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml, monkeypatch: Any
) -> None:
    """The agent died after the runner started a workload and before it saved the lease's
    record: the next agent adopted the workload with no GPUs and no maximum, so an owner coming
    back to the GPU never got it back. The record is saved before the start now."""
    transport = FakeTransport()
    first = _agent(tmp_path, sandbox_kit, rentals_dir, transport)
    first.poll_once()
    transport.heartbeat_replies.append(_reply(start=[{**_order(1, gpu.gpus[0].uuid, 300), "max_duration_s": 600}]))
    first.network_once()

    def dies(*args: Any, **kwargs: Any) -> None:
        raise _AgentDied

    monkeypatch.setattr(first.tracker, "_event", dies)  # the first thing after the runner's start
    with pytest.raises(_AgentDied):
        first.poll_once()
    first.outbox.close()
    pids = first.runner.poll(1).pids
    assert pids  # the workload runs on, and the agent is gone

    second = _agent(tmp_path, sandbox_kit, rentals_dir, transport)
    try:
        second.adopt()
        assert second.leases[1].gpu_uuids == (gpu.gpus[0].uuid,)
        assert second.leases[1].max_duration_s == 600
        gpu.add_process(0, OWNER_PID, 1000)  # the owner is back
        second.poll_once()
        second.network_once()
        assert 1 not in second.leases
        assert all(not os.path.exists(f"/proc/{pid}/cmdline") or _zombie(pid) for pid in pids)
        assert "owner process 4000321" in transport._events[(1, "lease-1-preempted_by_owner")]["detail"]
    finally:
        _close(second)


def test_a_lease_the_agent_died_starting_waits_for_its_runner_and_then_for_its_start_order(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml, monkeypatch: Any
) -> None:
    """The agent died after saving the starting record and before the runner started anything,
    and the next agent's runner could not be asked at first (its engine not up yet). The record
    was dropped at the restart, so a workload started after all would have gone untracked; kept,
    and once the runner answers that it knows no such workload, it is dropped without a report:
    the marketplace's start order, sent again, starts it."""
    transport = FakeTransport()
    first = _agent(tmp_path, sandbox_kit, rentals_dir, transport)
    first.poll_once()
    transport.heartbeat_replies.append(_reply(start=[_order(1, gpu.gpus[0].uuid, 300)]))
    first.network_once()

    def dies(*args: Any, **kwargs: Any) -> None:
        raise _AgentDied

    monkeypatch.setattr(first.tracker, "_runner_start", dies)
    with pytest.raises(_AgentDied):
        first.poll_once()
    first.outbox.close()

    second = _agent(tmp_path, sandbox_kit, rentals_dir, transport)
    process = second.runner.runners["process"]
    try:
        with monkeypatch.context() as down:
            down.setattr(process, "adopt", _engine_down)
            down.setattr(process, "poll", _engine_down)
            second.adopt()
            assert second.leases[1].gpu_uuids == (gpu.gpus[0].uuid,)  # kept: it may be running
            second.poll_once()
        second.poll_once()  # the runner answers: no such workload
        second.network_once()
        assert 1 not in second.leases and 1 not in second.done
        assert not [key for _, _, key in transport.applied if key.startswith("lease-1-")]

        _ordered(second, transport, _order(1, gpu.gpus[0].uuid, 300))
        assert 1 in second.leases and second.runner.poll(1).running
    finally:
        _close(second)


def test_a_rental_adopted_without_a_deadline_gets_one(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    # A rental started by an agent from before fencing has no deadline file; the next agent gives
    # it one (counting from its own start) rather than leave it unfenced for good.
    transport = FakeTransport()
    _left_running(_agent(tmp_path, sandbox_kit, rentals_dir, transport), gpu, transport, 300)
    deadline_file = tmp_path / "fence" / "lease-1.json"
    deadline_file.unlink()

    second = _agent(tmp_path, sandbox_kit, rentals_dir, transport)
    try:
        second.adopt()
        deadline = json.loads(deadline_file.read_text())["deadline"]
    finally:
        _close(second)

    assert boottime() + 119 <= deadline <= boottime() + 120


def test_a_lease_whose_start_takes_longer_than_the_fence_is_not_fenced_meanwhile(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    transport = FakeTransport()
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, fenced=True, start_delay_s=3, poll_interval_s=0.1)
    order = _order(1, gpu.gpus[0].uuid, 300)
    transport.heartbeat_replies.extend([_reply(heartbeat_interval_s=1, start=[order], lease_fence_s=1.5)])
    transport.heartbeat_replies.extend(_reply(heartbeat_interval_s=1, lease_fence_s=1.5) for _ in range(100))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        # The heartbeats go on while the start takes twice the fence; the deadline goes on with them.
        _wait(lambda: ("event", 1, "lease-1-started") in transport.applied, 10, "the lease starting")
        time.sleep(1.5)
        assert 1 in agent.leases and agent.runner.poll(1).running
        assert ("event", 1, "lease-1-exited") not in transport.applied
    finally:
        agent.request_stop()
        thread.join(30)
        _close(agent)


def _engine_down(*args: Any, **kwargs: Any) -> Any:
    raise RunnerError("the engine did not answer within 30 s")


def test_a_lease_its_runner_cannot_answer_for_stays_tracked_and_fenced(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml, monkeypatch: Any
) -> None:
    """Any error of the runner's poll (an engine that timed out, a daemon restarting) was read as
    "its records are gone": the lease was forgotten and its fence taken down while the workload
    ran on, never reclaimed for the owner nor reported, and the marketplace placed the job again."""
    transport = FakeTransport()
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, fenced=True)
    deadline_file = tmp_path / "fence" / "lease-1.json"
    try:
        _start_lease(agent, gpu, transport, 300)
        agent.network_once()
        assert deadline_file.exists()
        process = agent.runner.runners["process"]
        with monkeypatch.context() as down:
            down.setattr(process, "poll", _engine_down)
            for _ in range(3):
                agent.poll_once()
        agent.network_once()

        assert 1 in agent.leases and deadline_file.exists()
        assert ("event", 1, "lease-1-exited") not in transport.applied
        assert [lease["lease_id"] for lease in agent.tracker.reports()] == [1]  # in the heartbeats
        agent.poll_once()
        assert agent.runner.poll(1).running
    finally:
        _close(agent)


def test_a_lease_no_runner_knows_is_unknown_though_the_runner_of_a_refused_kind_cannot_answer() -> None:
    """A machine that runs process jobs only, its container engine broken (why containers are
    refused there): that runner's errors made every lease the process runner did not know look
    unreadable rather than unknown, kept and reported running for ever."""
    from gpgpu_agent.runners.common import UnknownLeaseError

    class Knows:
        def __init__(self, known: set[int]) -> None:
            self.known = known

        def poll(self, lease_id: int) -> Any:
            if lease_id not in self.known:
                raise UnknownLeaseError(lease_id)
            return object()

    class Broken:
        """A container runner whose engine does not answer; it keeps work directories of 9."""

        def poll(self, lease_id: int) -> Any:
            raise RunnerError("Cannot connect to the Docker daemon")

        def workspace(self, lease_id: int) -> Path | None:
            return Path("/work-of-9") if lease_id == 9 else None

    refused = KindRunner(runners={"process": Knows({1}), "container": Broken()}, accepts={"process"})  # type: ignore[dict-item]
    accepted = KindRunner(runners={"process": Knows({1}), "container": Broken()}, accepts={"process", "container"})  # type: ignore[dict-item]

    refused.poll(1)
    with pytest.raises(UnknownLeaseError):
        refused.poll(7)
    # Its own work directory: its engine may be down only for now (an agent started before
    # Docker at boot), and the container running: kept.
    with pytest.raises(RunnerError) as kept:
        refused.poll(9)
    assert not isinstance(kept.value, UnknownLeaseError)
    with pytest.raises(RunnerError) as unreadable:  # it may be the container runner's: kept
        accepted.poll(7)
    assert not isinstance(unreadable.value, UnknownLeaseError)


def test_a_restarted_agent_whose_runner_cannot_answer_yet_keeps_its_leases(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml, monkeypatch: Any
) -> None:
    transport = FakeTransport()
    first = _agent(tmp_path, sandbox_kit, rentals_dir, transport, fenced=True)
    _start_lease(first, gpu, transport, 300)
    first.network_once()
    first.request_stop()
    first.shutdown()
    deadline_file = tmp_path / "fence" / "lease-1.json"

    second = _agent(tmp_path, sandbox_kit, rentals_dir, transport, fenced=True)
    try:
        process = second.runner.runners["process"]
        with monkeypatch.context() as down:
            down.setattr(process, "adopt", _engine_down)
            down.setattr(process, "poll", _engine_down)
            second.adopt()
            assert 1 in second.leases and deadline_file.exists()
        second.poll_once()
        assert second.runner.poll(1).running and 1 in second.leases
    finally:
        _close(second)


def test_a_stop_that_fails_is_tried_again_at_the_next_poll_and_the_owner_gets_the_gpu(
    rig: Any, monkeypatch: Any
) -> None:
    """The reclaim marked the lease ending before its stop; when the stop failed, every later
    poll passed over a lease already ending, and the rental ran on the owner's GPU for good."""
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)
    pids = agent.runner.poll(1).pids
    process = agent.runner.runners["process"]
    fake.add_process(0, OWNER_PID, 1000)
    with monkeypatch.context() as down:
        down.setattr(process, "stop", _engine_down)
        agent.poll_once()
    assert 1 in agent.leases and agent.runner.poll(1).running

    agent.poll_once()
    agent.network_once()

    assert 1 not in agent.leases
    assert all(not os.path.exists(f"/proc/{pid}/cmdline") or _zombie(pid) for pid in pids)
    assert ("event", 1, "lease-1-preempted_by_owner") in transport.applied
    assert "owner process 4000321" in transport._events[(1, "lease-1-preempted_by_owner")]["detail"]


def test_start_orders_with_ids_out_of_range_are_ignored_and_the_other_leases_go_on(rig: Any) -> None:
    """A lease id of 0 or less could not be signed in its usage reports: its end raised at every
    poll from then on, and no other lease's exit was noticed. One of 19 digits was past the names
    the runners find a workload by after a restart: forgotten there, unfenced."""
    agent, fake, transport = rig
    uuid = fake.gpus[0].uuid
    agent.poll_once()
    bad = [{**_order(1, uuid, 1), "lease_id": lease_id} for lease_id in (0, -4, 10**18, True, "1e3")]
    bad.append({**_order(1, uuid, 1), "lease_id": 9, "job_id": 0})
    transport.heartbeat_replies.append(_reply(start=[*bad, _order(2, uuid, 1)]))
    agent.network_once()
    agent.poll_once()

    assert list(agent.leases) == [2]
    started = time.monotonic()
    while 2 in agent.leases and time.monotonic() - started < 15:
        agent.poll_once()
        time.sleep(0.1)
    agent.network_once()
    assert ("event", 2, "lease-2-exited") in transport.applied


def test_a_lease_whose_image_is_still_being_pulled_is_listed_as_starting(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path, gpu: FakeNvml
) -> None:
    """The poll that starts a lease holds it until its image is in; meanwhile the heartbeats left
    it out, and the marketplace ended it at its start timeout and placed the job again."""
    gpu.add_gpu("NVIDIA L4", 23034)
    transport = FakeTransport()
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, start_delay_s=3, poll_interval_s=0.1)
    orders = [_order(1, gpu.gpus[0].uuid, 300), _order(2, gpu.gpus[1].uuid, 300)]
    transport.heartbeat_replies.append(_reply(heartbeat_interval_s=0.5, start=orders))
    transport.heartbeat_replies.extend(_reply(heartbeat_interval_s=0.5) for _ in range(100))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()

    def heartbeats() -> list[Any]:
        return [call.body["leases"] for call in list(transport.calls) if call.method == "heartbeat"]

    try:
        _wait(lambda: agent.tracker.starting == 1, 10, "the start to begin")
        both = [{"lease_id": 1, "state": "starting"}, {"lease_id": 2, "state": "starting"}]
        # The second waits behind the first's pull: listed as starting too.
        _wait(lambda: both in heartbeats(), 5, "a heartbeat listing both as starting")
        # The first started while the second's image is pulled: listed running meanwhile (left
        # out until the poll ended, its fence was not renewed).
        first_up = [{"lease_id": 1, "state": "running"}, {"lease_id": 2, "state": "starting"}]
        _wait(lambda: first_up in heartbeats(), 6, "a heartbeat listing the first running, the second starting")
        _wait(lambda: ("event", 2, "lease-2-started") in transport.applied, 15, "the leases starting")
        time.sleep(1.2)
        assert heartbeats()[-1] == [{"lease_id": 1, "state": "running"}, {"lease_id": 2, "state": "running"}]
    finally:
        agent.request_stop()
        thread.join(30)
        _close(agent)


# --- the job's output, live ---------------------------------------------------------------------


def _run_to_end(agent: Agent, transport: FakeTransport, lease_id: int, *, network: bool = True) -> None:
    deadline = time.monotonic() + 15
    while lease_id not in agent.done and time.monotonic() < deadline:
        agent.poll_once()
        if network:
            agent.network_once()
        time.sleep(0.05)
    assert lease_id in agent.done


def test_a_running_jobs_output_reaches_the_marketplace_while_it_runs_then_all_of_it_before_its_end(
    rig: Any,
) -> None:
    agent, fake, transport = rig
    script = (
        "import sys, time\n"
        "print('first line', flush=True)\n"
        "time.sleep(1.0)\n"
        "for n in range(2000): print(f'line {n} ' + 'x' * 40)\n"
        "sys.stdout.flush()\n"
    )
    agent.poll_once()
    transport.heartbeat_replies.append(_reply(start=[_order(5, fake.gpus[0].uuid, 0, script=script)]))
    agent.network_once()
    deadline = time.monotonic() + 10
    while not transport.logs and time.monotonic() < deadline:
        agent.poll_once()
        agent.network_once()
        time.sleep(0.05)
    assert transport.log_text(5) == "first line\n"  # while the job still runs
    assert 5 in agent.leases

    _run_to_end(agent, transport, 5)
    agent.network_once()

    expected = "first line\n" + "".join(f"line {n} {'x' * 40}\n" for n in range(2000))
    assert transport.log_text(5) == expected
    seqs = [int(key) for kind, lease, key in transport.applied if kind == "log" and lease == 5]
    assert seqs == list(range(len(seqs))) and len(seqs) > 2
    assert all(len(str(body["text"]).encode()) <= 64 * 1024 for body in transport.logs.values())
    kinds = [kind for kind, lease, key in transport.applied if lease == 5]
    assert kinds.index("event", 1) > max(i for i, kind in enumerate(kinds) if kind == "log")  # exited last


def test_a_secret_the_job_prints_in_pieces_across_reads_never_reaches_the_marketplace(rig: Any) -> None:
    agent, fake, transport = rig
    # The credential is written in two halves a second apart: the agent reads the first half
    # alone, in one poll, and the rest in a later one.
    half = len(CREDENTIAL) // 2
    key = PRIVATE_KEY.upper()
    script = (
        "import sys, time\n"
        f"sys.stdout.write('cred {CREDENTIAL[:half]}'); sys.stdout.flush(); time.sleep(1.0)\n"
        f"sys.stdout.write('{CREDENTIAL[half:]} key 0x{key[:7]}'); sys.stdout.flush(); time.sleep(1.0)\n"
        f"print('{key[7:]} done', flush=True)\n"
    )
    agent.poll_once()
    transport.heartbeat_replies.append(_reply(start=[_order(6, fake.gpus[0].uuid, 0, script=script)]))
    agent.network_once()

    _run_to_end(agent, transport, 6)
    agent.network_once()

    shipped = [str(body["text"]) for (lease, _), body in sorted(transport.logs.items()) if lease == 6]
    assert "".join(shipped) == f"cred {REDACTED} key 0x{REDACTED} done\n"
    for text in shipped:
        assert CREDENTIAL[:8] not in text and PRIVATE_KEY[:8] not in text.lower()


def test_output_spooled_while_the_marketplace_is_unreachable_arrives_once_in_order_after_it(rig: Any) -> None:
    agent, fake, transport = rig
    script = "import time\nfor n in range(10):\n    print(f'tick {n}', flush=True); time.sleep(0.3)\n"
    agent.poll_once()
    transport.heartbeat_replies.append(_reply(start=[_order(7, fake.gpus[0].uuid, 0, script=script)]))
    agent.network_once()
    agent.poll_once()
    agent.network_once()
    transport.set_down()

    _run_to_end(agent, transport, 7)
    assert agent.outbox.stats().logs >= 2  # kept on disk meanwhile
    transport.set_up()
    transport.fail_next(1)  # the first try after the outage fails too
    for _ in range(4):
        agent.network_once()

    assert transport.log_text(7) == "".join(f"tick {n}\n" for n in range(10))
    logs = [key for kind, lease, key in transport.applied if kind == "log" and lease == 7]
    assert logs == [str(n) for n in range(len(logs))]  # each once, in order
    assert agent.outbox.pending() == 0


def test_output_past_the_cap_is_not_shipped_and_the_last_chunk_says_so(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path
) -> None:
    fake = FakeNvml().install()
    fake.add_gpu("NVIDIA L4", 23034)
    transport = FakeTransport()
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, log_max_bytes=1000)
    try:
        script = "print('y' * 99, end=''); [print('z' * 99) for _ in range(50)]"
        agent.poll_once()
        transport.heartbeat_replies.append(_reply(start=[_order(8, fake.gpus[0].uuid, 0, script=script)]))
        agent.network_once()
        _run_to_end(agent, transport, 8)
        agent.network_once()
    finally:
        agent.outbox.close()
        fake.uninstall()

    text = transport.log_text(8)
    output = "y" * 99 + "".join("z" * 99 + "\n" for _ in range(50))
    assert text.startswith(output[:1000])
    assert text[1000:].startswith("\n[gpgpu-agent: this lease's output passed 1000 bytes")
    last = max((seq, body) for (lease, seq), body in transport.logs.items() if lease == 8)[1]
    assert last["truncated"] is True
    assert [body["truncated"] for (lease, _), body in sorted(transport.logs.items()) if lease == 8].count(True) == 1


def _metrics(state_dir: Path) -> dict[str, float]:
    """metrics.prom, parsed as a scraper would (prometheus-client's parser), name{labels} → value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (state_dir / "metrics.prom").read_text()
    assert text.endswith("\n")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def test_the_agents_own_metrics_count_polls_nvml_errors_heartbeats_spool_and_reclaims(rig: Any, tmp_path: Path) -> None:
    agent, fake, transport = rig
    _start_lease(agent, fake, transport, 300)  # two polls, one heartbeat answered
    fake.fail_field(0, "temperature")
    agent.poll_once()  # one NVML read fails
    transport.up = False
    agent.network_once()  # the marketplace is away: the usage report waits in the spool
    state_dir = agent.state_dir

    seen = _metrics(state_dir)
    assert seen["gpgpu_agent_polls_total"] == 3
    assert seen["gpgpu_agent_nvml_errors_total"] == 1
    assert seen["gpgpu_agent_heartbeats_total{outcome=ok}"] == 1
    assert seen["gpgpu_agent_heartbeats_total{outcome=unreachable}"] == 1
    assert seen["gpgpu_agent_rentals_running"] == 1
    assert seen["gpgpu_agent_spool_depth"] == agent.outbox.pending() >= 1
    assert seen["gpgpu_agent_last_heartbeat_ok_timestamp_seconds"] > time.time() - 60
    assert (state_dir / "metrics.prom").stat().st_mode & 0o777 == 0o644  # a collector running as another user

    fake.heal_field(0, "temperature")
    fake.add_process(0, OWNER_PID, 1000)  # the owner is back
    agent.poll_once()
    transport.up = True
    agent.network_once()

    seen = _metrics(state_dir)
    assert seen["gpgpu_agent_reclaim_seconds_count"] == 1
    assert 0 < seen["gpgpu_agent_reclaim_longest_seconds"] == seen["gpgpu_agent_reclaim_seconds_sum"] < 10
    assert seen["gpgpu_agent_rentals_running"] == 0
    assert seen["gpgpu_agent_spool_depth"] == 0
    assert seen["gpgpu_agent_polls_total"] == 4 and seen["gpgpu_agent_nvml_errors_total"] == 1
    assert not list(state_dir.glob(".metrics.*.tmp"))  # written whole, by rename


# --- checkpoints that follow the job ----------------------------------------------------------------


class FakeCheckpoints:
    """protocols.CheckpointTransfer in memory: archives to serve by URL, uploads kept in order,
    and each call noted in `log` (shared with the spool's puts, to see what came first)."""

    def __init__(self, log: list[str]) -> None:
        self.archives: dict[str, bytes] = {}
        self.uploads: list[tuple[str, bytes, str]] = []
        self.log = log
        self.unreachable_for = 0  # the next uploads that find the marketplace unreachable

    def checkpoint_download(self, url: str, dest: Path, *, size: int, sha256: str, max_bytes: int) -> None:
        data = self.archives[url]
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256 or size > max_bytes:
            raise CheckpointError("the checkpoint sent does not match its SHA-256")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)

    def checkpoint_upload(self, url: str, path: Path, *, size: int, sha256: str, direct: bool = False) -> None:
        if self.unreachable_for > 0:
            self.unreachable_for -= 1
            self.log.append(f"unreachable {url}")
            raise TransportUnavailable("Cannot reach the marketplace: ConnectionError.")
        data = path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha256)
        self.uploads.append((url, data, sha256))
        self.log.append(f"upload {url}")


@pytest.fixture
def checkpoint_rig(
    tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path
) -> Iterator[tuple[Agent, FakeNvml, FakeTransport, FakeCheckpoints, Path]]:
    fake = FakeNvml().install()
    fake.add_gpu("NVIDIA L4", 23034)
    transport = FakeTransport()
    log: list[str] = []
    store = FakeCheckpoints(log)
    agent = _agent(tmp_path, sandbox_kit, rentals_dir, transport, checkpoints=store)
    put = agent.outbox.put

    def noted_put(kind: Any, lease_id: int, key: str, body: Any) -> bool:
        log.append(f"{kind} {key}")
        return put(kind, lease_id, key, body)

    agent.outbox.put = noted_put  # type: ignore[method-assign]
    try:
        yield agent, fake, transport, store, rentals_dir
    finally:
        for lease_id in list(agent.leases):
            agent.runner.stop(lease_id, grace_s=0)
        agent.outbox.close()
        fake.uninstall()


def _checkpoint(lease_id: int, *, restore: bytes | None = None, sha256: str | None = None) -> dict[str, Any]:
    url = f"leases/{lease_id}/checkpoint"
    return {
        "dir": "/work/ckpt",
        "max_bytes": 1 << 20,
        "upload_url": url,
        "restore_url": url if restore is not None else None,
        "restore_sha256": sha256 or (hashlib.sha256(restore).hexdigest() if restore is not None else ""),
        "restore_size": len(restore) if restore is not None else 0,
        "resume_count": 0 if restore is None else 1,
    }


# The job: saves what it was told in its checkpoint directory, then trains until stopped.
TOLD = (
    "import json, os, time\n"
    "os.makedirs('/work/ckpt', exist_ok=True)\n"
    "told = {k: v for k, v in os.environ.items() if k.startswith('GPGPU_')}\n"
    "json.dump(told, open('/work/ckpt/told.json', 'w'))\n"
    "time.sleep(300)\n"
)


def test_a_preempted_jobs_checkpoint_is_uploaded_before_its_end_is_reported_and_it_was_told_how_to_checkpoint(
    checkpoint_rig: Any,
) -> None:
    agent, fake, transport, store, rentals = checkpoint_rig
    agent.poll_once()
    order = {**_order(1, fake.gpus[0].uuid, 0, script=TOLD), "checkpoint": _checkpoint(1), "checkpoint_interval_s": 900}
    transport.heartbeat_replies.append(_reply(start=[order], predicted_idle_s=7200))
    agent.network_once()
    agent.poll_once()
    told_path = rentals / "lease-1" / "ckpt" / "told.json"
    _wait(told_path.exists, 15, "the job writing what it was told")
    told = json.loads(told_path.read_text())
    assert told["GPGPU_CHECKPOINT_DIR"] == "/work/ckpt"
    assert told["GPGPU_RESUME_COUNT"] == "0"
    assert told["GPGPU_STOP_GRACE_S"] == "2"
    assert 7100 <= int(told["GPGPU_PREDICTED_IDLE_S"]) <= 7200
    assert told["GPGPU_SUGGESTED_CHECKPOINT_INTERVAL_S"] == "900"  # its promise is shorter than 7200 / 4
    status = json.loads((rentals / "lease-1" / ".gpgpu-lease.json").read_text())
    assert (status["resume_count"], status["checkpoint_dir"], status["stop_grace_s"]) == (0, "/work/ckpt", 2)

    # A later heartbeat says the owner is due back sooner: the file follows.
    transport.heartbeat_replies.append(_reply(predicted_idle_s=600))
    agent.network_once()
    agent.poll_once()
    status = json.loads((rentals / "lease-1" / ".gpgpu-lease.json").read_text())
    assert status["predicted_idle_s"] <= 600
    assert 145 <= status["suggested_checkpoint_interval_s"] <= 150  # a quarter of what is left

    fake.add_process(0, OWNER_PID, 1000)
    store.log.clear()
    agent.poll_once()  # reclaim: SIGTERM, grace, pack, upload, then the end event

    ((url, data, _),) = store.uploads
    assert url == "leases/1/checkpoint"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["told.json"]
    upload = store.log.index("upload leases/1/checkpoint")
    assert upload < store.log.index("event lease-1-preempted_by_owner")


# The job: copies its status file (or says it found none) at its first instruction, and ends.
READS_STATUS_AT_ONCE = (
    "import os, shutil\n"
    "try: shutil.copy(os.environ['GPGPU_LEASE_INFO'], '/work/seen.json')\n"
    "except FileNotFoundError: open('/work/seen.json', 'w').write('missing')\n"
)


def test_a_job_finds_its_status_file_at_its_first_instruction(checkpoint_rig: Any) -> None:
    agent, fake, transport, _store, rentals = checkpoint_rig
    runner = agent.runner
    seen = rentals / "lease-1" / "seen.json"
    start = runner.start

    def start_then_wait_for_the_job(spec: Any, **options: Any) -> Any:
        # However fast the job is, the agent does nothing more until it has looked.
        state = start(spec, **options)
        _wait(seen.exists, 15, "the job looking for its status file")
        return state

    runner.start = start_then_wait_for_the_job
    agent.poll_once()
    order = {**_order(1, fake.gpus[0].uuid, 0, script=READS_STATUS_AT_ONCE), "checkpoint": _checkpoint(1)}
    transport.heartbeat_replies.append(_reply(start=[order], predicted_idle_s=3600))
    agent.network_once()
    agent.poll_once()
    assert seen.read_text() != "missing"
    status = json.loads(seen.read_text())
    assert (status["lease_id"], status["job_id"], status["checkpoint_dir"]) == (1, 101, "/work/ckpt")
    assert 3500 <= status["predicted_idle_s"] <= 3600


def test_a_lease_starts_with_its_jobs_checkpoint_restored_and_owned_by_the_job(checkpoint_rig: Any) -> None:
    agent, fake, transport, store, _ = checkpoint_rig
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("state.txt")
        info.size = 7
        tar.addfile(info, io.BytesIO(b"step 13"))
    store.archives["leases/2/checkpoint"] = archive.getvalue()
    script = (
        "import os, time; print(open('/work/ckpt/state.txt').read(), 'resumed', os.environ['GPGPU_RESUME_COUNT'], "
        "os.access('/work/ckpt/state.txt', os.W_OK), flush=True); time.sleep(300)"
    )
    agent.poll_once()
    order = {**_order(2, fake.gpus[0].uuid, 0, script=script), "checkpoint": _checkpoint(2, restore=archive.getvalue())}
    transport.heartbeat_replies.append(_reply(start=[order]))
    agent.network_once()
    agent.poll_once()
    assert 2 in agent.leases
    log = agent.state_dir / "logs" / "lease-2.log"
    _wait(lambda: log.exists() and "resumed" in log.read_text(), 15, "the job reading its checkpoint")
    assert "step 13 resumed 1 True" in log.read_text()
    # The fetched archive does not linger in the agent's state.
    assert not list((agent.state_dir / "checkpoints").glob("*"))


def test_a_checkpoint_that_is_not_the_one_named_fails_the_start_rather_than_start_from_nothing(
    checkpoint_rig: Any,
) -> None:
    agent, fake, transport, store, _ = checkpoint_rig
    store.archives["leases/3/checkpoint"] = b"replaced by someone"
    agent.poll_once()
    order = {
        **_order(3, fake.gpus[0].uuid, 1),
        "checkpoint": _checkpoint(3, restore=b"replaced by someone", sha256="0" * 64),
    }
    transport.heartbeat_replies.append(_reply(start=[order]))
    agent.network_once()
    agent.poll_once()
    agent.network_once()
    body = transport._events[(3, "lease-3-failed_to_start")]
    assert "checkpoint" in body["detail"]
    assert 3 not in agent.leases


def test_a_cancelled_jobs_checkpoint_is_not_uploaded(checkpoint_rig: Any) -> None:
    agent, fake, transport, store, rentals = checkpoint_rig
    agent.poll_once()
    order = {**_order(4, fake.gpus[0].uuid, 0, script=TOLD), "checkpoint": _checkpoint(4)}
    transport.heartbeat_replies.append(_reply(start=[order]))
    agent.network_once()
    agent.poll_once()
    _wait((rentals / "lease-4" / "ckpt" / "told.json").exists, 15, "the job starting")
    transport.heartbeat_replies.append(_reply(stop=[{"lease_id": 4, "reason": "cancelled"}]))
    agent.network_once()
    agent.poll_once()
    assert 4 not in agent.leases
    assert store.uploads == []


def test_a_job_cancelled_keeping_its_checkpoint_has_it_uploaded_before_its_exit_is_reported(
    checkpoint_rig: Any,
) -> None:
    agent, fake, transport, store, rentals = checkpoint_rig
    agent.poll_once()
    order = {**_order(5, fake.gpus[0].uuid, 0, script=TOLD), "checkpoint": _checkpoint(5)}
    transport.heartbeat_replies.append(_reply(start=[order]))
    agent.network_once()
    agent.poll_once()
    _wait((rentals / "lease-5" / "ckpt" / "told.json").exists, 15, "the job starting")
    store.log.clear()
    stop = {"lease_id": 5, "reason": "cancelled", STOP_SAVE_CHECKPOINT: True}
    transport.heartbeat_replies.append(_reply(stop=[stop]))
    agent.network_once()
    agent.poll_once()  # SIGTERM, grace, pack, upload, then the exit

    assert 5 not in agent.leases
    ((url, data, _),) = store.uploads
    assert url == "leases/5/checkpoint"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["told.json"]
    assert store.log.index("upload leases/5/checkpoint") < store.log.index("event lease-5-exited")
    agent.network_once()
    assert transport._events[(5, "lease-5-exited")]["detail"] == "stopped on request (cancelled)"


def test_a_stop_order_whose_checkpoint_flag_is_not_true_uploads_nothing(checkpoint_rig: Any) -> None:
    agent, fake, transport, store, rentals = checkpoint_rig
    agent.poll_once()
    order = {**_order(6, fake.gpus[0].uuid, 0, script=TOLD), "checkpoint": _checkpoint(6)}
    transport.heartbeat_replies.append(_reply(start=[order]))
    agent.network_once()
    agent.poll_once()
    _wait((rentals / "lease-6" / "ckpt" / "told.json").exists, 15, "the job starting")
    stop = {"lease_id": 6, "reason": "cancelled", STOP_SAVE_CHECKPOINT: "yes"}
    transport.heartbeat_replies.append(_reply(stop=[stop]))
    agent.network_once()
    agent.poll_once()
    assert 6 not in agent.leases
    assert store.uploads == []


def test_every_rental_the_owner_came_back_to_is_stopped_before_any_checkpoint_is_uploaded(
    checkpoint_rig: Any,
) -> None:
    agent, fake, transport, store, rentals = checkpoint_rig
    fake.add_gpu("NVIDIA L4", 23034)
    agent.poll_once()
    orders = [
        {**_order(lease_id, gpu.uuid, 0, script=TOLD), "checkpoint": _checkpoint(lease_id)}
        for lease_id, gpu in ((5, fake.gpus[0]), (6, fake.gpus[1]))
    ]
    transport.heartbeat_replies.append(_reply(start=orders))
    agent.network_once()
    agent.poll_once()
    for lease_id in (5, 6):
        _wait((rentals / f"lease-{lease_id}" / "ckpt" / "told.json").exists, 15, f"lease {lease_id} starting")
    stop = agent.tracker.runner.stop

    def noted_stop(lease_id: int, *, grace_s: float) -> Any:
        store.log.append(f"stop {lease_id}")
        return stop(lease_id, grace_s=grace_s)

    agent.tracker.runner.stop = noted_stop  # type: ignore[method-assign]
    fake.add_process(0, OWNER_PID, 1000)
    fake.add_process(1, OWNER_PID + 1, 1000)
    store.log.clear()
    agent.poll_once()

    steps = [line for line in store.log if line.startswith(("stop", "upload"))]
    assert steps == ["stop 5", "stop 6", "upload leases/5/checkpoint", "upload leases/6/checkpoint"]


def test_a_checkpoint_upload_the_marketplace_could_not_take_is_tried_again_and_then_given_up(
    checkpoint_rig: Any,
) -> None:
    agent, fake, transport, store, rentals = checkpoint_rig
    agent.tracker.pause = lambda seconds: None
    agent.poll_once()
    orders = [
        {**_order(lease_id, fake.gpus[0].uuid, 0, script=TOLD), "checkpoint": _checkpoint(lease_id)}
        for lease_id in (8, 9)
    ]
    for order in orders:
        transport.heartbeat_replies.append(_reply(start=[order]))
        agent.network_once()
        agent.poll_once()
        lease_id = order["lease_id"]
        _wait((rentals / f"lease-{lease_id}" / "ckpt" / "told.json").exists, 15, f"lease {lease_id} starting")
        # Twice unreachable then taken; then unreachable every time: given up, said in the event.
        store.unreachable_for = 2 if lease_id == 8 else 99
        transport.heartbeat_replies.append(_reply(stop=[{"lease_id": lease_id, "reason": "machine_suspended"}]))
        agent.network_once()
        agent.poll_once()
        assert lease_id not in agent.leases

    assert [url for url, _, _ in store.uploads] == ["leases/8/checkpoint"]
    assert store.log.count("unreachable leases/9/checkpoint") == 3
    agent.network_once()
    assert transport._events[(8, "lease-8-exited")]["detail"] == "stopped on request (machine_suspended)"
    assert "checkpoint not saved" in transport._events[(9, "lease-9-exited")]["detail"]
