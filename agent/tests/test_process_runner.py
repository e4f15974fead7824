"""The process runner, with real processes in the real sandbox: short Python children that print
what they see, trap or ignore signals, fork grandchildren, and outlive the runner that started
them. Inside the sandbox a process sees its own PID namespace, so the tests find the host pids
of what a job started by the job's command line (markers in its arguments)."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from conftest import SANDBOX_PYTHON, SandboxKit
from gpgpu_agent.protocols import RunnerError
from gpgpu_agent.runners import ProcessRunner, UnknownLeaseError
from gpgpu_agent.runners import process as process_module
from gpgpu_agent.runners.state import LOG_TAIL_BYTES, proc_stat, write_json_atomic
from gpgpu_agent.types import LeaseSpec, RunState

GPUS = {"GPU-aaa": 0, "GPU-bbb": 1, "GPU-ccc": 2}
T = TypeVar("T")


def lease(lease_id: int, script: str, *, env: dict[str, str] | None = None, kind: str = "process") -> LeaseSpec:
    return LeaseSpec(
        lease_id=lease_id,
        job_id=lease_id + 100,
        kind=kind,  # type: ignore[arg-type]
        image="",
        command=(SANDBOX_PYTHON, "-u", "-c", textwrap.dedent(script)),
        env=env or {},
        gpu_uuids=("GPU-ccc", "GPU-aaa"),
        max_duration_s=60,
        price_per_gpu_hour="0.400000",
    )


def wait_for(check: Callable[[], T | None], timeout: float = 5.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"gave up after {timeout} s")


def ended(runner: ProcessRunner, lease_id: int) -> RunState:
    def check() -> RunState | None:
        state = runner.poll(lease_id)
        return None if state.running else state

    return wait_for(check)


def log_says(runner: ProcessRunner, lease_id: int, text: str) -> str:
    def check() -> str | None:
        tail = runner.poll(lease_id).log_tail
        return tail if text in tail else None

    return wait_for(check)


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and not stat.zombie


def host_pid(marker: str) -> int | None:
    """The host pid of the live workload process whose command line holds ``marker`` as one
    argument (not the supervisor's or bwrap's, whose command lines hold the job's too)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        wrapper = argv[0].endswith(b"bwrap") or any(arg.endswith(b"shim.py") for arg in argv)
        if marker.encode() in argv and not wrapper and alive(int(name)):
            return int(name)
    return None


@pytest.fixture
def make_runner(tmp_path: Path, sandbox_kit: SandboxKit, rentals_dir: Path) -> Callable[..., ProcessRunner]:
    """A new runner over the same state (as an agent after a restart would build it); keyword
    arguments go to ProcessRunner."""

    def make(**options: str) -> ProcessRunner:
        return ProcessRunner(
            tmp_path / "state",
            tmp_path / "logs",
            sandbox=sandbox_kit.sandbox,
            user=sandbox_kit.user,
            cgroups=sandbox_kit.cgroups,
            limits=sandbox_kit.limits,
            work_dir=rentals_dir,
            **options,
        )

    return make


@pytest.fixture
def runner(make_runner: Callable[[], ProcessRunner]) -> ProcessRunner:
    return make_runner()


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path, rentals_dir: Path, sandbox_kit: SandboxKit):
    """Whatever a test leaves running is killed, and its cgroup removed, by the runner's own stop
    and forget."""
    yield
    leftover = ProcessRunner(
        tmp_path / "state", tmp_path / "logs", sandbox=None, cgroups=sandbox_kit.cgroups, work_dir=rentals_dir
    )
    for state in leftover.adopt():
        if state.running:
            leftover.stop(state.lease_id, grace_s=0)
        leftover.forget(state.lease_id)


# --- what the workload sees -------------------------------------------------------------------


