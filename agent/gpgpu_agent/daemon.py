"""The agent daemon: samples the GPUs, reclaims them for their owner, runs leases, reports.

Two threads share the work so a slow or unreachable marketplace never delays a reclaim:

- the **poll loop** (the caller's thread, every `poll_interval_s`): samples NVML, decides
  idleness and has the lease tracker (gpgpu_agent.leases) read the runner's state of every
  lease, reclaim leased GPUs the owner came back to (a foreign process on a leased GPU, or the
  owner's schedule closed) or whose processes could not be listed for `BLIND_RECLAIM_S`, notice
  leases that exited and act on the marketplace's start/stop orders (a start refused on a GPU
  whose owner this poll's idle verdict saw back); the tracker writes every event and usage report to
  the spool first (write-ahead). It is the only thread that calls the runner.
- the **network loop**: heartbeats at the interval the marketplace asks (or the configured
  override), hands the reply's orders to the poll loop, renews the leases' fence deadlines, and
  replays the spool in order: around each heartbeat, and between heartbeats as soon as something
  is spooled, so an event or usage report never waits for the next heartbeat. While the
  marketplace is unreachable it backs off with jitter, never longer than the marketplace's
  heartbeat interval (nor a third of the lease fence): a machine that comes back is heard from
  well within the marketplace's grace (HEARTBEAT_GRACE_BEATS intervals), and the first request
  that succeeds after failures brings a heartbeat and the spool's replay at once.

Fencing (gpgpu_agent.fencing): the heartbeat reply's `lease_fence_s` (120 s when absent) bounds
how long a rental may outlive the agent's contact with the marketplace. After each successful
heartbeat the leases' deadlines move to (the time that heartbeat was sent) + lease_fence_s; a
watchdog outside this process stops a workload whose deadline passes. The agent heartbeats at
least three times per fence, whatever the interval.

Reclaim bound: the owner is seen at most `poll_interval_s` after their process appears; the
workload then gets `stop_grace_s` before SIGKILL. With the defaults (1 s + 5 s) that is well
inside the 10 s goal. The `preempted_by_owner` event's `at` is the moment the owner was seen:
the lease's billable time ends there.

Stopping (SIGTERM/SIGINT → `Agent.request_stop`) leaves rentals running: the runner adopts
them on the next start, if it comes within their fence (their watchdogs stop them otherwise).
What can be flushed (a final usage report per lease, the spool) is.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NotRequired, TypedDict

from gpgpu_agent import __version__
from gpgpu_agent.config import AgentConfig
from gpgpu_agent.credentials import MachineCredential, rotation_pending
from gpgpu_agent.fencing import DEFAULT_LEASE_FENCE_S, Fence
from gpgpu_agent.idle import IdleDetector, ParentOf, foreign_processes, proc_parent
from gpgpu_agent.leases import (
    GpuView,
    LeaseReport,
    LeaseTracker,
    Schedule,
    TrackedLease,
    UsageSigner,
    iso,
    secret_variants,
    utc_now,
    write_private_json,
)
from gpgpu_agent.logship import DEFAULT_MAX_BYTES as DEFAULT_LOG_MAX_BYTES
from gpgpu_agent.metrics import AgentMetrics
from gpgpu_agent.protocols import (
    AgentError,
    CheckpointTransfer,
    Collector,
    Rejected,
    Runner,
    Transport,
    TransportUnavailable,
)
from gpgpu_agent.spool import Spool
from gpgpu_agent.transport import Backoff
from gpgpu_agent.types import GpuVerdict, HostSample, JsonObject

if TYPE_CHECKING:
    from gpgpu_agent_testing.sim import SimulatedHost

logger = logging.getLogger("gpgpu_agent")

DEFAULT_HEARTBEAT_INTERVAL_S = 10.0
# The backoff's own cap; the daemon caps each delay lower still (Agent.retry_cap_s).
MAX_BACKOFF_S = 60.0
# Heartbeats (and retries) per fence period, at least: one lost or slow heartbeat never fences.
BEATS_PER_FENCE = 3
CREDENTIAL_REVOKED = "credential_revoked"
MACHINE_SUSPENDED = "machine_suspended"
# While a rotation on this machine is under way (see credentials.rotation_pending), a refused
# heartbeat is tried again this soon instead of ending the agent.
ROTATION_RETRY_S = 0.5
# The doorbell (Agent._doorbell_loop): how long one orders/wait call asks to be held, and how long
# to wait before asking again a marketplace that does not hold them (or does not know the call).
DOORBELL_WAIT_S = 25.0
DOORBELL_OFF_RETRY_S = 300.0
SIMULATION_MISSING = (
    "--simulate needs the agent's test support (the gpgpu_agent_testing package), which the installed "
    "package does not ship: run the agent from a source checkout (pip install -e ./agent, or the "
    "checkout's agent/ folder on PYTHONPATH)"
)


class SimulationUnavailable(AgentError):
    """`simulate` is set but the simulated machine (gpgpu_agent_testing) is not installed."""


# --- what the heartbeat says (docs/agent-api.md) ----------------------------------------------


class GpuReport(TypedDict):
    """One GPU, or one MIG instance, in the heartbeat. A MIG instance has no telemetry."""

    uuid: str
    index: int
    model: str
    vram_mb: int
    memory_used_mb: NotRequired[int | None]
    utilization_pct: NotRequired[float | None]
    temperature_c: NotRequired[float | None]
    power_w: NotRequired[float | None]
    idle: bool
    idle_since: str | None
    owner_busy: bool


class HeartbeatBody(TypedDict):
    agent_version: str
    driver_version: str | None
    cuda_version: str | None
    cpu_cores: int | None
    region: str | None
    gpus: list[GpuReport]
    leases: list[LeaseReport]
    # What the machine's runner accepts and how it isolates jobs (runners.kinds.KindRunner).
    capabilities: NotRequired[Mapping[str, object]]


class HeartbeatOutcome(TypedDict):
    """The last heartbeat, for the status file: None before the first."""

    ok: bool | None
    at: str | None
    error: str | None


@dataclass
class Snapshot:
    """What the poll loop publishes for the network loop's heartbeat."""

    sample: HostSample | None = None
    verdicts: dict[str, GpuVerdict] = field(default_factory=dict)
    leases: list[LeaseReport] = field(default_factory=list)


