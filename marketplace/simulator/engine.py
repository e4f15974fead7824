"""The event engine: owners' GPUs become rentable and are reclaimed as their duty cycles say,
jobs arrive, a match cycle runs every `cycle_s` simulated seconds and hands the pending jobs and
the free GPUs to `marketplace.placement.place`, leases run until they finish or an owner comes
back.

The world's rules (docs/simulator.md): a GPU is rentable once its owner's utilisation has been
under `IDLE_BELOW` percent for `RENTABLE_AFTER_S` seconds; the owner's return preempts a lease
on it at once and the work since the lease's last checkpoint is lost; a preempted job goes back
to the queue with its checkpointed work kept. Forecasts are learnt as production learns them
(owners.Learner: each GPU's own idle stretches, counted when they end, plus a fleet prior
rebuilt every 6 h; nothing from the future), in a process of their own where the platform
forks, since the owners do not depend on the jobs. (The engine itself reads ahead in the
trace: a lease whose owner comes back before it would finish queues no finish event. Neither
the policy nor the forecasts see that.)
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from core.collector import collector_paused
from marketplace.placement import (
    FreePool,
    GpuOffer,
    JobQueue,
    JobRequest,
    MachineOffer,
    Placement,
    StretchForecast,
    pool_place,
)
from marketplace.simulator.metrics import Metrics
from marketplace.simulator.owners import (
    EPOCH,
    RENTABLE_AFTER_S,
    Learner,
    Pattern,
    Readings,
    idle_runs,
    learn_apart,
    next_absence,
)
from marketplace.simulator.traces import DutySeries, Node, TraceJob

RENTERS = 16
STARVED_AFTER_S = 86400.0  # a job waiting longer while GPUs fitting it go to later jobs is starved
FLOOR = 500_000  # micro-units per GPU-hour, every GPU
CEILINGS = (1_000_000, 1_500_000, 2_000_000)  # renters' price ceilings, drawn per renter
VRAM_MB = 16_384  # the traces name no VRAM: every GPU has this, every job asks for none

# Event kinds, in the order they are handled at one instant.
_BACK, _FINISH, _RENTABLE, _ARRIVE, _CYCLE = range(5)


@dataclass(frozen=True, slots=True)
class Config:
    horizon_s: float = 3 * 86400.0
    warmup_s: float = 6 * 3600.0
    seed: int = 1
    policy: str = "v2"
    load: float | None = None  # None: the trace's own arrivals
    checkpoint_interval_s: int = 600  # for jobs that declare none; 0 = none
    checkpoint_on_reclaim_s: float | None = None  # jobs save within this of SIGTERM: nothing lost
    max_duration_s: float = 86400.0
    cycle_s: float = 30.0
    owner_drift_s: float = 0.0  # each day of an owner's pattern shifted by up to this, either way
    analogs: bool = True  # v2 reads the days before (providers.forecasting.Analogs)
    learn_apart: bool = True  # v2 learns in a process of its own, where the platform forks


@dataclass(slots=True)
class _Gpu:
    id: int
    machine: int
    model: str
    runs: Iterator[tuple[float, float]]
    away_since: float = 0.0  # start of the owner's current absence
    away_until: float = 0.0  # its end
    rentable: bool = False
    offer: GpuOffer | None = None
    lease: int | None = None  # job id


@dataclass(slots=True)
class _Job:
    id: int
    renter: int
    arrival: float
    gpu_count: int
    models: frozenset[str]
    duration: int
    checkpoint: int | None
    max_price: int
    done: float = 0.0  # checkpointed work, seconds
    started: float | None = None  # current lease's start
    gpus: tuple[int, ...] = ()
    lease_seq: int = 0
    first_start: float | None = None
    finished: float | None = None
    preemptions: int = 0


class Simulation:
    # Queue the finish of every lease, also of one an owner's return ends first (see _cycle):
    # the same figures, more slowly; the tests compare the two.
    queue_every_finish = False
    # v2: learn in step with the engine and let the pool judge each GPU from its forecast
    # itself, as the matcher does, rather than from what the learner read of it ahead: the same
    # figures, more slowly; the tests compare the two.
    judge_live = False

    def __init__(
        self, *, nodes: Sequence[Node], jobs: Sequence[TraceJob], duty: Sequence[DutySeries], config: Config
    ) -> None:
        self.config = config
        rng = random.Random(config.seed)
        origin = min(s.start_s for s in duty)
        # An owner's day is a day: the series repeat every whole number of days that covers
        # them, the time a series does not cover counting as the owner present. (Repeated at
        # their own length, 22.8 h in the shared traces, owners would live on days no clock
        # keeps, and nothing could learn their habits by the hour.)
        span = max(s.start_s + len(s.values) * s.step_s for s in duty) - origin
        period = math.ceil(span / 86400.0) * 86400.0
        patterns = [tuple(idle_runs(s, origin_s=origin, period_s=period)) for s in duty]
        self.metrics = Metrics(warmup_s=config.warmup_s, horizon_s=config.horizon_s)
        self.gpus: list[_Gpu] = []
        self.machine_gpus: list[list[int]] = []
        self.machines: list[MachineOffer] = []
        owners: list[Pattern] = []
        supply = 0.0  # mean rentable GPUs over a period
        for m, node in enumerate(nodes):
            self.machines.append(MachineOffer(m, "", 1, math.inf, None, None, []))
            self.machine_gpus.append(list(range(len(self.gpus), len(self.gpus) + node.gpus)))
            for _ in range(node.gpus):
                k = rng.randrange(len(patterns))
                phase = rng.uniform(0, period)
                # Drift draws from the GPU's own generator: without drift nothing else changes.
                owner = Pattern(
                    patterns[k], period, phase, config.owner_drift_s, config.seed * 1_000_003 + len(self.gpus)
                )
                owners.append(owner)
                self.gpus.append(_Gpu(len(self.gpus), m, node.model, owner.absences()))
                supply += sum(max(b - a - RENTABLE_AFTER_S, 0.0) for a, b in patterns[k]) / period
        self.mean_supply = supply
        self.pool = FreePool(config.policy)
        # v2's learner: its own replay of the owners (see owners.py), started by run().
        self.learner = (
            Learner(owners, horizon_s=config.horizon_s, read_analogs=config.analogs, ahead=not self.judge_live)
            if config.policy == "v2"
            else None
        )
        self.readings: Readings | None = None
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.jobs: dict[int, _Job] = {}
        self.pending: dict[int, _Job] = {}  # waiting jobs, in the order they entered
        # Of those, the ones never placed and not yet counted starved, by shape (models, GPUs),
        # each in arrival order.
        self.unplaced: dict[tuple[frozenset[str], int], dict[int, _Job]] = {}
        self.queue = JobQueue(policy=config.policy)  # the same, as the policy orders them
        self.held: dict[int, int] = {}
        self.changed = True
        self._arrivals(jobs, rng)
        for gpu in self.gpus:
            self._next_absence(gpu, 0.0)
        self._push(0.0, _CYCLE, 0)  # each cycle schedules the next: a small event heap

    # --- setup -----------------------------------------------------------------------------

    def _arrivals(self, trace: Sequence[TraceJob], rng: random.Random) -> None:
        cfg = self.config
        usable = []
        for row in trace:
            if row.duration_s > cfg.max_duration_s:
                self.metrics.skip("over_max_duration", row.arrival_s)
            else:
                usable.append(row)
        if not usable:
            return
        renter_rng = random.Random(cfg.seed * 7919 + 1)
        ceilings = [renter_rng.choice(CEILINGS) for _ in range(RENTERS)]
        picked: list[tuple[float, TraceJob]] = []
        if cfg.load is None:
            origin = usable[0].arrival_s
            picked = [(j.arrival_s - origin, j) for j in usable if j.arrival_s - origin < cfg.horizon_s]
        else:
            work = sum(j.gpu_count * j.duration_s for j in usable) / len(usable)
            rate = cfg.load * self.mean_supply / work  # jobs per second
            arrival_rng = random.Random(cfg.seed * 104729 + 3)
            t = arrival_rng.expovariate(rate) if rate > 0 else math.inf
            while t < cfg.horizon_s:
                picked.append((t, usable[arrival_rng.randrange(len(usable))]))
                t += arrival_rng.expovariate(rate)
        models = {g.model for g in self.gpus}
        for i, (at, trace_job) in enumerate(picked):
            renter = renter_rng.randrange(RENTERS)
            checkpoint = cfg.checkpoint_interval_s or None
            job = _Job(
                i, renter, at, trace_job.gpu_count, trace_job.models, trace_job.duration_s, checkpoint, ceilings[renter]
            )
            self.metrics.offered(job.arrival, job.gpu_count, job.duration, job.models or frozenset(models))
            self.jobs[i] = job
        if self.jobs:
            self._push(self.jobs[0].arrival, _ARRIVE, 0)

    def _push(self, at: float, kind: int, subject: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, subject))

    def _next_absence(self, gpu: _Gpu, now: float) -> None:
        """Schedule the GPU's next absence of its owner long enough to rent."""
        found = next_absence(gpu.runs, self.config.horizon_s, now, None)
        if found is not None:
            gpu.away_since, gpu.away_until, rentable_at = found
            self._push(rentable_at, _RENTABLE, gpu.id)
            self._push(gpu.away_until, _BACK, gpu.id)

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> Metrics:
        # Millions of small objects that die young and never form cycles (events, requests,
        # offers, forecasts): the cyclic collector took 18 % of a 1-day run and freed nothing
        # (the same peak memory without it).
        with collector_paused():
            if self.learner is not None and not self.judge_live:
                apart = self.config.learn_apart and learn_apart()
                self.readings = Readings(self.learner, len(self.gpus), apart=apart)
            try:
                return self._run()
            finally:
                if self.readings is not None:
                    self.readings.close()

    def _run(self) -> Metrics:
        cfg = self.config
        live = self.learner if self.judge_live else None
        while self.events:
            at, kind, _, subject = heapq.heappop(self.events)
            if at >= cfg.horizon_s:
                break
            if live is not None:
                live.advance(at, through=True)
            if kind == _BACK:
                self._owner_back(self.gpus[subject], at)
            elif kind == _RENTABLE:
                self._rentable(self.gpus[subject], at)
            elif kind == _FINISH:
                self._finish(subject, at)
            elif kind == _ARRIVE:
                self._enqueue(self.jobs[subject])
                if subject + 1 in self.jobs:  # arrivals are numbered in time order
                    self._push(self.jobs[subject + 1].arrival, _ARRIVE, subject + 1)
            elif kind == _CYCLE:
                if at + cfg.cycle_s < cfg.horizon_s:
                    self._push(at + cfg.cycle_s, _CYCLE, 0)
                if self.pending and self.changed:
                    self._cycle(at)
        self._close(cfg.horizon_s)
        return self.metrics

    def _rentable(self, gpu: _Gpu, now: float) -> None:
        gpu.rentable = True
        idle_since = EPOCH + gpu.away_since
        forecast: StretchForecast | None = None
        if self.readings is not None:
            forecast = self.readings.take(gpu.id, gpu.away_since, now)
        elif self.learner is not None:
            forecast = self.learner.forecast_of(gpu.id)
        gpu.offer = GpuOffer(gpu.id, gpu.model, VRAM_MB, FLOOR, idle_since, forecast)
        self.metrics.rentable_from(gpu.id, gpu.model, now)
        self._free(gpu, now)

    def _free(self, gpu: _Gpu, now: float) -> None:
        assert gpu.offer is not None
        self.pool.add(self.machines[gpu.machine], gpu.offer, now=EPOCH + now)
        self.changed = True

    def _unfree(self, gpu: _Gpu) -> None:
        self.pool.remove(gpu.id)

    def _owner_back(self, gpu: _Gpu, now: float) -> None:
        if gpu.rentable:
            self.metrics.rentable_until(gpu.id, now)
            gpu.rentable = False
            if gpu.lease is not None:
                self._preempt(self.jobs[gpu.lease], now)
            else:
                self._unfree(gpu)
        self._next_absence(gpu, now)

    def _end_lease(self, job: _Job, now: float) -> float:
        """Close the job's lease; return the work it did. Its GPUs still rentable go back."""
        assert job.started is not None
        worked = now - job.started
        for gpu_id in job.gpus:
            gpu = self.gpus[gpu_id]
            gpu.lease = None
            if gpu.rentable:
                self._free(gpu, now)
        self.held[job.renter] -= job.gpu_count
        job.started = None
        job.lease_seq += 1
        return worked

    def _preempt(self, job: _Job, now: float) -> None:
        assert job.started is not None
        started = job.started
        worked = self._end_lease(job, now)
        if self.config.checkpoint_on_reclaim_s is not None:
            kept = worked
        elif job.checkpoint:
            kept = (worked // job.checkpoint) * job.checkpoint
        else:
            kept = 0.0
        job.done += kept
        job.preemptions += 1
        self.metrics.lease(job.id, job.gpu_count, started, now, lost_from=started + kept, preempted=True)
        self._enqueue(job)  # its remaining work changed

    def _finish(self, subject: int, now: float) -> None:
        job_id, seq = divmod(subject, 1 << 20)
        job = self.jobs[job_id]
        if job.lease_seq != seq or job.started is None:
            return  # a lease preempted before it finished
        started = job.started
        self._end_lease(job, now)
        job.done = job.duration
        job.finished = now
        self.metrics.lease(job.id, job.gpu_count, started, now, lost_from=now, preempted=False)
        self.metrics.completed(job.arrival, now)

    def _enqueue(self, job: _Job) -> None:
        self.pending[job.id] = job
        if job.first_start is None:
            self.unplaced.setdefault((job.models, job.gpu_count), {})[job.id] = job
        self.queue.add(self._request(job))
        self.changed = True

    def _cycle(self, now: float) -> None:
        self.changed = False
        # The queue is kept across cycles; placed jobs leave it in pool_place.
        placements = pool_place(self.pool, self.queue, now=EPOCH + now, held_by_renter=self.held, report=False)
        for p in placements:
            job = self.pending.pop(p.job_id)
            job.started = now
            job.gpus = p.gpu_ids
            if job.first_start is None:
                job.first_start = now
                self.unplaced[(job.models, job.gpu_count)].pop(job.id, None)
                self.metrics.waited(job.arrival, now)
            for gpu_id in p.gpu_ids:
                gpu = self.gpus[gpu_id]
                assert gpu.rentable and gpu.lease is None, "a GPU given twice"
                gpu.lease = job.id
                self._unfree(gpu)
            self.held[job.renter] = self.held.get(job.renter, 0) + job.gpu_count
            end = now + (job.duration - job.done)
            # Where an owner comes back first (a return is handled before a finish at the same
            # instant), the lease is preempted and its finish would be an event that does
            # nothing: not queued. Most leases end so (about 4 in 5 at load 1); queued, they
            # made up a quarter of the events and most of the event heap.
            if self.queue_every_finish or min(self.gpus[gpu_id].away_until for gpu_id in p.gpu_ids) > end:
                self._push(end, _FINISH, job.id * (1 << 20) + job.lease_seq)
            self.metrics.placed(job.id, now)
        self._starved(now, placements)

    @staticmethod
    def _request(job: _Job) -> JobRequest:
        return JobRequest(
            id=job.id,
            renter=job.renter,
            submitted_at=EPOCH + job.arrival,
            gpu_count=job.gpu_count,
            min_vram_mb=0,
            models=job.models,
            region="",
            max_price=job.max_price,
            duration_s=math.ceil(job.duration - job.done),
            checkpoint_interval_s=job.checkpoint,
            kind_bit=1,
        )

    def _starved(self, now: float, placements: list[Placement]) -> None:
        """Note each job never placed yet, waiting over a day since its arrival, while GPUs that
        fit it went to a later job in this cycle."""
        if not placements:
            return
        # Jobs never placed are kept by shape in arrival order (they enter once, on arrival, and
        # leave once, placed or counted), so each shape's walk stops at its first job under a
        # day old, and a shape too big for every machine is passed over whole.
        shapes = [
            (shape, jobs)
            for shape, jobs in self.unplaced.items()
            if jobs and now - next(iter(jobs.values())).arrival > STARVED_AFTER_S
        ]
        if not shapes:
            return
        # Per machine given GPUs this cycle: its GPUs free when the cycle began (gpu -> model),
        # and the placements made on it. Every policy offers a job waiting over a day after
        # every job that arrived before it and before every later one (FIFO; v2's aged jobs
        # first, oldest first), so what was left for the waiting job at its turn is what was
        # free at the start less what went to jobs that arrived before it.
        placed = {g for p in placements for g in p.gpu_ids}
        given: dict[int, tuple[dict[int, str], list[tuple[tuple[float, int], tuple[int, ...]]]]] = {}
        for p in placements:
            if p.machine_id not in given:
                free = {
                    g: self.gpus[g].model
                    for g in self.machine_gpus[p.machine_id]
                    if self.gpus[g].rentable and (self.gpus[g].lease is None or g in placed)
                }
                given[p.machine_id] = (free, [])
            given[p.machine_id][1].append(((self.jobs[p.job_id].arrival, p.job_id), p.gpu_ids))
        # (first and last turn given GPUs there, free GPUs by model, free GPUs, placements), the
        # machines whose last placement went to the latest job first: a waiting job's check stops
        # at the first machine where no job after it got GPUs.
        machines = sorted(
            (
                (min(order for order, _ in made), max(order for order, _ in made), Counter(free.values()), free, made)
                for free, made in given.values()
            ),
            key=lambda machine: machine[1],
            reverse=True,
        )
        # What was left for a job at its turn is at most what was free: a job for more GPUs of
        # its models than any one machine had free fits nowhere. A job ahead of every placement
        # (the usual case: the oldest jobs wait) had all that was free left on every machine.
        ahead_of_all = min(first for first, *_ in machines)
        for (models, count), jobs in shapes:
            most = max(
                sum(by_model.values()) if not models else sum(by_model[m] for m in models)
                for _, _, by_model, _, _ in machines
            )
            if most < count:
                continue
            starved = [waiting.id for waiting in self._old(jobs, now) if self._fitted(waiting, ahead_of_all, machines)]
            for job_id in starved:
                self.metrics.starved.add(job_id)
                del jobs[job_id]

    @staticmethod
    def _old(jobs: dict[int, _Job], now: float) -> Iterator[_Job]:
        """The jobs (in arrival order) waiting over a day."""
        for waiting in jobs.values():
            if now - waiting.arrival <= STARVED_AFTER_S:
                return
            yield waiting

    @staticmethod
    def _fitted(
        waiting: _Job,
        ahead_of_all: tuple[float, int],
        machines: list[tuple[tuple[float, int], tuple[float, int], Counter[str], dict[int, str], list[Any]]],
    ) -> bool:
        """Whether GPUs of one machine that fitted `waiting` at its turn went to a later job
        (`machines` by their last placement's turn, latest first)."""
        turn = (waiting.arrival, waiting.id)
        if turn < ahead_of_all:
            return True
        for first, last, by_model, free, made in machines:
            if last < turn:
                return False  # no later job got GPUs here, nor on any machine after it
            if first > turn:  # nothing went to a job ahead of it: all that was free was left
                left = by_model
            else:
                taken = {g for order, gpu_ids in made if order < turn for g in gpu_ids}
                left = Counter(model for g, model in free.items() if g not in taken)
            fits = sum(left.values()) if not waiting.models else sum(left.get(m, 0) for m in waiting.models)
            if fits >= waiting.gpu_count:
                return True
        return False

    def _close(self, end: float) -> None:
        for gpu in self.gpus:
            if gpu.rentable:
                self.metrics.rentable_until(gpu.id, end)
        for job in self.jobs.values():
            if job.started is not None:
                self.metrics.lease(job.id, job.gpu_count, job.started, end, lost_from=end, preempted=False)
            elif job.first_start is None and job.arrival < end:
                self.metrics.skip("still_waiting", job.arrival)
        self.metrics.max_wait_s = max(
            (
                ((job.first_start if job.first_start is not None else end) - job.arrival)
                for job in self.jobs.values()
                if job.arrival < end
            ),
            default=0.0,
        )