def test_workload_sees_only_the_leased_gpus_and_the_jobs_env(runner, monkeypatch):
    monkeypatch.setenv("AGENT_ONLY_SECRET", "do-not-leak")
    spec = lease(
        1,
        "import json, os; print(json.dumps(dict(os.environ)))",
        env={"MODEL": "tiny", "CUDA_VISIBLE_DEVICES": "0,1,2"},
    )

    runner.start(spec, gpu_indexes=GPUS)
    state = ended(runner, 1)

    seen = json.loads(state.log_tail)
    assert seen["CUDA_VISIBLE_DEVICES"] == "2,0"  # lease order, and the job cannot widen it
    assert seen["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert seen["GPGPU_LEASE_ID"] == "1"
    assert seen["GPGPU_JOB_ID"] == "101"
    assert seen["MODEL"] == "tiny"
    assert "AGENT_ONLY_SECRET" not in seen
    assert state.exit_code == 0


def test_workload_runs_in_a_process_group_of_its_own(runner, tmp_path):
    spec = lease(2, "import time; print('ready', flush=True); time.sleep(30)  # marker-2")

    started = runner.start(spec, gpu_indexes=GPUS)
    log_says(runner, 2, "ready")

    record = json.loads((tmp_path / "state" / "runs" / "lease-2.json").read_text())
    workload = proc_stat(wait_for(lambda: host_pid(spec.command[-1])))
    assert record["pgid"] == record["pid"] != os.getpgid(0)
    assert workload.sid not in (os.getsid(0), record["pid"])  # a session of its own, in the sandbox
    assert record["lease_id"] == 2
    assert record["command"] == list(spec.command)
    assert record["start_ticks"] == proc_stat(record["pid"]).start_ticks
    assert started.running and record["pid"] in started.pids
    assert workload.pid in runner.poll(2).pids


# --- exit codes and logs ----------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_and_output_are_reported(runner, code):
    runner.start(lease(3, f"print('training done'); raise SystemExit({code})"), gpu_indexes=GPUS)

    state = ended(runner, 3)

    assert state.exit_code == code
    assert state.pids == ()
    assert "training done" in state.log_tail


def test_log_tail_is_bounded_valid_text_without_nul(runner):
    script = "import sys; sys.stdout.buffer.write(b'x' * 200_000 + b'\\xff\\x00the end\\n')"

    runner.start(lease(4, script), gpu_indexes=GPUS)
    state = ended(runner, 4)

    assert len(state.log_tail.encode("utf-8")) <= LOG_TAIL_BYTES
    assert state.log_tail.endswith("\ufffdthe end\n")
    assert "\x00" not in state.log_tail


# --- the log's cap: a job that prints without end must not fill the owner's disk --------------

LOG_CAP = 64 * 1024
# What the supervisor adds to a cut log: the line where it cuts, the line before the output's end.
CUT_LINES = 512


def test_a_job_that_prints_far_more_than_the_cap_leaves_a_log_within_it_that_ends_with_its_last_lines(
    make_runner, tmp_path
):
    # Given a log cap of 64 KiB and a job that prints 32 times as much, then its error
    runner = make_runner(log_max_size="64k")
    script = """
        import sys
        print('starting')
        for _ in range(512):
            print('x' * 4095)
        print('the real error', file=sys.stderr)
        raise SystemExit(3)
    """

    runner.start(lease(30, script), gpu_indexes=GPUS)
    state = ended(runner, 30)

    # Then the log on disk holds no more than the cap and the lines that say what was cut
    log_file = tmp_path / "logs" / "lease-30.log"
    assert log_file.stat().st_size <= LOG_CAP + CUT_LINES
    # And the job's end is reported, with its last lines
    assert state.exit_code == 3
    assert state.log_tail.endswith("the real error\n")
    assert "bytes before them were left out" in state.log_tail
    # And the output reader reads the log from its start
    output = runner.read_output(30, offset=0, limit=4 * LOG_CAP)
    assert output is not None
    assert output.data.startswith(b"starting\nxxx")
    assert output.next_offset == log_file.stat().st_size
    assert b"this lease's log keeps the first" in output.data


def test_a_job_whose_output_passes_the_cap_goes_on_running_and_the_owner_is_told_once(
    make_runner, tmp_path, rentals_dir, caplog
):
    # Given a job that prints 64 times the cap, then goes on working
    runner = make_runner(log_max_size="64k")
    script = """
        import os, sys, time
        line = b'y' * 1023 + b'\\n'
        for _ in range(4096):
            sys.stdout.buffer.write(line)
        sys.stdout.flush()
        open('/work/printed', 'w').close()
        time.sleep(30)
    """
    caplog.set_level(logging.WARNING, logger="gpgpu_agent.runners.process")

    runner.start(lease(31, script), gpu_indexes=GPUS)
    wait_for(lambda: (rentals_dir / "lease-31" / "printed").exists())
    running = runner.poll(31)
    runner.poll(31)
    size_while_running = (tmp_path / "logs" / "lease-31.log").stat().st_size
    state = runner.stop(31, grace_s=1)

    # Then it was still running, its log held at the cap, and the renter reads why
    assert running.running
    assert size_while_running <= LOG_CAP
    assert "the rest is left out" in running.log_tail
    # And its end comes with its last lines, still within the cap
    assert state.exit_code == 128 + signal.SIGTERM
    assert (tmp_path / "logs" / "lease-31.log").stat().st_size <= LOG_CAP + CUT_LINES
    assert state.log_tail.endswith("y" * 1023 + "\n")
    # And the owner's log says so once
    told = [r for r in caplog.records if r.getMessage().startswith("lease 31: the job's output passed")]
    assert len(told) == 1


@pytest.mark.parametrize("size", ["lots", "0", "-1m", "20 m", "1k", "4095"])
def test_a_log_cap_that_is_not_a_size_of_at_least_4k_is_refused(tmp_path, size):
    with pytest.raises(ValueError, match=f"log_max_size must be a size of at least 4k such as 20m, not '{size}'"):
        ProcessRunner(tmp_path / "state", tmp_path / "logs", sandbox=None, log_max_size=size)


# --- stopping ---------------------------------------------------------------------------------


def test_stop_ends_a_workload_that_traps_sigterm_quickly(runner):
    script = """
        import os, signal, time
        def cleanup(signum, frame):
            print('saving checkpoint', flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, cleanup)
        print('ready', flush=True)
        time.sleep(30)
    """
    runner.start(lease(5, script), gpu_indexes=GPUS)
    log_says(runner, 5, "ready")

    began = time.monotonic()
    state = runner.stop(5, grace_s=5)

    assert time.monotonic() - began < 1.0  # it did not wait out the grace period
    assert not state.running
    assert state.exit_code == 128 + signal.SIGTERM
    assert "saving checkpoint" in state.log_tail


def test_stop_returns_once_the_supervisor_is_gone_not_when_it_has_only_recorded_the_exit(runner, tmp_path, monkeypatch):
    """The supervisor records the exit, then ends; on a loaded machine its ending takes a while
    (the daemon's owner-reclaim test saw it alive just after stop returned). Here it takes half a
    second: stop waits for it, so a stopped lease holds no process."""
    slow = tmp_path / "slow_shim.py"
    slow.write_text(
        "import runpy, sys, time\n"
        f"sys.argv[0] = {str(process_module.SHIM)!r}\n"
        "try:\n"
        f"    runpy.run_path({str(process_module.SHIM)!r}, run_name='__main__')\n"
        "finally:\n"
        "    time.sleep(0.5)\n"
    )
    monkeypatch.setattr(process_module, "SHIM", slow)
    runner.start(lease(12, "import time; print('ready', flush=True); time.sleep(30)"), gpu_indexes=GPUS)
    log_says(runner, 12, "ready")
    supervisor = runner._records[12].pid

    state = runner.stop(12, grace_s=5)

    assert not state.running and state.exit_code == 128 + signal.SIGTERM
    assert not alive(supervisor)


def test_stop_kills_a_workload_that_ignores_sigterm_after_the_grace_period(runner):
    script = """
        import signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        escaped = subprocess.Popen(['sleep', '30.6'], start_new_session=True)
        print('ready', flush=True)
        time.sleep(30)
    """
    started = runner.start(lease(6, script), gpu_indexes=GPUS)
    log_says(runner, 6, "ready")
    escaped = wait_for(lambda: host_pid("30.6"))
    pids = runner.poll(6).pids

    began = time.monotonic()
    state = runner.stop(6, grace_s=0.5)
    took = time.monotonic() - began

    assert 0.5 <= took <= 1.5
    assert state.exit_code == 128 + signal.SIGKILL
    assert not state.running
    assert started.pids[0] in pids and escaped in pids
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=0.5)
    assert runner.stop(6, grace_s=5).exit_code == 137  # stopping a stopped lease returns its state


