"""Runners: start, watch, stop and re-adopt leased workloads (protocols.Runner).

ProcessRunner (process.py) runs a lease's command as a supervised process group with
CUDA_VISIBLE_DEVICES set to the leased GPUs; ContainerRunner (container.py) runs a container
(Podman, else Docker) with only the leased GPUs, a read-only root, its own user namespace, limits,
no privileges, and a network confined to the public internet by the agent's nftables rules
(firewall.py). Both survive an agent restart: ``adopt`` finds the running workloads again (pid
files; container labels). Exit codes follow the shell's convention in both: 0–255 from the
workload, 128+n when signal n ended it (137: SIGKILL).
"""

from gpgpu_agent.runners.common import EXIT_KILLED, UnknownLeaseError
from gpgpu_agent.runners.container import ContainerRunner
from gpgpu_agent.runners.firewall import Firewall, FirewallError
from gpgpu_agent.runners.process import ProcessRunner

__all__ = ["EXIT_KILLED", "ContainerRunner", "Firewall", "FirewallError", "ProcessRunner", "UnknownLeaseError"]
