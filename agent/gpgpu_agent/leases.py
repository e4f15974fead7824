"""The leases this machine runs: started on the marketplace's orders, stopped on its request, for
the owner (reclaim) or at their maximum duration, and their usage accounted.

LeaseTracker owns every TrackedLease and is the only one to start, poll or stop workloads
(through the runner). It never talks to the marketplace: every event and usage report goes to
the outbox (the spool) first, write-ahead, and the daemon's network loop sends it from there.
Its state (the leases it runs, those it is done with) is persisted in `<state_dir>/leases.json`,
so a restarted agent adopts the workloads still running and bills them from where the last one
stopped.

The daemon's poll loop drives it, one thread, each poll in this order:

    states = tracker.poll()                    # the runner's view of every lease
    tracker.rental_pids(states)                # which pids on which GPU are the rentals'
    tracker.enforce(states, gpus, ...)         # reclaim for the owner, max duration, exits
    tracker.start(order, gpus, ...) / tracker.stop(order)   # the marketplace's orders
    tracker.account_usage()                    # a usage report per lease every interval
    tracker.ship_output()                      # what each job wrote since, as log chunks

and `adopt()` once at start, `flush()` at shutdown, `stop_all()` when the credential is revoked.

Times: a lease's end is reported when its workload ended, as recorded where it ran (its
supervisor's exit file, the container engine's FinishedAt: RunState.ended_at), never when the
agent happened to notice, so a workload that ended while the agent was stopped is billed to its
real end; its last usage report is cut there too. Only a reclaim ends billing earlier: at the
moment the owner was seen. A periodic usage report ends no later than the last poll that saw the
workload running, so an agent held up between its poll and its report never bills the hold-up.

Fencing (gpgpu_agent.fencing): the tracker arms each lease's deadline before it starts the
workload and removes it once the lease's records are forgotten; the daemon renews the deadlines
after each heartbeat. A workload its watchdog stopped (RunState.fenced_at) is reported `exited`
at its recorded end, with its recorded exit code and a detail that starts `fenced:`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypedDict

from gpgpu_agent import checkpoint, logship
from gpgpu_agent.checkpoint import CheckpointError, relative_parts
from gpgpu_agent.fencing import Fence
from gpgpu_agent.idle import unlisted_processes
from gpgpu_agent.metrics import AgentMetrics
from gpgpu_agent.protocol import (
    EVENT_EXITED,
    EVENT_FAILED_TO_START,
    EVENT_PREEMPTED_BY_OWNER,
    EVENT_STARTED,
    STOP_SAVE_CHECKPOINT,
    UsageStruct,
)
from gpgpu_agent.protocols import (
    CheckpointTransfer,
    OutputReader,
    Rejected,
    Runner,
    RunnerError,
    TransportUnavailable,
    Workspaces,
)
from gpgpu_agent.runners.common import UnknownLeaseError
from gpgpu_agent.spool import LogCursor, Spool, SpoolError, SpoolFull
from gpgpu_agent.types import JOB_KINDS, CheckpointSpec, GpuSample, GpuVerdict, JobKind, LeaseSpec, RunState, json_int

logger = logging.getLogger("gpgpu_agent")

LOG_TAIL_CHARS = 16 * 1024  # the API takes 64 KiB; the last 16 KiB tell the story
TIMEOUT_EXIT_CODE = 124  # what timeout(1) returns for a command it killed
REDACTED = "[redacted]"
# A leased GPU whose process lists could not be read this long on end is given back to its owner.
BLIND_RECLAIM_S = 5.0
_DONE_KEPT = 1000  # leases remembered as done (a repeated `start` for them is ignored)
# A checkpoint upload the marketplace could not take (unreachable, 5xx) is tried this many times,
# a second, then two, apart: the poll loop waits meanwhile, but the rentals are already stopped.
CHECKPOINT_UPLOAD_ATTEMPTS = 3
# Stop reasons after which the job does not run again (or the marketplace does not know the
# lease): its checkpoint is not uploaded, unless the stop order asks for it
# (protocol.STOP_SAVE_CHECKPOINT: a renter's cancel that keeps the checkpoint).
_NO_CHECKPOINT_STOPS = frozenset({"cancelled", "max_duration", "unknown_lease", "succeeded", "failed"})

UsageSigner = Callable[[UsageStruct], str]


# --- times and files ------------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: object) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def write_private_json(path: Path, data: object) -> None:
    """Write JSON atomically with mode 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _whole_second(at: datetime) -> datetime:
    return at.replace(microsecond=0)


# --- what lease tracking reads --------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """The owner's schedule from the last heartbeat reply (open with no end until told)."""

    available_now: bool = True
    available_until: datetime | None = None

    def open_at(self, now: datetime) -> bool:
        return self.available_now and (self.available_until is None or now < self.available_until)

    @classmethod
    def from_reply(cls, data: object) -> Schedule:
        if not isinstance(data, Mapping):
            return cls()
        return cls(
            available_now=bool(data.get("available_now", True)),
            available_until=None if data.get("indefinitely") else parse_time(data.get("available_until")),
        )


@dataclass(frozen=True)
class GpuView:
    """What one poll saw of the GPUs, as lease tracking needs it: each GPU by uuid, the pids on
    each GPU that belong to no rental of it (the owner's, see idle.foreign_processes), and the
    idle detector's verdict on each GPU from the same sample (empty: not judged)."""

    by_uuid: Mapping[str, GpuSample]
    foreign: Mapping[str, list[int]]
    verdicts: Mapping[str, GpuVerdict] = field(default_factory=dict)


class LeaseReport(TypedDict):
    """One lease in the heartbeat's `leases` (docs/agent-api.md)."""

    lease_id: int
    state: Literal["starting", "running", "stopping"]


