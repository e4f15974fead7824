"""On-disk records of the leases a runner started, and the /proc reading that ties them to live
processes.

A process lease leaves two files in ``<state_dir>/runs/`` (the agent's state directory):

- ``lease-<id>.json``, the pid file, written by the runner when it starts the workload: lease and
  job id, the supervisor's pid and process group, the process's start time in clock ticks since
  boot (field 22 of ``/proc/<pid>/stat``) and the kernel's boot id, so that a pid the kernel has
  since handed to another process (after the workload ended, or after a reboot) is never taken
  for the workload;
- ``lease-<id>.exit.json``, the exit file, written by the supervisor (``shim.py``) when the
  workload ends, or by the runner when it had to kill the supervisor, so that an exit code, the
  times the workload started and ended and whether its fence stopped it are still known to an
  agent that was not running when the workload ended.

Both are written atomically (a temporary file in the same directory, fsync, rename), so a reader
sees the old content or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

# The marketplace keeps at most 64 KiB of UTF-8 as a lease's log tail (docs/agent-api.md).
LOG_TAIL_BYTES = 64 * 1024

_RECORD_NAME = re.compile(r"^lease-(\d{1,18})\.json$")


def write_json_atomic(path: Path, data: object, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` as JSON in one step: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_json(path: Path) -> object:
    """The JSON in ``path`` (of any shape); None when it is missing. A corrupt file is logged and
    read as missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        log.warning("ignoring %s: it is not valid JSON", path)
        return None


# --- /proc ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the runners use."""

    pid: int
    state: str  # R, S, D, Z (zombie), T, …
    ppid: int
    pgid: int
    sid: int
    start_ticks: int  # when the process started, in clock ticks since boot

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def proc_stat(pid: int) -> ProcStat | None:
    """The stat of a live (or zombie) process; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')': the
    # fields after it start after the LAST ')'.
    try:
        rest = raw[raw.rindex(b")") + 2 :].split()
        return ProcStat(
            pid=pid,
            state=rest[0].decode("ascii", "replace"),
            ppid=int(rest[1]),
            pgid=int(rest[2]),
            sid=int(rest[3]),
            start_ticks=int(rest[19]),
        )
    except (ValueError, IndexError):
        return None


def all_proc_stats() -> dict[int, ProcStat]:
    """Every process the agent can see, by pid (a process that ends during the scan is left out)."""
    stats: dict[int, ProcStat] = {}
    try:
        names = os.listdir("/proc")
    except FileNotFoundError:
        return stats
    for name in names:
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                stats[st.pid] = st
    return stats


def boot_id() -> str | None:
    """The kernel's boot id: start times in ticks only compare within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def workload_pids(leader: int, pgid: int, stats: dict[int, ProcStat] | None = None) -> tuple[int, ...]:
    """The live host pids of a workload: members of its process group, and every descendant of
    its leader (which also finds a process that moved to a session of its own with setsid)."""
    if stats is None:
        stats = all_proc_stats()
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    found: set[int] = {st.pid for st in stats.values() if st.pgid == pgid and not st.zombie}
    stack = [leader]
    while stack:
        pid = stack.pop()
        for child in children.get(pid, ()):
            if child not in found and not stats[child].zombie:
                found.add(child)
            if child != leader:
                stack.append(child)
    leader_stat = stats.get(leader)
    if leader_stat is not None and not leader_stat.zombie:
        found.add(leader)
    return tuple(sorted(found))


# --- log tails ------------------------------------------------------------------------------


def tail_text(data: bytes, limit: int = LOG_TAIL_BYTES) -> str:
    """The end of a job's output as text the marketplace accepts: at most ``limit`` bytes of
    UTF-8, undecodable bytes replaced, NUL characters removed."""
    data = data[-limit:] if len(data) > limit else data
    text = data.decode("utf-8", "replace").replace("\x00", "")
    encoded = text.encode("utf-8")
    if len(encoded) > limit:
        # Replacement characters take 3 bytes for 1: trim again from the front.
        text = encoded[-limit:].decode("utf-8", "ignore")
    return text


def read_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a log file as text (see tail_text); "" when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return tail_text(f.read(limit), limit)
    except FileNotFoundError:
        return ""