def test_stop_ends_the_workloads_children_even_those_in_a_session_of_their_own(runner):
    script = """
        import subprocess, time
        child = subprocess.Popen(['sleep', '30.7'])
        escaped = subprocess.Popen(['sleep', '31.7'], start_new_session=True)
        print('ready', flush=True)
        time.sleep(30)
    """
    runner.start(lease(7, script), gpu_indexes=GPUS)
    log_says(runner, 7, "ready")
    child, escaped = wait_for(lambda: host_pid("30.7")), wait_for(lambda: host_pid("31.7"))

    running = runner.poll(7)
    assert {child, escaped} <= set(running.pids)  # the idle detector counts them as the rental's

    runner.stop(7, grace_s=1)

    wait_for(lambda: not alive(child) and not alive(escaped), timeout=1.0)


def test_processes_the_command_leaves_behind_die_when_it_ends(runner):
    script = """
        import subprocess, time
        subprocess.Popen(['sleep', '30.8'])
        time.sleep(0.5)
    """
    runner.start(lease(8, script), gpu_indexes=GPUS)
    child = wait_for(lambda: host_pid("30.8"))

    state = ended(runner, 8)

    assert state.exit_code == 0
    wait_for(lambda: not alive(child), timeout=1.0)


# --- starting ---------------------------------------------------------------------------------


