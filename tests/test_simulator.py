"""The simulated fleet's parts that need no marketplace: owner patterns, the trace fit, process
groups, and HTTP retries."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from simulator import trace_params
from simulator.fleet import Api, ApiError, RunningLease, utc_now
from simulator.owner_usage import BUSY_RUNS, IDLE_RUNS, OwnerUsage, idle_fraction, owner_runs

# --- owner usage ----------------------------------------------------------------------------


def test_owner_runs_alternate_and_follow_the_fitted_trace_distribution() -> None:
    runs = owner_runs(random.Random(1), start_busy=False)
    sample = [next(runs) for _ in range(20_000)]

    states = [busy for busy, _ in sample]
    assert all(a != b for a, b in itertools.pairwise(states)), "runs must alternate"
    idle = sorted(length for busy, length in sample if not busy)
    busy = sorted(length for busy, length in sample if busy)
    # The traces' idle runs: p50 about 3 min, p90 about 17 min (the README's figures).
    assert 150 <= statistics.median(idle) <= 210
    assert 14 * 60 <= idle[int(0.9 * len(idle))] <= 20 * 60
    assert 130 <= statistics.median(busy) <= 190
    # About two thirds of the time idle, as in the traces.
    share = sum(idle) / (sum(idle) + sum(busy))
    assert 0.58 <= share <= 0.70
    assert 0.6 <= idle_fraction() <= 0.7


def test_time_scale_compresses_owner_patterns() -> None:
    normal = [length for _, length in _take(owner_runs(random.Random(2), start_busy=False), 2000)]
    fast = [length for _, length in _take(owner_runs(random.Random(2), start_busy=False, time_scale=10), 2000)]
    assert statistics.median(fast) == pytest.approx(statistics.median(normal) / 10)


def test_run_lengths_are_clamped() -> None:
    lengths = [length for _, length in _take(owner_runs(random.Random(3)), 20_000)]
    assert min(lengths) >= min(IDLE_RUNS.min_s, BUSY_RUNS.min_s)
    assert max(lengths) <= max(IDLE_RUNS.max_s, BUSY_RUNS.max_s)


def test_owner_usage_walks_its_runs_as_time_passes() -> None:
    now = [0.0]
    usage = OwnerUsage(iter([(False, 10.0), (True, 5.0), (False, 100.0)]), clock=lambda: now[0])
    assert usage.busy() is False
    now[0] = 9.9
    assert usage.idle_for_s() == pytest.approx(9.9)
    now[0] = 10.0
    assert usage.busy() is True
    assert usage.idle_for_s() == 0.0
    now[0] = 17.0
    assert usage.busy() is False
    assert usage.idle_for_s() == pytest.approx(2.0)


def test_time_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        next(owner_runs(random.Random(), time_scale=0))


def _take(iterator: Iterator[tuple[bool, float]], n: int) -> list[tuple[bool, float]]:
    return [next(iterator) for _ in range(n)]


# --- trace fit ------------------------------------------------------------------------------


def _write_trace(folder: Path, series: dict[str, list[float]], interval: float = 60.0) -> None:
    lines = ["value,timestamp_anon,container_ip"]
    for pod, values in series.items():
        lines += [f"{value},{1000.0 + i * interval},{pod}" for i, value in enumerate(values)]
    (folder / trace_params.DUTY_CYCLE_FILE).write_text("\n".join(lines) + "\n")


def test_trace_fit_measures_idle_and_busy_runs(tmp_path: Path) -> None:
    # Pod a: idle 3 min, busy 2 min, idle 1 min. Pod b: busy 1 min, idle 3 min.
    _write_trace(tmp_path, {"a": [0, 0, 0, 40, 80, 0], "b": [55, 0, 0, 0]})
    params = trace_params.fit_traces(
        trace_params.read_series(tmp_path / trace_params.DUTY_CYCLE_FILE), threshold_pct=0.01
    )
    assert params.sample_interval_s == 60
    assert params.idle_fraction == pytest.approx(7 / 10)
    assert params.idle.count == 3
    assert params.idle.p50_s == 180
    assert params.idle.mu == pytest.approx(statistics.fmean([math.log(180), math.log(180), math.log(60)]))
    assert params.busy.count == 2
    assert sorted([params.busy.p50_s, params.busy.p99_s]) == [60, 120]


def test_trace_fit_splits_a_series_at_a_long_gap(tmp_path: Path) -> None:
    path = tmp_path / trace_params.DUTY_CYCLE_FILE
    # Two idle samples, an hour of nothing, two more idle samples: two runs of 2 min, not one.
    path.write_text("value,timestamp_anon,container_ip\n0,0,a\n0,60,a\n50,120,a\n0,3720,a\n0,3780,a\n9,3840,a\n")
    params = trace_params.fit_traces(trace_params.read_series(path), threshold_pct=1)
    assert params.idle.count == 2
    assert params.idle.p99_s == 120


def test_trace_params_command_prints_the_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_trace(tmp_path, {"a": [0, 0, 50, 0, 70, 0, 0]})
    assert trace_params.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "idle runs: n=3 lognormal mu=" in out
    assert "busy runs: n=2" in out


def test_trace_params_command_explains_a_missing_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert trace_params.main([str(tmp_path)]) == 2
    assert "gpu_duty_cycle_train.csv not found" in capsys.readouterr().err


# --- running jobs ---------------------------------------------------------------------------


def test_stopping_a_job_kills_its_whole_process_group(tmp_path: Path) -> None:
    import subprocess

    pids = tmp_path / "pids"
    # The job spawns a grandchild: stopping the job must stop it too.
    script = f"import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); open({str(pids)!r}, 'w').write(str(c.pid)); time.sleep(60)"  # noqa: E501
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)  # noqa: S603
    lease = RunningLease(
        lease_id=1,
        job_id=1,
        gpu_indexes=[0],
        max_duration_s=60,
        started_mono=time.monotonic(),
        started_at=utc_now(),
        process=process,
    )
    _until(pids.exists)
    grandchild = int(pids.read_text())

    lease.terminate("stopped")

    _until(lambda: lease.exit_code() is not None)
    assert lease.exit_code() == -15
    _until(lambda: not _running(grandchild))


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from simulator import fleet

    monkeypatch.setattr(fleet, "STOP_GRACE_S", 0.3)
    script = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"  # noqa: E501
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE
    )
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    lease = RunningLease(
        lease_id=1,
        job_id=1,
        gpu_indexes=[0],
        max_duration_s=60,
        started_mono=time.monotonic(),
        started_at=utc_now(),
        process=process,
    )
    lease.terminate("stopped")
    time.sleep(0.5)
    assert lease.exit_code() is None, "SIGTERM is ignored: still running within the grace"
    lease.enforce_kill_deadline()
    _until(lambda: lease.exit_code() is not None)
    assert lease.exit_code() == -9
    process.stdout.close()


def _until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# --- HTTP retries ---------------------------------------------------------------------------


@pytest.fixture
def flaky_server() -> Iterator[dict]:
    """A local HTTP server answering POSTs with the statuses queued in state["statuses"]."""
    state: dict = {"statuses": [], "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state["requests"] += 1
            status = state["statuses"].pop(0) if state["statuses"] else 200
            body = json.dumps({"code": "x", "detail": "y"} if status >= 400 else {"ok": True}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def test_transient_errors_are_retried_until_the_request_goes_through(flaky_server: dict) -> None:
    flaky_server["statuses"] = [503, 502, 429]
    api = Api(flaky_server["url"], backoff_s=0.01)
    assert api.post("/x", {}) == {"ok": True}
    assert flaky_server["requests"] == 4


def test_a_refusal_is_not_retried(flaky_server: dict) -> None:
    flaky_server["statuses"] = [409]
    api = Api(flaky_server["url"], backoff_s=0.01)
    with pytest.raises(ApiError) as caught:
        api.post("/x", {})
    assert caught.value.status == 409 and caught.value.code == "x"
    assert flaky_server["requests"] == 1


def test_retries_give_up_after_the_last_attempt(flaky_server: dict) -> None:
    import requests

    flaky_server["statuses"] = [500] * 10
    api = Api(flaky_server["url"], attempts=3, backoff_s=0.01)
    with pytest.raises(requests.HTTPError):
        api.post("/x", {})
    assert flaky_server["requests"] == 3
