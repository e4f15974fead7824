"""What a simulation measured, over the measured period [warmup, horizon) only.

- idle_gpu_s: GPU-seconds rentable (the owner away past the rentable delay), leased or not.
- leased_gpu_s: GPU-seconds under a lease. lost_gpu_s: the part of them whose work a
  preemption threw away (since the lease's last checkpoint). useful_gpu_s = leased - lost (work
  kept: finished, checkpointed, or still running at the horizon).
- rented_share = leased / idle; useful_share = useful / idle.
- upper_bound_gpu_s: the most useful work any policy could do, ignoring time: a maximum flow
  from offered demand (each job's GPUs x the part of [arrival, arrival + duration] inside the
  measured period; grouped by allowed models) to idle supply per GPU model. useful_vs_bound =
  useful / upper bound.
- preemptions_per_job: preemptions in the period / jobs leased in the period.
- starved_over_a_day: jobs never placed yet, waiting over a day, at a cycle that gave a later
  job GPUs on a machine where enough GPUs of a model they allow were free.
- wait (first placement - arrival) and completion (finish - arrival) percentiles: jobs that
  arrived in the period. jobs_completed: finishes in the period. never_placed: by reason.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def max_flow_bound(demand: dict[frozenset[str], float], supply: dict[str, float]) -> float:
    """Max flow from demand groups (allowed models) to models' supply: the useful work a perfect
    scheduler could do. Augmenting paths over a graph of a few dozen nodes."""
    groups = [g for g, d in demand.items() if d > 0]
    models = sorted(supply)
    left: dict[Any, float] = {g: demand[g] for g in groups}
    room: dict[Any, float] = dict(supply)
    # flow[g][m], so a later group can push an earlier one over to another model.
    flow: dict[Any, dict[Any, float]] = {g: {} for g in groups}
    total = 0.0
    while True:
        # BFS over (group -> allowed model with room: done) or (model -> group using it -> ...).
        parents: dict[Any, Any] = {}
        frontier: list[Any] = [("g", g) for g in groups if left[g] > 1e-9]
        for node in frontier:
            parents[node] = None
        found = None
        while frontier and found is None:
            following: list[Any] = []
            for node in frontier:
                if node[0] == "g":
                    for m in models:
                        if m in node[1] and ("m", m) not in parents:
                            parents[("m", m)] = node
                            if room[m] > 1e-9:
                                found = ("m", m)
                                break
                            following.append(("m", m))
                else:
                    for g in groups:
                        if flow[g].get(node[1], 0.0) > 1e-9 and ("g", g) not in parents:
                            parents[("g", g)] = node
                            following.append(("g", g))
                if found:
                    break
            frontier = following
        if found is None:
            return total
        path = [found]
        while parents[path[-1]] is not None:
            path.append(parents[path[-1]])
        path.reverse()  # group, model, group, model, ...
        amount = min(left[path[0][1]], room[found[1]])
        for a, b in itertools.pairwise(path):
            if a[0] == "m":  # model a -> group b: b gives up flow on a
                amount = min(amount, flow[b[1]][a[1]])
        for a, b in itertools.pairwise(path):
            if a[0] == "g":
                flow[a[1]][b[1]] = flow[a[1]].get(b[1], 0.0) + amount
            else:
                flow[b[1]][a[1]] -= amount
        left[path[0][1]] -= amount
        room[found[1]] -= amount
        total += amount


@dataclass
class Metrics:
    warmup_s: float
    horizon_s: float
    idle_by_model: dict[str, float] = field(default_factory=dict)
    demand_by_models: dict[frozenset[str], float] = field(default_factory=dict)
    leased_gpu_s: float = 0.0
    lost_gpu_s: float = 0.0
    preemptions: int = 0
    leased_jobs: set[int] = field(default_factory=set)
    waits: list[float] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)
    jobs_completed: int = 0
    jobs_arrived: int = 0
    never_placed: dict[str, int] = field(default_factory=dict)
    max_wait_s: float = 0.0
    starved: set[int] = field(default_factory=set)
    _rentable: dict[int, tuple[str, float]] = field(default_factory=dict)

    def _clip(self, a: float, b: float) -> float:
        """The length of [a, b] inside the measured period (0 when outside)."""
        end = b if b < self.horizon_s else self.horizon_s
        start = a if a > self.warmup_s else self.warmup_s
        return end - start if end > start else 0.0

    def rentable_from(self, gpu: int, model: str, at: float) -> None:
        self._rentable[gpu] = (model, at)

    def rentable_until(self, gpu: int, at: float) -> None:
        model, since = self._rentable.pop(gpu)
        self.idle_by_model[model] = self.idle_by_model.get(model, 0.0) + self._clip(since, at)

    def offered(self, arrival: float, gpus: int, duration: float, models: frozenset[str]) -> None:
        if arrival >= self.warmup_s:
            self.jobs_arrived += 1
        # The part of [arrival, arrival + duration] inside the measured period: what the job
        # offers there if it ran at once. A job that arrived during the warm-up offers only what
        # is left of it after the warm-up (its earlier work was the warm-up's, and it was
        # counted whole here once: work done before the period inflated the bound).
        work = gpus * self._clip(arrival, arrival + duration)
        self.demand_by_models[models] = self.demand_by_models.get(models, 0.0) + work

    def lease(self, job: int, gpus: int, start: float, end: float, *, lost_from: float, preempted: bool) -> None:
        leased = self._clip(start, end)
        if leased > 0:
            self.leased_jobs.add(job)
        self.leased_gpu_s += gpus * leased
        self.lost_gpu_s += gpus * self._clip(lost_from, end)
        if preempted and self.warmup_s <= end < self.horizon_s:
            self.preemptions += 1

    def placed(self, job: int, at: float) -> None:
        if at >= self.warmup_s:
            self.leased_jobs.add(job)

    def waited(self, arrival: float, at: float) -> None:
        if arrival >= self.warmup_s:
            self.waits.append(at - arrival)

    def completed(self, arrival: float, at: float) -> None:
        if at >= self.warmup_s:
            self.jobs_completed += 1
        if arrival >= self.warmup_s:
            self.completions.append(at - arrival)

    def skip(self, reason: str, arrival: float) -> None:
        self.never_placed[reason] = self.never_placed.get(reason, 0) + 1

    def summary(self) -> dict[str, Any]:
        idle = sum(self.idle_by_model.values())
        useful = self.leased_gpu_s - self.lost_gpu_s
        bound = max_flow_bound(self.demand_by_models, self.idle_by_model)

        def share(a: float, b: float) -> float | None:
            return round(a / b, 4) if b > 0 else None

        def pct(values: list[float], q: float) -> float | None:
            found = _percentile(values, q)
            return round(found, 1) if found is not None else None

        return {
            "idle_gpu_s": round(idle),
            "leased_gpu_s": round(self.leased_gpu_s),
            "useful_gpu_s": round(useful),
            "lost_gpu_s": round(self.lost_gpu_s),
            "rented_share": share(self.leased_gpu_s, idle),
            "useful_share": share(useful, idle),
            "lost_share_of_leased": share(self.lost_gpu_s, self.leased_gpu_s),
            "upper_bound_gpu_s": round(bound),
            "useful_vs_bound": share(useful, bound),
            "preemptions": self.preemptions,
            "preemptions_per_job": share(self.preemptions, len(self.leased_jobs)),
            "wait_p50_s": pct(self.waits, 0.5),
            "wait_p95_s": pct(self.waits, 0.95),
            "max_wait_s": round(self.max_wait_s, 1),
            "starved_over_a_day": len(self.starved),
            "completion_p50_s": pct(self.completions, 0.5),
            "completion_p95_s": pct(self.completions, 0.95),
            "jobs_arrived": self.jobs_arrived,
            "jobs_completed": self.jobs_completed,
            "never_placed": dict(sorted(self.never_placed.items())),
        }


def table(rows: Iterable[tuple[str, Any]]) -> str:
    items = list(rows)
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in items)