@dataclass
class TrackedLease:
    """A lease this machine runs, with what its usage reports need."""

    lease_id: int
    gpu_uuids: tuple[str, ...]
    max_duration_s: float
    started_at: datetime
    # The start of the next usage period (whole seconds), persisted so a restart loses nothing.
    usage_from: datetime
    # Utilisation and memory samples since usage_from.
    util_samples: list[float] = field(default_factory=list)
    peak_memory_mb: int | None = None
    # Why the agent is ending it: "preempted_by_owner", "stopped:<reason>", "timeout".
    ending: str | None = None
    job_id: int = 0
    # The job's checkpoint directory and where to upload it (None: the job keeps none), and its
    # promised checkpoint interval.
    checkpoint: CheckpointSpec | None = None
    checkpoint_interval_s: int | None = None
    # The marketplace's stop order asked for the checkpoint whatever its reason (a renter's cancel
    # that keeps it): protocol.STOP_SAVE_CHECKPOINT.
    save_checkpoint: bool = False
    # The last poll that found its workload running: when that poll began (not persisted). A
    # usage period never ends later than this (see LeaseTracker.account_usage).
    running_seen_at: datetime | None = None
    # From the record saved before its start, adopted while its runner could not be asked: its
    # workload may never have started. Until the runner answers for it, a runner that knows no
    # such workload drops it quietly (the marketplace's next start order starts it).
    unconfirmed: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "lease_id": self.lease_id,
            "gpu_uuids": list(self.gpu_uuids),
            "max_duration_s": self.max_duration_s,
            "started_at": iso(self.started_at),
            "usage_from": iso(self.usage_from),
            "job_id": self.job_id,
            "checkpoint": asdict(self.checkpoint) if self.checkpoint is not None else None,
            "checkpoint_interval_s": self.checkpoint_interval_s,
            "unconfirmed": self.unconfirmed,
        }

    @classmethod
    def from_json(cls, data: object) -> TrackedLease:
        """Raises KeyError, TypeError or ValueError (CheckpointError) for a record that is not one."""
        if not isinstance(data, Mapping):
            raise TypeError("a lease record is an object")
        started = parse_time(data["started_at"]) or utc_now()
        return cls(
            lease_id=int(data["lease_id"]),
            gpu_uuids=tuple(str(u) for u in data["gpu_uuids"]),
            max_duration_s=float(data["max_duration_s"]),
            started_at=started,
            usage_from=parse_time(data.get("usage_from")) or started,
            job_id=json_int(data.get("job_id") or 0),
            checkpoint=_checkpoint_spec(data.get("checkpoint")),
            checkpoint_interval_s=_optional_int(data.get("checkpoint_interval_s")),
            unconfirmed=data.get("unconfirmed") is True,
        )


# --- the tracker ------------------------------------------------------------------------------


