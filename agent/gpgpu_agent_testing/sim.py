"""A simulated machine for `gpgpu-agent run --simulate`: fake GPUs whose owners come and go.

SimulatedHost installs a FakeNvml (beneath pynvml, so the real NvmlCollector reads it) and, per
GPU, drives the owner's usage from the trace-fitted alternating idle/busy generator
(gpgpu_agent_testing.owner_usage): while the owner is busy a fake owner process (pid
OWNER_PID_BASE and up, a graphics process for a gamer, a compute one for a researcher) is on the
GPU and the utilisation follows a busy level drawn for that run; while the owner is idle the
utilisation is about 0. A rental the agent runs shows too: `set_rental(uuid, True, pids)` lists
the rental's real pids on the GPU and makes it busy, so the idle detector and reclaim see what
they would on a real machine. Temperature and power follow the load.

Deterministic: the same seed and the same tick times give the same owners, levels and pids.

    host = SimulatedHost([("NVIDIA GeForce RTX 4090", 24564)], seed=7, time_scale=10)
    collector = host.collector()   # installs the fake; collector.close() removes it
    sample = collector.sample()    # ticks the owners to now, then reads NVML
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gpgpu_agent.nvml import NvmlCollector
from gpgpu_agent.types import HostSample
from gpgpu_agent_testing.fake_nvml import FakeNvml
from gpgpu_agent_testing.owner_usage import NeverBusy, OwnerUsage, owner_runs

OWNER_PID_BASE = 900_000  # fake owner pids: OWNER_PID_BASE + 1000 × GPU index + busy run number
# Model name fragment → (idle W, max W, idle °C); the first match wins.
POWER_PROFILES: list[tuple[str, float, float, float]] = [
    ("4090", 21.0, 450.0, 36.0),
    ("3090", 25.0, 350.0, 38.0),
    ("A100", 62.0, 400.0, 33.0),
    ("H100", 70.0, 700.0, 32.0),
    ("H200", 75.0, 700.0, 32.0),
    ("L40", 35.0, 350.0, 34.0),
    ("L4", 16.0, 72.0, 38.0),
    ("A6000", 22.0, 300.0, 35.0),
]
DEFAULT_PROFILE = (20.0, 300.0, 35.0)


def power_profile(model: str) -> tuple[float, float, float]:
    """(idle W, max W, idle °C) for a model name."""
    for fragment, idle_w, max_w, idle_c in POWER_PROFILES:
        if fragment.lower() in model.lower():
            return idle_w, max_w, idle_c
    return DEFAULT_PROFILE


@dataclass(slots=True)
class _SimGpu:
    index: int
    uuid: str
    vram_mb: int
    owner: OwnerUsage
    rng: random.Random
    owner_kind: Literal["compute", "graphics"]
    idle_w: float
    max_w: float
    idle_c: float
    temperature_c: float
    owner_busy: bool = False
    busy_runs: int = 0
    busy_level: float = 0.0
    owner_pid: int | None = None
    rental_active: bool = False
    rental_pids: set[int] = field(default_factory=set)


class SimulatedHost:
    """Fake GPUs `gpus` [(model, vram_mb)] with simulated owners.

    `seed` fixes every random draw; `time_scale` > 1 makes owners come and go that many times
    faster (see owner_usage); `owners_never_busy` gives owners who never use their GPUs;
    `uuid_namespace` (default from the seed) makes GPU uuids differ between simulated machines,
    since the marketplace refuses a uuid another machine has; `clock` is in seconds (monotonic).
    """

    def __init__(
        self,
        gpus: Sequence[tuple[str, int]],
        *,
        seed: int = 0,
        time_scale: float = 1.0,
        owners_never_busy: bool = False,
        uuid_namespace: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not gpus:
            raise ValueError("a simulated machine needs at least one GPU")
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.seed = seed
        self._clock = clock
        self._now = clock()
        self.fake = FakeNvml(clock=lambda: self._now, uuid_namespace=uuid_namespace or f"gpgpu-sim/{seed}")
        self._gpus: list[_SimGpu] = []
        for model, vram_mb in gpus:
            idle_w, max_w, idle_c = power_profile(model)
            index = self.fake.add_gpu(model, vram_mb, temperature_c=round(idle_c), power_w=idle_w, power_limit_w=max_w)
            rng = random.Random(f"{seed}/{index}")
            owner: OwnerUsage = (
                NeverBusy(clock=self._owner_clock)
                if owners_never_busy
                else OwnerUsage(
                    owner_runs(random.Random(f"{seed}/{index}/owner"), time_scale=time_scale),
                    clock=self._owner_clock,
                )
            )
            self._gpus.append(
                _SimGpu(
                    index=index,
                    uuid=self.fake.gpus[index].uuid,
                    vram_mb=vram_mb,
                    owner=owner,
                    rng=rng,
                    owner_kind=rng.choice(("compute", "graphics")),
                    idle_w=idle_w,
                    max_w=max_w,
                    idle_c=idle_c,
                    temperature_c=idle_c,
                )
            )
        self._by_uuid = {gpu.uuid: gpu for gpu in self._gpus}
        self.tick(self._now)

    def _owner_clock(self) -> float:
        return self._now

    @property
    def uuids(self) -> list[str]:
        return [gpu.uuid for gpu in self._gpus]

    # --- installing ---------------------------------------------------------------------------

    def install(self) -> SimulatedHost:
        self.fake.install()
        return self

    def uninstall(self) -> None:
        self.fake.uninstall()

    def __enter__(self) -> SimulatedHost:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def collector(self, *, offer_mig: bool = False) -> SimulatedCollector:
        """A protocols.Collector over this host: installs the fake (if need be); each sample()
        ticks the owners to now first; close() closes NVML and uninstalls the fake."""
        return SimulatedCollector(self, offer_mig=offer_mig)

    # --- the simulation -------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Advance every owner to `now` (default: the clock; never backwards) and set what NVML
        reports: owner process, utilisation, memory, temperature and power."""
        self._now = max(self._now, self._clock() if now is None else now)
        with self.fake.lock:
            for gpu in self._gpus:
                self._tick_gpu(gpu)

    def _tick_gpu(self, gpu: _SimGpu) -> None:
        busy = gpu.owner.busy()
        if busy and not gpu.owner_busy:
            # A new busy run: a new owner process, with its own level and memory.
            gpu.busy_runs += 1
            gpu.busy_level = gpu.rng.uniform(35.0, 95.0)
            gpu.owner_pid = OWNER_PID_BASE + 1000 * gpu.index + gpu.busy_runs % 1000
            mem = int(gpu.vram_mb * gpu.rng.uniform(0.05, 0.5))
            self.fake.add_process(gpu.index, gpu.owner_pid, mem, kind=gpu.owner_kind)
        elif not busy and gpu.owner_pid is not None:
            self.fake.remove_process(gpu.index, gpu.owner_pid)
            gpu.owner_pid = None
        gpu.owner_busy = busy

        owner_load = gpu.busy_level + gpu.rng.uniform(-5.0, 5.0) if busy else gpu.rng.uniform(0.0, 1.5)
        rental_load = gpu.rng.uniform(88.0, 99.0) if gpu.rental_active else 0.0
        utilization = min(100.0, owner_load + rental_load)
        load = utilization / 100.0
        gpu.temperature_c += (gpu.idle_c + 45.0 * load - gpu.temperature_c) * 0.5
        self.fake.set_utilization(gpu.index, utilization, memory=utilization * 0.6)
        self.fake.set_telemetry(
            gpu.index, temperature_c=gpu.temperature_c, power_w=gpu.idle_w + (gpu.max_w - gpu.idle_w) * load
        )

    def set_rental(self, uuid: str, active: bool, pids: Iterable[int] = ()) -> None:
        """A rental starts (active, with its workload's host pids, listed as compute processes)
        or stops running on GPU `uuid`; the utilisation shows it from the next tick."""
        gpu = self._by_uuid.get(uuid)
        if gpu is None:
            raise KeyError(f"no simulated GPU {uuid}")
        with self.fake.lock:
            for pid in gpu.rental_pids:
                self.fake.remove_process(gpu.index, pid)
            gpu.rental_active = active
            gpu.rental_pids = set(pids) if active else set()
            for pid in gpu.rental_pids:
                self.fake.add_process(gpu.index, pid, gpu.vram_mb // 2, kind="compute")

    def owner_busy(self, uuid: str) -> bool:
        """Whether the owner of GPU `uuid` is using it (as of the last tick)."""
        return self._by_uuid[uuid].owner_busy

    def owner_pid(self, uuid: str) -> int | None:
        """The owner's fake process on GPU `uuid` while busy."""
        return self._by_uuid[uuid].owner_pid


class SimulatedCollector:
    """protocols.Collector for simulation mode: the real NvmlCollector over a SimulatedHost."""

    def __init__(self, host: SimulatedHost, *, offer_mig: bool = False) -> None:
        self.host = host
        # Installed already when the caller holds the host as a context manager; else by us.
        self._installed_here = not host.fake.installed
        if self._installed_here:
            host.install()
        try:
            self._inner = NvmlCollector(offer_mig=offer_mig)
        except BaseException:
            if self._installed_here:
                host.uninstall()
            raise

    def sample(self) -> HostSample:
        self.host.tick()
        return self._inner.sample()

    def close(self) -> None:
        self._inner.close()
        if self._installed_here:
            self.host.uninstall()