def read_from(path: Path, offset: int, limit: int) -> tuple[bytes, int]:
    """At most ``limit`` bytes of a file from ``offset``, and the offset after them. A file now
    shorter than ``offset`` was truncated (a log rotated by size): reading starts again at 0. A
    missing file reads as nothing."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < offset:
                offset = 0
            f.seek(offset)
            data = f.read(max(0, limit))
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """The pid file of one process lease (``lease-<id>.json``)."""

    lease_id: int
    job_id: int
    pid: int  # the supervisor's pid; it leads the workload's process group and session
    pgid: int
    start_ticks: int  # /proc/<pid>/stat field 22 when the runner started it
    boot_id: str | None
    started_at: str  # ISO 8601, UTC
    command: tuple[str, ...]
    gpu_uuids: tuple[str, ...]
    log_path: str
    exit_path: str
    work_dir: str
    # The lease's cgroup directories (its limits), removed with the lease; empty when it has none.
    cgroups: tuple[str, ...] = ()
    # Whether the workload runs in the bubblewrap sandbox (its first two processes are bwrap's).
    sandboxed: bool = False

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["command"] = list(self.command)
        data["gpu_uuids"] = list(self.gpu_uuids)
        data["cgroups"] = list(self.cgroups)
        return data

    @classmethod
    def from_json(cls, data: object) -> ProcessRecord:
        """Raises ValueError for a record that does not have the expected fields and types."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        try:
            record = cls(
                lease_id=int(data["lease_id"]),
                job_id=int(data["job_id"]),
                pid=int(data["pid"]),
                pgid=int(data["pgid"]),
                start_ticks=int(data["start_ticks"]),
                boot_id=None if data.get("boot_id") is None else str(data["boot_id"]),
                started_at=str(data["started_at"]),
                command=tuple(str(c) for c in data["command"]),
                gpu_uuids=tuple(str(u) for u in data.get("gpu_uuids", ())),
                log_path=str(data["log_path"]),
                exit_path=str(data["exit_path"]),
                work_dir=str(data["work_dir"]),
                cgroups=tuple(str(c) for c in data.get("cgroups", ())),
                sandboxed=bool(data.get("sandboxed", False)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or malformed field: {exc}") from exc
        if record.pid <= 1 or record.pgid <= 1:
            raise ValueError("pid and pgid must be above 1")
        return record


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """The exit file of one process lease (``lease-<id>.exit.json``). Times are UTC: when the
    workload started and ended, and when its fence stopped it (None: it did not), as the
    supervisor saw them; ``exited_at`` is None only in a record of an older supervisor."""

    exit_code: int
    detail: str = ""
    started_at: datetime | None = None
    exited_at: datetime | None = None
    fenced_at: datetime | None = None


def read_exit(path: Path) -> ExitRecord | None:
    """The recorded exit of a workload; None while it has none (still running, or lost)."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("exit_code"), int):
        return None
    return ExitRecord(
        exit_code=data["exit_code"],
        detail=str(data.get("detail", "")),
        started_at=parse_utc(data.get("started_at")),
        exited_at=parse_utc(data.get("exited_at")),
        fenced_at=parse_utc(data.get("fenced_at")),
    )


def write_exit(path: Path, record: ExitRecord) -> None:
    write_json_atomic(
        path,
        {
            "exit_code": record.exit_code,
            "detail": record.detail,
            "started_at": _iso(record.started_at),
            "exited_at": _iso(record.exited_at),
            "fenced_at": _iso(record.fenced_at),
        },
    )


def parse_utc(value: object) -> datetime | None:
    """An ISO 8601 time with a zone ("Z" too) as an aware datetime; None for anything else."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else None


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat().replace("+00:00", "Z")


class RecordStore:
    """The pid files in one directory, one per lease."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def ensure(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, lease_id: int) -> Path:
        return self.directory / f"lease-{lease_id}.json"

    def exit_path(self, lease_id: int) -> Path:
        return self.directory / f"lease-{lease_id}.exit.json"

    def save(self, record: ProcessRecord) -> None:
        self.ensure()
        write_json_atomic(self.path(record.lease_id), record.to_json())

    def load(self, lease_id: int) -> ProcessRecord | None:
        """The lease's record; None when there is none or it is unreadable (logged)."""
        data = _read_json(self.path(lease_id))
        if data is None:
            return None
        try:
            return ProcessRecord.from_json(data)
        except ValueError as exc:
            log.warning("ignoring the record of lease %s: %s", lease_id, exc)
            return None

    def all(self) -> list[ProcessRecord]:
        """Every readable record, by lease id."""
        try:
            names: Iterable[str] = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            m = _RECORD_NAME.match(name)
            if m:
                record = self.load(int(m.group(1)))
                if record is not None and record.lease_id == int(m.group(1)):
                    records.append(record)
        return sorted(records, key=lambda r: r.lease_id)

    def delete(self, lease_id: int) -> None:
        for path in (self.path(lease_id), self.exit_path(lease_id)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
