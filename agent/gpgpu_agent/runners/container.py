"""The container runner: runs a lease as a container that cannot touch the owner's machine.

Renter code is hostile (issue 7). The runner drives a container engine's command line, each call
with a timeout: rootful **Podman** by preference (daemonless: there is no socket a workload could
open, and ``--userns=auto`` gives every container its own unprivileged range of host uids, so
container root is not host root), else **Docker** (a rootful daemon; user namespaces only where
the daemon runs with ``userns-remap``, which ``capabilities()`` and the doctor report). The agent
runs as root and is in no ``docker`` group.

The container of lease N is named ``gpgpu-lease-N`` and labelled ``gpgpu.lease_id=N`` and
``gpgpu.job_id=M``: the labels are its record, so after an agent restart ``adopt`` finds every
lease container again (``ps -a --filter label=gpgpu.lease_id``). Its work directory is
``<rentals_dir>/containers/lease-N`` on the host; ``forget`` removes both.

What every container is given, and why:

- ``--read-only`` root filesystem; writable only ``/work`` (the lease's work directory, bind
  mounted, also the working directory and ``HOME``: an image's own WORKDIR is replaced, so a job
  names its files by absolute path), ``/tmp`` (a tmpfs of ``tmp_size``) and
  ``--shm-size`` of ``/dev/shm``. Nothing else of the host is mounted: never the agent's state
  directory, never an engine socket, no device but the leased GPUs;
- the work directory must be writable by the container's user, whose host uid is not known in
  advance. With Podman the mount carries the ``U`` option: Podman chowns the (new, empty)
  directory to the host uid its user maps to under ``--userns=auto``, after it chose the range
  and before the workload starts; it resolves a user named by the image (USER jovyan) from the
  image's own /etc/passwd, which the agent could not do without mounting the image. With
  Docker, which has no such option, the container is created first, its user (numeric, or
  looked up in the image's /etc/passwd with ``docker cp``) is mapped through the daemon's
  userns-remap range (read from its root directory, ``/var/lib/docker/<uid>.<gid>``), and the
  runner chowns the directory before starting it. Either way the directory is mode 0700 inside
  ``<rentals_dir>/containers`` (mode 0700, root's): no other host user can reach it;
- GPUs: Podman uses CDI (``--device nvidia.com/gpu=<uuid>``, from ``nvidia-ctk cdi generate``),
  Docker ``--gpus "device=<uuid,…>"`` (the quotes keep Docker's CSV parser from splitting the
  list). Either way ``NVIDIA_VISIBLE_DEVICES`` is set to the leased uuids so an image's own
  ``all`` cannot widen it, and variables that would ask the NVIDIA runtime for more are refused;
- ``--cap-drop ALL`` and ``--security-opt no-new-privileges``: a job has no capability at all (no
  raw sockets to forge packets, no mounting, no changing others' files);
- limits: ``--cpus``, ``--memory`` with ``--memory-swap`` equal to it (no swap on the owner's
  disk), ``--pids-limit`` (a fork bomb stops there), ``--shm-size``, and explicit
  ``--ulimit nofile=N:N --ulimit nproc=N:N`` at or below the agent's own hard limits (read with
  ``resource.getrlimit``): the engines' defaults (nofile 1048576) are above what a process
  without CAP_SYS_RESOURCE (as in many VMs) may set, and Podman clamps its own nproc to 32768;
- ``--init``: a small init as PID 1 forwards ``stop``'s SIGTERM and reaps zombies (Podman needs
  the ``catatonit`` package for it);
- the network: ``network="filtered"`` puts every rental on the engine network ``gpgpu-rentals``
  (a bridge on ``subnet``, created here when missing; with Docker, inter-container traffic off)
  whose traffic the agent's nftables rules (``firewall.py``) confine to the public internet
  (plus DNS to the engine's resolver); IPv6 is turned off inside the container
  (``--sysctl net.ipv6.conf.all.disable_ipv6=1``), so a rental has no address the IPv4 rules
  do not cover. This **fails closed**: when the rules are missing and cannot be installed,
  ``start`` raises RunnerError and ``capabilities()`` says why; ``poll`` puts missing rules
  back, and stops a running rental when it cannot. ``network="none"`` gives containers no
  network at all (``--network none``) and needs no rules;
- the runtime: gVisor's ``runsc`` when the engine knows it (``runtime="auto"``), else the
  engine's default (``runc``/``crun``; ``runc`` instead of a default ``crun`` on a host with
  hybrid cgroups, which crun refuses); ``runtime`` may name one;
- never ``--privileged``, never the host's network, PID, IPC or user namespace, ``--restart no``,
  bounded logs (``--log-opt max-size``), no health check; with Podman, not the host's proxy
  variables (``--http-proxy=false``) and an image's VOLUMEs on tmpfs, not on the host's disk.

Exit codes are the engine's: the main process's status, 128+n when signal n ended it (137:
SIGKILL, also the out-of-memory killer), 125 for a container that was created but never started.
So are the times: RunState.started_at and ended_at are the engine's ``StartedAt`` and
``FinishedAt``, so a container that ended while the agent was away is reported at its real end.

Fencing (gpgpu_agent.fencing): with ``fence_dir``, every lease container has a watcher, a small
detached process (``fencing.py watch``, in a session of its own, not the agent's child) that
reads the lease's deadline file and, when the agent has not renewed it in time, records
``fenced_at`` (``lease-N.fenced.json`` beside the deadline) and stops the container (``stop -t
fence_grace_s``, ``kill`` if that fails) through the engine's command line, with or without the
agent. The runner starts it before the container and starts it again whenever it finds a running
container without one (after a restart, or if someone killed it); ``lease-N.watcher.json`` holds
its pid and start time.
"""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import json
import logging
import math
import os
import pwd
import re
import resource
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

from gpgpu_agent import checkpoint, fencing
from gpgpu_agent.protocol import IMAGE_REF, NVIDIA_FEATURES_OFF, REFUSED_ENV, image_registry_refusal
from gpgpu_agent.protocols import RunnerError
from gpgpu_agent.runners.cgroups import default_limits as cgroup_default_limits
from gpgpu_agent.runners.common import (
    EXIT_KILLED,
    LOG_MAX_SIZE,
    MEMORY_SIZE,
    UnknownLeaseError,
    check_env,
    check_gpu_uuids,
    size_bytes,
)
from gpgpu_agent.runners.firewall import Firewall, FirewallError
from gpgpu_agent.runners.state import (
    LOG_TAIL_BYTES,
    boot_id,
    parse_utc,
    proc_stat,
    read_from,
    tail_text,
    write_json_atomic,
)
from gpgpu_agent.types import JobLimits, LeaseSpec, OutputRead, RunState, json_int

log = logging.getLogger(__name__)

