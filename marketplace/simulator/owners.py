"""The owners' side of the simulated world: when each GPU's owner is away, and what v2's
forecasts learn of it.

Nothing here depends on the jobs or the policy: owners come and go as their duty cycles say,
whatever is rented, and a forecast learns only from the owners' stretches (as production's
does, from heartbeats). So v2's learning can run ahead of the jobs, in a process of its own
(`Learner`, `learn_apart`), while the event engine (engine.py) places and runs the jobs on the
other core. Each time a GPU becomes rentable the learner reads what the pool will judge that
idle stretch from: the forecast's curve for the hour it began, and its analogs' reading
(`providers.forecasting.Analogs.reading`). A GPU's forecast, its curves and its analogs change
only when its stretch ends or the next begins, never while it is rentable, so the pool judges
from these as it would from the forecast itself at the time (a test runs the two ways side by
side).
"""

from __future__ import annotations

import heapq
import math
import multiprocessing
import os
import queue
import random
import threading
import time
import traceback
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from marketplace.placement import P_TARGET
from marketplace.simulator.traces import DutySeries
from providers.forecasting import NBINS, AnalogReading, Analogs, Forecast, StretchCounts, Survival, hour_of_week

IDLE_BELOW = 10.0  # percent: the owner is away below this duty cycle
RENTABLE_AFTER_S = 120.0
# The simulated clock's origin: Monday 2026-01-05 00:00 UTC, so hours of the week are plain.
EPOCH = 1_767_571_200.0
FORECAST_REFRESH_S = 1800.0  # a GPU's forecast is rebuilt at most this often
FLEET_PRIOR_REFRESH_S = 6 * 3600.0  # the fleet prior is rebuilt at every multiple of this
# The learner hands over what it read for this much simulated time at once.
BATCH_S = 3600.0


@dataclass(frozen=True, slots=True)
class Pattern:
    """One owner's habits: the away runs of a period (from `idle_runs`), repeated every period
    and shifted back by `phase_s`, each period's copy moved by its own draw within `drift_s`
    either way from a generator seeded with `drift_seed`."""

    runs: tuple[tuple[float, float], ...]
    period_s: float
    phase_s: float
    drift_s: float = 0.0
    drift_seed: int = 0

    def absences(self) -> Iterator[tuple[float, float]]:
        """The owner's absences, (start, end) seconds, from the one in progress at time 0 on;
        every call starts over with the same draws."""
        drift = (random.Random(self.drift_seed), self.drift_s) if self.drift_s > 0 else None
        return _tiled(list(self.runs), self.period_s, self.phase_s, drift)


def idle_runs(series: DutySeries, *, origin_s: float, period_s: float) -> list[tuple[float, float]]:
    """The series' owner-away runs (duty cycle under IDLE_BELOW) as
    (start, end) seconds from `origin_s`, inside [0, period_s). Missing samples and time outside
    the series count as the owner being present (no rent on what nobody saw)."""
    runs: list[tuple[float, float]] = []
    begin: float | None = None
    offset = series.start_s - origin_s
    for i, value in enumerate(series.values):
        at = offset + i * series.step_s
        idle = value is not None and value < IDLE_BELOW
        if idle and begin is None:
            begin = at
        elif not idle and begin is not None:
            runs.append((begin, at))
            begin = None
    if begin is not None:
        runs.append((begin, min(offset + len(series.values) * series.step_s, period_s)))
    return [(max(a, 0.0), min(b, period_s)) for a, b in runs if min(b, period_s) > max(a, 0.0)]


