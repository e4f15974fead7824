"""Per-lease control groups: the CPU, memory and process-count limits of a sandboxed process job.

Each lease gets its own cgroup, ``gpgpu-rentals/lease-<id>``, below the agent's own cgroup (an
agent with a state directory of its own uses ``gpgpu-rentals-<digest>``: group_name_for), with

- ``cpus``: a CPU quota (``cpu.max`` on cgroup v2, ``cpu.cfs_quota_us`` on v1), in CPUs;
- ``memory_bytes``: a hard memory limit with no swap (``memory.max`` and ``memory.swap.max = 0``;
  on v1 ``memory.limit_in_bytes`` and, where swap accounting exists, ``memory.memsw.limit_in_bytes``):
  a job that needs more is killed by the kernel's OOM killer inside its own cgroup, never the
  owner's programs;
- ``pids``: the most tasks the lease may have at once (``pids.max``): a fork bomb stops there.

The supervisor's child joins the cgroup before it drops its privileges and starts the sandbox, so
nothing of the workload ever runs outside it; the supervisor itself stays outside (an OOM kill
inside the lease cannot take the supervisor with it, and the exit code is still written).

Where the cgroups may be created:

- **cgroup v2** (every current distribution): the agent's own cgroup must be delegated to it
  (the systemd unit sets ``Delegate=yes``). v2 forbids processes in a cgroup whose children have
  controllers enabled, so the agent first moves the processes of its own cgroup into a leaf
  ``agent`` below it, then enables ``+cpu +memory +pids`` for the children.
- **cgroup v1** (older hosts, some VMs): one directory per controller, below the agent's path in
  each of the ``cpu``, ``memory`` and ``pids`` hierarchies.

When none of this is writable, ``Cgroups.detect`` raises CgroupError with a sentence, and the
process runner refuses process jobs rather than run them without limits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpgpu_agent.protocols import AgentError
from gpgpu_agent.types import JobLimits

log = logging.getLogger(__name__)

GROUP_NAME = "gpgpu-rentals"


def group_name_for(state_dir: Path, *, system_state_dir: Path) -> str:
    """The lease cgroups' parent name of the agent whose state lives in `state_dir`:
    ``gpgpu-rentals`` for the system agent, ``gpgpu-rentals-<digest of its state dir>`` for any
    other (simulated agents, tests), so that agents sharing one host and cgroup (each with its
    own marketplace, hence its own lease ids) never reach into each other's lease cgroups. Stable
    across restarts, so a restarted agent finds its leases' cgroups."""
    if state_dir.resolve() == system_state_dir.resolve():
        return GROUP_NAME
    return f"{GROUP_NAME}-{hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]}"


V1_CONTROLLERS = ("cpu", "memory", "pids")
V2_CONTROLLERS = ("cpu", "memory", "pids")
CPU_PERIOD_US = 100_000


class CgroupError(AgentError):
    """The lease's limits cannot be set up here; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one lease may use; None leaves that resource unlimited (only where the caller allows)."""

    cpus: float | None
    memory_bytes: int | None
    pids: int | None

    def describe(self) -> JobLimits:
        return {
            "cpus": self.cpus,
            "memory_mb": None if self.memory_bytes is None else self.memory_bytes // (1024 * 1024),
            "pids": self.pids,
        }


def memory_bytes(text: str) -> int:
    """A size such as "512m", "16g", "1048576" (bytes) as bytes; ValueError otherwise."""
    text = text.strip().lower()
    units = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    scale = units.get(text[-1:], None)
    number = text[:-1] if scale is not None else text
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"{text!r} is not a memory size such as 512m or 16g")
    return int(number) * (scale or 1)


