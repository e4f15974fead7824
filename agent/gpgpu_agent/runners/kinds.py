"""Which job kinds this machine accepts, and the runner of each (what the heartbeat's
``capabilities`` says, docs/agent-api.md).

- **Containers** are accepted by default on a real machine, when a container engine is found and
  can run them safely (``ContainerRunner.check``: the engine answers, and in the default
  ``filtered`` network mode the egress firewall is in place). Simulated machines run no
  containers.
- **Process jobs** are accepted only when the provider opts in (``allow_process_jobs = true``),
  and then only when the sandbox works: bubblewrap is installed and can create namespaces, the
  agent runs as root so that jobs run as the rental user (``gpgpu-agent setup`` creates it),
  and the agent may create the per-lease cgroups for their limits. The simulated machines of the
  demo, whose agent is not root, run the sandbox under the agent's own user and without cgroups
  when none can be made: a developer's own laptop, not an owner's machine.

A kind that is not accepted is refused with its reason, both in the heartbeat (so the matcher
never sends one) and in ``KindRunner.start`` (so an order that arrives anyway fails to start with
that sentence). Records of leases a runner left behind are still adopted after a restart even if
their kind is no longer accepted: they are stopped or finished, never orphaned.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from gpgpu_agent.config import SYSTEM_STATE_DIR, AgentConfig
from gpgpu_agent.protocols import AgentError, CapableRunner, OutputReader, RunnerError, Workspaces
from gpgpu_agent.runners.common import UnknownLeaseError
from gpgpu_agent.types import JOB_KINDS, LeaseSpec, OutputRead, RunState

if TYPE_CHECKING:
    from gpgpu_agent.runners.container import ContainerRunner
    from gpgpu_agent.runners.process import ProcessRunner

log = logging.getLogger(__name__)

KINDS = JOB_KINDS
PROCESS_OFF = "process jobs are off on this machine (allow_process_jobs = false)"
SIMULATED_NO_CONTAINERS = "a simulated machine runs process jobs only"
CONTAINERS_OFF = "container jobs are off on this machine (container_engine = none)"


def _may_hold(runner: CapableRunner, lease_id: int) -> bool:
    """Whether `runner` may hold the lease though it cannot be asked: it keeps a work directory
    of it (read from the disk, not its engine), or keeps none at all."""
    if not isinstance(runner, Workspaces):
        return True
    try:
        return runner.workspace(lease_id) is not None
    except (OSError, RunnerError):
        return True


class KindRunner:
    """Routes each lease to the runner of its kind (protocols.Runner) and refuses kinds this
    machine does not accept. ``runners`` may hold a runner for a kind that is not accepted: it
    then only adopts, watches and stops what an earlier run of the agent left."""

    def __init__(
        self,
        *,
        runners: Mapping[str, CapableRunner],
        accepts: set[str] | frozenset[str],
        refused: Mapping[str, str] | None = None,
    ) -> None:
        unknown = (set(runners) | set(accepts)) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown job kinds {sorted(unknown)}")
        missing = set(accepts) - set(runners)
        if missing:
            raise ValueError(f"no runner for accepted kinds {sorted(missing)}")
        self.runners = dict(runners)
        self.accepts = frozenset(accepts)
        self.refused = {k: v for k, v in (refused or {}).items() if k not in self.accepts}
        self._owner: dict[int, CapableRunner] = {}

    def capabilities(self) -> dict[str, object]:
        """The heartbeat's ``capabilities`` object."""
        out: dict[str, object] = {"kinds": [k for k in KINDS if k in self.accepts]}
        for kind in KINDS:
            runner = self.runners.get(kind) if kind in self.accepts else None
            out[kind] = runner.capabilities() if runner is not None else None
        if self.refused:
            out["refused"] = {k: v[:300] for k, v in self.refused.items()}
        return out

    def _of(self, lease_id: int) -> CapableRunner:
        runner = self._owner.get(lease_id)
        if runner is not None:
            return runner
        # Not started by this agent: ask each runner whose records it is. Only when every runner
        # answered that it has none is the lease unknown; one that could not answer may hold it:
        # one of an accepted kind, or one with a work directory of the lease. A runner of a kind
        # this machine refuses (its engine missing or broken, or not up yet at boot) with no work
        # directory of it does not: its errors kept every forgotten lease for ever, reported
        # running, on a machine whose engine never worked.
        failure: RunnerError | None = None
        for kind, candidate in self.runners.items():
            try:
                candidate.poll(lease_id)
            except UnknownLeaseError:
                continue
            except RunnerError as exc:
                if kind in self.accepts or _may_hold(candidate, lease_id):
                    failure = exc
                continue
            self._owner[lease_id] = candidate
            return candidate
        if failure is not None:
            raise failure
        raise UnknownLeaseError(lease_id)

    def start(
        self, spec: LeaseSpec, *, gpu_indexes: Mapping[str, int], gpu_minors: Mapping[str, int] | None = None
    ) -> RunState:
        if spec.kind not in self.accepts:
            raise RunnerError(self.refused.get(spec.kind) or f"this machine does not accept {spec.kind} jobs")
        runner = self.runners[spec.kind]
        self._owner[spec.lease_id] = runner
        return runner.start(spec, gpu_indexes=gpu_indexes, gpu_minors=gpu_minors)

    def poll(self, lease_id: int) -> RunState:
        return self._of(lease_id).poll(lease_id)

    def stop(self, lease_id: int, *, grace_s: float) -> RunState:
        return self._of(lease_id).stop(lease_id, grace_s=grace_s)

    def adopt(self) -> list[RunState]:
        states: list[RunState] = []
        for kind, runner in self.runners.items():
            try:
                found = runner.adopt()
            except RunnerError as exc:
                log.warning("could not look for %s leases left running: %s", kind, exc)
                continue
            for state in found:
                self._owner[state.lease_id] = runner
                states.append(state)
        return states

    def workspace(self, lease_id: int) -> Path | None:
        """The lease's runner's workspace (protocols.Workspaces); None when it has none."""
        try:
            runner = self._of(lease_id)
        except RunnerError:
            return None
        if not isinstance(runner, Workspaces):
            return None
        return runner.workspace(lease_id)

    def read_output(self, lease_id: int, *, offset: int, limit: int) -> OutputRead | None:
        """The lease's runner's read_output (protocols.OutputReader); None when it has none."""
        try:
            runner = self._of(lease_id)
        except RunnerError:
            return None
        if not isinstance(runner, OutputReader):
            return None
        return runner.read_output(lease_id, offset=offset, limit=limit)

    def forget(self, lease_id: int) -> None:
        try:
            runner = self._of(lease_id)
        except RunnerError:
            return
        runner.forget(lease_id)
        self._owner.pop(lease_id, None)