def _tiled(
    runs: list[tuple[float, float]], period_s: float, phase_s: float, drift: tuple[random.Random, float] | None = None
) -> Iterator[tuple[float, float]]:
    """The runs repeated every period and shifted back by `phase_s`, runs that touch across a
    period's end joined; from the run in progress at time 0 on. `drift` (a generator and S):
    each period's copy is shifted by its own uniform draw in [-S, S] (an owner who keeps the
    same habits at different times from day to day); copies that overlap are joined."""
    if not runs:
        return
    if runs[0][0] <= 0 and runs[-1][1] >= period_s and len(runs) == 1:
        yield (-phase_s, math.inf)  # an owner who never comes back (away since the trace began)
        return
    k = 0
    pending: tuple[float, float] | None = None
    while True:
        base = k * period_s - phase_s
        if drift is not None:
            base += drift[0].uniform(-drift[1], drift[1])
        for a, b in runs:
            start, end = a + base, b + base
            if pending is not None and start <= pending[1]:
                pending = (pending[0], max(pending[1], end))
                continue
            if pending is not None and pending[1] > 0:
                yield pending
            pending = (start, end)
        k += 1


def next_absence(
    runs: Iterator[tuple[float, float]], horizon_s: float, now: float, short: list[tuple[float, float]] | None
) -> tuple[float, float, float] | None:
    """The owner's next absence long enough to rent that begins before the horizon, looked for
    at `now`: (start, end, when it becomes rentable); None: none. The engine and the learner
    both schedule by it. Shorter ones on the way are appended to `short` (where given) to be
    counted later."""
    for start, end in runs:
        if start >= horizon_s:
            return None
        if end - start > RENTABLE_AFTER_S:
            return start, end, max(start + RENTABLE_AFTER_S, now)
        if short is not None and math.isfinite(start):
            short.append((start, end))
    return None


# A batch of readings: (read through, then per stretch: GPU id, start, hour of the week it
# began, its curve's index in the batch, its analogs' least length and factor (NaN: none), then
# the batch's curves: at_edges and rates one after another, NBINS each); or ("error", the
# learner's traceback).
Batch = tuple[float, array, array, array, array, array, array, array]


_BACK, _RENTABLE = 0, 1  # at one instant an owner's return is handled first, as in the engine


@dataclass(slots=True)
class _Learnt:
    runs: Iterator[tuple[float, float]]
    counts: StretchCounts = field(default_factory=StretchCounts)
    analogs: Analogs = field(default_factory=lambda: Analogs(observed_from=EPOCH))
    forecast: Forecast | None = None
    forecast_at: float = -math.inf
    counts_changed: bool = False
    short: list[tuple[float, float]] = field(default_factory=list)  # absences too short to rent, not yet counted
    away_since: float = 0.0
    away_until: float = 0.0


