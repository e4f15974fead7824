"""When a simulated GPU's owner is using it: alternating idle and busy runs, like real owners.

The agent's simulation mode (gpgpu_agent_testing.sim, `gpgpu-agent run --simulate`) draws its
owners from here.

A GPU owner's own workload comes and goes. Run lengths (seconds) are drawn from lognormal
distributions fitted to real duty-cycle traces of 72 GPUs over 22.8 hours (one sample a
minute; a minute with no kernel at all counts as idle):

    python -m gpgpu_agent.trace_params ../shared/data/traces
    threshold: duty cycle < 0.01% is idle
    sample interval: 57 s
    idle fraction of samples: 0.674
    idle runs: n=6877 lognormal mu=5.225 sigma=1.173 (ln seconds); p50=2.9 min p90=17.1 min p99=84.5 min
    busy runs: n=6816 lognormal mu=5.079 sigma=0.758 (ln seconds); p50=1.9 min p90=7.6 min p99=20.9 min

The defaults below are those printed numbers. A time scale above 1 compresses the pattern
(10: runs ten times shorter) so a demo shows owners coming and going within minutes.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class RunLengths:
    """A lognormal distribution of run lengths: ln(seconds) ~ Normal(mu, sigma), clamped to
    [min_s, max_s] so one draw cannot stall or flap a simulation."""

    mu: float
    sigma: float
    min_s: float = 30.0
    max_s: float = 6 * 3600.0

    def median_s(self) -> float:
        return math.exp(self.mu)

    def mean_s(self) -> float:
        """The unclamped mean, exp(mu + sigma²/2)."""
        return math.exp(self.mu + self.sigma**2 / 2)


# Fitted by gpgpu_agent/trace_params.py (see the module docstring).
IDLE_RUNS = RunLengths(mu=5.225, sigma=1.173)
BUSY_RUNS = RunLengths(mu=5.079, sigma=0.758)


def idle_fraction(idle: RunLengths = IDLE_RUNS, busy: RunLengths = BUSY_RUNS) -> float:
    """The long-run share of time the owner leaves the GPU idle (0.63 with the defaults)."""
    return idle.mean_s() / (idle.mean_s() + busy.mean_s())


def owner_runs(
    rng: random.Random,
    *,
    idle: RunLengths = IDLE_RUNS,
    busy: RunLengths = BUSY_RUNS,
    time_scale: float = 1.0,
    start_busy: bool | None = None,
) -> Iterator[tuple[bool, float]]:
    """An endless sequence of (owner_busy, seconds) runs, alternating busy and idle.

    The first run's state is drawn with the long-run idle fraction unless `start_busy` is
    given; lengths are divided by `time_scale` (> 0).
    """
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    busy_now = rng.random() >= idle_fraction(idle, busy) if start_busy is None else start_busy
    while True:
        dist = busy if busy_now else idle
        length = min(dist.max_s, max(dist.min_s, rng.lognormvariate(dist.mu, dist.sigma)))
        yield busy_now, length / time_scale
        busy_now = not busy_now


class OwnerUsage:
    """One GPU's owner over time: is the owner using it now, and since when is it idle.

    Call `busy()` with a non-decreasing clock (time.monotonic by default); it walks the run
    sequence forward as time passes.
    """

    def __init__(self, runs: Iterator[tuple[bool, float]], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._runs = runs
        self._clock = clock
        self._busy, length = next(runs)
        self._run_started = clock()
        self._run_ends = self._run_started + length

    def _advance(self) -> None:
        now = self._clock()
        while now >= self._run_ends:
            self._busy, length = next(self._runs)
            self._run_started = self._run_ends
            self._run_ends += length

    def busy(self) -> bool:
        """True while the owner's own workload is on the GPU."""
        self._advance()
        return self._busy

    def idle_for_s(self) -> float:
        """How long the current idle run has lasted (0 while busy)."""
        self._advance()
        return 0.0 if self._busy else self._clock() - self._run_started


class NeverBusy(OwnerUsage):
    """An owner who never uses the GPU (tests, or a dedicated rig)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()

    def busy(self) -> bool:
        return False

    def idle_for_s(self) -> float:
        return self._clock() - self._started


def trace_owner(rng: random.Random, *, time_scale: float = 1.0) -> OwnerUsage:
    """An owner whose pattern follows the fitted trace distributions."""
    return OwnerUsage(owner_runs(rng, time_scale=time_scale))
