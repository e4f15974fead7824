"""Usage periods end where the agent last saw the workload running, not where its clock is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from gpgpu_agent.leases import GpuView, LeaseTracker, TrackedLease
from gpgpu_agent.spool import Spool
from gpgpu_agent.transport import FakeTransport
from gpgpu_agent.types import RunState

START = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


class Runner:
    """One workload, running until the test says it ended (as a fence watchdog would stop it)."""

    def __init__(self) -> None:
        self.ended_at: datetime | None = None

    def poll(self, lease_id: int) -> RunState:
        if self.ended_at is None:
            return RunState(lease_id=lease_id, running=True, exit_code=None, pids=(4242,), started_at=START)
        return RunState(
            lease_id=lease_id, running=False, exit_code=143, pids=(), started_at=START, ended_at=self.ended_at
        )


def _tracker(tmp_path: Path, clock: Clock, runner: Runner) -> tuple[LeaseTracker, Spool]:
    spool = Spool(tmp_path / "spool.sqlite3")
    tracker = LeaseTracker(
        runner=runner,  # type: ignore[arg-type]
        outbox=spool,
        sign=lambda struct: "",
        state_dir=tmp_path,
        usage_interval_s=0,
        clock=clock,
    )
    tracker.leases[7] = TrackedLease(
        lease_id=7, gpu_uuids=("GPU-a",), max_duration_s=86400, started_at=START, usage_from=START
    )
    return tracker, spool


def _periods(spool: Spool, transport: FakeTransport) -> list[tuple[int, int]]:
    """Every usage period the spool has sent through `transport` so far (replay sends what is new)."""
    spool.replay(transport)
    return sorted(
        (_unix(call.body["period_start"]), _unix(call.body["period_end"]))
        for call in transport.calls
        if call.method == "lease_usage"
    )


def _unix(wire: object) -> int:
    return int(datetime.fromisoformat(str(wire).replace("Z", "+00:00")).timestamp())


def test_an_agent_held_up_between_its_poll_and_its_usage_report_bills_only_what_it_saw_run(tmp_path: Path) -> None:
    clock, runner, transport = Clock(), Runner(), FakeTransport()
    tracker, spool = _tracker(tmp_path, clock, runner)
    start = int(START.timestamp())

    clock.now = START + timedelta(seconds=30.4)
    tracker.poll()  # running
    # The agent is paused here for ten minutes; its workload is stopped 2 s into the pause.
    runner.ended_at = START + timedelta(seconds=32.5)
    clock.now = START + timedelta(minutes=10, seconds=30)
    tracker.account_usage()

    assert _periods(spool, transport) == [(start, start + 30)]  # not ten minutes of an ended workload

    # Then the agent runs again and finds the workload ended: the end's report continues where
    # the last period stopped, up to the recorded end, so no second is lost.
    states = tracker.poll()
    tracker.enforce(states, GpuView(by_uuid={}, foreign={}), schedule_open=True, now=clock.now)

    assert _periods(spool, transport) == [(start, start + 30), (start + 30, start + 32)]
    assert 7 not in tracker.leases


def test_a_running_workload_is_billed_up_to_the_poll_that_saw_it(tmp_path: Path) -> None:
    clock, runner = Clock(), Runner()
    tracker, spool = _tracker(tmp_path, clock, runner)
    start = int(START.timestamp())

    for second in (60, 120):
        clock.now = START + timedelta(seconds=second, milliseconds=200)
        tracker.poll()
        clock.now += timedelta(milliseconds=5)  # the rest of the poll
        tracker.account_usage()

    assert _periods(spool, FakeTransport()) == [(start, start + 60), (start + 60, start + 120)]