class Learner:
    """v2's forecasts of every GPU, learnt from the owners' stretches as production learns them
    (each GPU's own stretches, counted when they end, its analogs, calibrated when its forecast
    is rebuilt, at most every FORECAST_REFRESH_S; a fleet prior rebuilt at every multiple of
    FLEET_PRIOR_REFRESH_S from the stretches ended before it); nothing from the future. It
    replays the owners' absences itself, in the engine's order.

    `batches()` runs it ahead: at each time a GPU becomes rentable it reads the stretch's curve
    and its analogs (module docstring) and hands them over a batch at a time. `advance()` runs it
    in step with the engine instead (`forecast_of`: the forecast the pool then judges from at the
    time)."""

    def __init__(
        self, patterns: Sequence[Pattern], *, horizon_s: float, read_analogs: bool, ahead: bool = True
    ) -> None:
        self.horizon_s = horizon_s
        self.read_analogs = read_analogs
        self.ahead = ahead
        self.gpus = [_Learnt(p.absences()) for p in patterns]
        self.fleet_live = StretchCounts()
        self.fleet = StretchCounts()
        self.next_prior = FLEET_PRIOR_REFRESH_S
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.made: list[tuple[int, float, int, Survival, AnalogReading | None]] = []  # since the last batch
        for gpu_id, gpu in enumerate(self.gpus):
            self._next_absence(gpu_id, gpu, 0.0)

    def forecast_of(self, gpu_id: int) -> Forecast | None:
        return self.gpus[gpu_id].forecast

    def advance(self, until: float, *, through: bool = False) -> None:
        """Handle the owners' events before `until` (also those at it, `through`)."""
        events = self.events
        while events and (events[0][0] < until or (through and events[0][0] == until)):
            at, kind, _, gpu_id = heapq.heappop(events)
            if at >= self.horizon_s:
                events.clear()
                return
            if at >= self.next_prior:
                self.fleet = StretchCounts()
                self.fleet.merge(self.fleet_live)
                self.next_prior = (math.floor(at / FLEET_PRIOR_REFRESH_S) + 1) * FLEET_PRIOR_REFRESH_S
            gpu = self.gpus[gpu_id]
            if kind == _BACK:
                self._count(gpu, gpu.away_since, at)
                self._next_absence(gpu_id, gpu, at)
            else:
                self._rentable(gpu_id, gpu, at)

    def batches(self, step_s: float = BATCH_S) -> Iterator[Batch]:
        """What it read, a batch for each `step_s` of simulated time, in time order; the
        last is read through infinity."""
        until = step_s
        while True:
            last = not self.events or until >= self.horizon_s
            self.advance(math.inf if last else until)
            ids, starts, hours, curve_of = array("l"), array("d"), array("l"), array("l")
            least, factor, curves = array("d"), array("d"), array("d")
            numbered: dict[int, int] = {}  # id(curve) -> its index: GPUs share a forecast's curves
            for gpu_id, start, hour, curve, reading in self.made:
                ids.append(gpu_id)
                starts.append(start)
                hours.append(hour)
                number = numbered.get(id(curve))
                if number is None:
                    number = numbered[id(curve)] = len(numbered)
                    curves.extend(curve.at_edges)
                    curves.extend(curve.rates)
                curve_of.append(number)
                least.append(math.nan if reading is None else reading.least_s)
                factor.append(math.nan if reading is None else reading.factor)
            self.made.clear()
            yield (math.inf if last else until, ids, starts, hours, curve_of, least, factor, curves)
            if last:
                return
            until += step_s

    def _push(self, at: float, kind: int, gpu_id: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, gpu_id))

    def _next_absence(self, gpu_id: int, gpu: _Learnt, now: float) -> None:
        found = next_absence(gpu.runs, self.horizon_s, now, gpu.short)
        if found is not None:
            gpu.away_since, gpu.away_until, rentable_at = found
            self._push(rentable_at, _RENTABLE, gpu_id)
            self._push(gpu.away_until, _BACK, gpu_id)

    def _count(self, gpu: _Learnt, start: float, end: float) -> None:
        """Count an ended stretch (its end is not in the future)."""
        if not math.isfinite(start):
            return
        hour = hour_of_week(EPOCH + start)
        gpu.counts.add(began_hour=hour, length_s=end - start, ended=True)
        if self.read_analogs:
            gpu.analogs.add(EPOCH + start, EPOCH + end)
        self.fleet_live.add(began_hour=hour, length_s=end - start, ended=True)
        gpu.counts_changed = True

    def _rentable(self, gpu_id: int, gpu: _Learnt, now: float) -> None:
        for start, end in gpu.short:  # all ended before this absence began
            self._count(gpu, start, end)
        gpu.short.clear()
        analogs = gpu.analogs if self.read_analogs else None
        if gpu.counts_changed and now - gpu.forecast_at >= FORECAST_REFRESH_S:
            if analogs is not None:
                analogs.calibrate(P_TARGET)
            gpu.forecast = Forecast(gpu.counts, self.fleet, analogs)
            gpu.forecast_at = now
            gpu.counts_changed = False
        elif gpu.forecast is None:
            gpu.forecast = Forecast(gpu.counts, self.fleet, analogs)
            gpu.forecast_at = now
        if self.ahead:
            since = EPOCH + gpu.away_since
            hour = hour_of_week(since)
            reading = analogs.reading(since, since) if analogs is not None else None
            self.made.append((gpu_id, gpu.away_since, hour, gpu.forecast.curve(hour), reading))


