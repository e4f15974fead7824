"""The fault suite's process watcher on real processes: every workload a sandbox starts is seen,
however its start lines up with the watcher's scans. Fast (no servers): it runs in every test run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.harness import SANDBOX_SH, Watcher, log_warnings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_every_workload_is_seen_even_when_a_scan_lands_inside_its_exec(tmp_path: Path) -> None:
    # A launcher whose argv names bwrap, as the sandbox's does, forks and execs each workload the
    # way bwrap does. A scan that reads a process inside execve finds an empty command line (the
    # new image's arguments are not mapped yet); scanning without pause lands there often. A
    # watcher that took the empty line as "not a workload" lost the run for good, and the suite
    # then called the lease's billed seconds unearned.
    prefix = f"gpgpu-watch-{time.time_ns()}-"
    count = 80
    launcher = (
        f"for n in $(seq 1 {count}); do "
        f"GPGPU_JOB_ID=$n GPGPU_LEASE_ID=$n {SANDBOX_SH} -c 'sleep 0.4' {prefix}$n:0.4 & "
        "sleep 0.01; done; wait"
    )
    watcher = Watcher(prefix, [], tmp_path / "runs.jsonl", interval_s=0.0)
    watcher.start()
    try:
        subprocess.run(  # noqa: S603 - our own command
            [SANDBOX_SH, "-c", launcher, "bwrap-like-launcher"], check=True, timeout=60
        )
        time.sleep(0.3)
    finally:
        watcher.stop()
    runs = watcher.runs()
    seen = {run.job_id for run in runs}
    assert sorted(set(range(1, count + 1)) - seen) == [], f"{watcher.scans} scans"
    assert {run.lease_id for run in runs} == seen
    # Each was seen for about its planned 0.4 s, once: the fork that runs `sleep` is part of it.
    assert len(runs) == count
    assert all(0.2 < (run.end or 0) - run.start < 2.0 for run in runs)


def test_a_failing_run_reports_the_last_warnings_and_errors_of_a_log(tmp_path: Path) -> None:
    # A CI run keeps no logs: what the worker said went wrong must be in the report itself.
    log = tmp_path / "worker.log"
    lines = [f"[2026-12-06 10:00:{n:02d},000: INFO/ForkPoolWorker-1] task {n} finished" for n in range(50)]
    lines[10] = "[2026-12-06 10:00:10,000: WARNING/ForkPoolWorker-1] settlement 4 is pending again"
    lines[20] = "[2026-12-06 10:00:20,000: ERROR/ForkPoolWorker-1] settlement 5: the escrow paid less than sent"
    lines[30] = "[2026-12-06 10:00:30,000: WARNING/ForkPoolWorker-2] chain rewind: " + "x" * 1000
    log.write_text("\n".join(lines) + "\n")

    assert log_warnings(log, 2) == [lines[20], lines[30][:400]]
    assert len(log_warnings(log, 80)) == 3
    assert log_warnings(tmp_path / "absent.log", 80) == []
