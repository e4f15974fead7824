"""What both runners check before they start anything, and the error for a lease they do not know."""

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

# Exit code reported when a workload was killed with SIGKILL, as a shell (and Docker) reports it.
EXIT_KILLED = 128 + 9


class UnknownLeaseError(RunnerError):
    """The runner has no record of this lease: never started here, forgotten, or its container
    was removed behind the agent's back."""

    def __init__(self, lease_id: int):
        super().__init__(f"lease {lease_id} has no workload on this machine")
        self.lease_id = lease_id


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