class LeaseTracker:
    """Starts, watches, stops and bills the leases this machine runs (module docstring).

    `runner` runs the workloads; `outbox` receives every event and usage report; `sign` signs a
    usage report; `state_dir` holds leases.json. `stop_grace_s` is SIGTERM to SIGKILL when a
    lease is stopped; `usage_interval_s` the length of a usage period; `secrets` never leave
    the machine in an event's text or a log chunk (see scrub_secrets); `fence` holds the leases'
    deadlines (None: leases are not fenced); `log_max_bytes` caps the output shipped per lease
    (0: none is shipped live; gpgpu_agent.logship); `checkpoints` moves jobs' checkpoints (None:
    a job's checkpoint is neither restored nor saved). Driven from one thread.

    Checkpoints are the one exception to "never talks to the marketplace": a lease's archive is
    fetched before its workload starts, and uploaded after its workload is stopped and before
    its end event is queued, so the job is back in the queue only once its checkpoint is stored
    (its next lease, on any machine, restores it). Both block the poll loop for their transfer;
    the rental's GPUs are already given back when the upload runs."""

    def __init__(
        self,
        *,
        runner: Runner,
        outbox: Spool,
        sign: UsageSigner,
        state_dir: Path,
        stop_grace_s: float = 5.0,
        usage_interval_s: float = 60.0,
        clock: Callable[[], datetime] = utc_now,
        secrets: tuple[str, ...] = (),
        fence: Fence | None = None,
        log_max_bytes: int = logship.DEFAULT_MAX_BYTES,
        metrics: AgentMetrics | None = None,
        checkpoints: CheckpointTransfer | None = None,
    ) -> None:
        self.runner = runner
        self.checkpoints = checkpoints
        # Waits between checkpoint upload attempts (tests make it instant).
        self.pause: Callable[[float], None] = time.sleep
        # The machine's predicted idle time from the last heartbeat reply and when it came
        # (time.monotonic()); set by the daemon's network loop, read here (one tuple, swapped whole).
        self.forecast: tuple[int | None, float] = (None, time.monotonic())
        # The forecast each lease's status file was last written with.
        self._status_of: dict[int, tuple[int | None, float]] = {}
        self.metrics = metrics or AgentMetrics()
        self.log_max_bytes = log_max_bytes
        # Each lease's read position, as the spool last recorded it.
        self._log_cursors: dict[int, LogCursor] = {}
        self._log_full_warned: set[int] = set()
        # When each lease's last chunk was queued (time.monotonic()), and the machine's budget of
        # chunks (logship.CHUNKS_PER_S, up to CHUNKS_BURST), refilled as time passes.
        self._log_shipped_at: dict[int, float] = {}
        self._log_budget = float(logship.CHUNKS_BURST)
        self._log_budget_at = time.monotonic()
        self.fence = fence
        self.outbox = outbox
        self.sign = sign
        self.state_dir = Path(state_dir)
        self.stop_grace_s = stop_grace_s
        self.usage_interval_s = usage_interval_s
        self.clock = clock
        self.secrets = secrets
        self.leases: dict[int, TrackedLease] = {}
        # Leases already run here (ended, refused or stopped): a repeated `start` is ignored.
        self.done: set[int] = set()
        # The lease being started now (the runner may pull an image for minutes meanwhile): the
        # daemon renews its deadline although no heartbeat has reported it yet.
        self.starting: int | None = None
        # Its record (GPUs, maximum), saved before the runner starts it: an agent that dies
        # between the runner's start and the lease's own record adopts the workload with it.
        self._starting_record: TrackedLease | None = None
        # Why the owner's GPU was reclaimed, for a lease whose stop failed and is tried again.
        self._reclaim_why: dict[int, str] = {}
        # Leased GPU uuid -> since when its process lists could not be read (_owner_back); a start
        # drops its GPUs' entries.
        self._blind_since: dict[str, datetime] = {}
        self._next_usage = time.monotonic() + usage_interval_s
        self._load()

    # -- persisted state ---------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.state_dir / "leases.json"

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        for item in data.get("leases", []):
            try:
                lease = TrackedLease.from_json(item)
            except (KeyError, TypeError, ValueError, CheckpointError):
                continue
            self.leases[lease.lease_id] = lease
        self.done.update(int(x) for x in data.get("done", [])[-_DONE_KEPT:])
        try:
            self._starting_record = TrackedLease.from_json(data["starting"]) if data.get("starting") else None
        except (KeyError, TypeError, ValueError, CheckpointError):
            self._starting_record = None

    def save(self) -> None:
        data: dict[str, object] = {
            "leases": [lease.to_json() for lease in self.leases.values()],
            "done": sorted(self.done)[-_DONE_KEPT:],
        }
        if self._starting_record is not None:
            data["starting"] = self._starting_record.to_json()
        write_private_json(self.path, data)

    def reports(self) -> list[LeaseReport]:
        """Every lease, for the heartbeat: running, or stopping (the agent is ending it)."""
        return [
            {"lease_id": lease.lease_id, "state": "running" if lease.ending is None else "stopping"}
            for lease in self.leases.values()
        ]

    # -- lifecycle -----------------------------------------------------------------------------

    def adopt(self) -> None:
        """Take back the workloads still running from before a restart, and report those that
        ended while the agent was away (their exit codes and end times come from the runner's
        records). A running one without a fence deadline (left by an agent without fencing) gets
        one, from now."""
        now = self.clock()
        adopted = {state.lease_id: state for state in self.runner.adopt()}
        for lease_id, state in adopted.items():
            lease = self.leases.get(lease_id)
            started = state.started_at or now
            if lease is None and self._starting_record is not None and self._starting_record.lease_id == lease_id:
                # The agent died between the runner's start and the lease's record: the record
                # saved before the start gives it its GPUs (reclaimed for their owner) and maximum.
                lease = replace(self._starting_record, started_at=started, usage_from=_whole_second(started))
                self.leases[lease_id] = lease
                logger.warning("lease %s: adopted from the record saved before its start", lease_id)
            elif lease is None:
                # No record of its GPUs (left by an agent from before starting records were
                # saved): keep it reporting; the marketplace's reply tells whether it still wants it.
                lease = TrackedLease(
                    lease_id=lease_id,
                    gpu_uuids=(),
                    max_duration_s=math.inf,
                    started_at=started,
                    usage_from=_whole_second(started),
                )
                self.leases[lease_id] = lease
            if state.running:
                logger.info("lease %s: adopted its workload, still running (pids %s)", lease_id, list(state.pids))
                if self.fence is not None and not self.fence.armed(lease_id):
                    self._arm(lease_id)
            else:
                self._finish(lease, state, at=now)
        record, self._starting_record = self._starting_record, None
        if record is not None and record.lease_id not in self.leases:
            # Not adopted: its workload never started, or its runner could not be asked (an
            # engine not up yet), which the polls below tell apart.
            self.leases[record.lease_id] = replace(record, unconfirmed=True)
        for lease_id in [lease_id for lease_id in self.leases if lease_id not in adopted]:
            lease = self.leases[lease_id]
            try:
                self.runner.poll(lease_id)
                lease.unconfirmed = False
            except UnknownLeaseError:
                if lease.unconfirmed:
                    self._never_started(lease)
                else:
                    self._vanished(lease, why="no runner record of it is left")
            except RunnerError as exc:
                # Its runner could not be asked (an engine not up yet): kept, fenced, asked again
                # by the polls.
                logger.warning("lease %s: could not look for its workload (%s); asking again", lease_id, exc)
        self.save()

    def stop_all(self, *, reason: str) -> None:
        """Stop every rental (SIGTERM, grace, SIGKILL) and forget it: after a revocation nothing
        may keep running in this machine's name. `reason` is for the log."""
        for lease_id in list(self.leases):
            try:
                self.runner.stop(lease_id, grace_s=self.stop_grace_s)
                self.runner.forget(lease_id)
            except Exception as exc:
                logger.warning("lease %s: could not stop it: %s", lease_id, exc)
            else:
                self._disarm(lease_id)
                self._forget_output(lease_id)
            del self.leases[lease_id]
            self.done.add(lease_id)
            logger.info("lease %s: stopped (%s)", lease_id, reason)
        self.save()

    def flush(self, *, until: datetime) -> None:
        """A last usage report per running lease (so the next agent continues from `until`),
        and the state file. The rentals keep running."""
        for lease in list(self.leases.values()):
            seen = lease.running_seen_at
            self._queue_usage(lease, until=until if seen is None else min(until, seen))
        self.save()

    # -- one poll ------------------------------------------------------------------------------

    def poll(self) -> dict[int, RunState]:
        """The runner's state of every lease; a lease whose records are gone is forgotten. A lease
        the runner could not be asked about (its engine timed out or is restarting) has no state
        this poll and stays tracked, its fence armed: its workload may well be running. Forgotten
        on any error, it ran on untracked and unfenced, never reclaimed for the owner nor
        reported, while the marketplace placed its job again elsewhere."""
        states: dict[int, RunState] = {}
        for lease_id in list(self.leases):
            asked_at = self.clock()
            lease = self.leases[lease_id]
            try:
                states[lease_id] = self.runner.poll(lease_id)
                if states[lease_id].running:
                    lease.running_seen_at = asked_at
                if lease.unconfirmed:
                    lease.unconfirmed = False
                    self.save()
            except UnknownLeaseError as exc:  # its records are gone: nothing left to watch
                if lease.unconfirmed:
                    self._never_started(lease)
                else:
                    self._vanished(lease, why=str(exc))
            except RunnerError as exc:
                logger.warning("lease %s: could not read its state (%s); asking again at the next poll", lease_id, exc)
        return states

    def rental_pids(self, states: Mapping[int, RunState]) -> dict[str, set[int]]:
        """GPU uuid → the host pids of the rentals running on it."""
        rental_pids: dict[str, set[int]] = {}
        for lease_id, lease in self.leases.items():
            state = states.get(lease_id)
            if state is None:
                continue  # not read this poll: its GPUs show its processes as not the rentals'
            for uuid in lease.gpu_uuids:
                rental_pids.setdefault(uuid, set()).update(state.pids if state.running else ())
        return rental_pids

    def enforce(self, states: dict[int, RunState], gpus: GpuView, *, schedule_open: bool, now: datetime) -> None:
        """Reclaim leased GPUs the owner came back to (or whose schedule closed), stop leases past
        their maximum duration, measure the others, and report the leases that ended. `states`
        is this poll's (see poll()); a stopped lease's entry is replaced by its final state."""
        # Reclaim first: it is the owner's GPU. Every rental the owner came back to is stopped
        # before any is reported, so that saving one's checkpoint never holds up another's stop.
        reclaimed: list[tuple[TrackedLease, RunState, str]] = []
        for lease_id, lease in list(self.leases.items()):
            state = states.get(lease_id)
            if state is None or not state.running:
                continue
            if lease.ending is not None:
                # Still running though it is ending: its stop failed (the runner did not answer).
                # Asked again at every poll; skipped, it ran on for good, the owner's GPU with it.
                states[lease_id] = stopped if (stopped := self._stop(lease)) is not None else state
                continue
            why = self._owner_back(lease, gpus, schedule_open, now)
            if why is not None:
                stopped = self._reclaim(lease, why=why)
                if stopped is None:
                    self._reclaim_why[lease_id] = why  # for its report, once a later poll stops it
                    continue  # tried again at the next poll
                reclaimed.append((lease, stopped, why))
            elif (now - lease.started_at).total_seconds() > lease.max_duration_s:
                logger.info("lease %s: past its max duration; stopping it", lease_id)
                lease.ending = "timeout"
                states[lease_id] = stopped if (stopped := self._stop(lease)) is not None else state
        for lease, state, why in reclaimed:
            self._finish(lease, state, at=now, detail=why)  # reported and forgotten

        # Measure and notice exits.
        for lease_id, lease in list(self.leases.items()):
            state = states.get(lease_id)
            if state is None:
                continue
            self._measure(lease, gpus.by_uuid)
            if not state.running:
                self._finish(lease, state, at=now, detail=self._reclaim_why.pop(lease_id, ""))

    def account_usage(self) -> None:
        """Every `usage_interval_s`: spool a usage report per lease for the period since its last,
        ending when a poll last found the workload running. An agent held up between its poll
        and this (paused, swapping, starved of CPU) would otherwise bill its renter for the
        hold-up though the workload had ended meanwhile (its fence watchdog, a crash); the next
        period, or the end's own report, starts where this one ended, so nothing is lost."""
        if time.monotonic() >= self._next_usage:
            self._next_usage = time.monotonic() + self.usage_interval_s
            for lease in list(self.leases.values()):
                self._queue_usage(lease, until=self._seen_running_until(lease))
            self.save()

    def _seen_running_until(self, lease: TrackedLease) -> datetime:
        now = self.clock()
        return now if lease.running_seen_at is None else min(now, lease.running_seen_at)

    def ship_output(self) -> None:
        """Queue what each running lease's workload wrote since the last poll, as log chunks
        (gpgpu_agent.logship): at most READS_PER_POLL reads of READ_BYTES per lease, and
        CHUNKS_PER_S for the whole machine (what is not read now is read at a later poll)."""
        now = time.monotonic()
        self._log_budget = min(
            float(logship.CHUNKS_BURST), self._log_budget + (now - self._log_budget_at) * logship.CHUNKS_PER_S
        )
        self._log_budget_at = now
        for lease in list(self.leases.values()):
            self._ship_output(lease, final=False)

    def _ship_output(self, lease: TrackedLease, *, final: bool) -> None:
        """Read and queue the lease's new output, at most one short chunk per MIN_INTERVAL_S (a
        full read ships at once); `final` (its workload ended): read to the end
        (within the cap, and at most FINAL_BYTES more, so that a job's last burst cannot hold up
        the poll loop) and hold nothing back. A full spool leaves the rest unread for a later
        poll (or, when final, unshipped: the tail still comes with the event)."""
        if self.log_max_bytes <= 0 or not isinstance(self.runner, OutputReader):
            return
        lease_id = lease.lease_id
        cursor = self._log_cursors.get(lease_id) or self.outbox.log_cursor(lease_id)
        cap = min(self.log_max_bytes, cursor.shipped + logship.FINAL_BYTES) if final else self.log_max_bytes
        notice = logship.truncation_notice(self.log_max_bytes, ending=cap < self.log_max_bytes)
        reads = 0
        while cursor.shipped < cap and (final or (reads < logship.READS_PER_POLL and self._log_budget >= 1)):
            reads += 1
            room = cap - cursor.shipped
            try:
                got = self.runner.read_output(lease_id, offset=cursor.offset, limit=min(logship.READ_BYTES, room + 1))
            except (OSError, RunnerError) as exc:
                logger.warning("lease %s: could not read its output: %s", lease_id, exc)
                return
            if got is None or (not got.data and not (final and cursor.carry)):
                return
            recent = time.monotonic() - self._log_shipped_at.get(lease_id, -math.inf) < logship.MIN_INTERVAL_S
            if not final and recent and len(got.data) < logship.READ_BYTES:
                return  # a trickle: read again at a later poll, one chunk per MIN_INTERVAL_S
            over = len(got.data) > room
            taken = got.data[:room] if over else got.data
            # At the cap, what could be the start of a secret is held back and never shipped.
            text, held = logship.cut_output(cursor.carry + taken, secrets=self.secrets, final=final and not over)
            text = scrub_secrets(text, self.secrets)
            if over:
                text, held = text + notice, b""
            after = LogCursor(
                offset=got.next_offset,
                seq=cursor.seq + (1 if text else 0),
                shipped=self.log_max_bytes if over else cursor.shipped + len(taken),
                carry=held,
            )
            try:
                if text:
                    body: dict[str, object] = {
                        "seq": cursor.seq,
                        "at": iso(self.clock()),
                        "text": text,
                        "truncated": over,
                    }
                    self.outbox.put_log(lease_id, body, cursor=after)
                else:
                    self.outbox.log_cursor_set(lease_id, after)
            except SpoolFull as exc:
                if lease_id not in self._log_full_warned:
                    self._log_full_warned.add(lease_id)
                    logger.warning("lease %s: %s", lease_id, exc)
                return
            except SpoolError as exc:
                logger.warning("lease %s: could not queue its output: %s", lease_id, exc)
                return
            self._log_full_warned.discard(lease_id)
            self._log_cursors[lease_id] = cursor = after
            if text:
                self._log_shipped_at[lease_id] = time.monotonic()
                self._log_budget -= 1
            if len(got.data) < min(logship.READ_BYTES, room + 1) and not (final and cursor.carry):
                return  # read all there is for now

    def _forget_output(self, lease_id: int) -> None:
        self._log_cursors.pop(lease_id, None)
        self._log_shipped_at.pop(lease_id, None)
        self._log_full_warned.discard(lease_id)
        try:
            self.outbox.log_cursor_forget(lease_id)
        except SpoolError as exc:
            logger.warning("lease %s: could not drop its output's read position: %s", lease_id, exc)

    def _owner_back(self, lease: TrackedLease, gpus: GpuView, schedule_open: bool, now: datetime) -> str | None:
        """Why the owner gets the lease's GPUs back now, or None. A GPU whose processes could not
        be listed for BLIND_RECLAIM_S on end is given back too: the owner's return could not be
        seen there (the utilisation is the renter's), and the owner waiting is the worse mistake."""
        if not schedule_open:
            return "the owner's availability window has closed"
        for uuid in lease.gpu_uuids:
            gpu = gpus.by_uuid.get(uuid)
            if gpu is not None and gpus.foreign.get(uuid):
                return f"owner process {', '.join(map(str, gpus.foreign[uuid]))} appeared on GPU {gpu.index}"
        for uuid in lease.gpu_uuids:
            gpu = gpus.by_uuid.get(uuid)
            unlisted = unlisted_processes(gpu) if gpu is not None else []
            if gpu is None or not unlisted:
                self._blind_since.pop(uuid, None)
                continue
            since = self._blind_since.setdefault(uuid, now)
            if (now - since).total_seconds() >= BLIND_RECLAIM_S:
                return (
                    f"the owner's processes could not be seen on GPU {gpu.index} for "
                    f"{(now - since).total_seconds():.0f} s ({'; '.join(unlisted)})"
                )
        return None

    def _stop(self, lease: TrackedLease) -> RunState | None:
        """Stop the rental (SIGTERM, grace, SIGKILL): its final state, or None when the runner
        failed to stop it (the lease stays ending, and enforce asks again at the next poll)."""
        try:
            return self.runner.stop(lease.lease_id, grace_s=self.stop_grace_s)
        except RunnerError as exc:
            logger.warning("lease %s: could not stop it (%s); trying again at the next poll", lease.lease_id, exc)
            return None

    def _reclaim(self, lease: TrackedLease, *, why: str) -> RunState | None:
        """Stop the rental now (SIGTERM, grace, SIGKILL); the caller then reports it
        preempted_by_owner (_finish). None when the stop failed (_stop)."""
        logger.warning("lease %s: reclaiming for the owner: %s", lease.lease_id, why)
        lease.ending = "preempted_by_owner"
        started = time.monotonic()
        state = self._stop(lease)
        if state is None:
            return None
        took = time.monotonic() - started
        self.metrics.reclaim(took)
        logger.info("lease %s: rental stopped %.1f s after the owner was seen", lease.lease_id, took)
        return state

    @staticmethod
    def _measure(lease: TrackedLease, by_uuid: Mapping[str, GpuSample]) -> None:
        utils = [by_uuid[u].utilization_pct for u in lease.gpu_uuids if u in by_uuid]
        known = [u for u in utils if u is not None]
        if known:
            lease.util_samples.append(sum(known) / len(known))
        mems = [by_uuid[u].vram_used_mb for u in lease.gpu_uuids if u in by_uuid]
        if mems and all(m is not None for m in mems):
            total = sum(m for m in mems if m is not None)
            lease.peak_memory_mb = max(lease.peak_memory_mb or 0, total)

    def _finish(self, lease: TrackedLease, state: RunState, *, at: datetime, detail: str = "") -> None:
        """The lease's workload is over: its last usage report, then its event, then forget it.

        `at` is when the agent saw it end (a reclaim: when the owner was seen); the workload's
        recorded end (state.ended_at) wins, except that a reclaim ends no later than the owner
        was seen."""
        if lease.lease_id not in self.leases:
            return
        if state.ended_at is not None:
            at = min(at, state.ended_at) if lease.ending == "preempted_by_owner" else state.ended_at
        self._queue_usage(lease, until=at)
        # Its last output before its end, so that a follower who sees the job end has it all.
        self._ship_output(lease, final=True)
        tail = scrub_secrets((state.log_tail or "")[-LOG_TAIL_CHARS:].replace("\x00", ""), self.secrets)
        # Stored before the end is reported: the job is queued again only once its checkpoint is.
        note = self._save_checkpoint(lease)
        if note and lease.ending == "preempted_by_owner":
            detail = f"{detail}; {note}"
        detail = scrub_secrets(detail[:500], self.secrets)
        if lease.ending == "preempted_by_owner":
            self._event(lease.lease_id, EVENT_PREEMPTED_BY_OWNER, at=at, detail=detail, log_tail=tail)
        elif lease.ending is not None and lease.ending.startswith("stopped:unknown_lease"):
            pass  # the marketplace does not know it: nothing to tell
        else:
            code = state.exit_code if state.exit_code is not None else -15
            if lease.ending == "timeout":
                code, detail = TIMEOUT_EXIT_CODE, "killed after max_duration_s"
            elif lease.ending is not None:
                detail = f"stopped on request ({lease.ending.partition(':')[2]})"
                if note:
                    detail = scrub_secrets(f"{detail}; {note}"[:500], self.secrets)
            elif state.fenced_at is not None:
                detail = self._fenced_detail(state.fenced_at)
            self._event(lease.lease_id, EVENT_EXITED, at=at, exit_code=code, detail=detail, log_tail=tail)
        if state.fenced_at is not None and lease.ending is None:
            logger.warning(
                "lease %s: its watchdog stopped it at %s (fenced: no contact with the marketplace in time)",
                lease.lease_id,
                iso(state.fenced_at),
            )
        logger.info("lease %s ended (%s, exit code %s)", lease.lease_id, lease.ending or "exited", state.exit_code)
        del self.leases[lease.lease_id]
        self._status_of.pop(lease.lease_id, None)
        self.done.add(lease.lease_id)
        self.save()
        try:
            self.runner.forget(lease.lease_id)
        except Exception as exc:
            logger.warning("lease %s: could not clean up its records: %s", lease.lease_id, exc)
        else:
            self._disarm(lease.lease_id)
            self._forget_output(lease.lease_id)

    def _never_started(self, lease: TrackedLease) -> None:
        """Forget a lease adopted from the record saved before its start whose workload its runner
        does not know: the agent died before it started. Not reported and not marked done: the
        marketplace's start order, sent again, starts it."""
        logger.info("lease %s: its workload was never started; waiting for its start order", lease.lease_id)
        del self.leases[lease.lease_id]
        self._disarm(lease.lease_id)
        self.save()

    def _vanished(self, lease: TrackedLease, *, why: str) -> None:
        """The lease's workload is gone from the machine with its records (its container removed
        there, the runner's files deleted): how it ended cannot be known. Reported as the
        machine's side ending it (`preempted_by_owner`, the job not to blame) when it was last
        seen running, and forgotten. Forgotten without a word, the lease stayed running at the
        marketplace until its maximum duration, its GPUs held and its job never run again."""
        logger.warning("lease %s: its workload is gone (%s); reporting it ended and forgetting it", lease.lease_id, why)
        lease.ending = "preempted_by_owner"
        lease.checkpoint = None  # its work directory went with it
        at = max(lease.running_seen_at or lease.usage_from, lease.usage_from)
        gone = RunState(lease_id=lease.lease_id, running=False, exit_code=None, pids=(), started_at=lease.started_at)
        self._finish(lease, gone, at=at, detail=f"its workload is gone from the machine ({why}); its end was not seen")
        self._disarm(lease.lease_id)
        self._forget_output(lease.lease_id)

    def _fenced_detail(self, fenced_at: datetime) -> str:
        """The `exited` detail of a workload its fence stopped (docs/agent-api.md: `fenced:`)."""
        limit = f"{self.fence.fence_s:g} s (lease_fence_s)" if self.fence is not None else "its lease fence"
        return (
            f"fenced: the machine had no contact with the marketplace for {limit}; its watchdog stopped the "
            f"workload at {iso(fenced_at)}"
        )

    # -- checkpoints and what the job is told (gpgpu_agent.checkpoint) ---------------------------

    def _predicted_idle_s(self) -> int | None:
        """The owner's predicted remaining absence, as of now: the last reply's, less the time since."""
        predicted, at = self.forecast
        if predicted is None:
            return None
        return max(0, int(predicted - (time.monotonic() - at)))

    def _job_view(self, *, spec: CheckpointSpec | None, promised: int | None) -> dict[str, str]:
        """What the job is told to checkpoint well, as environment variables."""
        predicted = self._predicted_idle_s()
        env = {
            "GPGPU_STOP_GRACE_S": f"{self.stop_grace_s:g}",
            "GPGPU_LEASE_INFO": f"{checkpoint.WORKSPACE}/{checkpoint.STATUS_FILE}",
            "GPGPU_SUGGESTED_CHECKPOINT_INTERVAL_S": str(
                checkpoint.suggested_interval_s(predicted_idle_s=predicted, promised_s=promised)
            ),
        }
        if predicted is not None:
            env["GPGPU_PREDICTED_IDLE_S"] = str(predicted)
        if spec is not None:
            env["GPGPU_CHECKPOINT_DIR"] = spec.dir
            env["GPGPU_RESUME_COUNT"] = str(spec.resume_count)
        return env

    def _with_checkpoint(self, spec: LeaseSpec) -> LeaseSpec:
        """`spec` with the job's variables and status file and, when it has one, its checkpoint
        fetched and checked (restore_archive). Raises CheckpointError when the checkpoint cannot be
        had: the lease then fails to start (and the job is placed again) rather than start from
        nothing."""
        env = self._job_view(spec=spec.checkpoint, promised=spec.checkpoint_interval_s)
        status = self._status(spec.lease_id, spec.job_id, spec.checkpoint, spec.checkpoint_interval_s)
        spec = replace(spec, agent_env=env, agent_status=status)
        ckpt = spec.checkpoint
        if ckpt is None or ckpt.restore_url is None:
            return spec
        if self.checkpoints is None:
            raise CheckpointError("this agent cannot fetch checkpoints")
        dest = self.state_dir / "checkpoints" / f"lease-{spec.lease_id}-restore.tar"
        try:
            self.checkpoints.checkpoint_download(
                ckpt.restore_url, dest, size=ckpt.restore_size, sha256=ckpt.restore_sha256, max_bytes=ckpt.max_bytes
            )
        except (TransportUnavailable, Rejected, OSError) as exc:
            raise CheckpointError(f"could not fetch the job's checkpoint: {exc}") from exc
        logger.info("lease %s: fetched its job's checkpoint (%d bytes)", spec.lease_id, ckpt.restore_size)
        return replace(spec, restore_archive=str(dest))

    def _checkpoint_wanted(self, lease: TrackedLease) -> bool:
        """Whether the lease's job wants its checkpoint: it will run again (stopped by the owner or
        the machine, not cancelled, timed out or unknown to the marketplace), or the stop order
        asked for it (a renter's cancel that keeps it)."""
        if lease.checkpoint is None or lease.ending is None:
            return False
        if lease.ending == "preempted_by_owner":
            return True
        if lease.save_checkpoint and lease.ending.startswith("stopped:"):
            return True
        reason = lease.ending.partition(":")[2] if lease.ending.startswith("stopped:") else ""
        return bool(reason) and reason not in _NO_CHECKPOINT_STOPS

    def _save_checkpoint(self, lease: TrackedLease) -> str:
        """Pack and upload the stopped lease's checkpoint directory; a sentence when it could not
        be saved (for the end event's detail), "" otherwise."""
        ckpt = lease.checkpoint
        if ckpt is None or not self._checkpoint_wanted(lease):
            return ""
        work = self.runner.workspace(lease.lease_id) if isinstance(self.runner, Workspaces) else None
        if work is None or self.checkpoints is None:
            return "checkpoint not saved: this agent cannot save checkpoints"
        dest = self.state_dir / "checkpoints" / f"lease-{lease.lease_id}.tar"
        try:
            packed = checkpoint.pack(work, ckpt.dir, dest, max_bytes=ckpt.max_bytes)
            if packed is None:
                logger.info("lease %s: no checkpoint directory %s to save", lease.lease_id, ckpt.dir)
                return f"no checkpoint saved: {ckpt.dir} did not exist"
            for attempt in range(1, CHECKPOINT_UPLOAD_ATTEMPTS + 1):
                try:
                    self.checkpoints.checkpoint_upload(
                        ckpt.upload_url, packed.path, size=packed.size, sha256=packed.sha256, direct=ckpt.upload_direct
                    )
                    break
                except TransportUnavailable as exc:
                    if attempt == CHECKPOINT_UPLOAD_ATTEMPTS:
                        raise
                    logger.info("lease %s: checkpoint upload failed (%s); trying again", lease.lease_id, exc)
                    self.pause(attempt)
        except (CheckpointError, TransportUnavailable, Rejected, OSError) as exc:
            logger.warning("lease %s: could not save its checkpoint: %s", lease.lease_id, exc)
            return f"checkpoint not saved: {exc}"
        finally:
            dest.unlink(missing_ok=True)
        logger.info(
            "lease %s: saved its checkpoint (%d files, %d bytes%s)",
            lease.lease_id,
            packed.files,
            packed.size,
            f", {packed.skipped} links or special files left out" if packed.skipped else "",
        )
        return ""

    def refresh_status(self) -> None:
        """Rewrite each running lease's status file when a heartbeat brought a new forecast."""
        for lease in list(self.leases.values()):
            if lease.ending is None and self._status_of.get(lease.lease_id) is not self.forecast:
                self._write_status(lease)

    def _write_status(self, lease: TrackedLease) -> None:
        """/work/.gpgpu-lease.json of the running lease: what its job is told to checkpoint well,
        current (the runner wrote its first before the workload started)."""
        work = self.runner.workspace(lease.lease_id) if isinstance(self.runner, Workspaces) else None
        self._status_of[lease.lease_id] = self.forecast
        if work is None:
            return
        data = self._status(lease.lease_id, lease.job_id, lease.checkpoint, lease.checkpoint_interval_s)
        try:
            checkpoint.write_status(work, data)
        except OSError as exc:
            logger.warning("lease %s: could not write its status file: %s", lease.lease_id, exc)

    def _status(
        self, lease_id: int, job_id: int, ckpt: CheckpointSpec | None, promised: int | None
    ) -> dict[str, object]:
        """The content of a lease's status file, as of now."""
        predicted = self._predicted_idle_s()
        return {
            "lease_id": lease_id,
            "job_id": job_id,
            "stop_grace_s": self.stop_grace_s,
            "predicted_idle_s": predicted,
            "suggested_checkpoint_interval_s": checkpoint.suggested_interval_s(
                predicted_idle_s=predicted, promised_s=promised
            ),
            "checkpoint_dir": ckpt.dir if ckpt is not None else None,
            "resume_count": ckpt.resume_count if ckpt is not None else 0,
            "updated_at": iso(self.clock()),
        }

    # -- fencing -------------------------------------------------------------------------------

    def _arm(self, lease_id: int) -> None:
        """Raises OSError when the deadline cannot be written."""
        if self.fence is not None:
            self.fence.arm(lease_id)

    def _disarm(self, lease_id: int) -> None:
        if self.fence is None:
            return
        try:
            self.fence.disarm(lease_id)
        except OSError as exc:
            logger.warning("lease %s: could not remove its fence deadline: %s", lease_id, exc)

    # -- the marketplace's orders --------------------------------------------------------------

    def start(self, order: object, gpus: GpuView, *, schedule: Schedule) -> None:
        """Start a lease (a heartbeat reply's `start` item) unless it runs or ran here already;
        refused (failed_to_start, with the reason) when its GPUs are not all here and free, the
        owner's schedule is closed or the runner cannot start it."""
        try:
            spec = lease_spec_from_order(order)
        except (KeyError, TypeError, ValueError, CheckpointError) as exc:
            logger.warning("ignoring a malformed start order %r: %s", order, exc)
            return
        if spec.lease_id in self.leases or spec.lease_id in self.done:
            return  # starting is idempotent: keyed by lease id
        now = self.clock()
        by_uuid, foreign = gpus.by_uuid, gpus.foreign
        refusal = None
        missing = [u for u in spec.gpu_uuids if u not in by_uuid]
        if not spec.gpu_uuids or missing:
            refusal = f"GPUs {missing or '(none)'} are not on this machine"
        elif not schedule.open_at(now):
            refusal = "the owner's availability window is closed"
        elif taken := [
            (u, other.lease_id) for other in self.leases.values() for u in other.gpu_uuids if u in spec.gpu_uuids
        ]:
            # The marketplace never places two leases on one GPU; a start order that would is not
            # obeyed (its isolation between renters rests on that).
            uuid, holder = taken[0]
            refusal = f"GPU {by_uuid[uuid].index} is in lease {holder} already"
        else:
            for uuid in spec.gpu_uuids:
                verdict = gpus.verdicts.get(uuid)
                if foreign.get(uuid):
                    refusal = f"the owner is using GPU {by_uuid[uuid].index} (process {foreign[uuid][0]})"
                elif verdict is not None and verdict.broken:
                    # The marketplace placed it on the GPU's last heartbeat; since then the owner
                    # came back (utilisation over the threshold, now or within the grace period),
                    # or the GPU can no longer be vouched for (unreadable, its processes unlisted).
                    # Not a restarted agent's first grace period: it saw no owner.
                    index = by_uuid[uuid].index
                    refusal = (
                        f"the owner is using GPU {index} ({verdict.reason})"
                        if verdict.owner_busy
                        else f"GPU {index} is not idle ({verdict.reason})"
                    )
                if refusal is not None:
                    break
        state: RunState | None = None
        if refusal is None:
            try:
                self._arm(spec.lease_id)  # the workload never runs without its deadline
            except OSError as exc:
                refusal = f"could not write the lease's fence deadline: {exc.strerror or exc}"
        if refusal is None:
            self.starting = spec.lease_id
            for uuid in spec.gpu_uuids:
                self._blind_since.pop(uuid, None)  # an ended lease's count is not this one's
            record = self._starting_record = TrackedLease(
                lease_id=spec.lease_id,
                gpu_uuids=spec.gpu_uuids,
                max_duration_s=float(spec.max_duration_s or math.inf),
                started_at=now,
                usage_from=_whole_second(now),
                job_id=spec.job_id,
                checkpoint=spec.checkpoint,
                checkpoint_interval_s=spec.checkpoint_interval_s,
            )
            try:
                self.save()  # before the runner starts anything
            except OSError as exc:
                self.starting = self._starting_record = None
                refusal = f"could not save the lease's record: {exc.strerror or exc}"
        if refusal is None:
            try:
                spec = self._with_checkpoint(spec)
                state = self._runner_start(spec, by_uuid)
            except (RunnerError, CheckpointError) as exc:
                refusal = str(exc)
            except Exception as exc:  # a runner's unforeseen failure fails the start
                # Escaping, it left the fence armed, no failed_to_start sent and the rest of the
                # poll undone, and the marketplace sent the same start again on every heartbeat.
                logger.exception("lease %s: the runner failed unexpectedly", spec.lease_id)
                refusal = f"the runner failed: {type(exc).__name__}: {exc}"
            finally:
                self.starting = None
                self._starting_record = None  # the lease's own record, or its refusal, is saved next
                if spec.restore_archive is not None:
                    Path(spec.restore_archive).unlink(missing_ok=True)
        if refusal is not None or state is None:
            logger.warning("lease %s failed to start: %s", spec.lease_id, refusal)
            self._disarm(spec.lease_id)
            self.done.add(spec.lease_id)
            detail = scrub_secrets(str(refusal), self.secrets)[:500]
            self._event(spec.lease_id, EVENT_FAILED_TO_START, at=now, detail=detail)
            try:
                self.save()
            except OSError as exc:  # the refusal is spooled; `done` is saved with the next save
                logger.warning("lease %s: could not save the agent's lease records: %s", spec.lease_id, exc)
            return
        started = state.started_at or now
        lease = self.leases[spec.lease_id] = replace(record, started_at=started, usage_from=_whole_second(started))
        self._status_of[lease.lease_id] = self.forecast  # its status file: the runner wrote it
        self._event(spec.lease_id, EVENT_STARTED, at=started)
        self.save()
        logger.info("lease %s (job %s) started on GPUs %s", spec.lease_id, spec.job_id, list(spec.gpu_uuids))

    def _runner_start(self, spec: LeaseSpec, by_uuid: Mapping[str, GpuSample]) -> RunState:
        minors = {u: by_uuid[u].minor_number for u in spec.gpu_uuids}
        return self.runner.start(
            spec,
            gpu_indexes={u: by_uuid[u].index for u in spec.gpu_uuids},
            gpu_minors={uuid: minor for uuid, minor in minors.items() if minor is not None},
        )

    def stop(self, order: object) -> None:
        """Stop a lease on the marketplace's request (a heartbeat reply's `stop` item) and
        report it exited; an unknown lease, or one already ending, is left alone."""
        try:
            if not isinstance(order, Mapping):
                raise TypeError("a stop order is an object")
            lease_id = int(order["lease_id"])
        except (KeyError, TypeError, ValueError):
            return
        lease = self.leases.get(lease_id)
        if lease is None or lease.ending is not None:
            return
        reason = str(order.get("reason") or "stop")
        lease.save_checkpoint = order.get(STOP_SAVE_CHECKPOINT) is True
        logger.info(
            "lease %s: the marketplace asked to stop it (%s%s)",
            lease_id,
            reason,
            ", saving its checkpoint" if lease.save_checkpoint else "",
        )
        lease.ending = f"stopped:{reason}"
        state = self._stop(lease)
        if state is not None:  # else enforce asks again at every poll, and reports its end then
            self._finish(lease, state, at=self.clock())

    # -- reports (write-ahead) -----------------------------------------------------------------

    def _event(self, lease_id: int, event_type: str, *, at: datetime, **fields: str | int | None) -> None:
        # One event of each type per lease: a deterministic id makes any resend harmless.
        event_id = f"lease-{lease_id}-{event_type}"
        body: dict[str, str | int] = {"event_id": event_id, "type": event_type, "at": iso(at)}
        body.update({k: v for k, v in fields.items() if v is not None and v != ""})
        self.outbox.put("event", lease_id, event_id, body)

    def _queue_usage(self, lease: TrackedLease, *, until: datetime) -> None:
        """Spool a signed usage report for [usage_from, until) in whole seconds, then move on."""
        end = _whole_second(until)
        if end <= lease.usage_from:
            return
        seconds = int((end - lease.usage_from).total_seconds())
        gpus = max(1, len(lease.gpu_uuids))
        utils = lease.util_samples
        struct = UsageStruct.measure(
            lease_id=lease.lease_id,
            report_id=f"{lease.lease_id}-{int(lease.usage_from.timestamp())}",
            period_start=lease.usage_from,
            period_end=end,
            gpu_seconds=seconds * gpus,
            mean_utilization_pct=sum(utils) / len(utils) if utils else None,
            peak_memory_mb=lease.peak_memory_mb,
            gpu_count=gpus,
        )
        body = {**struct.to_wire(), "signature": self.sign(struct)}
        try:
            self.outbox.put("usage", lease.lease_id, struct.report_id, body)
        except SpoolFull as exc:
            logger.error("%s", exc)
        lease.usage_from = end
        lease.util_samples = []
        lease.peak_memory_mb = None