def test_start_is_idempotent_by_lease(runner, make_runner, tmp_path):
    spec = lease(9, "import time; time.sleep(30)")

    first = runner.start(spec, gpu_indexes=GPUS)
    second = runner.start(spec, gpu_indexes=GPUS)
    after_restart = make_runner().start(spec, gpu_indexes=GPUS)

    assert first.pids[0] == second.pids[0] == after_restart.pids[0]
    assert sorted(p.name for p in (tmp_path / "state" / "runs").iterdir()) == ["lease-9.json"]


def test_container_leases_are_refused_with_a_sentence(runner):
    with pytest.raises(RunnerError, match="the process runner runs process jobs only"):
        runner.start(lease(10, "pass", kind="container"), gpu_indexes=GPUS)


@pytest.mark.parametrize(
    ("gpu_indexes", "command", "message"),
    [
        ({"GPU-aaa": 0}, None, "GPU GPU-ccc is not on this machine"),
        (GPUS, ("no-such-program-here",), "command not found: 'no-such-program-here'"),
        (GPUS, (), "no command"),
    ],
)
def test_a_lease_that_cannot_start_is_refused_and_leaves_nothing(runner, gpu_indexes, command, message):
    spec = lease(11, "pass")
    if command is not None:
        spec = dataclasses.replace(spec, command=command)

    with pytest.raises(RunnerError, match=message):
        runner.start(spec, gpu_indexes=gpu_indexes)

    with pytest.raises(UnknownLeaseError):
        runner.poll(11)
    assert runner.adopt() == []


def test_invalid_environment_names_are_refused(runner):
    with pytest.raises(RunnerError, match="not a valid environment variable name"):
        runner.start(lease(12, "pass", env={"BAD=NAME": "x"}), gpu_indexes=GPUS)


# --- agent restarts ---------------------------------------------------------------------------


def test_a_restarted_agent_adopts_a_running_workload_and_learns_its_exit_code(make_runner, rentals_dir):
    script = """
        import os, time
        while not os.path.exists('/work/go'):
            time.sleep(0.02)
        raise SystemExit(5)
    """
    first_agent = make_runner()
    started = first_agent.start(lease(13, script), gpu_indexes=GPUS)
    del first_agent  # the agent exits without stopping anything
    gc.collect()

    second_agent = make_runner()
    (adopted,) = second_agent.adopt()

    assert adopted.lease_id == 13 and adopted.running
    assert started.pids[0] in adopted.pids
    (rentals_dir / "lease-13" / "go").touch()  # the job's /work
    assert ended(second_agent, 13).exit_code == 5


def test_an_adopted_workload_can_be_stopped(make_runner):
    first_agent = make_runner()
    first_agent.start(lease(14, "print('ready', flush=True); import time; time.sleep(30)"), gpu_indexes=GPUS)
    log_says(first_agent, 14, "ready")
    del first_agent
    gc.collect()

    second_agent = make_runner()
    second_agent.adopt()
    state = second_agent.stop(14, grace_s=2)

    assert state.exit_code == 128 + signal.SIGTERM


