"""A simulated provider fleet that speaks the real agent API (docs/agent-api.md).

Each SimulatedMachine registers with a one-time registration token, then, in its own thread,
heartbeats fake GPUs whose owners come and go (simulator.owner_usage), and acts on the
heartbeat's reply: it starts leases (process jobs really run as a subprocess; container jobs
are simulated), stops them when asked or when the owner comes back, and reports every event
and usage interval. It stands in for the real agent daemon until that exists: small on
purpose, but each call it makes is one the real agent will make.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import requests

from simulator.owner_usage import NeverBusy, OwnerUsage, trace_owner

logger = logging.getLogger("simulator")

AGENT_VERSION = "0.1.0-sim"
LOG_TAIL_BYTES = 16 * 1024  # the API takes up to 64 KiB; the last 16 KiB tell the story
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
TIMEOUT_EXIT_CODE = 124  # what timeout(1) returns for a command it killed


# (model, VRAM MB, idle W, max W, idle °C)
GPU_MODELS: list[tuple[str, int, float, float, float]] = [
    ("NVIDIA GeForce RTX 4090", 24564, 21.0, 450.0, 36.0),
    ("NVIDIA A100-SXM4-80GB", 81920, 62.0, 400.0, 33.0),
    ("NVIDIA L4", 23034, 16.0, 72.0, 38.0),
]
REGIONS = ["eu-west", "us-east"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


# --- HTTP -----------------------------------------------------------------------------------


class ApiError(Exception):
    """The marketplace refused a request (a 4xx other than 429): retrying will not help."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        code = body.get("code") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status} {code or ''}: {body}")

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None


