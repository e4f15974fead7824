"""The agent daemon: samples the GPUs, reclaims them for their owner, runs leases, reports.

Two threads share the work so a slow or unreachable marketplace never delays a reclaim:

- the **poll loop** (the caller's thread, every `poll_interval_s`): samples NVML, reads the
  runner's state of every lease, decides idleness, reclaims leased GPUs the owner came back to
  (a foreign process on a leased GPU, or the owner's schedule closed), notices leases that
  exited, acts on the marketplace's start/stop orders, and writes every event and usage report
  to the spool first (write-ahead). It is the only thread that calls the runner.
- the **network loop**: replays the spool in order, heartbeats at the interval the marketplace
  asks (or the configured override), hands the reply's orders to the poll loop, and backs off
  with jitter while the marketplace is unreachable.

Reclaim bound: the owner is seen at most `poll_interval_s` after their process appears; the
workload then gets `stop_grace_s` before SIGKILL. With the defaults (1 s + 5 s) that is well
inside the 10 s goal. The `preempted_by_owner` event's `at` is the moment the owner was seen:
the lease's billable time ends there.

Stopping (SIGTERM/SIGINT → `Agent.request_stop`) leaves rentals running: the runner adopts
them on the next start. What can be flushed (a final usage report per lease, the spool) is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gpgpu_agent import __version__
from gpgpu_agent.idle import IdleDetector, ParentOf, foreign_processes, proc_parent
from gpgpu_agent.protocol import (
    EVENT_EXITED,
    EVENT_FAILED_TO_START,
    EVENT_PREEMPTED_BY_OWNER,
    EVENT_STARTED,
    UsageStruct,
)
from gpgpu_agent.protocols import Collector, Rejected, Runner, RunnerError, Transport, TransportUnavailable
from gpgpu_agent.spool import Spool, SpoolFull
from gpgpu_agent.transport import Backoff
from gpgpu_agent.types import GpuSample, GpuVerdict, HostSample, LeaseSpec, RunState

logger = logging.getLogger("gpgpu_agent")

LOG_TAIL_CHARS = 16 * 1024  # the API takes 64 KiB; the last 16 KiB tell the story
TIMEOUT_EXIT_CODE = 124  # what timeout(1) returns for a command it killed
DEFAULT_HEARTBEAT_INTERVAL_S = 10.0
MAX_BACKOFF_S = 60.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


UsageSigner = Callable[[UsageStruct], str]


# --- per-lease bookkeeping ------------------------------------------------------------------


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

    def to_json(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "gpu_uuids": list(self.gpu_uuids),
            "max_duration_s": self.max_duration_s,
            "started_at": iso(self.started_at),
            "usage_from": iso(self.usage_from),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrackedLease:
        started = parse_time(data["started_at"]) or utc_now()
        return cls(
            lease_id=int(data["lease_id"]),
            gpu_uuids=tuple(str(u) for u in data["gpu_uuids"]),
            max_duration_s=float(data["max_duration_s"]),
            started_at=started,
            usage_from=parse_time(data.get("usage_from")) or started,
        )


def _whole_second(at: datetime) -> datetime:
    return at.replace(microsecond=0)


@dataclass(frozen=True)
class Schedule:
    """The owner's schedule from the last heartbeat reply (open with no end until told)."""

    available_now: bool = True
    available_until: datetime | None = None

    def open_at(self, now: datetime) -> bool:
        return self.available_now and (self.available_until is None or now < self.available_until)

    @classmethod
    def from_reply(cls, data: Any) -> Schedule:
        if not isinstance(data, Mapping):
            return cls()
        return cls(
            available_now=bool(data.get("available_now", True)),
            available_until=None if data.get("indefinitely") else parse_time(data.get("available_until")),
        )


@dataclass
class Snapshot:
    """What the poll loop publishes for the network loop's heartbeat."""

    sample: HostSample | None = None
    verdicts: dict[str, GpuVerdict] = field(default_factory=dict)
    leases: list[dict[str, Any]] = field(default_factory=list)