# --- orders and secrets -----------------------------------------------------------------------


def lease_spec_from_order(order: object) -> LeaseSpec:
    """A heartbeat reply's `start` item as a LeaseSpec. Raises KeyError/TypeError/ValueError."""
    if not isinstance(order, Mapping):
        raise TypeError("a start order is an object")
    kind = _job_kind(str(order["kind"]))
    return LeaseSpec(
        lease_id=_record_id(order["lease_id"], "lease_id"),
        job_id=_record_id(order["job_id"], "job_id"),
        kind=kind,
        image=str(order.get("image") or ""),
        command=tuple(str(part) for part in _items(order.get("command") or ())),
        env={str(k): str(v) for k, v in _fields(order.get("env") or {}).items()},
        gpu_uuids=tuple(str(u) for u in _items(order.get("gpu_uuids") or ())),
        max_duration_s=int(order.get("max_duration_s") or 0),
        price_per_gpu_hour=str(order.get("price_per_gpu_hour") or "0"),
        checkpoint_interval_s=_optional_int(order.get("checkpoint_interval_s")),
        checkpoint=_checkpoint_spec(order.get("checkpoint")),
    )


# Ids the marketplace gives: positive, and short enough for the names the runners give a lease's
# workload (containers, records), which they find again after a restart by those names.
_ID_MAX = 10**18


