"""The typed values the agent's modules pass each other. Only gpgpu_agent.nvml sees pynvml;
everything else sees these."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypedDict

# The kinds of job a lease runs (LeaseSpec.kind): a container image, or a sandboxed process.
JobKind = Literal["container", "process"]
JOB_KINDS: tuple[JobKind, ...] = ("container", "process")

# A JSON object received (from the marketplace, a file): its fields are checked where they are read.
JsonObject = dict[str, object]


def json_int(value: object) -> int:
    """``int(value)`` for a JSON number or numeric text; TypeError (as from int()) for anything else."""
    if isinstance(value, int | float | str):
        return int(value)
    raise TypeError(f"int() argument must be a string or a number, not {type(value).__name__!r}")


# The text GpuSample.errors holds for a field this GPU's hardware or driver does not offer
# (NVML_ERROR_NOT_SUPPORTED): normal on many GPUs, so nothing to warn about.
NOT_SUPPORTED = "Not Supported"


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_memory_mb: int | None  # None: the driver would not say (e.g. in containers)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one poll. A field the driver could not read is None and its NVML error is in
    `errors` (field name → message): one failing call spoils one field, never the sample."""

    index: int
    uuid: str
    model: str | None = None
    # The GPU's device node is /dev/nvidia<minor_number> (not always its index).
    minor_number: int | None = None
    vram_total_mb: int | None = None
    vram_used_mb: int | None = None
    utilization_pct: float | None = None
    memory_utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    mig_enabled: bool | None = None
    # MIG instances offered in place of the whole GPU (empty when MIG is off).
    mig_devices: tuple[MigDevice, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    # Why this GPU is not offered at all (e.g. "MIG is enabled"), None when it may be.
    declined_reason: str | None = None
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MigDevice:
    uuid: str
    gpu_instance_id: int | None
    memory_total_mb: int | None


@dataclass(frozen=True, slots=True)
class HostSample:
    """One poll of the whole machine: driver facts and every GPU."""

    driver_version: str | None
    cuda_version: str | None
    gpus: tuple[GpuSample, ...]
    taken_at: datetime
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GpuVerdict:
    """The idle detector's answer for one GPU."""

    uuid: str
    idle: bool
    owner_busy: bool
    idle_since: datetime | None
    reason: str  # why not idle, in words ("owner process 4242 is using it", "utilisation 63% ≥ 10%", …)
    # Not idle because the owner's quiet was broken, or cannot be vouched for, now or within the
    # grace period since (as this detector saw it: a detector just started has seen no break, and
    # its first grace period is not one).
    broken: bool = False


@dataclass(frozen=True, slots=True)
class CheckpointSpec:
    """A start order's `checkpoint` (gpgpu_agent.checkpoint): the job's directory (a path of its
    view under /work), the most its archive may be, where to upload it when the lease is stopped,
    the archive to restore first (restore_url None: none) and how often the job was resumed;
    `upload_direct`: upload straight to the store (a pre-signed PUT, then a commit)."""

    dir: str
    max_bytes: int
    upload_url: str
    restore_url: str | None
    restore_sha256: str
    restore_size: int
    resume_count: int
    upload_direct: bool = False


@dataclass(frozen=True, slots=True)
class LeaseSpec:
    """What the marketplace asked this machine to run (the heartbeat reply's `start` item)."""

    lease_id: int
    job_id: int
    kind: JobKind
    image: str
    command: tuple[str, ...]
    env: dict[str, str]
    gpu_uuids: tuple[str, ...]
    max_duration_s: int
    price_per_gpu_hour: str
    checkpoint_interval_s: int | None = None
    checkpoint: CheckpointSpec | None = None
    # Set by the agent, not the order: variables the runner gives the workload after the job's
    # own (GPGPU_STOP_GRACE_S, …), the checked archive to extract into its checkpoint directory
    # and the job's status file (GPGPU_LEASE_INFO) to write into its work directory, both before
    # the workload starts.
    agent_env: dict[str, str] = field(default_factory=dict)
    restore_archive: str | None = None
    agent_status: dict[str, object] = field(default_factory=dict)


class JobLimits(TypedDict):
    """What each job may use (the heartbeat's capabilities); None: no limit."""

    cpus: float | None
    memory_mb: int | None
    pids: int | None


@dataclass(frozen=True, slots=True)
class OutputRead:
    """Bytes of a workload's output read from one position, and the position after them."""

    data: bytes
    next_offset: int


@dataclass(frozen=True, slots=True)
class RunState:
    """A runner's view of one lease's workload."""

    lease_id: int
    running: bool
    exit_code: int | None  # set once it has exited
    pids: tuple[int, ...]  # host pids of the workload (to tell rental processes from the owner's)
    started_at: datetime | None
    log_tail: str = ""
    # When it ended, as recorded where it ran (its supervisor, the container engine); None while
    # it runs, or when nobody recorded it (the agent then reports the time it noticed).
    ended_at: datetime | None = None
    # When its fence watchdog stopped it (the agent had lost contact with the marketplace for
    # longer than the fence; gpgpu_agent.fencing); None when it did not.
    fenced_at: datetime | None = None
