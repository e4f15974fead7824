"""Runners: start, watch, stop and re-adopt leased workloads (protocols.Runner).

ProcessRunner (process.py) runs a lease's command as a supervised process group with
CUDA_VISIBLE_DEVICES set to the leased GPUs; DockerRunner (docker.py) runs a container with
only the leased GPUs, limits and no privileges. Both survive an agent restart: ``adopt`` finds
the running workloads again (pid files; container labels). Exit codes follow the shell's
convention in both: 0–255 from the workload, 128+n when signal n ended it (137: SIGKILL).
"""

from gpgpu_agent.runners.common import EXIT_KILLED, UnknownLeaseError
from gpgpu_agent.runners.docker import DockerRunner
from gpgpu_agent.runners.process import ProcessRunner

__all__ = ["EXIT_KILLED", "DockerRunner", "ProcessRunner", "UnknownLeaseError"]
