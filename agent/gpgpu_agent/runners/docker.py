"""The Docker runner: runs a lease as a container that sees only the leased GPUs.

It drives the ``docker`` command line (no SDK dependency), each call with a timeout. The
container of lease N is named ``gpgpu-lease-N`` and labelled ``gpgpu.lease_id=N`` and
``gpgpu.job_id=M``: the labels are its record, so after an agent restart ``adopt`` finds every
lease container again with ``docker ps -a --filter label=gpgpu.lease_id``, and the runner keeps
no files of its own.

What ``docker run`` is given, and why:

- ``--gpus "device=<uuid,…>"``: only the leased GPUs, by uuid (the quotes keep Docker's CSV
  parser from splitting the list), and ``-e NVIDIA_VISIBLE_DEVICES=<uuid,…>`` so an image's own
  ``NVIDIA_VISIBLE_DEVICES=all`` cannot widen it;
- ``--cpus``, ``--memory`` with ``--memory-swap`` equal to it (no swap on the owner's disk),
  ``--pids-limit``, ``--shm-size`` (PyTorch data loaders need more than Docker's 64 MB);
- ``--security-opt no-new-privileges`` and ``--cap-drop ALL``: a job has no capability at all,
  so jobs that need one (raw sockets, mounting, changing owners of others' files) are not
  supported;
- ``--init``: a small init as PID 1 forwards ``docker stop``'s SIGTERM and reaps zombies;
- ``--log-driver local`` with ``--log-opt max-size``: bounded logs that ``docker logs`` reads;
- never ``--privileged``, never the host's network, PID or IPC namespace, no volume or bind
  mount from the host, no devices other than the GPUs. The root filesystem stays writable (not
  ``--read-only``): jobs install packages and write outputs; whatever they write lives in the
  container's layer and is deleted with the container by ``forget``. The network is Docker's
  default bridge, so jobs can fetch data and upload results.

Exit codes are Docker's: the main process's status, 128+n when signal n ended it (137: SIGKILL,
also the out-of-memory killer), 125 for a container that was created but never started.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from gpgpu_agent.protocols import RunnerError
from gpgpu_agent.runners.common import EXIT_KILLED, UnknownLeaseError, check_env, check_gpu_uuids
from gpgpu_agent.runners.state import LOG_TAIL_BYTES, tail_text
from gpgpu_agent.types import LeaseSpec, RunState

log = logging.getLogger(__name__)

LABEL_LEASE = "gpgpu.lease_id"
LABEL_JOB = "gpgpu.job_id"
# A Docker image reference: repository, optional tag, optional digest. It may not start with "-"
# (it would be read as an option of `docker run`).
IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,499}$")
MEMORY_SIZE = re.compile(r"^[1-9][0-9]{0,15}[bkmgBKMG]?$")
# Variables the agent sets itself (they win over the job's env).
AGENT_ENV = ("NVIDIA_VISIBLE_DEVICES", "GPGPU_LEASE_ID", "GPGPU_JOB_ID")
# Variables that would ask the NVIDIA container runtime for more than the leased GPUs.
REFUSED_ENV = ("NVIDIA_MIG_CONFIG_DEVICES", "NVIDIA_MIG_MONITOR_DEVICES", "NVIDIA_IMEX_CHANNELS")
PROCESS_REFUSED = "the Docker runner runs container jobs only"
DOCKER_MISSING = "Docker is not installed here (no `{bin}` command found); install Docker to run container jobs"
EXIT_NEVER_STARTED = 125


def container_name(lease_id: int) -> str:
    return f"gpgpu-lease-{lease_id}"


def _host_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_limits() -> tuple[float, str]:
    """Limits when the provider sets none: all CPUs but one, three quarters of the memory."""
    cpus = float(max(1, (os.cpu_count() or 2) - 1))
    mem = _host_memory_bytes()
    memory = f"{max(256, mem * 3 // 4 // (1024 * 1024))}m" if mem else "4g"
    return cpus, memory


class DockerRunner:
    """Runs ``kind: "container"`` leases with the Docker CLI (see the module docstring).

    ``cpu_limit`` (CPUs, may be fractional) and ``memory_limit`` (Docker's size syntax: "16g",
    "512m") apply to every container; left out, ``default_limits()`` picks them. Each docker call
    has ``call_timeout_s``; ``docker run`` (which may pull the image) has ``run_timeout_s``.
    """

    def __init__(
        self,
        *,
        docker_bin: str = "docker",
        cpu_limit: float | None = None,
        memory_limit: str | None = None,
        pids_limit: int = 4096,
        shm_size: str = "1g",
        log_max_size: str = "20m",
        call_timeout_s: float = 30.0,
        run_timeout_s: float = 600.0,
        log_tail_lines: int = 2000,
        log_tail_bytes: int = LOG_TAIL_BYTES,
    ):
        default_cpus, default_memory = default_limits()
        self.docker_bin = docker_bin
        self.cpu_limit = default_cpus if cpu_limit is None else float(cpu_limit)
        self.memory_limit = default_memory if memory_limit is None else memory_limit
        if not (math.isfinite(self.cpu_limit) and self.cpu_limit > 0):
            raise ValueError(f"cpu_limit must be a positive number of CPUs, not {cpu_limit!r}")
        for name, value in (
            ("memory_limit", self.memory_limit),
            ("shm_size", shm_size),
            ("log_max_size", log_max_size),
        ):
            if not MEMORY_SIZE.match(value):
                raise ValueError(f"{name} must be a size such as 512m or 16g, not {value!r}")
        if pids_limit < 1:
            raise ValueError("pids_limit must be at least 1")
        self.pids_limit = int(pids_limit)
        self.shm_size = shm_size
        self.log_max_size = log_max_size
        self.call_timeout_s = call_timeout_s
        self.run_timeout_s = run_timeout_s
        self.log_tail_lines = log_tail_lines
        self.log_tail_bytes = log_tail_bytes

    # --- Runner protocol ------------------------------------------------------------------

    def start(self, spec: LeaseSpec, *, gpu_indexes: Mapping[str, int]) -> RunState:
        """``docker run -d`` the lease's container (pulling the image if needed; this call blocks
        meanwhile); a second call for the same lease returns the existing container's state.
        Raises RunnerError with Docker's own message when the image cannot be pulled or the
        container cannot start (the marketplace then hears failed_to_start)."""
        if spec.kind != "container":
            raise RunnerError(PROCESS_REFUSED)
        if not isinstance(spec.image, str) or not IMAGE_REF.match(spec.image):
            raise RunnerError(f"{spec.image!r} is not a Docker image reference")
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

        name = container_name(spec.lease_id)
        try:
            done = self._docker(self.run_args(spec), timeout=self.run_timeout_s)
        except RunnerError:
            self._remove_quietly(name)  # a timed-out run may still create the container
            raise
        if done.returncode != 0:
            message = _message(done.stderr)
            self._remove_quietly(name)  # created but not started: leave nothing behind
            if "could not select device driver" in message or "nvidia-container-cli" in message:
                raise RunnerError(
                    f"Docker cannot give containers GPUs here; install the NVIDIA Container Toolkit ({message})"
                )
            raise RunnerError(f"could not start the container: {message}")
        log.info("lease %s: started container %s from %s", spec.lease_id, name, spec.image)
        return self.poll(spec.lease_id)

    def poll(self, lease_id: int) -> RunState:
        """The container's state (``docker inspect``), host pids (``docker top``) and log tail
        (``docker logs --tail``). Raises UnknownLeaseError when there is no such container."""
        info = self._inspect(lease_id)
        if info is None:
            raise UnknownLeaseError(lease_id)
        return self._state(lease_id, info)

    def stop(self, lease_id: int, *, grace_s: float) -> RunState:
        """``docker stop -t <grace>``: SIGTERM to the container's main process, SIGKILL after the
        grace period (rounded up to whole seconds, as Docker counts it). Stopping an ended
        container returns its state."""
        info = self._inspect(lease_id)
        if info is None:
            raise UnknownLeaseError(lease_id)
        if not _running(info):
            return self._state(lease_id, info)
        grace = max(0, math.ceil(grace_s))
        name = container_name(lease_id)
        try:
            done = self._docker(["stop", "-t", str(grace), name], timeout=grace + self.call_timeout_s)
        except RunnerError:
            # The daemon did not finish the stop in time: insist once, then report what is known.
            self._docker(["kill", name], timeout=self.call_timeout_s)
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
        done = self._docker(
            [
                "ps",
                "-a",
                "--no-trunc",
                "--filter",
                f"label={LABEL_LEASE}",
                "--format",
                '{{.Names}}\t{{.Label "' + LABEL_LEASE + '"}}',
            ],
            timeout=self.call_timeout_s,
        )
        if done.returncode != 0:
            raise RunnerError(f"could not list the lease containers: {_message(done.stderr)}")
        states = []
        for line in done.stdout.splitlines():
            name, _, label = line.strip().partition("\t")
            # Only containers this runner named: a container someone else labelled is not ours.
            if not label.isdigit() or name != container_name(int(label)):
                continue
            try:
                states.append(self.poll(int(label)))
            except UnknownLeaseError:
                continue  # removed between the listing and the inspection
        return sorted(states, key=lambda s: s.lease_id)

    def forget(self, lease_id: int) -> None:
        """``docker rm`` the lease's ended container (its logs and written files go with it).
        Forgetting an unknown lease does nothing; a running one raises RunnerError."""
        done = self._docker(["rm", container_name(lease_id)], timeout=self.call_timeout_s)
        if done.returncode != 0:
            message = _message(done.stderr)
            if _no_such(message):
                return
            if "running" in message.lower():
                raise RunnerError(f"lease {lease_id} is still running; stop it before forgetting it")
            raise RunnerError(f"could not remove the container: {message}")

    # --- docker run -----------------------------------------------------------------------

    def run_args(self, spec: LeaseSpec) -> list[str]:
        """The ``docker run`` arguments for a lease (after the ``docker`` program name)."""
        uuids = ",".join(spec.gpu_uuids)
        env = {k: v for k, v in spec.env.items() if k not in AGENT_ENV}
        env.update(
            {"NVIDIA_VISIBLE_DEVICES": uuids, "GPGPU_LEASE_ID": str(spec.lease_id), "GPGPU_JOB_ID": str(spec.job_id)}
        )
        args = [
            "run",
            "--detach",
            "--name",
            container_name(spec.lease_id),
            "--label",
            f"{LABEL_LEASE}={spec.lease_id}",
            "--label",
            f"{LABEL_JOB}={spec.job_id}",
            "--gpus",
            f'"device={uuids}"',
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
            "--security-opt",
            "no-new-privileges",
            "--cap-drop",
            "ALL",
            "--init",
            "--restart",
            "no",
            "--log-driver",
            "local",
            "--log-opt",
            f"max-size={self.log_max_size}",
        ]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        # Options end at the image: the command's own arguments are never read as docker's.
        args.append(spec.image)
        args.extend(spec.command)
        return args

    # --- internals ------------------------------------------------------------------------

    def _docker(self, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run one docker command. Raises RunnerError when docker is missing, its daemon is down
        or unreachable, or it does not answer within ``timeout``; other failures are returned."""
        try:
            done = subprocess.run(  # noqa: S603 - argv, no shell
                [self.docker_bin, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise RunnerError(DOCKER_MISSING.format(bin=self.docker_bin)) from exc
        except PermissionError as exc:
            raise RunnerError(f"the agent may not run {self.docker_bin}: {exc.strerror}") from exc
        except subprocess.TimeoutExpired as exc:
            raise RunnerError(
                f"`docker {args[0]}` did not answer within {timeout:g} s; is the Docker daemon healthy?"
            ) from exc
        stdout = done.stdout.decode("utf-8", "replace")
        stderr = done.stderr.decode("utf-8", "replace")
        if done.returncode != 0:
            sentence = _daemon_problem(stderr)
            if sentence is not None:
                raise RunnerError(sentence)
        return subprocess.CompletedProcess(done.args, done.returncode, stdout, stderr)

    def _inspect(self, lease_id: int) -> dict[str, Any] | None:
        done = self._docker(["inspect", "--type", "container", container_name(lease_id)], timeout=self.call_timeout_s)
        if done.returncode != 0:
            message = _message(done.stderr)
            if _no_such(message):
                return None
            raise RunnerError(f"could not inspect the container: {message}")
        try:
            found = _json_list(done.stdout)
        except ValueError as exc:
            raise RunnerError(f"docker inspect answered something that is not JSON: {exc}") from exc
        return found[0] if found else None

    def _state(self, lease_id: int, info: Mapping[str, Any]) -> RunState:
        state = info.get("State") or {}
        running = _running(info)
        exit_code: int | None = None
        if not running:
            if state.get("Status") == "created":
                exit_code = EXIT_NEVER_STARTED
            elif state.get("OOMKilled"):
                exit_code = EXIT_KILLED
            else:
                exit_code = int(state.get("ExitCode") or 0)
        pids: tuple[int, ...] = ()
        if running:
            pids = self._host_pids(lease_id, state.get("Pid"))
        return RunState(
            lease_id=lease_id,
            running=running,
            exit_code=exit_code,
            pids=pids,
            started_at=_parse_docker_time(state.get("StartedAt")),
            log_tail=self._log_tail(lease_id),
        )

    def _host_pids(self, lease_id: int, main_pid: Any) -> tuple[int, ...]:
        """Host pids of every process in the container: `docker top` lists them (its ps runs on
        the host); the main pid from inspect is kept when top fails."""
        pids: set[int] = set()
        if isinstance(main_pid, int) and main_pid > 0:
            pids.add(main_pid)
        done = self._docker(["top", container_name(lease_id), "-eo", "pid"], timeout=self.call_timeout_s)
        if done.returncode == 0:
            for line in done.stdout.splitlines()[1:]:
                token = line.strip()
                if token.isdigit():
                    pids.add(int(token))
        return tuple(sorted(pids))

    def _log_tail(self, lease_id: int) -> str:
        try:
            done = subprocess.run(  # noqa: S603 - argv, no shell
                [self.docker_bin, "logs", "--tail", str(self.log_tail_lines), container_name(lease_id)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # the job's stderr comes out on docker's stderr
                timeout=self.call_timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return tail_text(done.stdout, self.log_tail_bytes) if done.returncode == 0 else ""

    def _remove_quietly(self, name: str) -> None:
        try:
            self._docker(["rm", "--force", name], timeout=self.call_timeout_s)
        except RunnerError as exc:
            log.warning("could not remove container %s: %s", name, exc)


def _running(info: Mapping[str, Any]) -> bool:
    state = info.get("State") or {}
    return bool(state.get("Running")) or state.get("Status") in ("restarting", "paused")


def _message(stderr: str) -> str:
    """Docker's error, on one line and not too long for a lease event's detail."""
    text = " ".join(stderr.split())
    return text[-400:] if len(text) > 400 else text or "docker gave no reason"


def _no_such(message: str) -> bool:
    return "No such container" in message or "No such object" in message


def _daemon_problem(stderr: str) -> str | None:
    """A sentence for a Docker that cannot be used at all; None for other failures."""
    if "Cannot connect to the Docker daemon" in stderr or "Is the docker daemon running" in stderr:
        return f"the Docker daemon is not running; start it (systemctl start docker). Docker said: {_message(stderr)}"
    if "permission denied" in stderr.lower() and "docker" in stderr.lower() and ".sock" in stderr:
        return (
            "the agent's user may not use Docker (permission denied on the Docker socket); add it to the "
            f"docker group. Docker said: {_message(stderr)}"
        )
    return None


def _json_list(text: str) -> list[dict[str, Any]]:
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError("expected a list of objects")
    return data


def _parse_docker_time(value: Any) -> datetime | None:
    """Docker's RFC 3339 times have nanoseconds; its zero time means never."""
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
