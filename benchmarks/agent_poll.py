"""The provider agent's own overhead, section by section.

    python benchmarks/agent_poll.py                      # every section
    python benchmarks/agent_poll.py --sections poll --polls 2000 --gpus 1,8,64

Prints one JSON object with one key per section run: {"poll": {...}, "spool": {...}}.

poll: the telemetry poll, NvmlCollector.sample() followed by IdleDetector.update(), over
FakeNvml machines of 1, 8 and 64 GPUs (a few of them with processes, MIG off as on GeForce,
utilisation in a spread). For each size: microseconds per poll and per poll per GPU, the NVML
calls a poll makes (all of them, and per GPU), and an estimate of the part spent inside the
fake's own functions (measured per fake call, times the calls), so that `agent_us_per_gpu`
is the agent's own cost: on a real machine the driver's time replaces the fake's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "agent"))

import pynvml  # noqa: E402

from gpgpu_agent.idle import IdleDetector, no_parent  # noqa: E402
from gpgpu_agent.nvml import NvmlCollector  # noqa: E402
from gpgpu_agent_testing.fake_nvml import FakeNvml  # noqa: E402


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--polls", type=int, default=1000, help="poll: polls timed per machine size")
    parser.add_argument("--gpus", default="1,8,64", help="poll: machine sizes (GPUs), comma-separated")
    # Options of other sections go here.
    parser.add_argument("--spool-reports", type=int, default=10_000, help="spool: usage reports put, then replayed")
    parser.add_argument(
        "--spool-dir", default=None, help="spool: directory for the spool file (default: a fresh temporary one)"
    )
    return parser.parse_args()


# --- poll: telemetry ----------------------------------------------------------------------------


def _machine(fake: FakeNvml, gpus: int) -> None:
    for index in range(gpus):
        fake.add_gpu("NVIDIA GeForce RTX 4090", 24564, utilization=(index * 37) % 100)
        if index % 4 == 0:  # a quarter of the GPUs have an owner's process (one compute, one graphics)
            fake.add_process(index, 10_000 + index, 2048, kind="compute")
            fake.add_process(index, 20_000 + index, 512, kind="graphics")


def _fake_call_us(fake: FakeNvml, calls: int = 20_000) -> float:
    """Microseconds one fake call takes (a telemetry call with a handle), to subtract."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    started = time.perf_counter()
    for _ in range(calls):
        pynvml.nvmlDeviceGetPowerUsage(handle)
    return (time.perf_counter() - started) / calls * 1e6


def bench_poll(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(n) for n in args.gpus.split(",") if n.strip()]
    result: dict[str, Any] = {"polls": args.polls, "machines": []}
    for gpus in sizes:
        with FakeNvml() as fake:
            _machine(fake, gpus)
            collector = NvmlCollector()
            # parent_of=no_parent: with no rental, the process tree is never walked anyway.
            detector = IdleDetector(threshold_pct=10.0, grace_s=120.0, parent_of=no_parent)
            now = datetime(2026, 1, 14, 12, 0, tzinfo=UTC)
            detector.update(collector.sample(), rental_pids={}, schedule_open=True, now=now)  # handles, facts
            fake.reset_calls()
            started = time.perf_counter()
            for _ in range(args.polls):
                detector.update(collector.sample(), rental_pids={}, schedule_open=True, now=now)
            elapsed = time.perf_counter() - started
            calls = fake.total_calls()
            fake_us = _fake_call_us(fake)
            collector.close()
        us_per_poll = elapsed / args.polls * 1e6
        calls_per_poll = calls / args.polls
        fake_us_per_poll = fake_us * calls_per_poll
        result["machines"].append(
            {
                "gpus": gpus,
                "us_per_poll": round(us_per_poll, 1),
                "us_per_gpu": round(us_per_poll / gpus, 1),
                "nvml_calls_per_poll": round(calls_per_poll, 2),
                "nvml_calls_per_gpu": round(calls_per_poll / gpus, 2),
                "fake_us_per_call": round(fake_us, 2),
                "agent_us_per_gpu": round((us_per_poll - fake_us_per_poll) / gpus, 1),
            }
        )
    return result


# --- spool: replay ------------------------------------------------------------------------------


