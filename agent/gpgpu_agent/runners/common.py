"""What both runners check before they start anything, the sizes they take in the engines'
syntax, and the error for a lease they do not know."""

from __future__ import annotations

import re
from collections.abc import Mapping

from gpgpu_agent.protocols import RunnerError

# As the agent API accepts GPU uuids (docs/agent-api.md); no comma or quote, so a list of them
# cannot smuggle anything into `--gpus "device=…"` or CUDA_VISIBLE_DEVICES.
GPU_UUID = re.compile(r"^[A-Za-z0-9._:/-]{1,96}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_ENV_VALUE_CHARS = 32 * 1024
MAX_ENV_ITEMS = 256
# A size as the container engines write it: "20m", "16g", "4096" (bytes); k, m and g are powers of 1024.
MEMORY_SIZE = re.compile(r"^([1-9][0-9]{0,15})([bkmgBKMG]?)$")
# How much of a job's output either runner keeps on the owner's disk (a container's log file,
# a process job's lease-<id>.log): a job that prints without end must not fill it.
LOG_MAX_SIZE = "20m"
# The smallest log cap the process runner takes: room for some output beside the lines that say
# what was cut.
LOG_MIN_BYTES = 4096

# Exit code reported when a workload was killed with SIGKILL, as a shell (and Docker) reports it.
EXIT_KILLED = 128 + 9


class UnknownLeaseError(RunnerError):
    """The runner has no record of this lease: never started here, forgotten, or its container
    was removed behind the agent's back."""

    def __init__(self, lease_id: int):
        super().__init__(f"lease {lease_id} has no workload on this machine")
        self.lease_id = lease_id


def size_bytes(size: str) -> int:
    """A size in the engines' syntax ("16g", "512m", "1048576") in bytes. Raises ValueError."""
    m = MEMORY_SIZE.match(size) if isinstance(size, str) else None
    if not m:
        raise ValueError(f"{size!r} is not a size such as 512m or 16g")
    return int(m.group(1)) * {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]


def check_env(env: Mapping[str, str]) -> None:
    """Raise RunnerError naming the first environment variable a workload cannot be given."""
    if len(env) > MAX_ENV_ITEMS:
        raise RunnerError(f"the job sets {len(env)} environment variables; at most {MAX_ENV_ITEMS} are allowed")
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.match(name):
            raise RunnerError(f"{name!r} is not a valid environment variable name")
        if not isinstance(value, str) or "\x00" in value or len(value) > MAX_ENV_VALUE_CHARS:
            raise RunnerError(f"the value of environment variable {name} is not allowed (NUL or too long)")


def check_gpu_uuids(uuids: tuple[str, ...]) -> None:
    if not uuids:
        raise RunnerError("the lease names no GPU")
    if len(set(uuids)) != len(uuids):
        raise RunnerError("the lease names a GPU twice")
    for uuid in uuids:
        if not isinstance(uuid, str) or not GPU_UUID.match(uuid):
            raise RunnerError(f"{uuid!r} is not a GPU uuid")