# --- the agent --------------------------------------------------------------------------------


class Agent:
    """Wires a Collector, an idle detector, a Runner, a Transport, the spool and the signing key.

    `run()` blocks until `request_stop()`; `poll_once()` and `network_once()` are the two loops'
    single steps (tests drive them directly)."""

    def __init__(
        self,
        *,
        collector: Collector,
        idle: IdleDetector,
        runner: Runner,
        transport: Transport,
        outbox: Spool,
        sign: UsageSigner,
        state_dir: Path,
        marketplace_url: str = "",
        machine_id: int | None = None,
        poll_interval_s: float = 1.0,
        stop_grace_s: float = 5.0,
        usage_interval_s: float = 60.0,
        heartbeat_interval_s: float | None = None,
        offer_mig: bool = False,
        hostname: str = "",
        region: str = "",
        backoff: Backoff | None = None,
        clock: Callable[[], datetime] = utc_now,
        parent_of: ParentOf = proc_parent,
        rental_observer: Callable[[Mapping[str, set[int]]], None] | None = None,
        secrets: tuple[str, ...] = (),
        reload_credential: Callable[[], bool] | None = None,
    ) -> None:
        self.collector = collector
        self.idle = idle
        self.runner = runner
        self.transport = transport
        self.outbox = outbox
        self.sign = sign
        self.state_dir = Path(state_dir)
        self.marketplace_url = marketplace_url
        self.machine_id = machine_id
        self.poll_interval_s = poll_interval_s
        self.stop_grace_s = stop_grace_s
        self.usage_interval_s = usage_interval_s
        self.heartbeat_override_s = heartbeat_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s or DEFAULT_HEARTBEAT_INTERVAL_S
        self.offer_mig = offer_mig
        self.hostname = hostname or socket.gethostname()
        self.region = region
        self.backoff = backoff or Backoff(base_s=1.0, cap_s=MAX_BACKOFF_S)
        self.clock = clock
        self.parent_of = parent_of
        # Simulation: told each poll which GPUs run which rental pids, so the fake driver lists them.
        self.rental_observer = rental_observer
        # Never sent to the marketplace, whatever a job prints (see scrub_secrets).
        self.secrets = secrets
        # After a 401: re-read the credential file (rotated by `gpgpu-agent rotate-credential`);
        # True when it changed and the next call should try the new one.
        self.reload_credential = reload_credential
        # Why the marketplace revoked this machine's credential; set, the agent stops renting.
        self.revoked: str | None = None

        self.leases: dict[int, TrackedLease] = {}
        # Leases already run here (ended, refused or stopped): a repeated `start` is ignored.
        self.done: set[int] = set()
        self.schedule = Schedule()
        self._orders: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._snapshot = Snapshot()
        self._snapshot_lock = threading.Lock()
        self._stop = threading.Event()
        self._next_usage = time.monotonic() + usage_interval_s
        self._next_heartbeat = 0.0
        self.last_heartbeat: dict[str, Any] = {"ok": None, "at": None, "error": None}
        self._load_state()

    # -- persisted state ---------------------------------------------------------------------

    @property
    def _leases_path(self) -> Path:
        return self.state_dir / "leases.json"

    def _load_state(self) -> None:
        try:
            data = json.loads(self._leases_path.read_text())
        except (OSError, ValueError):
            return
        for item in data.get("leases", []):
            try:
                lease = TrackedLease.from_json(item)
            except (KeyError, TypeError, ValueError):
                continue
            self.leases[lease.lease_id] = lease
        self.done.update(int(x) for x in data.get("done", [])[-1000:])

    def _save_state(self) -> None:
        data = {"leases": [lease.to_json() for lease in self.leases.values()], "done": sorted(self.done)[-1000:]}
        _write_private_json(self._leases_path, data)

    def _write_status(self) -> None:
        status = {
            "machine_id": self.machine_id,
            "marketplace_url": self.marketplace_url,
            "pid": os.getpid(),
            "updated_at": iso(self.clock()),
            "last_heartbeat": self.last_heartbeat,
            "leases": sorted(self.leases),
            "spool_depth": self._outbox_depth(),
            "schedule_open": self.schedule.open_at(self.clock()),
            "revoked": self.revoked,
        }
        try:
            _write_private_json(self.state_dir / "status.json", status)
        except OSError as exc:
            logger.warning("could not write the status file: %s", exc)

    def _outbox_depth(self) -> int:
        return self.outbox.pending()

    # -- lifecycle -----------------------------------------------------------------------------

    def adopt(self) -> None:
        """Take back the workloads still running from before a restart, and report those that
        ended while the agent was away (their exit codes come from the runner's records)."""
        now = self.clock()
        adopted = {state.lease_id: state for state in self.runner.adopt()}
        for lease_id, state in adopted.items():
            lease = self.leases.get(lease_id)
            if lease is None:
                # No record of its GPUs: keep it reporting; the marketplace's reply tells whether
                # it still wants it.
                started = state.started_at or now
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
            else:
                self._finish(lease, state, at=now)
        for lease_id in [lease_id for lease_id in self.leases if lease_id not in adopted]:
            logger.warning("lease %s: no runner record of it is left; forgetting it", lease_id)
            del self.leases[lease_id]
            self.done.add(lease_id)
        self._save_state()

    def run(self) -> None:
        """Adopt, then run both loops until request_stop(); rentals are left running."""
        self.adopt()
        net = threading.Thread(target=self._network_loop, name="gpgpu-agent-net", daemon=True)
        net.start()
        logger.info(
            "agent running: machine %s, marketplace %s, polling every %.1f s",
            self.machine_id,
            self.marketplace_url,
            self.poll_interval_s,
        )
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self.poll_once()
                except Exception:
                    logger.exception("poll failed; continuing")
                self._stop.wait(max(0.0, self.poll_interval_s - (time.monotonic() - started)))
        finally:
            self._stop.set()
            net.join(timeout=15)
            self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def shutdown(self) -> None:
        """Flush: a last usage report per running lease (so the next agent continues from
        here), one last try at the spool, the state files. Rentals keep running."""
        now = self.clock()
        if self.revoked is not None:
            self._stop_all_rentals()
        for lease in list(self.leases.values()):
            self._queue_usage(lease, until=now)
        self._save_state()
        try:
            self._replay()
        except Exception as exc:  # a shutdown must not fail on a network error
            logger.info("spool not flushed (%s); it is sent after the next start", exc)
        self._write_status()
        self.outbox.close()
        self.collector.close()
        logger.info("agent stopped; %d rental(s) left running for the next start to adopt", len(self.leases))

    def _stop_all_rentals(self) -> None:
        """Stop every rental (SIGTERM, grace, SIGKILL) and forget it: after a revocation nothing
        may keep running in this machine's name."""
        for lease_id in list(self.leases):
            try:
                self.runner.stop(lease_id, grace_s=self.stop_grace_s)
                self.runner.forget(lease_id)
            except Exception as exc:
                logger.warning("lease %s: could not stop it: %s", lease_id, exc)
            del self.leases[lease_id]
            self.done.add(lease_id)
            logger.info("lease %s: stopped (credential revoked)", lease_id)
        self._save_state()

    # -- the poll loop -------------------------------------------------------------------------

    def poll_once(self) -> None:
        """One poll: sample, reclaim, notice exits, act on orders, queue usage, publish."""
        states: dict[int, RunState] = {}
        for lease_id in list(self.leases):
            try:
                states[lease_id] = self.runner.poll(lease_id)
            except RunnerError as exc:  # its records are gone: nothing left to watch
                logger.warning("lease %s: %s; forgetting it", lease_id, exc)
                del self.leases[lease_id]
                self.done.add(lease_id)
        rental_pids: dict[str, set[int]] = {}
        for lease_id, lease in self.leases.items():
            for uuid in lease.gpu_uuids:
                rental_pids.setdefault(uuid, set()).update(states[lease_id].pids if states[lease_id].running else ())
        if self.rental_observer is not None:
            self.rental_observer(rental_pids)
        sample = self.collector.sample()
        now = self.clock()
        by_uuid = {gpu.uuid: gpu for gpu in sample.gpus}
        schedule_open = self.schedule.open_at(now)
        foreign = foreign_processes(sample, rental_pids, parent_of=self.parent_of)

        # Reclaim first: it is the owner's GPU.
        for lease_id, lease in list(self.leases.items()):
            state = states[lease_id]
            if not state.running or lease.ending is not None:
                continue
            why = self._owner_back(lease, by_uuid, foreign, schedule_open)
            if why is not None:
                self._reclaim(lease, at=now, why=why)  # reported and forgotten
            elif (now - lease.started_at).total_seconds() > lease.max_duration_s:
                logger.info("lease %s: past its max duration; stopping it", lease_id)
                lease.ending = "timeout"
                states[lease_id] = self.runner.stop(lease_id, grace_s=self.stop_grace_s)

        # Measure and notice exits.
        for lease_id, lease in list(self.leases.items()):
            state = states[lease_id]
            self._measure(lease, by_uuid)
            if not state.running:
                self._finish(lease, state, at=now)

        self._act_on_orders(by_uuid, foreign)

        if time.monotonic() >= self._next_usage:
            self._next_usage = time.monotonic() + self.usage_interval_s
            for lease in list(self.leases.values()):
                self._queue_usage(lease, until=self.clock())
            self._save_state()

        verdicts = self.idle.update(sample, rental_pids=rental_pids, schedule_open=schedule_open, now=now)
        with self._snapshot_lock:
            self._snapshot = Snapshot(
                sample=sample,
                verdicts=verdicts,
                leases=[
                    {"lease_id": lease.lease_id, "state": "running" if lease.ending is None else "stopping"}
                    for lease in self.leases.values()
                ],
            )

    def _owner_back(
        self,
        lease: TrackedLease,
        by_uuid: Mapping[str, GpuSample],
        foreign: Mapping[str, list[int]],
        schedule_open: bool,
    ) -> str | None:
        if not schedule_open:
            return "the owner's availability window has closed"
        for uuid in lease.gpu_uuids:
            gpu = by_uuid.get(uuid)
            if gpu is not None and foreign.get(uuid):
                return f"owner process {', '.join(map(str, foreign[uuid]))} appeared on GPU {gpu.index}"
        return None

    def _reclaim(self, lease: TrackedLease, *, at: datetime, why: str) -> None:
        """Stop the rental now (SIGTERM, grace, SIGKILL) and report preempted_by_owner at `at`."""
        logger.warning("lease %s: reclaiming for the owner: %s", lease.lease_id, why)
        lease.ending = "preempted_by_owner"
        started = time.monotonic()
        state = self.runner.stop(lease.lease_id, grace_s=self.stop_grace_s)
        logger.info(
            "lease %s: rental stopped %.1f s after the owner was seen", lease.lease_id, time.monotonic() - started
        )
        self._finish(lease, state, at=at, detail=why)

    def _measure(self, lease: TrackedLease, by_uuid: Mapping[str, GpuSample]) -> None:
        utils = [by_uuid[u].utilization_pct for u in lease.gpu_uuids if u in by_uuid]
        known = [u for u in utils if u is not None]
        if known:
            lease.util_samples.append(sum(known) / len(known))
        mems = [by_uuid[u].vram_used_mb for u in lease.gpu_uuids if u in by_uuid]
        if mems and all(m is not None for m in mems):
            total = sum(m for m in mems if m is not None)
            lease.peak_memory_mb = max(lease.peak_memory_mb or 0, total)

    def _finish(self, lease: TrackedLease, state: RunState, *, at: datetime, detail: str = "") -> None:
        """The lease's workload is over: its last usage report, then its event, then forget it."""
        if lease.lease_id not in self.leases:
            return
        self._queue_usage(lease, until=at)
        tail = scrub_secrets((state.log_tail or "")[-LOG_TAIL_CHARS:].replace("\x00", ""), self.secrets)
        detail = scrub_secrets(detail, self.secrets)
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
            self._event(lease.lease_id, EVENT_EXITED, at=at, exit_code=code, detail=detail, log_tail=tail)
        logger.info("lease %s ended (%s, exit code %s)", lease.lease_id, lease.ending or "exited", state.exit_code)
        del self.leases[lease.lease_id]
        self.done.add(lease.lease_id)
        self._save_state()
        try:
            self.runner.forget(lease.lease_id)
        except Exception as exc:
            logger.warning("lease %s: could not clean up its records: %s", lease.lease_id, exc)

    def _act_on_orders(self, by_uuid: Mapping[str, GpuSample], foreign: Mapping[str, list[int]]) -> None:
        while True:
            try:
                kind, order = self._orders.get_nowait()
            except queue.Empty:
                return
            if kind == "start":
                self._start(order, by_uuid, foreign)
            elif kind == "stop":
                self._stop_lease(order)

    def _start(
        self, order: Mapping[str, Any], by_uuid: Mapping[str, GpuSample], foreign: Mapping[str, list[int]]
    ) -> None:
        try:
            spec = lease_spec_from_order(order)
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("ignoring a malformed start order %r: %s", order, exc)
            return
        if spec.lease_id in self.leases or spec.lease_id in self.done:
            return  # starting is idempotent: keyed by lease id
        now = self.clock()
        refusal = None
        missing = [u for u in spec.gpu_uuids if u not in by_uuid]
        if not spec.gpu_uuids or missing:
            refusal = f"GPUs {missing or '(none)'} are not on this machine"
        elif not self.schedule.open_at(now):
            refusal = "the owner's availability window is closed"
        else:
            for uuid in spec.gpu_uuids:
                if foreign.get(uuid):
                    refusal = f"the owner is using GPU {by_uuid[uuid].index} (process {foreign[uuid][0]})"
                    break
        state: RunState | None = None
        if refusal is None:
            try:
                state = self.runner.start(
                    spec,
                    gpu_indexes={u: by_uuid[u].index for u in spec.gpu_uuids},
                    **_minors_kwarg(self.runner, {u: by_uuid[u].minor_number for u in spec.gpu_uuids}),
                )
            except RunnerError as exc:
                refusal = str(exc)
        if refusal is not None or state is None:
            logger.warning("lease %s failed to start: %s", spec.lease_id, refusal)
            self.done.add(spec.lease_id)
            detail = scrub_secrets(str(refusal), self.secrets)[:500]
            self._event(spec.lease_id, EVENT_FAILED_TO_START, at=now, detail=detail)
            self._save_state()
            return
        started = state.started_at or now
        self.leases[spec.lease_id] = TrackedLease(
            lease_id=spec.lease_id,
            gpu_uuids=spec.gpu_uuids,
            max_duration_s=float(spec.max_duration_s or math.inf),
            started_at=started,
            usage_from=_whole_second(started),
        )
        self._event(spec.lease_id, EVENT_STARTED, at=started)
        self._save_state()
        logger.info("lease %s (job %s) started on GPUs %s", spec.lease_id, spec.job_id, list(spec.gpu_uuids))

    def _stop_lease(self, order: Mapping[str, Any]) -> None:
        try:
            lease_id = int(order["lease_id"])
        except (KeyError, TypeError, ValueError):
            return
        lease = self.leases.get(lease_id)
        if lease is None or lease.ending is not None:
            return
        reason = str(order.get("reason") or "stop")
        logger.info("lease %s: the marketplace asked to stop it (%s)", lease_id, reason)
        lease.ending = f"stopped:{reason}"
        state = self.runner.stop(lease_id, grace_s=self.stop_grace_s)
        self._finish(lease, state, at=self.clock())

    # -- reports (write-ahead) -----------------------------------------------------------------

    def _event(self, lease_id: int, event_type: str, *, at: datetime, **fields: Any) -> None:
        # One event of each type per lease: a deterministic id makes any resend harmless.
        body = {"event_id": f"lease-{lease_id}-{event_type}", "type": event_type, "at": iso(at)}
        body.update({k: v for k, v in fields.items() if v not in (None, "")})
        self.outbox.put("event", lease_id, body["event_id"], body)

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
            self.outbox.put("usage", lease.lease_id, body["report_id"], body)
        except SpoolFull as exc:
            logger.error("%s", exc)
        lease.usage_from = end
        lease.util_samples = []
        lease.peak_memory_mb = None

    # -- the network loop ----------------------------------------------------------------------

    def _network_loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() >= self._next_heartbeat:
                try:
                    self.network_once()
                except Exception:
                    logger.exception("heartbeat failed unexpectedly; retrying")
                    self._next_heartbeat = time.monotonic() + self.heartbeat_interval_s
            self._stop.wait(0.1)

    def network_once(self) -> None:
        """Replay the spool, heartbeat, hand the reply's orders to the poll loop, replay again.
        On an unreachable marketplace, back off (exponential with jitter)."""
        try:
            self._replay()
            reply = self._heartbeat()
            self._replay()
        except TransportUnavailable as exc:
            delay = self.backoff.next_delay(exc.retry_after_s)
            self._next_heartbeat = time.monotonic() + delay
            self.last_heartbeat = {"ok": False, "at": iso(self.clock()), "error": str(exc)}
            logger.warning("marketplace unreachable (%s); retrying in %.1f s, reports are spooled", exc, delay)
        except Rejected as exc:
            self._next_heartbeat = time.monotonic() + max(self.heartbeat_interval_s, self.backoff.next_delay())
            self.last_heartbeat = {"ok": False, "at": iso(self.clock()), "error": str(exc)}
            if exc.status == 401 and self.reload_credential is not None and self.reload_credential():
                logger.info("the credential file changed; using the new credential")
                self._next_heartbeat = time.monotonic()
            elif exc.status == 401 and exc.code == CREDENTIAL_REVOKED:
                self._revoked(exc.detail or str(exc))
            else:
                logger.error("the marketplace refused the heartbeat: %s", exc)
        else:
            self.backoff.reset()
            self._next_heartbeat = time.monotonic() + self.heartbeat_interval_s
            self.last_heartbeat = {"ok": True, "at": iso(self.clock()), "error": None}
            for item in reply.get("stop") or []:
                self._orders.put(("stop", item))
            for item in reply.get("start") or []:
                self._orders.put(("start", item))
        self._write_status()

    def _revoked(self, why: str) -> None:
        """The marketplace revoked this machine's credential: stop renting at once (its leases
        were ended there), say why, and stop the agent; only a new registration brings it back."""
        self.revoked = why
        logger.error(
            "this machine's credential was revoked: %s. Rentals are stopped and the agent exits; register the "
            "machine again (gpgpu-agent register --force) with a new registration token.",
            why,
        )
        self._write_status()
        self._stop.set()

    def _replay(self) -> int:
        """Send the spool in order; raises TransportUnavailable (or a machine-wide Rejected)
        when it stopped early."""
        result = self.outbox.replay(self.transport)
        if result.stopped is not None:
            raise result.stopped
        return result.sent

    def _heartbeat(self) -> dict[str, Any]:
        with self._snapshot_lock:
            snapshot = self._snapshot
        if snapshot.sample is None:
            raise TransportUnavailable("no GPU sample yet")
        reply = self.transport.heartbeat(self.heartbeat_body(snapshot))
        interval = reply.get("heartbeat_interval_s")
        if self.heartbeat_override_s is None and isinstance(interval, int | float) and interval > 0:
            self.heartbeat_interval_s = float(interval)
        schedule = Schedule.from_reply(reply.get("schedule"))
        if schedule != self.schedule:
            logger.info(
                "owner's schedule: %s",
                "open" + (f" until {iso(schedule.available_until)}" if schedule.available_until else "")
                if schedule.available_now
                else "closed",
            )
        self.schedule = schedule
        return reply

    def heartbeat_body(self, snapshot: Snapshot) -> dict[str, Any]:
        """The heartbeat request (docs/agent-api.md) from one poll's sample and verdicts."""
        assert snapshot.sample is not None
        sample = snapshot.sample
        gpus: list[dict[str, Any]] = []
        for gpu in sample.gpus:
            if self.offer_mig and gpu.mig_devices:
                continue  # offered as its MIG instances below
            verdict = snapshot.verdicts.get(gpu.uuid)
            idle = bool(verdict and verdict.idle) and gpu.declined_reason is None
            gpus.append(
                {
                    "uuid": gpu.uuid,
                    "index": gpu.index,
                    "model": (gpu.model or "unknown GPU")[:100],
                    "vram_mb": gpu.vram_total_mb or 0,
                    "memory_used_mb": gpu.vram_used_mb,
                    "utilization_pct": _clamp(gpu.utilization_pct, 100),
                    "temperature_c": _clamp(gpu.temperature_c, 200),
                    "power_w": _clamp(gpu.power_w, 10_000),
                    "idle": idle,
                    "idle_since": iso(verdict.idle_since) if idle and verdict and verdict.idle_since else None,
                    "owner_busy": bool(verdict and verdict.owner_busy),
                }
            )
        if self.offer_mig:
            next_index = max((g.index for g in sample.gpus), default=-1) + 1
            for gpu in sample.gpus:
                verdict = snapshot.verdicts.get(gpu.uuid)
                for mig in gpu.mig_devices:
                    if next_index > 255:
                        break
                    idle = bool(verdict and verdict.idle)
                    gpus.append(
                        {
                            "uuid": mig.uuid,
                            "index": next_index,
                            "model": f"{gpu.model or 'GPU'} MIG {mig.gpu_instance_id}"[:100],
                            "vram_mb": mig.memory_total_mb or 0,
                            "idle": idle,
                            "idle_since": iso(verdict.idle_since) if idle and verdict and verdict.idle_since else None,
                            "owner_busy": bool(verdict and verdict.owner_busy),
                        }
                    )
                    next_index += 1
        body: dict[str, Any] = {
            "agent_version": __version__,
            "driver_version": sample.driver_version,
            "cuda_version": sample.cuda_version,
            "cpu_cores": os.cpu_count(),
            "region": self.region or None,
            "gpus": gpus[:64],
            "leases": snapshot.leases,
        }
        capabilities = getattr(self.runner, "capabilities", None)
        if callable(capabilities):
            body["capabilities"] = capabilities()
        return body