def test_a_workload_that_ended_while_the_agent_was_down_is_reported_with_its_exit_code(make_runner, tmp_path):
    first_agent = make_runner()
    first_agent.start(lease(15, "print('bye'); raise SystemExit(4)"), gpu_indexes=GPUS)
    del first_agent
    gc.collect()
    wait_for(lambda: (tmp_path / "state" / "runs" / "lease-15.exit.json").exists())

    (state,) = make_runner().adopt()

    assert not state.running
    assert state.exit_code == 4
    assert "bye" in state.log_tail


def test_a_workload_that_ended_while_the_agent_was_down_is_reported_with_when_it_ended(make_runner):
    first_agent = make_runner()
    started = first_agent.start(lease(21, "import time; time.sleep(0.5); raise SystemExit(4)"), gpu_indexes=GPUS)
    del first_agent
    gc.collect()
    supervisor = started.pids[0]
    wait_for(lambda: not alive(supervisor))
    noticed = datetime.now(UTC)  # a little after the real end, however loaded the machine
    time.sleep(2)

    (state,) = make_runner().adopt()

    assert state.exit_code == 4
    # The recorded end, not the adoption 2 s later.
    assert state.ended_at is not None
    assert noticed - timedelta(seconds=1.5) <= state.ended_at <= noticed + timedelta(seconds=0.05)
    assert state.started_at is not None and timedelta(seconds=0.5) <= state.ended_at - state.started_at


def _pid_file(tmp_path: Path, lease_id: int, pid: int, start_ticks: int) -> None:
    runs = tmp_path / "state" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        runs / f"lease-{lease_id}.json",
        {
            "lease_id": lease_id,
            "job_id": 1,
            "pid": pid,
            "pgid": pid,
            "start_ticks": start_ticks,
            "boot_id": None,
            "started_at": "2026-11-22T01:00:00+00:00",
            "command": ["train"],
            "gpu_uuids": ["GPU-aaa"],
            "log_path": str(tmp_path / "logs" / f"lease-{lease_id}.log"),
            "exit_path": str(runs / f"lease-{lease_id}.exit.json"),
            "work_dir": str(tmp_path / "work"),
        },
    )


def test_a_pid_reused_by_another_process_is_never_taken_for_the_workload(tmp_path):
    # Given a pid file whose pid now belongs to an unrelated process (another start time)
    stranger = subprocess.Popen([shutil.which("sleep"), "30"], start_new_session=True)  # noqa: S603
    try:
        _pid_file(tmp_path, 16, stranger.pid, proc_stat(stranger.pid).start_ticks + 1)
        runner = ProcessRunner(tmp_path / "state", tmp_path / "logs", sandbox=None)

        (state,) = runner.adopt()
        stopped = runner.stop(16, grace_s=0.2)

        assert not state.running and state.pids == ()
        assert stopped.exit_code == 137  # lost while the agent was down
        assert stranger.poll() is None  # the stranger was never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_a_pid_file_of_a_dead_process_is_not_adopted_as_running(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _pid_file(tmp_path, 17, gone.pid, 12345)

    (state,) = ProcessRunner(tmp_path / "state", tmp_path / "logs", sandbox=None).adopt()

    assert not state.running and state.pids == () and state.exit_code == 137


def test_an_unreadable_pid_file_is_skipped(tmp_path, runner):
    runs = tmp_path / "state" / "runs"
    runs.mkdir(parents=True)
    (runs / "lease-18.json").write_text("{not json")
    runner.start(lease(19, "pass"), gpu_indexes=GPUS)

    assert [s.lease_id for s in runner.adopt()] == [19]


def test_forget_removes_an_ended_leases_records_and_refuses_a_running_one(runner, make_runner, tmp_path, rentals_dir):
    runner.start(lease(20, "print('ready', flush=True); import time; time.sleep(30)"), gpu_indexes=GPUS)
    log_says(runner, 20, "ready")

    with pytest.raises(RunnerError, match="still running"):
        runner.forget(20)
    runner.stop(20, grace_s=1)
    runner.forget(20)
    runner.forget(20)  # forgetting twice is harmless

    assert list((tmp_path / "state" / "runs").iterdir()) == []
    assert not (tmp_path / "logs" / "lease-20.log").exists()
    assert not (rentals_dir / "lease-20").exists()
    with pytest.raises(UnknownLeaseError):
        runner.poll(20)
    with pytest.raises(UnknownLeaseError):
        runner.stop(20, grace_s=1)
    assert make_runner().adopt() == []
