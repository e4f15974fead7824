"""Is each GPU idle, so that it may be rented out? Is its owner using it?

A GPU is idle (offered) only when all of these hold:
- it is inside the owner's availability schedule;
- it is not declined (MIG on without offer_mig…) and can be read;
- no process other than a rental's runs on it, and its process list could be read;
- its utilisation stayed under `threshold_pct` for at least `grace_s` without a break (while a
  rental runs on it, the utilisation is the renter's and does not break the quiet stretch; on a
  GPU split by MIG, where the driver gives no utilisation, its processes alone decide). A
  utilisation that cannot be read is not quiet: the stretch starts again once it can be.

The owner is busy when a foreign process is on the GPU, or (no rental on it) its utilisation is
at or over the threshold. `idle_since` is when the current quiet stretch began; it is reported
once the GPU is idle (after the grace period), None otherwise.

Rental processes are told apart by pid: the runner reports the host pids of each lease's
workload, and a process on a rented GPU whose parent chain (in /proc) leads to one of them is
the rental's too (a training script's data-loader workers). A process NVML lists with pid 0
(hidden by a pid namespace) is foreign: better to stop a rental by mistake than to let the
owner wait.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path

from gpgpu_agent.types import NOT_SUPPORTED, GpuSample, GpuVerdict, HostSample

ParentOf = Callable[[int], int | None]

_MAX_ANCESTRY = 64  # deeper than any real process tree; stops a loop in a racing /proc read


def proc_parent(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (Linux), or None when it cannot be known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid …": comm may hold spaces and parentheses, so split after the last ')'.
    try:
        return int(stat[stat.rindex(")") + 2 :].split()[1])
    except (ValueError, IndexError):
        return None


def no_parent(pid: int) -> int | None:
    """A ParentOf that knows no process tree: only the listed pids count as the rental's."""
    return None


def _is_rental(pid: int, rental: Collection[int], parent_of: ParentOf) -> bool:
    if pid in rental:
        return True
    if pid <= 0 or not rental:
        return False
    current = pid
    for _ in range(_MAX_ANCESTRY):
        parent = parent_of(current)
        if parent is None or parent <= 1:
            return False
        if parent in rental:
            return True
        current = parent
    return False


def foreign_processes(
    sample: HostSample,
    rental_pids: Mapping[str, Collection[int]],
    *,
    parent_of: ParentOf = proc_parent,
) -> dict[str, list[int]]:
    """uuid → the pids (sorted) on that GPU that belong to no rental of that GPU, for the GPUs
    that have any. The reclaim logic stops a lease whose GPU appears here."""
    found: dict[str, list[int]] = {}
    for gpu in sample.gpus:
        if not gpu.uuid:
            continue
        pids = _foreign_on(gpu, rental_pids.get(gpu.uuid, ()), parent_of)
        if pids:
            found[gpu.uuid] = pids
    return found


def unlisted_processes(gpu: GpuSample) -> list[str]:
    """Why the GPU's process lists could not be read this sample ("compute_processes: …"), one
    entry per list; empty when both were read (a driver that does not support a list is not an
    error). While any could not, an owner's process on the GPU cannot be seen."""
    return [
        f"{name}: {gpu.errors[name]}"
        for name in ("compute_processes", "graphics_processes")
        if gpu.errors.get(name, NOT_SUPPORTED) != NOT_SUPPORTED
    ]


def _foreign_on(gpu: GpuSample, rental: Collection[int], parent_of: ParentOf) -> list[int]:
    return sorted(p.pid for p in gpu.processes if not _is_rental(p.pid, rental, parent_of))


def _describe_processes(pids: list[int]) -> str:
    named = [str(pid) for pid in pids if pid > 0]
    hidden = len(pids) - len(named)
    parts = []
    if named:
        parts.append(f"owner process{'es' if len(named) > 1 else ''} {', '.join(named)}")
    if hidden:
        parts.append(f"{hidden} process{'es' if hidden > 1 else ''} of unknown pid")
    verb = "is" if len(pids) == 1 else "are"
    return f"{' and '.join(parts)} {verb} using it"


def _seconds(value: float) -> str:
    return f"{value:.0f} s"


def utc_now() -> datetime:
    return datetime.now(UTC)