ENGINES = ("podman", "docker")
RUNTIMES = ("auto", "runc", "runsc", "crun")
NETWORKS = ("filtered", "none")
NETWORK_NAME = "gpgpu-rentals"
DEFAULT_SUBNET = "10.213.0.0/24"
LABEL_LEASE = "gpgpu.lease_id"
LABEL_JOB = "gpgpu.job_id"
LABEL_NETWORK = "gpgpu.network"
WORK = "/work"
NETWORK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Variables the agent sets itself (they win over the job's env).
AGENT_ENV = ("NVIDIA_VISIBLE_DEVICES", "GPGPU_LEASE_ID", "GPGPU_JOB_ID", "HOME")
# The most of a container file the agent reads (_image_file: /etc/passwd, /etc/group), as a tar.
IMAGE_FILE_MAX_BYTES = 4 * 1024 * 1024
PROCESS_REFUSED = "the container runner runs container jobs only"
EXIT_NEVER_STARTED = 125
# Podman's inspect can race a container's exit (it reads the process's /proc entries as the
# process goes): asked again after a pause, it answers. Three tries, half a second at most.
INSPECT_RACE_RETRIES = 3
INSPECT_RACE_PAUSE_S = 0.15
# Podman sets its own RLIMIT_NPROC to this before it starts a container; a container may not
# ask for more (the runtime has no CAP_SYS_RESOURCE to raise it).
PODMAN_NPROC_CEILING = 32 * 1024
NOFILE_CEILING = 1024 * 1024
# Each container's own range of host uids under --userns=auto (enough for any image's users).
USERNS_SIZE = 65536
# Where the engines look for an OCI runtime that containers.conf does not name.
RUNTIME_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/bin", "/sbin")
CONTAINERS_CONF = (
    "/usr/share/containers/containers.conf",
    "/etc/containers/containers.conf",
)
CONTAINERS_CONF_D = "/etc/containers/containers.conf.d"
SUBUID_FILES = ("/etc/subuid", "/etc/subgid")
# Where the NVIDIA Container Toolkit writes the CDI spec Podman reads (nvidia-ctk cdi generate).
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
# What Docker's --gpus needs from the NVIDIA Container Toolkit.
NVIDIA_HOOKS = ("nvidia-container-runtime-hook", "nvidia-container-toolkit")
# How often ``poll`` makes sure the firewall rules are still there.
FIREWALL_CHECK_INTERVAL_S = 10.0


def container_name(lease_id: int) -> str:
    return f"gpgpu-lease-{lease_id}"


def default_limits() -> tuple[float, str]:
    """Limits when the provider sets none (cgroups.default_limits): all CPUs but one, three
    quarters of the memory, in the engines' syntax."""
    limits = cgroup_default_limits()
    assert limits.cpus is not None and limits.memory_bytes is not None
    return limits.cpus, f"{limits.memory_bytes // (1024 * 1024)}m"


def memory_mb(size: str) -> int:
    """A size in the engines' syntax ("16g", "512m", "1048576") in whole MiB, rounded down."""
    return size_bytes(size) // 1024**2


def own_ulimits() -> tuple[int, int]:
    """(nofile, nproc) for every container: the agent's own hard limits, capped where the
    engines cap them, so a runtime without CAP_SYS_RESOURCE can set them."""

    def hard(which: int, ceiling: int) -> int:
        _, limit = resource.getrlimit(which)
        return ceiling if limit == resource.RLIM_INFINITY else min(int(limit), ceiling)

    return hard(resource.RLIMIT_NOFILE, NOFILE_CEILING), hard(resource.RLIMIT_NPROC, PODMAN_NPROC_CEILING)


class ContainerCapabilities(TypedDict):
    """How container jobs are isolated here (the heartbeat's ``capabilities.container``)."""

    engine: str
    engine_version: str | None
    runtime: str | None
    user_namespace: bool | None
    network: str
    read_only_root: bool
    limits: JobLimits
    ready: bool
    problem: str | None


@dataclasses.dataclass(frozen=True)
class EngineFacts:
    """What ``info`` says about the engine, read once and again by ``check``."""

    engine: str
    version: str
    default_runtime: str
    runtimes: frozenset[str]
    user_namespace: bool  # Podman: the subuid range --userns=auto needs; Docker: userns-remap
    rootless: bool
    remap: tuple[int, int] | None = None  # Docker's userns-remap base (uid, gid)


class ContainerRunner:
    """Runs ``kind: "container"`` leases with Podman or Docker (see the module docstring).

    ``engine``: "auto" (Podman, else Docker), "podman" or "docker"; ``engine_bin`` overrides
    the command's path. ``runtime``: "auto" (runsc when the engine knows it), "runc", "runsc"
    or "crun". ``network``: "filtered" or "none"; ``subnet`` and ``network_name`` name the
    rentals network, ``firewall`` its rules (built from ``subnet`` when left out; tests pass a
    fake). ``rentals_dir``: where the per-lease work directories go. ``cpu_limit`` (CPUs, may be
    fractional) and ``memory_limit`` ("16g", "512m") apply to every container; left out,
    ``default_limits()`` picks them. ``attach_gpus=False`` passes no GPU to the engine (for
    tests on machines without one: the leased uuids are still checked). Each engine call has
    ``call_timeout_s``; ``create`` (which may pull the image) has ``run_timeout_s``.
    ``fence_dir`` holds the leases' deadline files (None: containers are not fenced); a fence
    that fires stops the container with ``stop -t fence_grace_s``. ``python`` runs the watchers.
    """

    def __init__(
        self,
        *,
        engine: str = "auto",
        engine_bin: str | None = None,
        runtime: str = "auto",
        network: str = "filtered",
        subnet: str = DEFAULT_SUBNET,
        network_name: str = NETWORK_NAME,
        rentals_dir: Path,
        cpu_limit: float | None = None,
        memory_limit: str | None = None,
        pids_limit: int = 4096,
        shm_size: str = "1g",
        tmp_size: str = "1g",
        log_max_size: str = LOG_MAX_SIZE,
        firewall: Firewall | None = None,
        attach_gpus: bool = True,
        call_timeout_s: float = 30.0,
        run_timeout_s: float = 600.0,
        log_tail_lines: int = 2000,
        log_tail_bytes: int = LOG_TAIL_BYTES,
        fence_dir: Path | None = None,
        fence_grace_s: float = 5.0,
        python: str = sys.executable,
    ):
        if engine not in ("auto", *ENGINES):
            raise ValueError(f"engine must be one of auto, podman, docker, not {engine!r}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, not {network!r}")
        if not NETWORK_NAME_RE.match(network_name):
            raise ValueError(f"{network_name!r} is not a network name")
        self.engine, self.engine_bin = _resolve_engine(engine, engine_bin)
        self.runtime = runtime
        self.network = network
        self.network_name = network_name
        self.subnet = ipaddress.ip_network(subnet, strict=True)
        if not isinstance(self.subnet, ipaddress.IPv4Network) or self.subnet.prefixlen > 29:
            raise ValueError(f"subnet must be an IPv4 network of at least 8 addresses, not {subnet!r}")
        rentals = Path(rentals_dir)
        if not rentals.is_absolute() or any(c in str(rentals) for c in ",:\n"):
            raise ValueError(f"rentals_dir must be an absolute path without ',' or ':', not {rentals_dir!r}")
        self.rentals_dir = rentals
        default_cpus, default_memory = default_limits()
        self.cpu_limit = default_cpus if cpu_limit is None else float(cpu_limit)
        self.memory_limit = default_memory if memory_limit is None else memory_limit
        if not (math.isfinite(self.cpu_limit) and self.cpu_limit > 0):
            raise ValueError(f"cpu_limit must be a positive number of CPUs, not {cpu_limit!r}")
        for name, value in (
            ("memory_limit", self.memory_limit),
            ("shm_size", shm_size),
            ("tmp_size", tmp_size),
            ("log_max_size", log_max_size),
        ):
            if not isinstance(value, str) or not MEMORY_SIZE.match(value):
                raise ValueError(f"{name} must be a size such as 512m or 16g, not {value!r}")
        if pids_limit < 1:
            raise ValueError("pids_limit must be at least 1")
        self.pids_limit = int(pids_limit)
        self.shm_size = shm_size
        self.tmp_size = tmp_size
        self.log_max_size = log_max_size
        if firewall is None and network == "filtered":
            firewall = Firewall(subnet=str(self.subnet))
        self.firewall = firewall if network == "filtered" else None
        self.attach_gpus = attach_gpus
        self.call_timeout_s = call_timeout_s
        self.run_timeout_s = run_timeout_s
        self.log_tail_lines = log_tail_lines
        self.log_tail_bytes = log_tail_bytes
        self.fence_dir = Path(fence_dir) if fence_dir is not None else None
        self.fence_grace_s = fence_grace_s
        self.python = python
        self._boot_id = boot_id()
        self._facts: EngineFacts | None = None
        self._network_ready = False
        self._bridge: str | None = None
        self._firewall_checked_at = -math.inf
        self._firewall_kills: dict[int, str] = {}
        # Each lease's k8s-file log (Podman), found by one inspect; "" when it has none.
        self._log_files: dict[int, str] = {}

    # --- what this machine offers -----------------------------------------------------------

    def capabilities(self) -> ContainerCapabilities:
        """What a rental gets here, for the marketplace and the doctor. ``ready`` is False, and
        ``problem`` says why, when containers cannot be run safely now (see ``check``)."""
        problem: str | None = None
        facts: EngineFacts | None = None
        try:
            facts = self._engine_facts(refresh=True)
        except RunnerError as exc:
            problem = str(exc)
        if facts is not None:
            try:
                self._check(facts)
            except RunnerError as exc:
                problem = str(exc)
        return {
            "engine": self.engine,
            "engine_version": facts.version if facts else None,
            "runtime": self._runtime_name(facts) if facts else None,
            "user_namespace": facts.user_namespace if facts else None,
            "network": self.network,
            "read_only_root": True,
            "limits": {"cpus": self.cpu_limit, "memory_mb": memory_mb(self.memory_limit), "pids": self.pids_limit},
            "ready": problem is None,
            "problem": problem,
        }

    def check(self) -> None:
        """Raise RunnerError with a sentence when containers cannot be run safely here now: the
        engine is missing or its daemon is down, Podman's user namespaces are not configured,
        the configured runtime is unknown, or (``network="filtered"``) the firewall rules are
        not in place. Changes nothing (``prepare`` installs what is missing)."""
        self._check(self._engine_facts(refresh=True))

    def _check(self, facts: EngineFacts) -> None:
        if self.engine == "podman" and not facts.user_namespace:
            raise RunnerError(
                "Podman cannot give each container its own user namespace: /etc/subuid and /etc/subgid need a "
                "range for the user `containers` (e.g. containers:2147483647:2147483648)"
            )
        if self.attach_gpus:
            problem = gpu_plumbing_problem(self.engine, facts)
            if problem:
                raise RunnerError(problem)
        if self.runtime not in ("auto", facts.default_runtime) and self.runtime not in facts.runtimes:
            raise RunnerError(f"the {self.runtime} runtime is not known to {self.engine} here; install it or set auto")
        if self.firewall is not None:
            problems = self.firewall.check()
            if problems:
                raise RunnerError(
                    "the rentals network firewall is not in place ("
                    + "; ".join(problems)
                    + "); run `gpgpu-agent setup` to install it"
                )

    def prepare(self) -> None:
        """Make this machine ready to run rentals (idempotent; what ``gpgpu-agent setup`` and the
        first ``start`` call): with ``network="filtered"``, create the rentals network when
        missing and install the firewall rules. Raises RunnerError with a sentence."""
        self._engine_facts()
        if self.firewall is None:
            return
        if not self._network_ready:
            bridge = self._ensure_network()
            self._bridge = bridge
            self.firewall.adopt_network(bridge=bridge, dns_servers=self._dns_servers())
            self._network_ready = True
        self._ensure_firewall()

    def setup(self) -> str:
        """``prepare``, for ``gpgpu-agent setup``: what is now in place, in a sentence."""
        self.prepare()
        if self.firewall is None:
            return "containers get no network at all (network = none): no firewall needed"
        return (
            f"network {self.network_name} ({self.subnet}, bridge {self._bridge or 'not up yet'}) reaches the "
            f"internet only: nftables tables inet and bridge {getattr(self.firewall, 'table', '')} are in place"
        )

    # --- Runner protocol ----------------------------------------------------------------------

    def start(
        self, spec: LeaseSpec, *, gpu_indexes: Mapping[str, int], gpu_minors: Mapping[str, int] | None = None
    ) -> RunState:
        """Create and start the lease's container (pulling the image if needed; this call blocks
        meanwhile); a second call for the same lease returns the existing container's state.
        ``gpu_minors`` is not needed: the engine gives the container its GPUs by uuid.
        Raises RunnerError with a sentence (the marketplace then hears failed_to_start) when the
        lease asks for something unsafe, the image cannot be had, the container cannot start, or
        the machine is not ready (no engine, no firewall: fail closed)."""
        if spec.kind != "container":
            raise RunnerError(PROCESS_REFUSED)
        if not isinstance(spec.image, str) or not IMAGE_REF.match(spec.image):
            raise RunnerError(f"{spec.image!r} is not a container image reference")
        if local := image_registry_refusal(spec.image):
            raise RunnerError(f"{local}: this machine pulls only from public registries")
        check_env(spec.env)
        check_gpu_uuids(spec.gpu_uuids)
        for uuid in spec.gpu_uuids:
            if uuid not in gpu_indexes and not uuid.startswith("MIG-"):
                raise RunnerError(f"GPU {uuid} is not on this machine")
        for name in REFUSED_ENV:
            if name in spec.env:
                raise RunnerError(f"a job may not set {name}")
        if self._inspect(spec.lease_id) is not None:
            return self.poll(spec.lease_id)
        self.prepare()
        self._check(self._engine_facts())

        name = container_name(spec.lease_id)
        work = self._make_work_dir(spec.lease_id)
        try:
            # Before the container exists: nothing of the job runs yet. Podman's `U` mount option
            # then gives the whole tree to the container's user; Docker's is chowned.
            checkpoint.prepare_work(work, spec, owner=None)
        except checkpoint.CheckpointError as exc:
            _remove_tree(work)
            raise RunnerError(str(exc)) from exc
        try:
            done = self._call(self.create_args(spec, work), timeout=self.run_timeout_s)
            if done.returncode != 0 and self.firewall is not None and _network_missing(done.stderr):
                self._network_ready = False  # removed behind the agent's back: make it again, once
                self.prepare()
                done = self._call(self.create_args(spec, work), timeout=self.run_timeout_s)
            if done.returncode != 0:
                raise RunnerError(self._start_failure(done.stderr))
            if self.engine == "docker":
                self._own_work_dir_for_docker(name, work)
            self._start_watcher(spec.lease_id)  # before the workload runs: never a moment unfenced
            done = self._call(["start", name], timeout=self.run_timeout_s)
            if done.returncode != 0:
                raise RunnerError(self._start_failure(done.stderr))
        except RunnerError:
            # Leave nothing behind: a timed-out create may still have made the container, and one
            # created but not started would otherwise be adopted as a lease that never ran.
            self._remove_quietly(name)
            _remove_tree(work)
            raise
        log.info("lease %s: started container %s from %s", spec.lease_id, name, spec.image)
        self._pin_bridge_address()
        return self.poll(spec.lease_id)

    def poll(self, lease_id: int) -> RunState:
        """The container's state (``inspect``), host pids (``top``) and log tail (``logs``).
        Raises UnknownLeaseError when there is no such container. A running rental whose
        firewall rules vanished and cannot be put back is killed (fail closed)."""
        info = self._inspect(lease_id)
        if info is None:
            raise UnknownLeaseError(lease_id)
        return self._observe(lease_id, info)

    def _observe(self, lease_id: int, info: Mapping[str, object]) -> RunState:
        if _running(info):
            self._ensure_watcher(lease_id)
        if _running(info) and not self._firewall_holds():
            reason = "gpgpu-agent: stopped: the rentals firewall rules are gone and could not be restored"
            log.error("lease %s: %s; killing its container", lease_id, reason)
            self._call(["kill", container_name(lease_id)], timeout=self.call_timeout_s)
            self._firewall_kills[lease_id] = reason
            deadline = time.monotonic() + self.call_timeout_s
            while (found := self._inspect(lease_id)) is not None and _running(found) and time.monotonic() < deadline:
                time.sleep(0.1)  # the engine records the exit a moment after the signal
            info = found or info
        return self._state(lease_id, info)

    def stop(self, lease_id: int, *, grace_s: float) -> RunState:
        """``stop -t <grace>``: SIGTERM to the container's main process, SIGKILL after the grace
        period (rounded up to whole seconds, as the engines count it). Stopping an ended
        container returns its state."""
        info = self._inspect(lease_id)
        if info is None:
            raise UnknownLeaseError(lease_id)
        if not _running(info):
            return self._state(lease_id, info)
        grace = max(0, math.ceil(grace_s))
        name = container_name(lease_id)
        try:
            done = self._call(["stop", "-t", str(grace), name], timeout=grace + self.call_timeout_s)
        except RunnerError:
            # The engine did not finish the stop in time: insist once, then report what is known.
            self._call(["kill", name], timeout=self.call_timeout_s)
            return self.poll(lease_id)
        if done.returncode != 0:
            message = _message(done.stderr)
            if _no_such(message):
                raise UnknownLeaseError(lease_id)
            raise RunnerError(f"could not stop the container: {message}")
        return self.poll(lease_id)

    def adopt(self) -> list[RunState]:
        """Every lease container on this machine, running or ended, found by its label: running
        ones are managed again (not restarted, not stopped), ended ones carry their exit code."""
        done = self._call(
            ["ps", "-a", "--no-trunc", "--filter", f"label={LABEL_LEASE}", "--format", "{{.Names}}"],
            timeout=self.call_timeout_s,
        )
        if done.returncode != 0:
            raise RunnerError(f"could not list the lease containers: {_message(done.stderr)}")
        states = []
        for line in done.stdout.splitlines():
            m = re.match(r"^gpgpu-lease-(\d{1,18})$", line.strip())
            if not m:
                continue
            lease_id = int(m.group(1))
            info = self._inspect(lease_id)
            # Only containers this runner made: a container someone else labelled is not ours.
            if info is None or _labels(info).get(LABEL_LEASE) != str(lease_id):
                continue
            states.append(self._observe(lease_id, info))
        return sorted(states, key=lambda s: s.lease_id)

    def forget(self, lease_id: int) -> None:
        """Remove the lease's ended container (its logs go with it) and its work directory.
        Forgetting an unknown lease does nothing; a running one raises RunnerError."""
        # --volumes: with the anonymous volumes an image's VOLUME made (Docker puts them outside
        # /work, writable despite --read-only); without it they, and the renter's data in them,
        # stayed on the owner's disk after the lease.
        done = self._call(["rm", "--volumes", container_name(lease_id)], timeout=self.call_timeout_s)
        if done.returncode != 0:
            message = _message(done.stderr)
            if "running" in message.lower() and not _no_such(message):
                raise RunnerError(f"lease {lease_id} is still running; stop it before forgetting it")
            if not _no_such(message) and self._inspect(lease_id) is not None:
                raise RunnerError(f"could not remove the container: {message}")
        _remove_tree(self.work_dir(lease_id))
        self._firewall_kills.pop(lease_id, None)
        self._log_files.pop(lease_id, None)
        if self.fence_dir is not None:
            for path in (fencing.fenced_path(self.fence_dir, lease_id), fencing.watcher_path(self.fence_dir, lease_id)):
                path.unlink(missing_ok=True)

    # --- the engine's arguments -----------------------------------------------------------------

    def work_dir(self, lease_id: int) -> Path:
        return self.rentals_dir / "containers" / f"lease-{lease_id}"

    def workspace(self, lease_id: int) -> Path | None:
        """The lease's work directory (the container's /work), while it exists."""
        path = self.work_dir(lease_id)
        return path if path.is_dir() else None

    def create_args(self, spec: LeaseSpec, work: Path) -> list[str]:
        """The ``create`` arguments for a lease (after the engine's program name)."""
        facts = self._engine_facts()
        uuids = ",".join(spec.gpu_uuids)
        env = {k: v for k, v in spec.env.items() if k not in AGENT_ENV}
        env.update(spec.agent_env)
        env.update(dict.fromkeys(NVIDIA_FEATURES_OFF, "disabled"))  # over the image's own ENV too
        env.update(
            {
                "NVIDIA_VISIBLE_DEVICES": uuids,
                "GPGPU_LEASE_ID": str(spec.lease_id),
                "GPGPU_JOB_ID": str(spec.job_id),
                "HOME": WORK,
            }
        )
        nofile, nproc = own_ulimits()
        args = [
            "create",
            "--name",
            container_name(spec.lease_id),
            "--label",
            f"{LABEL_LEASE}={spec.lease_id}",
            "--label",
            f"{LABEL_JOB}={spec.job_id}",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--cpus",
            f"{self.cpu_limit:g}",
            "--memory",
            self.memory_limit,
            "--memory-swap",
            self.memory_limit,
            "--pids-limit",
            str(self.pids_limit),
            "--shm-size",
            self.shm_size,
            "--ulimit",
            f"nofile={nofile}:{nofile}",
            "--ulimit",
            f"nproc={nproc}:{nproc}",
            "--tmpfs",
            f"/tmp:rw,nosuid,nodev,size={self.tmp_size}",  # noqa: S108 - the container's own /tmp
            "--workdir",
            WORK,
            "--init",
            "--restart",
            "no",
        ]
        args.append("--no-healthcheck")  # the engine would otherwise run the image's own command in it
        if self.engine == "podman":
            # The host's proxy variables (credentials, often) are not the renter's business, and an
            # image's VOLUMEs are not a way around the read-only root onto the host's disk.
            args += ["--http-proxy=false", "--image-volume", "tmpfs"]
            args += ["--userns", f"auto:size={USERNS_SIZE}"]
            args += ["--volume", f"{work}:{WORK}:rw,U,nosuid,nodev"]
            args += ["--log-driver", "k8s-file", "--log-opt", f"max-size={self.log_max_size}"]
        else:
            args += ["--mount", f"type=bind,source={work},target={WORK}"]
            # json-file, one file (max-file=1: at max-size it starts again): the agent, root, reads
            # it as it grows (read_output), as Podman's k8s-file.
            args += ["--log-driver", "json-file", "--log-opt", f"max-size={self.log_max_size}"]
            args += ["--log-opt", "max-file=1"]
        if self.network == "none":
            args += ["--network", "none"]
        else:
            args += ["--network", self.network_name]
        args += ["--sysctl", "net.ipv6.conf.all.disable_ipv6=1", "--sysctl", "net.ipv6.conf.default.disable_ipv6=1"]
        runtime = self._runtime_choice(facts)
        if runtime is not None:
            args += ["--runtime", runtime]
        if self.attach_gpus:
            if self.engine == "podman":
                for uuid in spec.gpu_uuids:
                    args += ["--device", f"nvidia.com/gpu={uuid}"]
            else:
                args += ["--gpus", f'"device={uuids}"']
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        # Options end at the image: the command's own arguments are never read as the engine's.
        args.append(spec.image)
        args.extend(spec.command)
        return args

    # --- engine facts ---------------------------------------------------------------------------

    def facts(self) -> EngineFacts:
        """What the engine says about itself now (``info``); RunnerError when it cannot answer."""
        return self._engine_facts(refresh=True)

    def _engine_facts(self, *, refresh: bool = False) -> EngineFacts:
        if self._facts is not None and not refresh:
            return self._facts
        if self.engine == "podman":
            done = self._call(["info", "--format", "json"], timeout=self.call_timeout_s)
        else:
            done = self._call(["info", "--format", "{{json .}}"], timeout=self.call_timeout_s)
        if done.returncode != 0:
            raise RunnerError(f"`{self.engine} info` failed: {_message(done.stderr)}")
        try:
            info = json.loads(done.stdout)
            if not isinstance(info, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise RunnerError(f"`{self.engine} info` answered something that is not JSON: {exc}") from exc
        self._facts = _podman_facts(info) if self.engine == "podman" else _docker_facts(info)
        return self._facts

    def _runtime_choice(self, facts: EngineFacts) -> str | None:
        """The ``--runtime`` to pass; None for the engine's default."""
        if self.runtime == "auto":
            if "runsc" in facts.runtimes:
                return "runsc" if facts.default_runtime != "runsc" else None
            if facts.default_runtime == "crun" and "runc" in facts.runtimes and cgroups_hybrid():
                return "runc"  # crun refuses hosts with cgroup v1 and a v2 mount beside it
            return None
        return None if self.runtime == facts.default_runtime else self.runtime

    def _runtime_name(self, facts: EngineFacts) -> str:
        return self._runtime_choice(facts) or facts.default_runtime

    # --- network and firewall -------------------------------------------------------------------

    def _ensure_network(self) -> str | None:
        """Create the rentals network when missing; its bridge's name (None when the engine does
        not say). Raises RunnerError when a network of that name exists with another subnet."""
        info = self._network_inspect()
        if info is None:
            args = ["network", "create", "--driver", "bridge", "--subnet", str(self.subnet)]
            args += ["--gateway", str(next(self.subnet.hosts())), "--label", f"{LABEL_NETWORK}=1"]
            if self.engine == "docker":
                args += ["-o", "com.docker.network.bridge.enable_icc=false"]
                args += ["-o", f"com.docker.network.bridge.name={self.network_name[:15]}"]
            done = self._call([*args, self.network_name], timeout=self.call_timeout_s)
            if done.returncode != 0 and "exists" not in done.stderr:
                raise RunnerError(f"could not create the {self.network_name} network: {_message(done.stderr)}")
            info = self._network_inspect()
            if info is None:
                raise RunnerError(f"the {self.network_name} network was created but cannot be found")
            log.info("created the %s network on %s", self.network_name, self.subnet)
        subnets, bridge = _network_subnets_and_bridge(info)
        if str(self.subnet) not in subnets:
            raise RunnerError(
                f"the {self.network_name} network exists with subnet {', '.join(subnets) or 'none'}, not "
                f"{self.subnet}; remove it ({self.engine} network rm {self.network_name}) or configure its subnet"
            )
        return bridge

    def _network_inspect(self) -> dict[str, object] | None:
        done = self._call(["network", "inspect", self.network_name], timeout=self.call_timeout_s)
        if done.returncode != 0:
            if "not found" in done.stderr.lower() or "no such network" in done.stderr.lower():
                return None
            raise RunnerError(f"could not inspect the {self.network_name} network: {_message(done.stderr)}")
        try:
            found = _json_list(done.stdout)
        except ValueError as exc:
            raise RunnerError(f"network inspect answered something that is not JSON: {exc}") from exc
        return found[0] if found else None

    def _dns_servers(self) -> list[str] | None:
        """The resolvers rentals must reach on port 53. Podman: its aardvark-dns on the gateway
        (None, the firewall's default). Docker: its embedded resolver forwards from inside the
        container to the host's own resolvers, so those."""
        if self.engine == "podman":
            return None
        servers = _resolv_conf_servers(Path("/etc/resolv.conf"))
        if servers and all(ipaddress.ip_address(s).is_loopback for s in servers):
            # systemd-resolved's stub: Docker uses the upstream servers behind it.
            servers = _resolv_conf_servers(Path("/run/systemd/resolve/resolv.conf"))
        return [s for s in servers if not ipaddress.ip_address(s).is_loopback]

    def _ensure_firewall(self) -> None:
        """The rules in place, installing them when missing; RunnerError when they cannot be."""
        assert self.firewall is not None
        if not self.firewall.check():
            self._firewall_checked_at = time.monotonic()
            return
        try:
            self.firewall.install()
        except FirewallError as exc:
            raise RunnerError(f"containers are not run without the rentals network firewall: {exc}") from exc
        problems = self.firewall.check()
        if problems:
            raise RunnerError("containers are not run without the rentals network firewall: " + "; ".join(problems))
        self._firewall_checked_at = time.monotonic()

    def _firewall_holds(self) -> bool:
        """For running rentals: the rules are still in place (checked every few seconds), put
        back when they vanished; False when they cannot be."""
        if self.firewall is None:
            return True
        if time.monotonic() - self._firewall_checked_at < FIREWALL_CHECK_INTERVAL_S:
            return True
        try:
            problems = self.firewall.check()
            if problems:
                log.warning("the rentals firewall rules are not in place (%s); reinstalling", "; ".join(problems))
                self.prepare()
        except RunnerError as exc:
            log.error("%s", exc)
            return False
        self._firewall_checked_at = time.monotonic()
        return True

    def _pin_bridge_address(self) -> None:
        """Give Podman's bridge its current MAC address for good. Linux gives a bridge the lowest
        address among its ports unless one was set, so as rentals come and go the gateway's MAC
        changes under the others, whose ARP caches then point at nothing for seconds: every
        connection of theirs stalls. Docker sets its bridges' addresses; netavark 1.4 does not.
        Best effort: a failure is logged."""
        if self.engine != "podman" or not self._bridge:
            return
        sysfs = Path("/sys/class/net") / self._bridge
        try:
            if (sysfs / "addr_assign_type").read_text().strip() == "3":  # NET_ADDR_SET: pinned
                return
            address = (sysfs / "address").read_text().strip()
            done = subprocess.run(  # noqa: S603 - argv, no shell
                [shutil.which("ip") or "/sbin/ip", "link", "set", "dev", self._bridge, "address", address],
                capture_output=True,
                text=True,
                timeout=self.call_timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("could not pin the address of bridge %s: %s", self._bridge, exc)
            return
        if done.returncode != 0:
            log.warning("could not pin the address of bridge %s: %s", self._bridge, _message(done.stderr))

    # --- fencing ------------------------------------------------------------------------------

    def _start_watcher(self, lease_id: int) -> None:
        """Start the lease's fence watcher (module docstring) and record its pid; nothing when the
        lease has no deadline (not fenced). Raises RunnerError when it cannot be started: a
        container is not run unfenced."""
        if self.fence_dir is None or not fencing.deadline_path(self.fence_dir, lease_id).exists():
            return
        argv = [self.python, "-I", "-S", str(Path(fencing.__file__).resolve()), "watch"]
        argv += ["--engine-bin", self.engine_bin, "--name", container_name(lease_id)]
        argv += ["--deadline", str(fencing.deadline_path(self.fence_dir, lease_id))]
        argv += ["--record", str(fencing.fenced_path(self.fence_dir, lease_id))]
        argv += ["--grace", f"{max(0.0, self.fence_grace_s):g}"]
        try:
            self.fence_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            done = subprocess.run(  # noqa: S603 - argv, no shell
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.call_timeout_s,
                check=False,
                cwd=self._engine_cwd(),  # the engine calls it makes run there too
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RunnerError(f"could not start the lease's fence watcher: {exc}") from exc
        pid_text = done.stdout.decode("ascii", "replace").strip()
        stat = proc_stat(int(pid_text)) if done.returncode == 0 and pid_text.isdigit() else None
        if stat is None:
            why = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}"
            raise RunnerError(f"could not start the lease's fence watcher: {why}")
        write_json_atomic(
            fencing.watcher_path(self.fence_dir, lease_id),
            {"pid": stat.pid, "start_ticks": stat.start_ticks, "boot_id": self._boot_id},
        )

    def _watcher_alive(self, lease_id: int) -> bool:
        assert self.fence_dir is not None
        data = fencing.read_json(fencing.watcher_path(self.fence_dir, lease_id))
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
            return False
        stat = proc_stat(data["pid"])
        if stat is None or stat.zombie or stat.start_ticks != data.get("start_ticks"):
            return False
        return data.get("boot_id") == self._boot_id

    def _ensure_watcher(self, lease_id: int) -> None:
        """A running fenced container has its watcher: started again when it is gone (logged)."""
        if self.fence_dir is None or not fencing.deadline_path(self.fence_dir, lease_id).exists():
            return
        if self._watcher_alive(lease_id):
            return
        log.warning("lease %s: its container has no fence watcher; starting one", lease_id)
        try:
            self._start_watcher(lease_id)
        except RunnerError as exc:
            log.error("lease %s: %s", lease_id, exc)

    def _fenced_at(self, lease_id: int, ended_at: datetime | None) -> datetime | None:
        """When the watcher fenced the lease, if it did and the container ended by it (not before)."""
        if self.fence_dir is None:
            return None
        data = fencing.read_json(fencing.fenced_path(self.fence_dir, lease_id))
        fenced_at = parse_utc(data.get("fenced_at")) if isinstance(data, dict) else None
        if fenced_at is None or (ended_at is not None and ended_at < fenced_at):
            return None
        return fenced_at

    # --- work directories -----------------------------------------------------------------------

    def _make_work_dir(self, lease_id: int) -> Path:
        """A new, empty work directory (mode 0700) in ``<rentals_dir>/containers`` (mode 0700,
        root's; ``rentals_dir`` itself is shared with the process runner, which sets its mode)."""
        path = self.work_dir(lease_id)
        try:
            self.rentals_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            os.chmod(path.parent, 0o700)
            if os.path.lexists(path):
                # Left by a lease whose container is gone: its files are not this lease's.
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    path.unlink()
                else:
                    _remove_tree(path)
            os.mkdir(path, 0o700)
        except OSError as exc:
            raise RunnerError(f"could not make the work directory in {self.rentals_dir}: {exc.strerror}") from exc
        return path

    def _own_work_dir_for_docker(self, name: str, work: Path) -> None:
        """Chown the work directory to the host uid the created container's user maps to."""
        info = self._inspect_name(name)
        user = str(_object(_object(info).get("Config")).get("User") or "")
        uid, gid = self._docker_user_ids(name, user)
        base_uid, base_gid = self._engine_facts().remap or (0, 0)
        try:
            os.lchown(work, base_uid + uid, base_gid + gid)
            # A restored checkpoint (gpgpu_agent.checkpoint.unpack made no links; nothing runs yet).
            for root, dirs, files in os.walk(work):
                for entry in (*dirs, *files):
                    os.lchown(os.path.join(root, entry), base_uid + uid, base_gid + gid)
        except OSError as exc:
            raise RunnerError(f"could not give the container its work directory: {exc.strerror}") from exc

    def _docker_user_ids(self, name: str, user: str) -> tuple[int, int]:
        """The container's (uid, gid) inside it: numeric, or looked up in its /etc/passwd."""
        who, _, group = user.partition(":")
        if who == "":
            return 0, 0
        uid: int | None = int(who) if who.isdigit() else None
        gid: int | None = int(group) if group.isdigit() else None
        if uid is None or gid is None:
            passwd = self._image_file(name, "/etc/passwd")
            for line in passwd.splitlines():
                fields = line.split(":")
                if len(fields) >= 4 and fields[2].isdigit() and fields[3].isdigit():
                    if (uid is None and fields[0] == who) or (uid is not None and fields[2] == who):
                        uid, primary = int(fields[2]), int(fields[3])
                        if gid is None and not group:
                            gid = primary
                        break
        if uid is None:
            raise RunnerError(f"the image's user {who!r} is not in its /etc/passwd")
        if gid is None and group:
            gid = _group_gid(self._image_file(name, "/etc/group"), group)
        return uid, gid or 0

    def _image_file(self, name: str, path: str) -> str:
        """A small text file of a created container (``docker cp`` streams it as a tar): "" when
        it cannot be read, or its tar is over IMAGE_FILE_MAX_BYTES. Read as it streams, at most
        that much: an image's /etc/passwd of gigabytes (zeros compress well in a layer) was held
        whole in the agent's memory."""
        try:
            proc = subprocess.Popen(  # noqa: S603 - argv, no shell
                [self.engine_bin, "cp", f"{name}:{path}", "-"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=self._engine_cwd(),
            )
        except OSError:
            return ""
        timer = threading.Timer(self.call_timeout_s, proc.kill)  # an engine that stalls
        timer.start()
        try:
            data = proc.stdout.read(IMAGE_FILE_MAX_BYTES + 1) if proc.stdout is not None else b""
            whole = len(data) <= IMAGE_FILE_MAX_BYTES
            if not whole:
                proc.kill()
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.stdout is not None:
                proc.stdout.close()
        if code != 0 or not whole:
            return ""
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    if member.isfile() and member.size <= 1024 * 1024:
                        f = tar.extractfile(member)
                        return f.read().decode("utf-8", "replace") if f else ""
        except (tarfile.TarError, OSError):
            return ""
        return ""

    # --- internals ------------------------------------------------------------------------------

    def _engine_cwd(self) -> str:
        """Where engine commands run: the runner's own private directory. Podman 4's conmon
        leaves a file named ``oom`` in its working directory when a container is OOM-killed;
        it must not land in whatever directory the agent was started from."""
        private = self.rentals_dir / "containers"
        try:
            private.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            return "/"
        return str(private)

    def _call(self, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run one engine command. Raises RunnerError when the engine is missing, its daemon is
        down or unreachable, or it does not answer within ``timeout``; other failures are
        returned."""
        try:
            done = subprocess.run(  # noqa: S603 - argv, no shell
                [self.engine_bin, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                cwd=self._engine_cwd(),
            )
        except FileNotFoundError as exc:
            raise RunnerError(
                f"{self.engine.capitalize()} is not installed here (no `{self.engine_bin}` command found); "
                f"install it (apt-get install {'podman catatonit' if self.engine == 'podman' else 'docker.io'}) "
                "to run container jobs"
            ) from exc
        except PermissionError as exc:
            raise RunnerError(f"the agent may not run {self.engine_bin}: {exc.strerror}") from exc
        except subprocess.TimeoutExpired as exc:
            raise RunnerError(
                f"`{self.engine} {args[0]}` did not answer within {timeout:g} s; is {self.engine} healthy?"
            ) from exc
        except (OSError, ValueError) as exc:  # an argument list over the kernel's limit, a NUL in one
            raise RunnerError(f"`{self.engine} {args[0]}` could not be run: {exc}") from exc
        stdout = done.stdout.decode("utf-8", "replace")
        stderr = done.stderr.decode("utf-8", "replace")
        if done.returncode != 0:
            sentence = _daemon_problem(stderr)
            if sentence is not None:
                raise RunnerError(sentence)
        return subprocess.CompletedProcess(done.args, done.returncode, stdout, stderr)

    def _inspect(self, lease_id: int) -> dict[str, object] | None:
        return self._inspect_name(container_name(lease_id))

    def _inspect_name(self, name: str) -> dict[str, object] | None:
        done = self._call(["inspect", "--type", "container", name], timeout=self.call_timeout_s)
        for _ in range(INSPECT_RACE_RETRIES):
            if done.returncode == 0 or not _exit_race(_message(done.stderr)):
                break
            time.sleep(INSPECT_RACE_PAUSE_S)
            done = self._call(["inspect", "--type", "container", name], timeout=self.call_timeout_s)
        if done.returncode != 0:
            message = _message(done.stderr)
            if _no_such(message):
                return None
            raise RunnerError(f"could not inspect the container: {message}")
        try:
            found = _json_list(done.stdout)
        except ValueError as exc:
            raise RunnerError(f"{self.engine} inspect answered something that is not JSON: {exc}") from exc
        return found[0] if found else None

    def _start_failure(self, stderr: str) -> str:
        message = _message(stderr)
        lowered = message.lower()
        if "could not select device driver" in message or "nvidia-container-cli" in message:
            return f"Docker cannot give containers GPUs here; install the NVIDIA Container Toolkit ({message})"
        if "cdi" in lowered and ("unresolvable" in lowered or "nvidia.com/gpu" in lowered):
            return (
                "Podman cannot give containers GPUs here; generate the NVIDIA CDI spec "
                f"(nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml) ({message})"
            )
        if "container-init binary not found" in lowered or "catatonit" in lowered:
            return f"Podman's init for containers is missing; install catatonit ({message})"
        if "subuid" in lowered or "subgid" in lowered:
            return (
                "Podman cannot map the container's users; add a `containers` range to /etc/subuid and "
                f"/etc/subgid ({message})"
            )
        return f"could not start the container: {message}"

    def _state(self, lease_id: int, info: Mapping[str, object]) -> RunState:
        state = _object(info.get("State"))
        running = _running(info)
        exit_code: int | None = None
        if not running:
            if state.get("Status") in ("created", "configured", "initialized"):
                exit_code = EXIT_NEVER_STARTED
            elif state.get("OOMKilled"):
                exit_code = EXIT_KILLED
            else:
                exit_code = json_int(state.get("ExitCode") or 0)
        pids: tuple[int, ...] = ()
        if running:
            pids = self._host_pids(lease_id, state.get("Pid"))
        log_tail = self._log_tail(lease_id, info)
        note = self._firewall_kills.get(lease_id)
        if note:
            log_tail = tail_text((log_tail + ("\n" if log_tail else "") + note + "\n").encode(), self.log_tail_bytes)
        ended_at = None if running else _parse_engine_time(state.get("FinishedAt"))
        return RunState(
            lease_id=lease_id,
            running=running,
            exit_code=exit_code,
            pids=pids,
            started_at=_parse_engine_time(state.get("StartedAt")),
            log_tail=log_tail,
            ended_at=ended_at,
            fenced_at=None if running else self._fenced_at(lease_id, ended_at),
        )

    def _host_pids(self, lease_id: int, main_pid: object) -> tuple[int, ...]:
        """Host pids of every process in the container (``podman top … hpid``; ``docker top``
        runs ps on the host); the main pid from inspect is kept when top fails."""
        pids: set[int] = set()
        if isinstance(main_pid, int) and main_pid > 0:
            pids.add(main_pid)
        descriptors = ["hpid"] if self.engine == "podman" else ["-eo", "pid"]
        done = self._call(["top", container_name(lease_id), *descriptors], timeout=self.call_timeout_s)
        if done.returncode == 0:
            for line in done.stdout.splitlines()[1:]:
                token = line.strip()
                if token.isdigit():
                    pids.add(int(token))
        return tuple(sorted(pids))

    def read_output(self, lease_id: int, *, offset: int, limit: int) -> OutputRead | None:
        """Up to ``limit`` bytes of the container's log file from ``offset``, whole records only,
        as the job's output (protocols.OutputReader): a read of the file the engine appends to
        (Podman's k8s-file, which conmon writes; Docker's json-file, its ``LogPath``), no engine
        call after the first inspect. Pieces of stdout and stderr lines are joined in the order
        they were written, so a line the job wrote in several pieces may interleave with the
        other stream's. None for a container of another log driver, or a file the agent cannot
        read (an agent not run as root, with Docker): such a lease's output comes only as the
        tail of its end."""
        path = self._log_files.get(lease_id)
        if path is None:
            info = self._inspect(lease_id)
            if info is None:
                return None
            if self.engine == "podman":
                found = _object(_object(info.get("HostConfig")).get("LogConfig")).get("Path")
            else:
                found = info.get("LogPath")
            path = self._log_files[lease_id] = found if isinstance(found, str) else ""
        if not path:
            return None
        try:
            raw, end = read_from(Path(path), offset, limit)
        except PermissionError:
            self._log_files[lease_id] = ""
            return None
        start = end - len(raw)
        whole = raw[: raw.rfind(b"\n") + 1]  # a record still being written waits for the next read
        text = _k8s_file_text(whole) if self.engine == "podman" else _json_file_text(whole)
        return OutputRead(data=text, next_offset=start + len(whole))

    def _log_tail(self, lease_id: int, info: Mapping[str, object]) -> str:
        """The end of the job's output. Podman's: read from its k8s-file log itself, because
        ``podman logs --tail`` (4.3) drops or misorders the pieces of lines the job wrote in
        several writes; Docker's: ``docker logs --tail``."""
        if self.engine == "podman":
            path = _object(_object(info.get("HostConfig")).get("LogConfig")).get("Path")
            if isinstance(path, str) and path:
                text = _k8s_file_tail(Path(path), self.log_tail_bytes, self.log_tail_lines)
                if text is not None:
                    return text
        try:
            done = subprocess.run(  # noqa: S603 - argv, no shell
                [self.engine_bin, "logs", "--tail", str(self.log_tail_lines), container_name(lease_id)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # the job's stderr comes out on the engine's stderr
                timeout=self.call_timeout_s,
                check=False,
                cwd=self._engine_cwd(),
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return tail_text(done.stdout, self.log_tail_bytes) if done.returncode == 0 else ""

    def _remove_quietly(self, name: str) -> None:
        try:
            self._call(["rm", "--force", "--volumes", name], timeout=self.call_timeout_s)
        except RunnerError as exc:
            log.warning("could not remove container %s: %s", name, exc)


def _k8s_file_tail(path: Path, limit: int, lines: int) -> str | None:
    """The last ``lines`` lines (at most ``limit`` bytes) of a k8s-file log, whose records are
    ``<time> <stream> <P|F> <text>``: P is a piece of a line, F ends one (pieces of stdout and
    stderr may interleave, so each stream's are joined apart). None when the file cannot be
    read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            # Records carry ~45 bytes of prefix each: read enough to fill the tail after them.
            start = max(0, size - 4 * limit - 64 * 1024)
            f.seek(start)
            raw = f.read()
    except OSError:
        return None
    records = raw.split(b"\n")
    if start > 0:
        records = records[1:]  # the first is cut
    out = bytearray()
    pending: dict[bytes, bytearray] = {}  # per stream: the pieces of a line not ended yet
    for record in records:
        parts = record.split(b" ", 3)
        if len(parts) < 3 or parts[2] not in (b"P", b"F"):
            continue
        piece = pending.setdefault(parts[1], bytearray())
        piece += parts[3] if len(parts) == 4 else b""
        if parts[2] == b"F":
            out += piece + b"\n"
            del pending[parts[1]]
    for piece in pending.values():
        out += piece
    kept = b"\n".join(bytes(out).split(b"\n")[-lines - 1 :]) if lines > 0 else bytes(out)
    return tail_text(kept, limit)


def _json_file_text(records: bytes) -> bytes:
    """The job's output in whole json-file records (Docker: ``{"log": "<text>", "stream":
    "stdout", "time": "…"}`` a line): each record's text (a line the engine split is in several
    records, the last ending with a newline). A record that is not such an object is skipped."""
    out = bytearray()
    for line in records.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        text = record.get("log") if isinstance(record, dict) else None
        if isinstance(text, str):
            out += text.encode("utf-8", "surrogateescape")
    return bytes(out)


def _k8s_file_text(records: bytes) -> bytes:
    """The job's output in whole k8s-file records (``<time> <stream> <P|F> <text>``): each
    record's text, a newline after each F (the end of a line)."""
    out = bytearray()
    for record in records.split(b"\n"):
        parts = record.split(b" ", 3)
        if len(parts) < 3 or parts[2] not in (b"P", b"F"):
            continue
        out += parts[3] if len(parts) == 4 else b""
        if parts[2] == b"F":
            out += b"\n"
    return bytes(out)


def cgroups_hybrid(root: Path = Path("/sys/fs/cgroup")) -> bool:
    """Whether the host mounts cgroup v1 controllers with a cgroup v2 hierarchy beside them
    ("hybrid" mode, as systemd sets up on older distributions). crun refuses to start containers
    there ("cgroups in hybrid mode not supported"); runc runs them on the v1 controllers."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    types = {fields[1]: fields[2] for fields in (line.split() for line in mounts) if len(fields) > 2}
    return types.get(str(root)) != "cgroup2" and types.get(str(root / "unified")) == "cgroup2"


def _resolve_engine(engine: str, engine_bin: str | None) -> tuple[str, str]:
    """(engine, command) for the configuration: "auto" is Podman when its command is found,
    else Docker; an ``engine_bin`` with "auto" is named by its file name."""
    if engine != "auto":
        return engine, engine_bin or engine
    if engine_bin is not None:
        return ("docker" if "docker" in Path(engine_bin).name else "podman"), engine_bin
    if shutil.which("podman") is not None or shutil.which("docker") is None:
        return "podman", "podman"
    return "docker", "docker"


def _podman_facts(info: Mapping[str, object]) -> EngineFacts:
    host = _object(info.get("host"))
    rootless = bool(_object(host.get("security")).get("rootless"))
    default_runtime = str(_object(host.get("ociRuntime")).get("name") or "runc")
    # Podman's info names only the default runtime; the others are those containers.conf
    # configures or whose binary is where Podman looks by default.
    runtimes = {default_runtime, *installed_runtimes()}
    user = pwd.getpwuid(os.getuid()).pw_name if rootless else "containers"
    return EngineFacts(
        engine="podman",
        version=str(_object(info.get("version")).get("Version") or "unknown"),
        default_runtime=default_runtime,
        runtimes=frozenset(runtimes),
        user_namespace=all(_has_subid_range(Path(f), user) for f in SUBUID_FILES),
        rootless=rootless,
    )


def _docker_facts(info: Mapping[str, object]) -> EngineFacts:
    options = [str(o) for o in _each(info.get("SecurityOptions"))]
    userns = any("name=userns" in o for o in options)
    rootless = any("name=rootless" in o for o in options)
    remap: tuple[int, int] | None = None
    m = re.search(r"/(\d+)\.(\d+)/?$", str(info.get("DockerRootDir") or ""))
    if userns and m:
        remap = (int(m.group(1)), int(m.group(2)))
    return EngineFacts(
        engine="docker",
        version=str(info.get("ServerVersion") or "unknown"),
        default_runtime=str(info.get("DefaultRuntime") or "runc"),
        runtimes=frozenset(str(k) for k in _each(info.get("Runtimes"))),
        user_namespace=userns or rootless,
        rootless=rootless,
        remap=remap,
    )


def nvidia_cdi_specs() -> list[Path]:
    """The CDI spec files that declare NVIDIA GPUs (kind nvidia.com/gpu), for Podman."""
    found = []
    for directory in CDI_DIRS:
        try:
            paths = sorted(Path(directory).iterdir())
        except OSError:
            continue
        for path in paths:
            if path.suffix in (".yaml", ".yml", ".json"):
                try:
                    if "nvidia.com/gpu" in path.read_text(encoding="utf-8", errors="replace"):
                        found.append(path)
                except OSError:
                    continue
    return found


def gpu_plumbing_problem(engine: str, facts: EngineFacts) -> str | None:
    """Why the engine cannot give containers GPUs here, or None."""
    if engine == "podman":
        if nvidia_cdi_specs():
            return None
        return (
            f"Podman cannot give containers GPUs: no NVIDIA CDI spec in {' or '.join(CDI_DIRS)}; generate it "
            "(nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml, from the NVIDIA Container Toolkit)"
        )
    if "nvidia" in facts.runtimes or any(shutil.which(hook) for hook in NVIDIA_HOOKS):
        return None
    return "Docker cannot give containers GPUs: install the NVIDIA Container Toolkit (nvidia-container-toolkit)"


def installed_runtimes() -> set[str]:
    """The OCI runtimes Podman can use here besides its default: those containers.conf names
    whose binary exists, and runc, crun and runsc where Podman looks for them by default."""
    found = _containers_conf_runtimes()
    for name in ("runc", "crun", "runsc"):
        if shutil.which(name) or any(os.access(os.path.join(d, name), os.X_OK) for d in RUNTIME_DIRS):
            found.add(name)
    return found


def _containers_conf_runtimes() -> set[str]:
    """Runtimes named in ``[engine.runtimes]`` of containers.conf whose binary exists."""
    paths = [Path(p) for p in CONTAINERS_CONF]
    try:
        paths += sorted(Path(CONTAINERS_CONF_D).glob("*.conf"))
    except OSError:
        pass
    found: set[str] = set()
    for path in paths:
        try:
            conf = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        runtimes = (conf.get("engine") or {}).get("runtimes") or {}
        for name, candidates in runtimes.items():
            if isinstance(candidates, list) and any(os.access(str(c), os.X_OK) for c in candidates):
                found.add(str(name))
    return found


def _has_subid_range(path: Path, user: str) -> bool:
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[0] == user and fields[2].isdigit() and int(fields[2]) >= USERNS_SIZE:
                return True
    except OSError:
        pass
    return False


def _network_subnets_and_bridge(info: Mapping[str, object]) -> tuple[list[str], str | None]:
    """Subnets and bridge interface of a network, from Podman's or Docker's inspect."""
    if "subnets" in info or "network_interface" in info:  # Podman (netavark)
        subnets = [str(s.get("subnet")) for s in _each(info.get("subnets")) if isinstance(s, dict)]
        bridge = info.get("network_interface")
        return subnets, str(bridge) if bridge else None
    config = _each(_object(info.get("IPAM")).get("Config"))
    subnets = [str(c.get("Subnet")) for c in config if isinstance(c, dict)]
    options = _object(info.get("Options"))
    bridge = options.get("com.docker.network.bridge.name") or (
        f"br-{str(info.get('Id'))[:12]}" if info.get("Id") else None
    )
    return subnets, str(bridge) if bridge else None


def _resolv_conf_servers(path: Path) -> list[str]:
    servers = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                try:
                    if isinstance(ipaddress.ip_address(fields[1]), ipaddress.IPv4Address):
                        servers.append(fields[1])
                except ValueError:
                    continue
    except OSError:
        pass
    return servers


def _group_gid(group_file: str, name: str) -> int:
    for line in group_file.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    raise RunnerError(f"the image's group {name!r} is not in its /etc/group")


def _remove_tree(path: Path) -> None:
    """Remove a work directory and what the rental left in it, never following its links
    (``shutil.rmtree`` works through directory descriptors on Linux)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def _labels(info: Mapping[str, object]) -> dict[str, str]:
    labels = _object(info.get("Config")).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _running(info: Mapping[str, object]) -> bool:
    """Whether the container runs. Podman says Running false while a `stop` is under way (status
    "stopping", no exit code yet): that one still runs (its fence watcher may be stopping it)."""
    state = _object(info.get("State"))
    return bool(state.get("Running")) or state.get("Status") in ("restarting", "paused", "stopping")


def _message(stderr: str) -> str:
    """The engine's error, on one line and not too long for a lease event's detail."""
    text = " ".join(line for line in stderr.splitlines() if "failed to connect to syslog" not in line)
    text = " ".join(text.split())
    return text[-400:] if len(text) > 400 else text or "the engine gave no reason"


def _network_missing(stderr: str) -> bool:
    lowered = stderr.lower()
    return "network not found" in lowered or ("network" in lowered and "not found" in lowered)


def _exit_race(message: str) -> bool:
    """Podman read a container's /proc entries while its process was exiting ("read
    /proc/1234/cgroup: no such process"): the container is there, and asked again a moment
    later, Podman describes it as it now is."""
    return "/proc/" in message and "no such process" in message.lower()


def _no_such(message: str) -> bool:
    lowered = message.lower()
    return "no such container" in lowered or "no such object" in lowered


def _daemon_problem(stderr: str) -> str | None:
    """A sentence for a Docker that cannot be used at all; None for other failures."""
    if "Cannot connect to the Docker daemon" in stderr or "Is the docker daemon running" in stderr:
        return f"the Docker daemon is not running; start it (systemctl start docker). Docker said: {_message(stderr)}"
    if "permission denied" in stderr.lower() and "docker" in stderr.lower() and ".sock" in stderr:
        return (
            "the agent may not use Docker (permission denied on its socket); run the agent as root. "
            f"Docker said: {_message(stderr)}"
        )
    return None


def _json_list(text: str) -> list[dict[str, object]]:
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError("expected a list of objects")
    return data


# The engines' JSON, read field by field: a field that is missing or null reads as empty.


def _object(value: object) -> Mapping[str, object]:
    """A JSON object's fields; none for a missing (null) one. Raises TypeError for anything else."""
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a JSON object, not {type(value).__name__}")
    return value


def _each(value: object) -> Iterable[object]:
    """A JSON array's items (an object's keys); none for a missing (null) one."""
    if not value:
        return ()
    if not isinstance(value, Iterable):
        raise TypeError(f"{type(value).__name__!r} object is not iterable")
    return value


def _parse_engine_time(value: object) -> datetime | None:
    """RFC 3339 times with nanoseconds; the zero time means never."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", value)
    if not m:
        return None
    fraction = (m.group(2) or ".0")[:7]
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        parsed = datetime.fromisoformat(f"{m.group(1)}{fraction}{zone}")
    except ValueError:
        return None
    return parsed.astimezone(UTC)