class Api:
    """JSON over HTTP with retries: connection errors, timeouts, 429 and 5xx are retried with
    exponential backoff and full jitter, up to `attempts` tries; other 4xx raise ApiError at once."""

    def __init__(
        self,
        base_url: str,
        *,
        attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        timeout_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self._rng = rng or random.Random()
        self._session = requests.Session()

    def post(self, path: str, body: dict[str, Any], *, auth: str | None = None) -> dict[str, Any]:
        """POST `body` to `path` and return the JSON reply. Raises ApiError (refused) or
        requests.RequestException (still failing after every retry)."""
        headers = {"Authorization": auth} if auth else {}
        url = f"{self.base_url}/{path.lstrip('/')}"
        for attempt in range(1, self.attempts + 1):
            try:
                response = self._session.post(url, json=body, headers=headers, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout):
                if attempt == self.attempts:
                    raise
            else:
                if response.status_code < 400:
                    return response.json() if response.content else {}
                if response.status_code != 429 and response.status_code < 500:
                    raise ApiError(response.status_code, _json_or_text(response))
                if attempt == self.attempts:
                    response.raise_for_status()
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            time.sleep(self._rng.uniform(0, delay))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._session.close()


def _json_or_text(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


# --- registration ---------------------------------------------------------------------------


@dataclass
class FakeGpu:
    uuid: str
    index: int
    model: str
    vram_mb: int
    idle_w: float
    max_w: float
    idle_c: float
    owner: OwnerUsage
    temperature_c: float = 0.0

    def __post_init__(self) -> None:
        self.temperature_c = self.idle_c


@dataclass
class MachineSpec:
    """What a simulated machine looks like: its hostname, region and GPUs."""

    hostname: str
    region: str
    gpus: list[FakeGpu]
    cpu_cores: int = 16
    ram_mb: int = 64000
    disk_gb: int = 900


def machine_spec_random(
    *,
    hostname: str,
    rng: random.Random,
    time_scale: float = 1.0,
    owners_never_busy: bool = False,
    gpu_count: int | None = None,
) -> MachineSpec:
    """A machine with 1 to 4 GPUs of one model (or `gpu_count`), owners following the traces."""
    model, vram, idle_w, max_w, idle_c = rng.choice(GPU_MODELS)
    count = gpu_count or rng.randint(1, 4)
    gpus = [
        FakeGpu(
            uuid=f"GPU-{uuid.UUID(int=rng.getrandbits(128), version=4)}",
            index=i,
            model=model,
            vram_mb=vram,
            idle_w=idle_w,
            max_w=max_w,
            idle_c=idle_c,
            owner=NeverBusy() if owners_never_busy else trace_owner(random.Random(rng.random()), time_scale=time_scale),
        )
        for i in range(count)
    ]
    return MachineSpec(
        hostname=hostname,
        region=rng.choice(REGIONS),
        gpus=gpus,
        cpu_cores=8 * count,
        ram_mb=32000 * count,
        disk_gb=rng.choice([500, 900, 1800]),
    )


def registration_token_create(api: Api, *, provider_token: str, label: str) -> str:
    """A one-time registration token from the provider API (POST /api/v1/registration-tokens/)."""
    reply = api.post("/api/v1/registration-tokens/", {"label": label}, auth=f"Token {provider_token}")
    return str(reply["token"])


@dataclass(frozen=True)
class Registration:
    machine_id: int
    credential: str
    heartbeat_interval_s: float


def machine_register(api: Api, *, token: str, spec: MachineSpec) -> Registration:
    """Trade a registration token for the machine's credential (POST /api/agent/v1/register)."""
    reply = api.post(
        "/api/agent/v1/register",
        {"token": token, "hostname": spec.hostname, "agent_version": AGENT_VERSION, "region": spec.region},
    )
    return Registration(
        machine_id=int(reply["machine_id"]),
        credential=str(reply["credential"]),
        heartbeat_interval_s=float(reply.get("heartbeat_interval_s", 10)),
    )


# --- leases ---------------------------------------------------------------------------------


@dataclass
class RunningLease:
    """A lease this machine is running: a subprocess (process jobs) or a timer (container jobs)."""

    lease_id: int
    job_id: int
    gpu_indexes: list[int]
    max_duration_s: float
    started_mono: float
    started_at: datetime
    process: subprocess.Popen[bytes] | None = None
    output: IO[bytes] | None = None
    simulated_exit_mono: float | None = None
    kill_deadline_mono: float | None = None
    # Why the agent is ending it ("preempted_by_owner", "stopped", "timeout"), once it is.
    ending: str | None = None
    usage_from: datetime = field(default_factory=utc_now)
    usage_seq: int = 0

    def exit_code(self) -> int | None:
        """The exit code once the job has exited, else None."""
        if self.process is not None:
            return self.process.poll()
        if self.ending is not None:
            return -signal.SIGTERM
        if self.simulated_exit_mono is not None and time.monotonic() >= self.simulated_exit_mono:
            return 0
        return None

    def terminate(self, why: str) -> None:
        """Ask the job to stop: SIGTERM to its process group now, SIGKILL after STOP_GRACE_S."""
        if self.ending is None:
            self.ending = why
            self.kill_deadline_mono = time.monotonic() + STOP_GRACE_S
            self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the job's process group at once and free its output file."""
        self.ending = self.ending or "killed"
        self._signal(signal.SIGKILL)
        self.close()

    def enforce_kill_deadline(self) -> None:
        if self.kill_deadline_mono is not None and time.monotonic() >= self.kill_deadline_mono:
            self._signal(signal.SIGKILL)
            self.kill_deadline_mono = None

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def log_tail(self) -> str:
        if self.output is None:
            return f"simulated container job ran for {time.monotonic() - self.started_mono:.0f} s\n"
        self.output.flush()
        size = self.output.seek(0, os.SEEK_END)
        self.output.seek(max(0, size - LOG_TAIL_BYTES))
        return self.output.read().decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.output is not None:
            self.output.close()


# --- the machine ----------------------------------------------------------------------------


class SimulatedMachine:
    """One registered machine: call `run(stop_event)` in a thread.

    Every `tick_s` it checks its jobs (exited, past max_duration_s, owner back), sends what it
    has to report, and heartbeats every heartbeat interval. Events and usage reports go through
    an outbox sent in order, so a report that fails for a while is retried, not lost.
    """

    def __init__(
        self,
        *,
        api: Api,
        spec: MachineSpec,
        registration: Registration,
        container_seconds: float = 5.0,
        tick_s: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        self.api = api
        self.spec = spec
        self.machine_id = registration.machine_id
        self.auth = f"Machine {registration.credential}"
        self.heartbeat_interval_s = registration.heartbeat_interval_s
        self.container_seconds = container_seconds
        self.tick_s = tick_s
        self.rng = rng or random.Random()
        self.leases: dict[int, RunningLease] = {}
        # Leases already run here (ended or refused), so a repeated `start` does not rerun them.
        self.finished: deque[int] = deque(maxlen=1000)
        self.outbox: deque[tuple[str, dict[str, Any]]] = deque()
        self._next_heartbeat = 0.0
        self.log = logging.getLogger(f"simulator.{spec.hostname}")

    # -- the loop --

    def run(self, stop: threading.Event) -> None:
        """Run until `stop` is set, then kill the jobs still running (their leases end as lost
        when the machine goes silent, and interruptible jobs are requeued)."""
        self.log.info("machine %s online with %d x %s", self.machine_id, len(self.spec.gpus), self.spec.gpus[0].model)
        try:
            while not stop.is_set():
                try:
                    self.step()
                except (requests.RequestException, ApiError) as exc:
                    self.log.warning("marketplace unreachable or refused: %s", exc)
                stop.wait(self.tick_s)
        finally:
            for lease in self.leases.values():
                lease.kill()
            self.api.close()

    def step(self) -> None:
        """One tick: watch the jobs, report, heartbeat when due, act on the reply."""
        self._watch_leases()
        self._flush_outbox()
        if time.monotonic() >= self._next_heartbeat:
            reply = self.heartbeat()
            self._next_heartbeat = time.monotonic() + self.heartbeat_interval_s
            for stop in reply.get("stop", []):
                self._stop(stop)
            for start in reply.get("start", []):
                self._start(start)
            self._queue_usage()
            self._flush_outbox()

    # -- heartbeat --

    def heartbeat(self) -> dict[str, Any]:
        reply = self.api.post("/api/agent/v1/heartbeat", self.heartbeat_body(), auth=self.auth)
        interval = reply.get("heartbeat_interval_s")
        if interval:
            self.heartbeat_interval_s = float(interval)
        return reply

    def heartbeat_body(self) -> dict[str, Any]:
        leased = {i: lease for lease in self.leases.values() for i in lease.gpu_indexes}
        now = utc_now()
        gpus = []
        for gpu in self.spec.gpus:
            owner_busy = gpu.owner.busy()
            load = self._load(owner_busy=owner_busy, leased=gpu.index in leased)
            # Temperature follows the load with some lag, like a heatsink.
            target = gpu.idle_c + 45.0 * load
            gpu.temperature_c += (target - gpu.temperature_c) * 0.5
            idle_for = gpu.owner.idle_for_s()
            gpus.append(
                {
                    "uuid": gpu.uuid,
                    "index": gpu.index,
                    "model": gpu.model,
                    "vram_mb": gpu.vram_mb,
                    "memory_used_mb": int(300 + (gpu.vram_mb - 300) * load * self.rng.uniform(0.6, 0.9)),
                    "utilization_pct": round(100.0 * load, 1),
                    "temperature_c": round(gpu.temperature_c, 1),
                    "power_w": round(gpu.idle_w + (gpu.max_w - gpu.idle_w) * load, 1),
                    # Idle means the owner is not using it: a renter's job on it does not count.
                    "idle": not owner_busy,
                    "idle_since": None if owner_busy else iso(now - timedelta(seconds=idle_for)),
                    "owner_busy": owner_busy,
                }
            )
        return {
            "agent_version": AGENT_VERSION,
            "driver_version": "550.54.15",
            "cuda_version": "12.4",
            "cpu_cores": self.spec.cpu_cores,
            "ram_mb": self.spec.ram_mb,
            "disk_gb": self.spec.disk_gb,
            "region": self.spec.region,
            "gpus": gpus,
            "leases": [
                {"lease_id": lease.lease_id, "state": "running" if lease.ending is None else "stopping"}
                for lease in self.leases.values()
            ],
        }

    def _load(self, *, owner_busy: bool, leased: bool) -> float:
        """GPU load from 0 to 1: the owner's work (games, renders) is bursty; a renter's job is steady."""
        if owner_busy:
            return self.rng.uniform(0.3, 1.0)
        if leased:
            return self.rng.uniform(0.85, 0.99)
        return self.rng.uniform(0.0, 0.02)

    # -- acting on the reply --

    def _start(self, order: dict[str, Any]) -> None:
        lease_id = int(order["lease_id"])
        if lease_id in self.leases or lease_id in self.finished:
            return  # starting is idempotent: keyed by lease id
        by_uuid = {gpu.uuid: gpu for gpu in self.spec.gpus}
        gpus = [by_uuid.get(u) for u in order.get("gpu_uuids", [])]
        if not gpus or any(g is None for g in gpus):
            self._refuse(lease_id, f"unknown GPU uuids {order.get('gpu_uuids')}")
            return
        if any(g.owner.busy() for g in gpus if g is not None):
            self._refuse(lease_id, "the owner is using a leased GPU")
            return
        indexes = sorted(g.index for g in gpus if g is not None)
        lease = RunningLease(
            lease_id=lease_id,
            job_id=int(order.get("job_id", 0)),
            gpu_indexes=indexes,
            max_duration_s=float(order.get("max_duration_s") or 3600),
            started_mono=time.monotonic(),
            started_at=utc_now(),
        )
        lease.usage_from = lease.started_at
        kind = order.get("kind")
        if kind == "process":
            command = order.get("command") or []
            env = {**os.environ, **{str(k): str(v) for k, v in (order.get("env") or {}).items()}}
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indexes)
            output = tempfile.TemporaryFile()
            try:
                # A process group of its own, so stopping it stops everything it spawned.
                lease.process = subprocess.Popen(  # noqa: S603 - running the renter's command is the point
                    [str(part) for part in command],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except (OSError, ValueError) as exc:
                output.close()
                self._refuse(lease_id, f"could not start {command!r}: {exc}")
                return
            lease.output = output
        elif kind == "container":
            lease.simulated_exit_mono = lease.started_mono + self.container_seconds
        else:
            self._refuse(lease_id, f"unknown job kind {kind!r}")
            return
        self.leases[lease_id] = lease
        self._event(lease_id, "started", at=lease.started_at)
        self.log.info("lease %s (job %s) started on GPUs %s", lease_id, lease.job_id, indexes)

    def _refuse(self, lease_id: int, detail: str) -> None:
        self.finished.append(lease_id)
        self._event(lease_id, "failed_to_start", detail=detail)
        self.log.warning("lease %s failed to start: %s", lease_id, detail)

    def _stop(self, order: dict[str, Any]) -> None:
        lease = self.leases.get(int(order["lease_id"]))
        if lease is not None:
            self.log.info("lease %s: asked to stop (%s)", lease.lease_id, order.get("reason", ""))
            lease.terminate("stopped")

    def _watch_leases(self) -> None:
        for lease in list(self.leases.values()):
            if lease.ending is None:
                if any(self.spec.gpus[i].owner.busy() for i in lease.gpu_indexes if i < len(self.spec.gpus)):
                    self.log.info("lease %s: the owner is back, stopping the job", lease.lease_id)
                    lease.terminate("preempted_by_owner")
                elif time.monotonic() - lease.started_mono > lease.max_duration_s:
                    self.log.info("lease %s: past max_duration_s, stopping the job", lease.lease_id)
                    lease.terminate("timeout")
            lease.enforce_kill_deadline()
            code = lease.exit_code()
            if code is not None:
                self._finish(lease, code)

    def _finish(self, lease: RunningLease, code: int) -> None:
        del self.leases[lease.lease_id]
        self.finished.append(lease.lease_id)
        self._queue_usage(only=lease)  # the last interval, while the lease is still running
        tail = lease.log_tail()
        lease.close()
        if lease.ending == "preempted_by_owner":
            self._event(lease.lease_id, "preempted_by_owner", detail="the owner started using the GPU", log_tail=tail)
        else:
            if lease.ending == "timeout":
                code = TIMEOUT_EXIT_CODE
            detail = {"timeout": "killed after max_duration_s", "stopped": "stopped on request"}.get(lease.ending, "")
            self._event(lease.lease_id, "exited", exit_code=code, detail=detail, log_tail=tail)
        self.log.info("lease %s ended (%s, exit code %s)", lease.lease_id, lease.ending or "exited", code)

    # -- reports --

    def _event(self, lease_id: int, event_type: str, *, at: datetime | None = None, **fields: Any) -> None:
        body = {"event_id": str(uuid.uuid4()), "type": event_type, "at": iso(at or utc_now()), **fields}
        self.outbox.append((f"/api/agent/v1/leases/{lease_id}/events", body))

    def _queue_usage(self, only: RunningLease | None = None) -> None:
        """A usage report per running lease for the time since its last one (unsigned for now)."""
        now = utc_now()
        for lease in [only] if only else list(self.leases.values()):
            micros = (now - lease.usage_from) // timedelta(microseconds=1)
            if micros < 1_000_000:
                continue
            lease.usage_seq += 1
            # Rounded down to the millisecond: the marketplace refuses more than period x GPUs.
            gpu_millis = micros * len(lease.gpu_indexes) // 1000
            body = {
                "report_id": f"{lease.lease_id}-{lease.usage_seq}",
                "period_start": iso(lease.usage_from),
                "period_end": iso(now),
                "gpu_seconds": f"{gpu_millis // 1000}.{gpu_millis % 1000:03d}",
                "mean_utilization_pct": round(self.rng.uniform(85, 99), 1),
                "peak_memory_mb": int(min(g.vram_mb for g in self.spec.gpus) * self.rng.uniform(0.5, 0.9)),
            }
            lease.usage_from = now
            self.outbox.append((f"/api/agent/v1/leases/{lease.lease_id}/usage", body))

    def _flush_outbox(self) -> None:
        """Send queued reports in order. A refused one (4xx) is logged and dropped: sending it
        again would be refused again. A transient failure leaves it queued for the next tick."""
        while self.outbox:
            path, body = self.outbox[0]
            try:
                self.api.post(path, body, auth=self.auth)
            except ApiError as exc:
                self.log.warning("%s refused: %s", path, exc)
            self.outbox.popleft()


# --- the fleet ------------------------------------------------------------------------------


class Fleet:
    """Several simulated machines of one provider, each in its own thread."""

    def __init__(self, machines: list[SimulatedMachine]) -> None:
        self.machines = machines
        self.stop_event = threading.Event()
        self.threads = [
            threading.Thread(target=m.run, args=(self.stop_event,), name=m.spec.hostname, daemon=True) for m in machines
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self.stop_event.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(timeout_s)


def fleet_register(
    base_url: str,
    *,
    provider_token: str,
    count: int,
    rng: random.Random,
    time_scale: float = 1.0,
    container_seconds: float = 5.0,
    owners_never_busy: bool = False,
    hostname_prefix: str = "sim-rig",
) -> Fleet:
    """Create a registration token per machine through the provider API, register each
    machine through the agent API, and return the fleet (not started)."""
    machines = []
    api = Api(base_url)
    suffix = uuid.UUID(int=rng.getrandbits(128)).hex[:6]
    for n in range(1, count + 1):
        spec = machine_spec_random(
            hostname=f"{hostname_prefix}-{suffix}-{n}",
            rng=rng,
            time_scale=time_scale,
            owners_never_busy=owners_never_busy,
        )
        token = registration_token_create(api, provider_token=provider_token, label=spec.hostname)
        registration = machine_register(api, token=token, spec=spec)
        machines.append(
            SimulatedMachine(
                api=Api(base_url),
                spec=spec,
                registration=registration,
                container_seconds=container_seconds,
                rng=random.Random(rng.random()),
            )
        )
    api.close()
    return Fleet(machines)