def host_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_limits(*, cpus: float | None = None, memory: str | None = None, pids: int = 4096) -> Limits:
    """The provider's limits, or when unset: all CPUs but one, three quarters of the memory."""
    if cpus is None:
        cpus = float(max(1, (os.cpu_count() or 2) - 1))
    if memory is not None:
        mem: int | None = memory_bytes(memory)
    else:
        total = host_memory_bytes()
        mem = max(256 * 1024**2, total * 3 // 4) if total else 4 * 1024**3
    return Limits(cpus=cpus, memory_bytes=mem, pids=pids)


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _read(path: Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of every cgroup mount in /proc/self/mountinfo."""
    found = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        found.append((fields[4], tail[0], set(tail[2].split(","))))
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller (or "" for the v2 hierarchy) → this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        for name in controllers.split(","):
            if name:
                paths[name] = path
    return paths


class Cgroups:
    """Creates, fills, kills and removes the per-lease cgroups. Build with ``detect``."""

    def __init__(self, *, version: int, bases: Sequence[Path]):
        self.version = version
        # v2: one base; v1: one per controller (cpu, memory, pids), each <mount>/<own path>/gpgpu-rentals.
        self.bases = tuple(bases)

    @classmethod
    def detect(
        cls,
        *,
        proc_self: Path = Path("/proc/self"),
        name: str = GROUP_NAME,
    ) -> Cgroups:
        """Find where this process may create lease cgroups, prepare the parent, and check it can
        be written. Raises CgroupError with the reason and the fix."""
        try:
            mounts = _mounts((proc_self / "mountinfo").read_text())
            own = _own_paths((proc_self / "cgroup").read_text())
        except OSError as exc:
            raise CgroupError(f"cannot read this process's cgroups ({exc.strerror or exc})") from None
        v1 = {opt: point for point, fstype, opts in mounts if fstype == "cgroup" for opt in opts}
        v2 = next((point for point, fstype, _ in mounts if fstype == "cgroup2"), None)
        if all(c in v1 for c in V1_CONTROLLERS):
            bases = [Path(v1[c]) / own.get(c, "/").lstrip("/") / name for c in V1_CONTROLLERS]
            groups = cls(version=1, bases=bases)
        elif v2 is not None and "" in own:
            parent = Path(v2) / own[""].lstrip("/")
            missing = set(V2_CONTROLLERS) - set(_read_or_empty(parent / "cgroup.controllers").split())
            if missing:
                raise CgroupError(
                    f"the agent's cgroup {parent} lacks the {', '.join(sorted(missing))} controller(s); "
                    "run the agent from its systemd unit (Delegate=yes)"
                )
            groups = cls(version=2, bases=[_v2_prepare(parent) / name])
            _v2_enable(groups.bases[0])
        else:
            raise CgroupError("no cgroup hierarchy with the cpu, memory and pids controllers is mounted")
        for base in groups.bases:
            try:
                base.mkdir(exist_ok=True)
            except OSError as exc:
                raise CgroupError(
                    f"cannot create {base} ({exc.strerror or exc}); run the agent as root from its systemd "
                    "unit (Delegate=yes) so it may set its rentals' limits"
                ) from None
        return groups

    def describe(self) -> str:
        return f"cgroup v{self.version} under {', '.join(str(b) for b in self.bases)}"

    def create(self, lease_id: int, limits: Limits) -> tuple[str, ...]:
        """Create the lease's cgroup(s) with its limits; returns the directories the workload
        joins (their ``cgroup.procs``). Raises CgroupError; leaves nothing behind on failure."""
        dirs = tuple(base / f"lease-{int(lease_id)}" for base in self.bases)
        try:
            for d in dirs:
                d.mkdir(exist_ok=True)
            if self.version == 2:
                self._limit_v2(dirs[0], limits)
            else:
                self._limit_v1(dirs, limits)
        except OSError as exc:
            self.remove([str(d) for d in dirs])
            raise CgroupError(f"cannot set the lease's limits ({exc.strerror or exc})") from None
        return tuple(str(d) for d in dirs)

    @staticmethod
    def _limit_v2(d: Path, limits: Limits) -> None:
        if limits.cpus is not None:
            _write(d / "cpu.max", f"{max(1000, int(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")
        if limits.memory_bytes is not None:
            _write(d / "memory.max", str(limits.memory_bytes))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
        if limits.pids is not None:
            _write(d / "pids.max", str(limits.pids))

    def _limit_v1(self, dirs: Sequence[Path], limits: Limits) -> None:
        by_controller = dict(zip(V1_CONTROLLERS, dirs, strict=True))
        cpu, memory, pids = by_controller["cpu"], by_controller["memory"], by_controller["pids"]
        if limits.cpus is not None:
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(max(1000, int(limits.cpus * CPU_PERIOD_US))))
        if limits.memory_bytes is not None:
            memsw = memory / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                # memsw may never be below the limit: lift it first (a reused cgroup may hold a
                # smaller one), then set the limit, then memsw to the same value (no swap).
                _write(memsw, "-1")
            _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
            if memsw.exists():
                _write(memsw, str(limits.memory_bytes))
        if limits.pids is not None:
            _write(pids / "pids.max", str(limits.pids))

    @staticmethod
    def procs(dirs: Iterable[str]) -> set[int]:
        """Every pid in the lease's cgroup(s) (empty when they are gone)."""
        pids: set[int] = set()
        for d in dirs:
            text = _read_or_empty(Path(d) / "cgroup.procs")
            pids.update(int(p) for p in text.split() if p.isdigit())
        return pids

    def kill(self, dirs: Iterable[str]) -> None:
        """SIGKILL everything in the lease's cgroup(s): also processes that left the supervisor's
        process tree (double forks, setsid) cannot outlive their lease."""
        dirs = list(dirs)
        for d in dirs:
            kill_file = Path(d) / "cgroup.kill"
            if self.version == 2 and kill_file.exists():
                try:
                    _write(kill_file, "1")
                    continue
                except OSError:
                    pass
        for pid in self.procs(dirs):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def remove(self, dirs: Iterable[str], *, wait_s: float = 2.0) -> None:
        """Remove the lease's cgroup(s) once empty (killing what is left); never raises."""
        deadline = time.monotonic() + wait_s
        for d in dirs:
            path = Path(d)
            while path.exists():
                try:
                    path.rmdir()
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        log.warning("could not remove cgroup %s: processes are still in it", path)
                        break
                    self.kill([d])
                    time.sleep(0.02)


def _read_or_empty(path: Path) -> str:
    try:
        return _read(path)
    except OSError:
        return ""


def _v2_prepare(parent: Path) -> Path:
    """Make ``parent`` able to hold child cgroups with controllers: its own processes move to a
    leaf ``agent`` below it (v2's no-internal-processes rule). The root cgroup is exempt."""
    if parent == parent.parent or str(parent) == "/sys/fs/cgroup":
        return parent
    procs = _read_or_empty(parent / "cgroup.procs").split()
    if procs:
        leaf = parent / "agent"
        try:
            leaf.mkdir(exist_ok=True)
            for pid in procs:
                try:
                    _write(leaf / "cgroup.procs", pid)
                except ProcessLookupError:
                    continue
        except OSError as exc:
            raise CgroupError(
                f"cannot move the agent into {leaf} ({exc.strerror or exc}); run it from its systemd unit "
                "(Delegate=yes)"
            ) from None
    return parent


def _v2_enable(base: Path) -> None:
    """Enable the controllers for ``base`` (in its parent) and for its children."""
    wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS)
    try:
        _write(base.parent / "cgroup.subtree_control", wanted)
        base.mkdir(exist_ok=True)
        _write(base / "cgroup.subtree_control", wanted)
    except OSError as exc:
        raise CgroupError(
            f"cannot enable the cpu, memory and pids controllers below {base.parent} ({exc.strerror or exc})"
        ) from None