def learn_apart() -> bool:
    """Whether the learner can run in a process of its own here (it is forked)."""
    return "fork" in multiprocessing.get_all_start_methods()


@dataclass(frozen=True, slots=True)
class StretchRead:
    """One idle stretch's forecast as the learner read it (`placement.StretchForecast`): the
    curve of stretches begun in its hour of the week, and its analogs' reading."""

    hour: int
    stretch_curve: Survival
    analogs: AnalogReading | None

    def curve(self, began_hour: int) -> Survival:
        if began_hour != self.hour:
            raise ValueError(f"read for stretches begun in hour {self.hour}, asked for hour {began_hour}")
        return self.stretch_curve


class Readings:
    """What the learner read as the engine takes it: `take(gpu_id, start, now)` gives the
    stretch's `StretchRead`, once the learner has read through `now`. The learner runs in a
    forked process of its own (`apart`), or here, a batch at a time, when asked."""

    def __init__(self, learner: Learner, gpus: int, *, apart: bool) -> None:
        self.through = -math.inf
        self.pending: list[list[tuple[float, StretchRead]]] = [[] for _ in range(gpus)]
        self.process: Any = None
        if apart:
            context = multiprocessing.get_context("fork")
            self.queue: Any = context.Queue()
            self.process = context.Process(target=_learn_into, args=(learner, self.queue, os.getpid()), daemon=True)
            self.process.start()
        else:
            self.batches = learner.batches()

    def take(self, gpu_id: int, start: float, now: float) -> StretchRead:
        while self.through <= now:
            self._receive()
        stretches = self.pending[gpu_id]
        if not stretches or stretches[0][0] != start:
            found = stretches[0][0] if stretches else None
            raise RuntimeError(f"the learner read GPU {gpu_id}'s stretch from {found}, the engine's is from {start}")
        return stretches.pop(0)[1]

    def _receive(self) -> None:
        if self.process is None:
            batch: Any = next(self.batches)
        else:
            while True:
                try:
                    batch = self.queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self.process.is_alive():
                        raise RuntimeError(
                            f"the learning process ended (exit code {self.process.exitcode}) before the run"
                        ) from None
        if isinstance(batch[0], str):
            raise RuntimeError(f"the learning process failed:\n{batch[1]}")
        through, ids, starts, hours, curve_of, least, factor, flat = batch
        curves = [
            Survival(tuple(flat[i : i + NBINS]), tuple(flat[i + NBINS : i + 2 * NBINS]))
            for i in range(0, len(flat), 2 * NBINS)
        ]
        for gpu_id, start, hour, number, least_s, k in zip(ids, starts, hours, curve_of, least, factor, strict=True):
            reading = None if math.isnan(least_s) else AnalogReading(EPOCH + start, least_s, k)
            self.pending[gpu_id].append((start, StretchRead(hour, curves[number], reading)))
        self.through = through

    def close(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.terminate()
            self.process.join()
            self.queue.close()
            self.process = None


def _learn_into(learner: Learner, into: Any, parent: int) -> None:
    # A run killed outright (SIGKILL, the OOM killer) cannot stop its learner: the learner stops
    # itself once its parent is gone, wherever it is (learning, or waiting for the pipe to
    # drain into a reader that will never read).
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    try:
        for batch in learner.batches():
            into.put(batch)
    except BaseException:
        into.put(("error", traceback.format_exc()))
        raise


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


__all__ = [
    "EPOCH",
    "IDLE_BELOW",
    "RENTABLE_AFTER_S",
    "Learner",
    "Pattern",
    "Readings",
    "StretchRead",
    "idle_runs",
    "learn_apart",
    "next_absence",
]
