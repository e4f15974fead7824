"""gunicorn's settings for `web`: read from the working directory (/app in the image) whenever
gunicorn starts there; the command line (docker-compose.yml, the Dockerfile's CMD) gives the
rest. Only the hooks of prometheus-client's multiprocess mode (core/prom.py), and only when
PROMETHEUS_MULTIPROC_DIR is set:

- on_starting, in the master before any worker: delete the value files a previous run left in
  the directory, which /metrics would otherwise add to this run's counts;
- child_exit: tell prometheus-client a worker is gone (it drops a dead worker's live gauges;
  the counters and histograms /metrics serves keep what the worker counted, as they should).

It imports nothing of the marketplace: the master must not open value files of its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _multiproc_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_DIR_ENV, "").strip()
    return Path(value) if value else None


def on_starting(server: Any) -> None:
    directory = _multiproc_dir()
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    # Only prometheus-client's files (*.db): the directory may be a volume's mount point.
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    if _multiproc_dir() is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