def _record_id(value: object, name: str) -> int:
    """A lease's or job's id from an order: a whole number from 1 to 10**18 - 1. Raises ValueError
    or TypeError. A lease id of 0 or less could not be signed in its usage reports (UsageStruct),
    and its end raised at every poll from then on, every other lease's exit unnoticed; one past
    the runners' names was forgotten, unfenced, at the agent's next start."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name} must be a whole number")
    number = int(value)
    if not 0 < number < _ID_MAX:
        raise ValueError(f"{name} {number} is outside 1..{_ID_MAX - 1}")
    return number


def _optional_int(value: object) -> int | None:
    return None if value is None else json_int(value)


def _checkpoint_spec(value: object) -> CheckpointSpec | None:
    """A start order's `checkpoint`; None for none. Raises KeyError/TypeError/ValueError (and
    CheckpointError, a ValueError's kin, for a directory that is not under /work)."""
    if value is None:
        return None
    data = _fields(value)
    directory = str(data["dir"])
    relative_parts(directory)
    restore = data.get("restore_url")
    sha256 = str(data.get("restore_sha256") or "")
    if restore is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError("restore_sha256 is not a SHA-256")
    max_bytes = json_int(data["max_bytes"])
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    return CheckpointSpec(
        dir=directory,
        max_bytes=max_bytes,
        upload_url=str(data["upload_url"]),
        restore_url=None if restore is None else str(restore),
        restore_sha256=sha256,
        restore_size=json_int(data.get("restore_size") or 0),
        resume_count=max(0, json_int(data.get("resume_count") or 0)),
        upload_direct=data.get("upload_direct") is True,
    )


