"""Fitting the owner-usage model to GPU duty-cycle traces (gpgpu_agent.trace_params), on small
traces written by the tests (the project commits none of the real data)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from gpgpu_agent import trace_params


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
