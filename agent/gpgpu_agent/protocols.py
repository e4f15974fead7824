"""The seams between the agent's parts. Tests swap in fakes at each (FakeNvml beneath pynvml,
FakeTransport, a runner over short processes) and need no GPU, no network and no Docker."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from gpgpu_agent.types import HostSample, JsonObject, LeaseSpec, OutputRead, RunState


class Collector(Protocol):
    def sample(self) -> HostSample:
        """Read every GPU now. Never raises for a failing GPU or field (see GpuSample.errors)."""
        ...

    def close(self) -> None: ...


class Runner(Protocol):
    """Runs leased workloads in isolation on the leased GPUs only."""

    def start(
        self, spec: LeaseSpec, *, gpu_indexes: Mapping[str, int], gpu_minors: Mapping[str, int] | None = None
    ) -> RunState:
        """Start the lease's workload; idempotent by lease_id (a second call returns the state of
        the first). `gpu_indexes`: each leased GPU's index (by uuid); `gpu_minors`: its device
        minor number (/dev/nvidia<minor>) where known, for runners that expose the device nodes
        themselves (the others ignore it). Raises RunnerError with a sentence for the marketplace
        when it cannot start."""
        ...

    def poll(self, lease_id: int) -> RunState: ...

    def stop(self, lease_id: int, *, grace_s: float) -> RunState:
        """SIGTERM (or `docker stop -t grace`), wait up to grace_s, then SIGKILL; returns the
        final state. Stopping a stopped workload returns its state."""
        ...

    def adopt(self) -> list[RunState]:
        """After an agent restart: the workloads still running (found by pid files or container
        labels), taken back under management rather than orphaned or killed."""
        ...

    def forget(self, lease_id: int) -> None:
        """Drop local records of a finished lease (pid files, stopped containers)."""
        ...


@runtime_checkable
class Workspaces(Protocol):
    """A runner that can say where a lease's work directory (the job's /work) is on this host."""

    def workspace(self, lease_id: int) -> Path | None:
        """The host path of the lease's work directory; None when this runner has no record of it."""
        ...


@runtime_checkable
class OutputReader(Protocol):
    """A runner that can read a lease's output as it is written (for the job's live logs)."""

    def read_output(self, lease_id: int, *, offset: int, limit: int) -> OutputRead | None:
        """At most `limit` bytes of the lease's output from position `offset` (a position an
        earlier read returned, or 0), and the position after them; None when this lease's
        output cannot be read as it runs. Only reads what the workload wrote: never waits for
        it, never slows it."""
        ...


class CapableRunner(Runner, Protocol):
    """A Runner that says how it isolates the jobs it runs (the heartbeat's `capabilities`)."""

    def capabilities(self) -> Mapping[str, object]: ...


class Transport(Protocol):
    """The agent API over HTTP (docs/agent-api.md). Raises TransportUnavailable for what a retry
    may cure (connection refused, timeout, 5xx, 429) and Rejected for a 4xx answer."""

    def register(self, body: Mapping[str, object]) -> JsonObject: ...

    def heartbeat(self, body: Mapping[str, object]) -> JsonObject: ...

    def lease_event(self, lease_id: int, body: Mapping[str, object]) -> JsonObject: ...

    def lease_usage(self, lease_id: int, body: Mapping[str, object]) -> JsonObject: ...

    def lease_log(self, lease_id: int, body: Mapping[str, object]) -> JsonObject:
        """One chunk of the lease's output (POST leases/{id}/logs); a repeated seq is a duplicate."""
        ...

    def orders_wait(self, body: Mapping[str, object]) -> JsonObject:
        """The doorbell (POST orders/wait): held up to body["wait_s"] until the machine has a new
        order; answers {"orders": bool, "wait_s": how long the marketplace holds these calls}."""


class CheckpointTransfer(Protocol):
    """Moves a job's checkpoint archive to and from its store (docs/agent-api.md, "Checkpoints").
    A URL without a scheme is the agent API's own (sent with the machine's credential); an
    absolute one (a store's pre-signed URL) is fetched without it. Raises TransportUnavailable
    or Rejected as Transport does, and CheckpointError for bytes that are not the ones named."""

    def checkpoint_download(self, url: str, dest: Path, *, size: int, sha256: str, max_bytes: int) -> None:
        """Write the archive at `url` to `dest` (0600), refusing more than `max_bytes`, another
        size than `size` or another SHA-256 than `sha256` (nothing is left at `dest` then)."""
        ...

    def checkpoint_upload(self, url: str, path: Path, *, size: int, sha256: str, direct: bool = False) -> None:
        """PUT the archive `path` (`size` bytes, SHA-256 `sha256`) to `url`; `direct`: to the store
        by a pre-signed PUT that `{url}/upload` gives, then commit it at `{url}/commit`."""
        ...


class AgentError(Exception):
    """Base of the agent's own errors: each carries a sentence a provider can act on."""


class RunnerError(AgentError):
    pass


class TransportUnavailable(AgentError):
    """A retry may cure it. `retry_after_s`: how long the marketplace asked the agent to wait
    (its Retry-After header), None when it did not say."""

    def __init__(self, message: str = "", *, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Rejected(AgentError):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