Order = tuple[Literal["start", "stop", "stop_all"], object]


# --- the agent --------------------------------------------------------------------------------


class Agent:
    """Wires a Collector, an idle detector, the lease tracker (over a Runner, the spool and the
    signing key) and a Transport.

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
        rotation_pending: Callable[[], bool] | None = None,
        fence: Fence | None = None,
        stop_rentals_on_exit: bool = False,
        log_max_bytes: int = DEFAULT_LOG_MAX_BYTES,
        checkpoints: CheckpointTransfer | None = None,
    ) -> None:
        self.collector = collector
        self.idle = idle
        self.runner = runner
        self.transport = transport
        self.outbox = outbox
        self.state_dir = Path(state_dir)
        self.marketplace_url = marketplace_url
        self.machine_id = machine_id
        self.poll_interval_s = poll_interval_s
        self.heartbeat_override_s = heartbeat_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s or DEFAULT_HEARTBEAT_INTERVAL_S
        # What the marketplace last asked for (its grace is a few of these): the retry cap.
        self.marketplace_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.offer_mig = offer_mig
        self.hostname = hostname or socket.gethostname()
        self.region = region
        self.backoff = backoff or Backoff(base_s=1.0, cap_s=MAX_BACKOFF_S)
        self.clock = clock
        self.parent_of = parent_of
        # Simulation: told each poll which GPUs run which rental pids, so the fake driver lists them.
        self.rental_observer = rental_observer
        # After a 401: re-read the credential file (rotated by `gpgpu-agent rotate-credential`);
        # True when it changed and the next call should try the new one.
        self.reload_credential = reload_credential
        # True while `gpgpu-agent rotate-credential` is replacing the credential on this machine:
        # the marketplace already refuses the old one, the new one is not in the file yet.
        self.rotation_pending = rotation_pending
        # Why the marketplace revoked this machine's credential; set, the agent stops renting.
        self.revoked: str | None = None
        # The leases' deadlines, renewed after each heartbeat (the runners' watchdogs read them).
        self.fence = fence if fence is not None else Fence(self.state_dir / "fence")
        # Stop the rentals on the way out (demos, tests) instead of leaving them to the next start.
        self.stop_rentals_on_exit = stop_rentals_on_exit

        self.metrics = AgentMetrics()
        self.tracker = LeaseTracker(
            metrics=self.metrics,
            runner=runner,
            outbox=outbox,
            sign=sign,
            state_dir=self.state_dir,
            stop_grace_s=stop_grace_s,
            usage_interval_s=usage_interval_s,
            clock=clock,
            secrets=secrets,
            fence=self.fence,
            log_max_bytes=log_max_bytes,
            checkpoints=checkpoints,
        )
        self.schedule = Schedule()
        self._orders: queue.Queue[Order] = queue.Queue()
        # Leases whose start order waits in _orders (the poll thread starts them one at a time,
        # each holding it while its image is pulled): listed as starting (_with_starting).
        self._starts_queued: set[int] = set()
        self._snapshot = Snapshot()
        self._snapshot_lock = threading.Lock()
        self._stop = threading.Event()
        # Set when the poll loop has something to do before its next poll (orders arrived, stop).
        self._poll_wake = threading.Event()
        self._next_heartbeat = 0.0
        # Set by the doorbell: the marketplace has a new order, heartbeat now.
        self._ring = threading.Event()
        # The server_time of the last heartbeat reply: the doorbell asks only for orders newer.
        self._server_time: object = None
        # Between heartbeats the spool is replayed as soon as it holds something, not before this.
        self._next_replay = 0.0
        self.last_heartbeat: HeartbeatOutcome = {"ok": None, "at": None, "error": None}

    @property
    def beat_s(self) -> float:
        """Seconds between heartbeats: the marketplace's interval (or the override), and at most a
        third of the lease fence, so the deadlines are renewed well before they pass."""
        return min(self.heartbeat_interval_s, self.fence.fence_s / BEATS_PER_FENCE)

    @property
    def retry_cap_s(self) -> float:
        """The longest wait between tries while the marketplace is unreachable: its heartbeat
        interval, so a machine that is back is heard from within the marketplace's grace."""
        return min(self.beat_s, self.marketplace_interval_s)

    @property
    def next_heartbeat_in_s(self) -> float:
        """Seconds until the network loop heartbeats (or tries again) next."""
        return max(0.0, self._next_heartbeat - time.monotonic())

    @property
    def leases(self) -> dict[int, TrackedLease]:
        """The leases this machine runs, by id (the tracker's)."""
        return self.tracker.leases

    @property
    def done(self) -> set[int]:
        """Leases already run here (ended, refused or stopped), by id (the tracker's)."""
        return self.tracker.done

    # -- the status file -----------------------------------------------------------------------

    def _write_status(self) -> None:
        spool_depth = self.outbox.pending()
        status = {
            "machine_id": self.machine_id,
            "marketplace_url": self.marketplace_url,
            "pid": os.getpid(),
            "updated_at": iso(self.clock()),
            "last_heartbeat": self.last_heartbeat,
            "leases": sorted(self.leases),
            "spool_depth": spool_depth,
            "schedule_open": self.schedule.open_at(self.clock()),
            "revoked": self.revoked,
        }
        try:
            write_private_json(self.state_dir / "status.json", status)
        except OSError as exc:
            logger.warning("could not write the status file: %s", exc)
        self.metrics.gauges(spool_depth=spool_depth, rentals_running=len(self.leases))
        self.metrics.write(self.state_dir)  # gpgpu_agent.metrics: for node_exporter's textfile collector

    # -- lifecycle -----------------------------------------------------------------------------

    def adopt(self) -> None:
        """Take back the workloads still running from before a restart (LeaseTracker.adopt)."""
        self.tracker.adopt()

    def run(self) -> None:
        """Adopt, then run both loops until request_stop(); rentals are left running."""
        self.adopt()
        net = threading.Thread(target=self._network_loop, name="gpgpu-agent-net", daemon=True)
        net.start()
        # Not joined: it may be held in a call for DOORBELL_WAIT_S, and it owns no state.
        threading.Thread(target=self._doorbell_loop, name="gpgpu-agent-doorbell", daemon=True).start()
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
                    self.metrics.poll(failed=True)
                    logger.exception("poll failed; continuing")
                # Orders from a heartbeat are acted on at once, not at the next poll.
                self._poll_wake.wait(max(0.0, self.poll_interval_s - (time.monotonic() - started)))
                self._poll_wake.clear()
        finally:
            self._stop.set()
            net.join(timeout=15)
            self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()
        self._poll_wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def shutdown(self) -> None:
        """Flush: a last usage report per running lease (so the next agent continues from
        here), one last try at the spool, the state files. Rentals keep running, unless the
        credential was revoked (then nothing may keep running in this machine's name) or the agent
        was started with stop_rentals_on_exit (then each is stopped and reported exited, as on the
        marketplace's request)."""
        now = self.clock()
        if self.revoked is not None:
            self.tracker.stop_all(reason="credential revoked")
        elif self.stop_rentals_on_exit:
            for lease_id in list(self.leases):
                self.tracker.stop({"lease_id": lease_id, "reason": "agent_stopped"})
        self.tracker.flush(until=now)
        try:
            self._replay()
        except Exception as exc:  # a shutdown must not fail on a network error
            logger.info("spool not flushed (%s); it is sent after the next start", exc)
        self._write_status()
        self.outbox.close()
        self.collector.close()
        if self.leases:
            logger.info("agent stopped; %d rental(s) left running for the next start to adopt", len(self.leases))
        else:
            logger.info("agent stopped; no rental left running")

    # -- the poll loop -------------------------------------------------------------------------

    def poll_once(self) -> None:
        """One poll: sample, reclaim, notice exits, act on orders, queue usage, publish."""
        states = self.tracker.poll()
        rental_pids = self.tracker.rental_pids(states)
        if self.rental_observer is not None:
            self.rental_observer(rental_pids)
        sample = self.collector.sample()
        now = self.clock()
        schedule_open = self.schedule.open_at(now)
        # Judged before the orders are acted on: a start refuses a GPU the owner came back to
        # since the heartbeat the marketplace placed it from.
        verdicts = self.idle.update(sample, rental_pids=rental_pids, schedule_open=schedule_open, now=now)
        gpus = GpuView(
            by_uuid={gpu.uuid: gpu for gpu in sample.gpus},
            foreign=foreign_processes(sample, rental_pids, parent_of=self.parent_of),
            verdicts=verdicts,
        )
        self.tracker.enforce(states, gpus, schedule_open=schedule_open, now=now)
        self._act_on_orders(gpus)
        self.tracker.account_usage()
        self.tracker.ship_output()
        self.tracker.refresh_status()

        with self._snapshot_lock:
            self._snapshot = Snapshot(sample=sample, verdicts=verdicts, leases=self.tracker.reports())
        self.metrics.poll(nvml_errors=len(sample.errors) + sum(len(gpu.errors) for gpu in sample.gpus))

    def _act_on_orders(self, gpus: GpuView) -> None:
        while True:
            try:
                kind, order = self._orders.get_nowait()
            except queue.Empty:
                return
            if kind == "start":
                try:
                    self.tracker.start(order, gpus, schedule=self.schedule)
                finally:
                    if isinstance(order, Mapping):
                        self._starts_queued.discard(order.get("lease_id"))
                    # The heartbeats list it from now on, not from the end of this poll: the next
                    # start may hold the poll for minutes (its image), and a lease left out of the
                    # heartbeats meanwhile had its fence run out (its workload killed).
                    with self._snapshot_lock:
                        self._snapshot = replace(self._snapshot, leases=self.tracker.reports())
            elif kind == "stop":
                self.tracker.stop(order)
            elif kind == "stop_all" and self.tracker.leases:
                self.tracker.stop_all(reason=str(order))

    # -- the network loop ----------------------------------------------------------------------

    def _network_loop(self) -> None:
        while not self._stop.is_set():
            self.network_step()
            self._stop.wait(0.1)

    def network_step(self) -> None:
        """One turn of the network loop: heartbeat when it is time, else send what the spool
        holds (as soon as it holds something, unless backing off)."""
        now = time.monotonic()
        try:
            if now >= self._next_heartbeat or self._ring.is_set():
                self._ring.clear()  # a ring while this heartbeat runs asks for another
                self.network_once()
            elif now >= self._next_replay and self.outbox.pending():
                self.replay_once()
        except Exception:
            logger.exception("heartbeat failed unexpectedly; retrying")
            self._next_heartbeat = self._next_replay = time.monotonic() + self.beat_s

    def replay_once(self) -> None:
        """Send the spool between heartbeats. Unreachable: back off (the next try of anything
        waits); the first success after failures brings the heartbeat forward to now. A
        machine-wide refusal waits for the next heartbeat, which handles it."""
        try:
            self._replay()
        except TransportUnavailable as exc:
            self.metrics.heartbeat("unreachable")
            delay = self.backoff.next_delay(exc.retry_after_s, cap_s=self.retry_cap_s)
            self._next_replay = time.monotonic() + delay
            logger.warning("marketplace unreachable (%s); retrying in %.1f s, reports are spooled", exc, delay)
        except Rejected:
            self._next_replay = self._next_heartbeat
        else:
            if self.backoff.failures:
                self.backoff.reset()
                self._next_heartbeat = time.monotonic()

    def network_once(self) -> None:
        """Replay the spool, heartbeat, hand the reply's orders to the poll loop, replay again.
        On an unreachable marketplace, back off (exponential with jitter, capped at
        retry_cap_s)."""
        try:
            self._replay()
            reply = self._heartbeat()
            self._replay()
        except TransportUnavailable as exc:
            self.metrics.heartbeat("unreachable")
            delay = self.backoff.next_delay(exc.retry_after_s, cap_s=self.retry_cap_s)
            self._next_heartbeat = self._next_replay = time.monotonic() + delay
            self.last_heartbeat = {"ok": False, "at": iso(self.clock()), "error": str(exc)}
            logger.warning("marketplace unreachable (%s); retrying in %.1f s, reports are spooled", exc, delay)
        except Rejected as exc:
            self.metrics.heartbeat("refused")
            delay = max(self.beat_s, self.backoff.next_delay(cap_s=self.retry_cap_s))
            self._next_heartbeat = self._next_replay = time.monotonic() + delay
            self.last_heartbeat = {"ok": False, "at": iso(self.clock()), "error": str(exc)}
            if exc.status == 401 and self.reload_credential is not None and self.reload_credential():
                logger.info("the credential file changed; using the new credential")
                self._next_heartbeat = time.monotonic()
            elif exc.status == 401 and self.rotation_pending is not None and self.rotation_pending():
                logger.info("the credential is being rotated on this machine; waiting for the new one")
                self._next_heartbeat = time.monotonic() + ROTATION_RETRY_S
            elif exc.status == 401 and exc.code == CREDENTIAL_REVOKED:
                self._revoked(exc.detail or str(exc))
            elif exc.status == 403 and exc.code == MACHINE_SUSPENDED:
                # The marketplace ended this machine's leases when it suspended it, and may already
                # run their jobs elsewhere: stop them now, not when their fence runs out (the
                # heartbeats go on, so that an operator's unsuspend is seen).
                logger.error("the marketplace suspended this machine: %s. Its rentals are stopped", exc.detail or exc)
                self._orders.put(("stop_all", "the machine is suspended"))
                self._poll_wake.set()
            else:
                logger.error("the marketplace refused the heartbeat: %s", exc)
        else:
            self.metrics.heartbeat("ok")
            self.backoff.reset()
            self._next_heartbeat = time.monotonic() + self.beat_s
            self._next_replay = 0.0
            self.last_heartbeat = {"ok": True, "at": iso(self.clock()), "error": None}
            self._server_time = reply.get("server_time")
            for item in _order_items(reply.get("stop")):
                self._orders.put(("stop", item))
            for item in _order_items(reply.get("start")):
                if isinstance(item, Mapping) and type(lease_id := item.get("lease_id")) is int:
                    self._starts_queued.add(lease_id)
                self._orders.put(("start", item))
            if not self._orders.empty():
                self._poll_wake.set()
        self._write_status()

    # -- the doorbell --------------------------------------------------------------------------

    def _doorbell_loop(self) -> None:
        while not self._stop.is_set():
            pause = self.doorbell_once()
            if pause:
                self._stop.wait(pause)

    def doorbell_once(self) -> float:
        """One orders/wait call, held by the marketplace until it has a new order for this machine
        (or DOORBELL_WAIT_S): answered `orders`, ring for a heartbeat now (which brings the
        orders, as every heartbeat does) and wait until it was sent. Returns how long to wait
        before the next call: none after an answer, a heartbeat interval after a failure (the
        network loop deals with outages), DOORBELL_OFF_RETRY_S from a marketplace that does not
        hold these calls."""
        since = self._server_time
        try:
            answer = self.transport.orders_wait({"wait_s": DOORBELL_WAIT_S, "since": since})
        except Rejected:
            return DOORBELL_OFF_RETRY_S  # an older marketplace without the call, or a refusal the heartbeat handles
        except TransportUnavailable:
            return self.beat_s
        except Exception:  # a bug here must not end the doorbell: the heartbeat still brings orders
            logger.exception("the orders doorbell call failed; trying again after a heartbeat interval")
            return self.beat_s
        if answer.get("orders") is True:
            self._ring.set()
            deadline = time.monotonic() + self.beat_s
            while self._server_time == since and time.monotonic() < deadline and not self._stop.is_set():
                self._stop.wait(0.05)
            return 0.0
        held = answer.get("wait_s")
        return 0.0 if isinstance(held, int | float) and held > 0 else DOORBELL_OFF_RETRY_S

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
        self.request_stop()

    def _replay(self) -> int:
        """Send the spool in order; raises TransportUnavailable (or a machine-wide Rejected)
        when it stopped early."""
        result = self.outbox.replay(self.transport)
        if result.stopped is not None:
            raise result.stopped
        return result.sent

    def _heartbeat(self) -> JsonObject:
        with self._snapshot_lock:
            snapshot = self._snapshot
        if snapshot.sample is None:
            raise TransportUnavailable("no GPU sample yet")
        body = self.heartbeat_body(snapshot)
        # The marketplace hears from this machine no earlier than now: the deadlines count from here.
        contact = self.fence.now()
        reply = self.transport.heartbeat(body)
        interval = reply.get("heartbeat_interval_s")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
            self.marketplace_interval_s = float(interval)
            if self.heartbeat_override_s is None:
                self.heartbeat_interval_s = float(interval)
        self._renew_fences(body, reply, contact=contact)
        predicted = reply.get("predicted_idle_s")
        if isinstance(predicted, int | float) and not isinstance(predicted, bool) and predicted >= 0:
            self.tracker.forecast = (int(predicted), time.monotonic())
        else:
            self.tracker.forecast = (None, time.monotonic())
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

    def _renew_fences(self, body: HeartbeatBody, reply: JsonObject, *, contact: float) -> None:
        """After a successful heartbeat: take the reply's `lease_fence_s` (DEFAULT_LEASE_FENCE_S
        when absent), and move the deadline of every lease the heartbeat reported, except those
        the reply asks to stop, and of the lease being started (its image may take minutes to
        pull), to `contact` + lease_fence_s. A lease started since the snapshot was armed from
        the last contact when it started."""
        fence_s = _lease_fence_s(reply.get("lease_fence_s"))
        if fence_s != self.fence.fence_s:
            logger.info("lease fence: rentals stop after %g s without contact with the marketplace", fence_s)
            self.fence.set_fence_s(fence_s)
        stopping = {item.get("lease_id") for item in _order_items(reply.get("stop")) if isinstance(item, Mapping)}
        renewed = [lease["lease_id"] for lease in body["leases"] if lease["lease_id"] not in stopping]
        starting = self.tracker.starting
        if starting is not None and starting not in renewed:
            renewed.append(starting)
        try:
            self.fence.renew(renewed, contact=contact)
        except OSError as exc:
            logger.error("could not renew the leases' fence deadlines: %s", exc)

    def heartbeat_body(self, snapshot: Snapshot) -> HeartbeatBody:
        """The heartbeat request (docs/agent-api.md) from one poll's sample and verdicts."""
        assert snapshot.sample is not None
        sample = snapshot.sample
        gpus: list[GpuReport] = []
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
        body: HeartbeatBody = {
            "agent_version": __version__,
            "driver_version": sample.driver_version,
            "cuda_version": sample.cuda_version,
            "cpu_cores": os.cpu_count(),
            "region": self.region or None,
            "gpus": gpus[:64],
            "leases": self._with_starting(snapshot.leases),
        }
        capabilities = getattr(self.runner, "capabilities", None)
        if callable(capabilities):
            body["capabilities"] = capabilities()
        return body

    def _with_starting(self, leases: list[LeaseReport]) -> list[LeaseReport]:
        """The poll's leases, and those being started (the one whose image is being pulled now,
        and those whose start orders wait behind it: the poll thread starts them one at a time)
        as `starting`: the marketplace then waits for them past their start timeout, rather than
        place their jobs again while a pull goes on."""
        listed = {lease["lease_id"] for lease in leases}
        starting = {*self._starts_queued, *([self.tracker.starting] if self.tracker.starting is not None else [])}
        new = sorted(lease_id for lease_id in starting - listed if lease_id not in self.tracker.done)
        added: list[LeaseReport] = [{"lease_id": lease_id, "state": "starting"} for lease_id in new]
        return [*leases, *added] if added else leases