def bench_spool(args: argparse.Namespace) -> dict[str, Any]:
    """The spool's own overhead: N usage reports put (each committed and fsynced, as the agent
    does while the marketplace is unreachable), then replayed through a FakeTransport (each
    sent, acknowledged, deleted and fsynced). The fake's own time, measured alone, is
    subtracted into `replay_agent_per_s`. Also the cost of signing one report (agent) and of
    verifying one (marketplace, per report received). The spool directory's file system
    decides the fsync cost: it is reported."""
    import os
    import tempfile

    from gpgpu_agent.protocol import UsageStruct, recover_usage_signer
    from gpgpu_agent.signing import SigningKey, sign_usage
    from gpgpu_agent.spool import Spool
    from gpgpu_agent.transport import FakeTransport

    n = args.spool_reports
    key = SigningKey.generate()
    start = datetime(2026, 1, 14, 12, 0, tzinfo=UTC)
    report = UsageStruct.measure(
        lease_id=1,
        report_id="1-0",
        period_start=start,
        period_end=start.replace(minute=1),
        gpu_seconds=60,
        mean_utilization_pct=93.57,
        peak_memory_mb=20480,
    )
    rounds = 100
    t = time.perf_counter()
    for _ in range(rounds):
        signature = sign_usage(report, key)
    sign_ms = (time.perf_counter() - t) / rounds * 1e3
    t = time.perf_counter()
    for _ in range(rounds):
        recover_usage_signer(report, signature)
    verify_ms = (time.perf_counter() - t) / rounds * 1e3
    # One signature serves every body: what is timed here is the spool, not the signing.
    template = {**report.to_wire(), "signature": signature}
    bodies = [(1 + i % 16, {**template, "report_id": f"{1 + i % 16}-{i}"}) for i in range(n)]

    with tempfile.TemporaryDirectory(dir=args.spool_dir) as folder:
        path = Path(folder) / "spool.sqlite3"
        fs = _filesystem(folder)
        with Spool(path, max_items=max(100_000, 2 * n)) as spool:
            t = time.perf_counter()
            for lease_id, body in bodies:
                spool.put("usage", lease_id, body["report_id"], body)
            put_s = time.perf_counter() - t
            size_mb = sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**20
            fake = FakeTransport(record_calls=False)
            t = time.perf_counter()
            result = spool.replay(fake)
            replay_s = time.perf_counter() - t
        alone = FakeTransport(record_calls=False)
        t = time.perf_counter()
        for lease_id, body in bodies:
            alone.lease_usage(lease_id, body)
        fake_s = time.perf_counter() - t
    assert result.sent == n and result.pending == 0 and len(fake.applied) == n, result
    return {
        "reports": n,
        "filesystem": fs,
        "cpus": os.cpu_count(),
        "put_per_s": round(n / put_s),
        "put_us_each": round(put_s / n * 1e6, 1),
        "spool_mb_at_peak": round(size_mb, 2),
        "replay_per_s": round(n / replay_s),
        "replay_us_each": round(replay_s / n * 1e6, 1),
        "fake_us_each": round(fake_s / n * 1e6, 2),
        "replay_agent_per_s": round(n / max(replay_s - fake_s, 1e-9)),
        "sign_ms": round(sign_ms, 2),
        "verify_ms": round(verify_ms, 2),
    }


# --- logs: shipping a job's output ------------------------------------------------------------


class _FileOutput:
    """A runner whose one lease's output is a file (read_output only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read_output(self, lease_id: int, *, offset: int, limit: int) -> Any:
        from gpgpu_agent.runners.state import read_from
        from gpgpu_agent.types import OutputRead

        data, next_offset = read_from(self.path, offset, limit)
        return OutputRead(data=data, next_offset=next_offset)


def bench_logs(args: argparse.Namespace) -> dict[str, Any]:
    """LeaseTracker.ship_output for one lease, per poll (as if a second had passed each time):
    with no new output, with 1 KiB new (one chunk), with 64 KiB new (four chunks, the most a
    poll reads). CPU and wall milliseconds per poll; the wall includes the spool's fsync."""
    import tempfile

    from gpgpu_agent.leases import LeaseTracker, TrackedLease
    from gpgpu_agent.spool import Spool

    folder = Path(tempfile.mkdtemp(prefix="gpgpu-bench-logs-", dir=args.spool_dir))
    out = folder / "out.log"
    out.write_bytes(b"")
    spool = Spool(folder / "spool.sqlite3")
    tracker = LeaseTracker(
        runner=_FileOutput(out),  # type: ignore[arg-type]
        outbox=spool,
        sign=lambda struct: "",
        state_dir=folder,
        secrets=("gpm_" + "c" * 40, "ab" * 32),
    )
    now = datetime.now(UTC)
    tracker.leases[1] = TrackedLease(lease_id=1, gpu_uuids=("g",), max_duration_s=1e9, started_at=now, usage_from=now)
    line = b"step 123 loss 0.1234 " + b"x" * 40 + b"\n"
    results: dict[str, Any] = {}
    for name, polls, new_bytes in (("idle", 2000, 0), ("1KiB", 300, 1024), ("64KiB", 100, 65536)):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(polls):
            if new_bytes:
                with out.open("ab") as f:
                    f.write(line * (new_bytes // len(line)))
            tracker._log_shipped_at.clear()  # a second has passed: no chunk is held back for it
            tracker._log_budget_at -= 1.0
            tracker.ship_output()
        results[name] = {
            "cpu_ms_per_poll": round((time.process_time() - cpu) / polls * 1e3, 3),
            "wall_ms_per_poll": round((time.perf_counter() - wall) / polls * 1e3, 3),
        }
    results["chunks_queued"] = spool.stats().logs
    spool.close()
    return results


def _filesystem(folder: str) -> str:
    """The file system type under `folder` (from /proc/mounts), or "unknown"."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    target = str(Path(folder).resolve())
    best = max((m for m in mounts if target.startswith(m[1])), key=lambda m: len(m[1]), default=None)
    return f"{best[2]} ({best[1]})" if best else "unknown"


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "poll": bench_poll,
    "spool": bench_spool,
    "logs": bench_logs,
}


def main() -> None:
    args = _parse()
    names = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    print(json.dumps({name: SECTIONS[name](args) for name in names}))


if __name__ == "__main__":
    main()
