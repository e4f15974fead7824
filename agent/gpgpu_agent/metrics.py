"""The agent's own metrics, as a Prometheus text file: `<state_dir>/metrics.prom`.

Rewritten whole (a temporary file renamed over it) after every heartbeat attempt and every few
polls, readable by every user (it holds counts, no secrets), for node_exporter's textfile
collector (`--collector.textfile.directory`; link or copy the file there) or any scraper that
reads files. No port is opened: a provider's machine exposes nothing new to its network.

- gpgpu_agent_polls_total, gpgpu_agent_poll_failures_total: telemetry polls, and those that
  raised;
- gpgpu_agent_nvml_errors_total: failed NVML reads (one per field of one GPU, or of the host);
- gpgpu_agent_heartbeats_total{outcome="ok|unreachable|refused"};
- gpgpu_agent_spool_depth: reports waiting in the on-disk outbox for the marketplace;
- gpgpu_agent_rentals_running: leases this agent runs now;
- gpgpu_agent_reclaim_seconds (a summary: _count, _sum), gpgpu_agent_reclaim_longest_seconds:
  rentals stopped because the owner came back, and how long the stops took (from the poll that
  saw the owner to the rental stopped);
- gpgpu_agent_last_heartbeat_ok_timestamp_seconds: when a heartbeat was last answered (Unix time;
  0 before the first).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger("gpgpu_agent")

FILE_NAME = "metrics.prom"
HEARTBEAT_OUTCOMES = ("ok", "unreachable", "refused")


class AgentMetrics:
    """The agent's counters and gauges; thread-safe (the poll and network loops both count)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.polls = 0
        self.poll_failures = 0
        self.nvml_errors = 0
        self.heartbeats = dict.fromkeys(HEARTBEAT_OUTCOMES, 0)
        self.spool_depth = 0
        self.rentals_running = 0
        self.reclaims = 0
        self.reclaim_seconds_sum = 0.0
        self.reclaim_seconds_max = 0.0
        self.last_heartbeat_ok_at = 0.0

    def poll(self, *, failed: bool = False, nvml_errors: int = 0) -> None:
        with self._lock:
            self.polls += 1
            self.poll_failures += int(failed)
            self.nvml_errors += nvml_errors

    def heartbeat(self, outcome: str) -> None:
        if outcome not in self.heartbeats:
            raise ValueError(f"not a heartbeat outcome: {outcome}")
        with self._lock:
            self.heartbeats[outcome] += 1
            if outcome == "ok":
                self.last_heartbeat_ok_at = time.time()

    def reclaim(self, seconds: float) -> None:
        with self._lock:
            self.reclaims += 1
            self.reclaim_seconds_sum += seconds
            self.reclaim_seconds_max = max(self.reclaim_seconds_max, seconds)

    def gauges(self, *, spool_depth: int, rentals_running: int) -> None:
        with self._lock:
            self.spool_depth = spool_depth
            self.rentals_running = rentals_running

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            rows: list[tuple[str, str, str, list[tuple[str, float]]]] = [
                ("gpgpu_agent_polls_total", "counter", "Telemetry polls.", [("", self.polls)]),
                ("gpgpu_agent_poll_failures_total", "counter", "Polls that raised.", [("", self.poll_failures)]),
                ("gpgpu_agent_nvml_errors_total", "counter", "Failed NVML reads.", [("", self.nvml_errors)]),
                (
                    "gpgpu_agent_heartbeats_total",
                    "counter",
                    "Heartbeats by outcome.",
                    [(f'{{outcome="{o}"}}', n) for o, n in self.heartbeats.items()],
                ),
                ("gpgpu_agent_spool_depth", "gauge", "Reports waiting in the outbox.", [("", self.spool_depth)]),
                ("gpgpu_agent_rentals_running", "gauge", "Leases running now.", [("", self.rentals_running)]),
                (
                    "gpgpu_agent_reclaim_seconds",
                    "summary",
                    "Rentals stopped for their owner, and the seconds the stops took.",
                    [("_count", self.reclaims), ("_sum", self.reclaim_seconds_sum)],
                ),
                (
                    "gpgpu_agent_reclaim_longest_seconds",
                    "gauge",
                    "The longest a reclaim took.",
                    [("", self.reclaim_seconds_max)],
                ),
                (
                    "gpgpu_agent_last_heartbeat_ok_timestamp_seconds",
                    "gauge",
                    "When a heartbeat was last answered (Unix time).",
                    [("", self.last_heartbeat_ok_at)],
                ),
            ]
        lines: list[str] = []
        for name, kind, help_text, samples in rows:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)
        return "\n".join(lines) + "\n"

    def write(self, state_dir: Path) -> None:
        """Replace `<state_dir>/metrics.prom` in one rename (a reader never sees half a file)."""
        target = Path(state_dir) / FILE_NAME
        try:
            fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".metrics.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(self.render())
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            logger.warning("could not write %s: %s", target, exc)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


__all__ = ["FILE_NAME", "AgentMetrics"]