def build_runner(config: AgentConfig) -> KindRunner:
    """The KindRunner the config asks for, with each refused kind's reason (logged once)."""
    runners: dict[str, CapableRunner] = {}
    accepts: set[str] = set()
    refused: dict[str, str] = {}

    process, why = process_runner(config)
    if process is not None:
        runners["process"] = process
    if not config.allow_process_jobs:
        refused["process"] = PROCESS_OFF
    elif why is not None:
        refused["process"] = why
    else:
        accepts.add("process")

    if config.simulate:
        refused["container"] = SIMULATED_NO_CONTAINERS
    elif config.container_engine == "none":
        refused["container"] = CONTAINERS_OFF
    else:
        container, why = _container_runner(config)
        if container is not None:
            runners["container"] = container
        if why is not None:
            refused["container"] = why
        else:
            accepts.add("container")

    for kind, reason in refused.items():
        log.warning("not accepting %s jobs: %s", kind, reason)
    for kind in sorted(accepts):
        log.info("accepting %s jobs: %s", kind, runners[kind].capabilities())
    return KindRunner(runners=runners, accepts=accepts, refused=refused)


def process_runner(config: AgentConfig) -> tuple[ProcessRunner | None, str | None]:
    """(runner, None) when process jobs can run sandboxed here; (runner or None, why) otherwise.
    A runner is returned even when it may not start jobs, so leases left from before are adopted."""
    from gpgpu_agent.runners.cgroups import CgroupError, Cgroups, default_limits, group_name_for
    from gpgpu_agent.runners.process import ProcessRunner
    from gpgpu_agent.runners.sandbox import Bubblewrap, SandboxError, rental_user

    limits = default_limits(cpus=config.job_cpus, memory=config.job_memory, pids=config.job_pids)
    adopt_only = ProcessRunner(
        config.state_dir,
        sandbox=None,
        work_dir=config.rentals_path,
        fence_dir=config.fence_dir,
        fence_grace_s=config.stop_grace_s,
    )
    if not config.allow_process_jobs:
        return adopt_only, PROCESS_OFF
    try:
        sandbox = Bubblewrap()
        user = None
        if os.geteuid() == 0:
            user = rental_user(config.process_user)
        elif not config.simulate:
            return adopt_only, (
                "process jobs run as a dedicated user, so the agent must run as root (see `gpgpu-agent setup`)"
            )
        sandbox.probe(user)
    except SandboxError as exc:
        return adopt_only, str(exc)
    cgroups = None
    try:
        cgroups = Cgroups.detect(name=group_name_for(config.state_dir, system_state_dir=SYSTEM_STATE_DIR))
    except CgroupError as exc:
        if not config.simulate:
            return adopt_only, f"the jobs' CPU, memory and process limits cannot be set: {exc}"
        log.warning("simulation: process jobs run without CPU, memory and process limits (%s)", exc)
    runner = ProcessRunner(
        config.state_dir,
        sandbox=sandbox,
        user=user,
        cgroups=cgroups,
        limits=limits if cgroups is not None else None,
        work_dir=config.rentals_path,
        fence_dir=config.fence_dir,
        fence_grace_s=config.stop_grace_s,
    )
    try:
        runner.prepare()
    except RunnerError as exc:
        return adopt_only, str(exc)
    return runner, None


def _container_runner(config: AgentConfig) -> tuple[ContainerRunner | None, str | None]:
    from gpgpu_agent.runners.container import ContainerRunner

    try:
        runner = ContainerRunner(
            engine=config.container_engine,
            runtime=config.container_runtime,
            network=config.container_network,
            rentals_dir=config.rentals_path,
            cpu_limit=config.job_cpus,
            memory_limit=config.job_memory,
            pids_limit=config.job_pids,
            fence_dir=config.fence_dir,
            fence_grace_s=config.stop_grace_s,
        )
    except (AgentError, ValueError) as exc:
        return None, str(exc)
    try:
        runner.check()
    except AgentError as exc:
        return runner, str(exc)
    return runner, None