def _order_items(value: object) -> Iterable[object]:
    """A heartbeat reply's `start` or `stop` list (absent or null: none)."""
    if not value:
        return ()
    if not isinstance(value, Iterable):
        raise TypeError(f"{type(value).__name__!r} object is not iterable")
    return value


def _lease_fence_s(value: object) -> float:
    """A heartbeat reply's `lease_fence_s`: seconds, a positive finite number; absent (an older
    marketplace) or anything else, DEFAULT_LEASE_FENCE_S."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return DEFAULT_LEASE_FENCE_S
    return float(value)


def _clamp(value: float | None, hi: float) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return min(max(value, 0.0), hi)


def seconds_between(a: datetime, b: datetime) -> float:
    return (b - a) / timedelta(seconds=1)


# --- wiring the real parts from the config ----------------------------------------------------


def build_agent(config: AgentConfig, credential: MachineCredential, *, transport: Transport | None = None) -> Agent:
    """An Agent from an AgentConfig and the stored MachineCredential: NVML (or, with
    `simulate`, a simulated host over the fake NVML), the configured runner, HTTP transport,
    the spool and the signing key. Raises AgentError subclasses with a sentence on failure
    (no driver, key file missing or not private, no simulation support installed…)."""
    from gpgpu_agent.runners.kinds import build_runner
    from gpgpu_agent.signing import load_key_file, sign_usage
    from gpgpu_agent.transport import HttpTransport

    key = load_key_file(config.key_path)
    url = config.marketplace_url or credential.marketplace_url
    observer: Callable[[Mapping[str, set[int]]], None] | None = None
    collector: Collector
    if config.simulate:
        host = _simulated_host(config)
        collector = host.collector(offer_mig=config.offer_mig)

        def observe(rentals: Mapping[str, set[int]]) -> None:
            for uuid in host.uuids:
                host.set_rental(uuid, uuid in rentals, rentals.get(uuid, ()))

        observer = observe
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
        rotation_pending=lambda: rotation_pending(config.credential_path),
        fence=Fence(config.fence_dir),
        log_max_bytes=config.log_max_bytes,
        stop_rentals_on_exit=config.stop_rentals_on_exit,
        checkpoints=http if isinstance(http, HttpTransport) else None,
    )


def _simulated_host(config: AgentConfig) -> SimulatedHost:
    """The simulated machine of `simulate`, from the test support beside the package (not in the
    wheel). Raises SimulationUnavailable when it is not installed."""
    try:
        from gpgpu_agent_testing.sim import SimulatedHost
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "gpgpu_agent_testing":
            raise  # something the simulation itself needs is missing: say what
        raise SimulationUnavailable(SIMULATION_MISSING) from None

    # The same state dir gives the same GPUs (uuids) after a restart: the marketplace knows them.
    seed = int.from_bytes(str(config.state_dir.resolve()).encode()[-8:], "big") % 2**31
    return SimulatedHost(
        config.simulated_gpus(),
        seed=seed,
        time_scale=config.time_scale,
        owners_never_busy=config.simulate_owners_idle,
        uuid_namespace=f"gpgpu-sim/{config.state_dir.resolve()}",
    )
