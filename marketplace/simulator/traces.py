"""Reading the traces: the fleet (GPU model and count per node), the job mix and the owners'
GPU duty cycles. Every reader names the file, line and column of the first thing it cannot
use (`TraceError`), so a malformed file is fixed in a minute, not debugged."""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Column names each reader accepts, first match wins (any fleet CSV with a model and a GPU
# count per node will do).
_NODE_ID = ("sn", "node", "node_id", "name", "id", "machine", "machine_id", "host")
_NODE_GPUS = ("gpu", "gpus", "num_gpu", "gpu_count", "n_gpu", "count")
_NODE_MODEL = ("model", "gpu_model", "gpu_type", "type")


class TraceError(ValueError):
    """A trace file that cannot be read as the simulator needs it."""


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    model: str  # lower-case
    gpus: int


@dataclass(frozen=True, slots=True)
class TraceJob:
    name: str
    arrival_s: float  # creation time, seconds from the trace's origin
    gpu_count: int  # whole GPUs taken (a fraction of one takes one)
    models: frozenset[str]  # lower-case; empty = any
    duration_s: int


@dataclass(frozen=True, slots=True)
class DutySeries:
    """One owner's GPU utilisation: `values[i]` (percent) from `start_s + i * step_s` for
    `step_s` seconds; None where the trace has no sample."""

    name: str
    start_s: float
    step_s: float
    values: tuple[float | None, ...]


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open ({exc.strerror})") from exc
    with handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise TraceError(f"{path}: empty file (no header line)")
        try:
            for row in reader:
                if None in row:
                    raise TraceError(f"{path}:{reader.line_num}: more fields than the header names")
                yield reader.line_num, row
        except csv.Error as exc:
            raise TraceError(f"{path}:{reader.line_num}: not CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _column(path: Path, header: list[str], names: tuple[str, ...], what: str) -> str:
    lowered = {h.strip().lower(): h for h in header}
    for name in names:
        if name in lowered:
            return lowered[name]
    raise TraceError(f"{path}: no {what} column (expected one of: {', '.join(names)}; found: {', '.join(header)})")


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except OSError as exc:
        raise TraceError(f"{path}: cannot open ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if not header:
        raise TraceError(f"{path}: empty file (no header line)")
    return header


def _number(path: Path, line: int, column: str, text: str | None, *, blank: float | None = None) -> float:
    if text is None or not text.strip():
        if blank is not None:
            return blank
        raise TraceError(f"{path}:{line}: column {column!r} is empty")
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{path}:{line}: column {column!r} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise TraceError(f"{path}:{line}: column {column!r} is not finite: {text!r}")
    return value


def read_fleet(path: Path) -> list[Node]:
    """Nodes with at least one GPU, from any CSV with a GPU model and count per node."""
    header = _header(path)
    model_col = _column(path, header, _NODE_MODEL, "GPU model")
    gpus_col = _column(path, header, _NODE_GPUS, "GPU count")
    lowered = {h.strip().lower(): h for h in header}
    id_col = next((lowered[n] for n in _NODE_ID if n in lowered), None)
    nodes: list[Node] = []
    for line, row in _rows(path):
        count = _number(path, line, gpus_col, row[gpus_col])
        if count < 0 or count != int(count):
            raise TraceError(f"{path}:{line}: column {gpus_col!r} must be a whole number >= 0, not {row[gpus_col]!r}")
        model = (row[model_col] or "").strip().lower()
        if count and not model:
            raise TraceError(f"{path}:{line}: column {model_col!r} is empty on a node with GPUs")
        if count:
            nodes.append(Node(name=(row[id_col] if id_col else f"node-{line}"), model=model, gpus=int(count)))
    if not nodes:
        raise TraceError(f"{path}: no node with a GPU")
    return nodes


def read_jobs(path: Path) -> list[TraceJob]:
    """The jobs of an openb-style pod list (name, num_gpu, gpu_milli, gpu_spec, creation_time,
    scheduled_time, deletion_time), in arrival order. Duration: deletion - scheduled (the run
    time) where the pod was scheduled, else deletion - creation. Jobs asking for no GPU or
    lasting no time are kept out."""
    header = _header(path)
    for needed in ("num_gpu", "creation_time", "deletion_time"):
        _column(path, header, (needed,), needed)
    jobs: list[TraceJob] = []
    for line, row in _rows(path):
        gpus = _number(path, line, "num_gpu", row.get("num_gpu"))
        milli = _number(path, line, "gpu_milli", row.get("gpu_milli"), blank=1000.0)
        created = _number(path, line, "creation_time", row.get("creation_time"))
        deleted = _number(path, line, "deletion_time", row.get("deletion_time"))
        scheduled = _number(path, line, "scheduled_time", row.get("scheduled_time"), blank=math.nan)
        if gpus < 0 or gpus != int(gpus) or milli < 0:
            raise TraceError(f"{path}:{line}: num_gpu must be a whole number >= 0 and gpu_milli >= 0")
        start = scheduled if math.isfinite(scheduled) and scheduled >= created else created
        if deleted < start:
            raise TraceError(f"{path}:{line}: deletion_time {deleted:g} is before the job started ({start:g})")
        count = int(gpus) if gpus >= 1 else (1 if milli > 0 else 0)
        duration = int(deleted - start)
        if count == 0 or duration <= 0:
            continue
        spec = (row.get("gpu_spec") or "").strip()
        models = frozenset(m.strip().lower() for m in spec.split("|") if m.strip())
        jobs.append(TraceJob(row.get("name") or f"job-{line}", created, count, models, duration))
    if not jobs:
        raise TraceError(f"{path}: no job asking for a GPU")
    jobs.sort(key=lambda j: (j.arrival_s, j.name))
    return jobs


def read_duty(path: Path) -> list[DutySeries]:
    """Per pod (container_ip), its duty cycle (value, percent) sampled at timestamp_anon. The
    sample step is the most common gap between a pod's samples; missing samples are None."""
    header = _header(path)
    for needed in ("value", "timestamp_anon", "container_ip"):
        _column(path, header, (needed,), needed)
    samples: dict[str, list[tuple[float, float]]] = {}
    for line, row in _rows(path):
        value = _number(path, line, "value", row.get("value"))
        at = _number(path, line, "timestamp_anon", row.get("timestamp_anon"))
        if not 0 <= value <= 100:
            raise TraceError(f"{path}:{line}: value must be a percentage (0..100), not {value:g}")
        samples.setdefault(row.get("container_ip") or "", []).append((at, value))
    if not samples:
        raise TraceError(f"{path}: no samples")
    gaps: dict[float, int] = {}
    for points in samples.values():
        points.sort()
        for (a, _), (b, _) in itertools.pairwise(points):
            if b > a:
                gaps[b - a] = gaps.get(b - a, 0) + 1
    if not gaps:
        raise TraceError(f"{path}: every pod has a single sample; cannot tell the sample step")
    step = max(gaps.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    series: list[DutySeries] = []
    for name in sorted(samples):
        points = samples[name]
        start = points[0][0]
        values: list[float | None] = [None] * (round((points[-1][0] - start) / step) + 1)
        for at, value in points:
            values[round((at - start) / step)] = value
        series.append(DutySeries(name=name, start_s=start, step_s=step, values=tuple(values)))
    return series