def _job_kind(text: str) -> JobKind:
    for kind in JOB_KINDS:
        if kind == text:
            return kind
    raise ValueError(f"unknown kind {text!r}")


def _items(value: object) -> Iterable[object]:
    if not isinstance(value, Iterable):
        raise TypeError(f"{type(value).__name__!r} object is not iterable")
    return value


def _fields(value: object) -> Mapping[object, object]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{type(value).__name__!r} object is not a mapping")
    return value


def secret_variants(*, credential: str, private_key_hex: str) -> tuple[str, ...]:
    """The forms in which the machine's secrets could appear in a job's output: the credential,
    and the signing key in hex with and without 0x (any letter case is matched by scrub)."""
    key = private_key_hex.lower().removeprefix("0x")
    return tuple(v for v in (credential, key) if v and len(v) >= 16)


def scrub_secrets(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every occurrence of a secret replaced by [redacted] (case-insensitive, so
    an upper-cased key is caught too). Secrets never leave the machine in a log tail."""
    if not text or not secrets:
        return text
    # Matched where they are, not found in text.lower() and cut from text: a character whose
    # lower case is longer ("İ" is two) moved every later position, and the secret went out whole.
    for secret in secrets:
        text = re.sub(re.escape(secret), REDACTED, text, flags=re.IGNORECASE)
    return text