class IdleDetector:
    """Turns successive HostSamples into per-GPU verdicts. Keeps, per GPU uuid, when its quiet
    stretch began; forget a GPU by leaving it out of a sample. Not thread-safe: one poll loop
    calls update()."""

    def __init__(
        self,
        threshold_pct: float = 10.0,
        grace_s: float = 120.0,
        *,
        clock: Callable[[], datetime] = utc_now,
        parent_of: ParentOf = proc_parent,
    ) -> None:
        if not 0 < threshold_pct <= 100:
            raise ValueError("threshold_pct must be in (0, 100]")
        if grace_s < 0:
            raise ValueError("grace_s must not be negative")
        self.threshold_pct = threshold_pct
        self.grace_s = grace_s
        self._clock = clock
        self._parent_of = parent_of
        self._quiet_since: dict[str, datetime] = {}
        # GPUs whose current quiet stretch began after a break this detector saw (until idle).
        self._after_break: set[str] = set()

    def update(
        self,
        sample: HostSample,
        *,
        rental_pids: Mapping[str, Collection[int]],
        schedule_open: bool,
        now: datetime | None = None,
    ) -> dict[str, GpuVerdict]:
        """The verdict for every GPU of `sample` with a known uuid.

        `rental_pids`: for each GPU leased now, the host pids of its lease's workload (an empty
        set while the workload starts). `schedule_open`: whether the owner's availability
        schedule lets the machine rent now. `now` defaults to the clock.
        """
        now = now or self._clock()
        verdicts: dict[str, GpuVerdict] = {}
        for gpu in sample.gpus:
            if gpu.uuid:
                verdicts[gpu.uuid] = self._judge(gpu, rental_pids, schedule_open, now)
        for uuid in [uuid for uuid in self._quiet_since if uuid not in verdicts]:
            del self._quiet_since[uuid]
        self._after_break &= verdicts.keys()
        return verdicts

    def _judge(
        self, gpu: GpuSample, rental_pids: Mapping[str, Collection[int]], schedule_open: bool, now: datetime
    ) -> GpuVerdict:
        uuid = gpu.uuid
        rented = uuid in rental_pids
        foreign = _foreign_on(gpu, rental_pids.get(uuid, ()), self._parent_of)
        utilization = gpu.utilization_pct
        # Under MIG the driver gives no utilisation for the whole GPU: its processes alone tell.
        processes_only = gpu.mig_enabled is True and gpu.errors.get("utilization") == NOT_SUPPORTED
        unreadable_processes = unlisted_processes(gpu)

        # Why the owner's quiet stretch is broken (or cannot be vouched for), first reason first.
        broken: str | None = None
        if "gpu" in gpu.errors:
            broken = f"the GPU cannot be read ({gpu.errors['gpu']})"
        elif foreign:
            broken = _describe_processes(foreign)
        elif unreadable_processes:
            broken = f"its processes could not be listed ({'; '.join(unreadable_processes)})"
        elif not rented and utilization is None and not processes_only:
            broken = f"its utilisation is unknown ({gpu.errors.get('utilization', 'not reported')})"
        elif not rented and utilization is not None and utilization >= self.threshold_pct:
            broken = f"utilisation {utilization:.0f}% ≥ {self.threshold_pct:g}%"

        owner_busy = bool(foreign) or (
            not rented and "gpu" not in gpu.errors and utilization is not None and utilization >= self.threshold_pct
        )

        if broken is not None:
            self._quiet_since.pop(uuid, None)
            self._after_break.add(uuid)
            return GpuVerdict(uuid=uuid, idle=False, owner_busy=owner_busy, idle_since=None, reason=broken, broken=True)

        quiet_since = self._quiet_since.setdefault(uuid, now)
        quiet_for = (now - quiet_since).total_seconds()
        after_break = False
        reason: str | None = None
        if gpu.declined_reason:
            reason = gpu.declined_reason
        elif not schedule_open:
            reason = "outside the owner's availability schedule"
        elif quiet_for < self.grace_s:
            reason = f"quiet for {_seconds(quiet_for)} of the {_seconds(self.grace_s)} grace period"
            after_break = uuid in self._after_break
        if reason is not None:
            return GpuVerdict(
                uuid=uuid, idle=False, owner_busy=False, idle_since=None, reason=reason, broken=after_break
            )
        self._after_break.discard(uuid)
        return GpuVerdict(
            uuid=uuid,
            idle=True,
            owner_busy=False,
            idle_since=quiet_since,
            reason="rented" if rented else "idle",
        )