CREDENTIAL_REVOKED = "credential_revoked"
REDACTED = "[redacted]"


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
    lowered = text.lower()
    for secret in secrets:
        needle = secret.lower()
        start = lowered.find(needle)
        while start != -1:
            text = text[:start] + REDACTED + text[start + len(needle) :]
            lowered = lowered[:start] + REDACTED.lower() + lowered[start + len(needle) :]
            start = lowered.find(needle, start + len(REDACTED))
    return text


def _minors_kwarg(runner: Any, minors: Mapping[str, int | None]) -> dict[str, Any]:
    """``gpu_minors`` for runners that take it (the process runner, through KindRunner)."""
    known = {uuid: minor for uuid, minor in minors.items() if minor is not None}
    return {"gpu_minors": known} if getattr(runner, "takes_gpu_minors", False) else {}


def _clamp(value: float | None, hi: float) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return min(max(value, 0.0), hi)


def lease_spec_from_order(order: Mapping[str, Any]) -> LeaseSpec:
    """A heartbeat reply's `start` item as a LeaseSpec. Raises KeyError/TypeError/ValueError."""
    kind = str(order["kind"])
    if kind not in ("container", "process"):
        raise ValueError(f"unknown kind {kind!r}")
    return LeaseSpec(
        lease_id=int(order["lease_id"]),
        job_id=int(order["job_id"]),
        kind=kind,  # type: ignore[arg-type]
        image=str(order.get("image") or ""),
        command=tuple(str(part) for part in order.get("command") or ()),
        env={str(k): str(v) for k, v in (order.get("env") or {}).items()},
        gpu_uuids=tuple(str(u) for u in order.get("gpu_uuids") or ()),
        max_duration_s=int(order.get("max_duration_s") or 0),
        price_per_gpu_hour=str(order.get("price_per_gpu_hour") or "0"),
    )


