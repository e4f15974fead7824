"""Fit the owner-usage model to real GPU duty-cycle traces and print its parameters.

    python -m gpgpu_agent.trace_params [TRACE_DIR] [--threshold PCT]

TRACE_DIR (default ../shared/data/traces) holds gpu_duty_cycle_train.csv: one duty-cycle
sample (percent of the minute a kernel ran) per pod per minute. Each pod stands for one
provider GPU whose owner's own workload is that series. A sample under --threshold percent is
idle (the default, 0.01, means "no kernel ran at all"). Consecutive samples of one pod with
the same verdict form a run; a gap longer than MAX_GAP_INTERVALS sample intervals ends it.
Runs cut short by either end of a series (or a gap) are kept as they are: they are lower
bounds, and dropping them would bias the fit toward short runs, since long runs are the ones
most likely to touch an edge. Run lengths are fitted with a lognormal by maximum likelihood
(mu and sigma of ln(seconds)).

The project commits none of the trace data: gpgpu_agent_testing.owner_usage carries the printed
numbers as its defaults.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TRACE_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "traces"
DUTY_CYCLE_FILE = "gpu_duty_cycle_train.csv"
# Missed samples show as gaps of two or three intervals; a longer gap splits a pod's series.
MAX_GAP_INTERVALS = 4


@dataclass(frozen=True)
class RunFit:
    """A lognormal fit of run lengths in seconds."""

    count: int
    mu: float
    sigma: float
    p50_s: float
    p90_s: float
    p99_s: float


@dataclass(frozen=True)
class TraceParams:
    threshold_pct: float
    sample_interval_s: float
    idle_fraction: float
    idle: RunFit
    busy: RunFit


def read_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{pod: [(timestamp_s, duty_cycle_pct), …] sorted by time} from a duty-cycle CSV."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            series[row["container_ip"]].append((float(row["timestamp_anon"]), float(row["value"])))
    for samples in series.values():
        samples.sort()
    return dict(series)


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _fit(lengths: list[float]) -> RunFit:
    if len(lengths) < 2:
        raise ValueError("too few complete runs to fit; is the threshold sensible?")
    logs = [math.log(x) for x in lengths]
    ordered = sorted(lengths)
    return RunFit(
        count=len(lengths),
        mu=statistics.fmean(logs),
        sigma=statistics.pstdev(logs),
        p50_s=_quantile(ordered, 0.50),
        p90_s=_quantile(ordered, 0.90),
        p99_s=_quantile(ordered, 0.99),
    )


def fit_traces(series: dict[str, list[tuple[float, float]]], *, threshold_pct: float) -> TraceParams:
    """Split each pod's series into idle/busy runs and fit both run-length distributions."""
    gaps = [b[0] - a[0] for samples in series.values() for a, b in itertools.pairwise(samples)]
    if not gaps:
        raise ValueError("the trace has no consecutive samples")
    interval = statistics.median(gaps)
    runs: dict[bool, list[float]] = {True: [], False: []}
    idle_samples = total_samples = 0
    for samples in series.values():
        total_samples += len(samples)
        idle_samples += sum(1 for _, value in samples if value < threshold_pct)
        segment_runs: list[tuple[bool, float]] = []
        previous_t: float | None = None
        for t, value in samples:
            idle = value < threshold_pct
            gap = None if previous_t is None else t - previous_t
            if gap is not None and gap > MAX_GAP_INTERVALS * interval:
                _collect(segment_runs, runs)
                segment_runs, gap = [], None
            if gap is not None and segment_runs[-1][0] == idle:
                segment_runs[-1] = (idle, segment_runs[-1][1] + gap)
            else:
                segment_runs.append((idle, interval))
            previous_t = t
        _collect(segment_runs, runs)
    return TraceParams(
        threshold_pct=threshold_pct,
        sample_interval_s=interval,
        idle_fraction=idle_samples / total_samples,
        idle=_fit(runs[True]),
        busy=_fit(runs[False]),
    )


def _collect(segment_runs: list[tuple[bool, float]], runs: dict[bool, list[float]]) -> None:
    for idle, length in segment_runs:
        runs[idle].append(length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_dir", nargs="?", type=Path, default=DEFAULT_TRACE_DIR)
    parser.add_argument("--threshold", type=float, default=0.01, help="duty cycle (%%) under which a GPU is idle")
    args = parser.parse_args(argv)
    path = args.trace_dir / DUTY_CYCLE_FILE
    if not path.is_file():
        print(f"error: {path} not found (pass the folder holding {DUTY_CYCLE_FILE})", file=sys.stderr)
        return 2
    params = fit_traces(read_series(path), threshold_pct=args.threshold)
    print(f"trace: {path}")
    print(f"threshold: duty cycle < {params.threshold_pct:g}% is idle")
    print(f"sample interval: {params.sample_interval_s:g} s")
    print(f"idle fraction of samples: {params.idle_fraction:.3f}")
    for name, fit in (("idle", params.idle), ("busy", params.busy)):
        print(
            f"{name} runs: n={fit.count} lognormal mu={fit.mu:.3f} sigma={fit.sigma:.3f} "
            f"(ln seconds); p50={fit.p50_s / 60:.1f} min p90={fit.p90_s / 60:.1f} min p99={fit.p99_s / 60:.1f} min"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
