"""CPU time from /proc, for benchmarks that run their server or database on this machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def _processes() -> Iterator[tuple[str, list[str]]]:
    """(command name, the stat fields after it) of every process /proc shows: fields[1] is the
    parent's pid, fields[11:13] the process's utime and stime, fields[13:15] its ended
    children's, in clock ticks."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        yield raw[raw.index("(") + 1 : raw.rindex(")")], raw.rsplit(")", 1)[1].split()


def children_cpu_seconds(parent: int) -> float:
    """CPU seconds (user and system) used so far by the processes whose parent is `parent`
    (the web server's workers), from /proc; 0 where /proc cannot tell."""
    ticks = sum(int(f[11]) + int(f[12]) for _, f in _processes() if int(f[1]) == parent)
    return ticks / os.sysconf("SC_CLK_TCK")


def database_cpu_seconds() -> float | None:
    """CPU seconds (user and system) used so far by this machine's PostgreSQL processes (every
    backend, live or ended, and the background writer, WAL writer, checkpointer: what the
    work measured cost the database server), from /proc; None where none is visible (a database on
    another host). A backend that closed during the run is counted in the postmaster's ended
    children."""
    postgres = [f for name, f in _processes() if name == "postgres"]
    if not postgres:
        return None
    return sum(int(t) for f in postgres for t in f[11:15]) / os.sysconf("SC_CLK_TCK")