def _write_private_json(path: Path, data: Any) -> None:
    """Write JSON atomically with mode 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def seconds_between(a: datetime, b: datetime) -> float:
    return (b - a) / timedelta(seconds=1)


# --- wiring the real parts from the config ----------------------------------------------------


def build_agent(config: Any, credential: Any, *, transport: Transport | None = None) -> Agent:
    """An Agent from an AgentConfig and the stored MachineCredential: NVML (or, with
    `simulate`, a simulated host over the fake NVML), the configured runner, HTTP transport,
    the spool and the signing key. Raises AgentError subclasses with a sentence on failure
    (no driver, key file missing or not private…)."""
    from gpgpu_agent.runners.kinds import build_runner
    from gpgpu_agent.signing import load_key_file, sign_usage
    from gpgpu_agent.transport import HttpTransport

    key = load_key_file(config.key_path)
    url = config.marketplace_url or credential.marketplace_url
    observer = None
    if config.simulate:
        host = _simulated_host(config)
        collector: Collector = host.collector(offer_mig=config.offer_mig)

        def observer(rentals: Mapping[str, set[int]]) -> None:
            for uuid in host.uuids:
                host.set_rental(uuid, uuid in rentals, rentals.get(uuid, ()))

    else:
        from gpgpu_agent.nvml import NvmlCollector

        collector = NvmlCollector(offer_mig=config.offer_mig)
    runner = build_runner(config)
    spool = Spool(config.spool_path, max_items=config.spool_max_items)
    http = transport or HttpTransport(url, credential=credential.credential)

    def reload_credential() -> bool:
        """Take a credential `gpgpu-agent rotate-credential` wrote while the daemon ran."""
        from gpgpu_agent.credentials import CredentialError, load_credential

        if not isinstance(http, HttpTransport):
            return False
        try:
            fresh = load_credential(config.credential_path)
        except CredentialError:
            return False
        if fresh.credential == http.credential:
            return False
        http.credential = fresh.credential
        return True

    return Agent(
        collector=collector,
        idle=IdleDetector(threshold_pct=max(config.idle_threshold_pct, 0.001), grace_s=config.idle_grace_s),
        runner=runner,
        transport=http,
        outbox=spool,
        sign=lambda struct: sign_usage(struct, key),
        state_dir=config.state_dir,
        marketplace_url=url,
        machine_id=credential.machine_id,
        poll_interval_s=config.poll_interval_s,
        stop_grace_s=config.stop_grace_s,
        usage_interval_s=config.usage_interval_s,
        heartbeat_interval_s=config.heartbeat_interval_s,
        offer_mig=config.offer_mig,
        hostname=config.hostname,
        region=config.region,
        rental_observer=observer,
        secrets=secret_variants(credential=credential.credential, private_key_hex=key.account.key.hex()),
        reload_credential=reload_credential,
    )


def _simulated_host(config: Any) -> Any:
    from gpgpu_agent.sim import SimulatedHost

    # The same state dir gives the same GPUs (uuids) after a restart: the marketplace knows them.
    seed = int.from_bytes(str(config.state_dir.resolve()).encode()[-8:], "big") % 2**31
    return SimulatedHost(
        config.simulated_gpus(),
        seed=seed,
        time_scale=config.time_scale,
        owners_never_busy=config.simulate_owners_idle,
        uuid_namespace=f"gpgpu-sim/{config.state_dir.resolve()}",
    )
