"""Placement policies: which pending job goes on which idle GPUs. Plain code over plain data (no
ORM, no Django): the matcher feeds it from the database, the trace-replay simulator
(marketplace.simulator) from its simulated world, so both run the same rules.

Hard constraints, every policy: the machine accepts the job's kind; every GPU has an allowed
model (empty = any), at least min_vram_mb and a floor <= the job's price ceiling; the machine is
in the job's region (when it names one); the machine's declared window lasts at least the job's
duration; all GPUs of a placement are on one machine; no GPU is given twice. The agreed price
is the highest floor among the chosen GPUs.

Policies (`POLICIES`):

- ``first-fit``: jobs in FIFO order (submitted_at, id); the fitting machine with the lowest id;
  its lowest-id eligible GPUs.
- ``v1``: today's production rule (marketplace.matching): jobs FIFO; among fitting machines the
  cheapest lease wins (the highest floor of the job's gpu_count cheapest eligible GPUs), then
  the best fit (fewest eligible free GPUs), then the lowest machine id; on it the cheapest
  eligible GPUs.
- ``v2``: forecast-aware, fair, priced and aged:

  * Order. A job waiting longer than `AGE_LIMIT_S` goes before every other, oldest first
    (but for the fit pass below, which only those waiting over `OVERDUE_S` go before).
    The others are taken renter by renter: the next job comes from the renter whose head job
    bids most per GPU already held, max_price / (1 + GPUs the renter holds, counting this
    cycle's placements); within a renter, higher price ceiling first, then FIFO. So when
    capacity is short a higher ceiling goes first, but a renter's bid is discounted by what
    it already holds: a flood from one renter cannot starve another (the other's head job
    outbids it once the flood holds price ratio-many GPUs), and aging bounds every wait.
  * Machine. Each free GPU gets a *safe-until* time: the instant until which its owner stays
    away with probability `P_TARGET`, from its forecast (providers.forecasting: its own
    stretches by hour of the week, blended with the fleet prior), conditioned on how long the
    owner has been away already (judged at grid ages 0, 60 s, then growing by half: see
    `_age_step`), or, where longer, the time its analogs give (`Analogs.safe_until`: the
    stretches that began at the same time on the days before, scaled by how well they read
    this machine before). A placement's safe-until is the earliest of its GPUs'. The job goes to the
    fitting placement whose safe-until is the *earliest that still covers the job's
    remaining duration* (best fit: long stretches are kept for long jobs); when none covers
    it, to the one with the latest safe-until (the most it can checkpoint), or, for a job
    without checkpoints (which keeps nothing unless it runs to the end), to the one with the
    earliest (the GPU time that costs least; the long stretches stay for jobs they can finish). On a machine the
    steadiest GPUs are taken first. Price plays no part here beyond the hard constraints
    (the agreed price is still the highest floor).
  * Fit: when capacity is short (more jobs pending than free GPUs), the GPUs choose first. After
    the jobs waiting over `OVERDUE_S` (20 h), and the jobs for several GPUs waiting over
    `AGE_LIMIT_S` (the pass hands out GPUs one by one and would take their machines apart), each
    free GPU, those due back soonest first (at most `_FIT_GPUS` a cycle; at most `_FIT_RENTERS`
    renters and `_FIT_WALK` jobs down each list asked for each), goes to a job for one GPU that it
    can run to the end (remaining duration within the GPU's safe-until): the longest such job of
    those waiting over `AGE_LIMIT_S` (then the oldest); without one, the longest such job (of equal
    lengths the higher bid, then the oldest) among the renters that bid at least half the highest
    bid of a renter with such a job (the bid as in Order; of each renter, its longest such job). A
    GPU no job fits goes on to the order above. Why: a job that finishes loses nothing to a
    preemption and frees its GPU for the next, while the oldest job at full load is usually a long
    one that a short idle stretch would only cut short (in the shared traces 77 % of the owners'
    stretches are shorter than a 600-s checkpoint interval, where it keeps nothing); and the
    longest job that fits, rather than any, keeps the rare long stretches for the jobs only they
    can hold (on the traces, the renters' order among the jobs that fit, or any job within nine
    tenths of the longest, kept under half of the gain: docs/simulator.md). With GPUs to spare
    every job is placed anyway, and the jobs choose as below.
    How fair share and price combine: a renter's bid is its job's ceiling ÷ (1 + GPUs it holds). In
    the order, the highest bid goes first, so a higher ceiling goes first until its renter holds
    ceiling-ratio times more than the other, and a flood from one renter cannot starve another. In
    the fit pass the bids only bound the choice: a renter bidding under half the best bid among the
    jobs that fit (at equal ceilings, one holding more than about twice the GPUs of the best
    bidder) is passed over; among the rest the fit decides. A job waiting over `OVERDUE_S` goes
    before the fit pass, whatever its renter or ceiling.
  * No holding back: a job that fits some free GPUs is placed this cycle, so no GPU sits idle
    while a fitting job waits. (Holding a job up to 30 min for a steadier GPU while capacity
    was ample was tried on the traces: no fewer preemptions, longer waits.)
  * Speed: per group of GPU (model, VRAM) and tier of free count (1, 2, 4, 8) a list of
    (safe-until, machine, class) entries sorted, where a class is the group's GPUs of one
    region and set of accepted kinds; a job bisects to now + its duration and walks upward
    (at most `_WALK_LIMIT` machines each way), passing over the entries of classes it does
    not accept, so a cycle costs about (free GPUs + jobs) x log(free GPUs), not jobs x
    machines (benchmarks/placement.py), and a job that accepts few of a group's classes (one
    region of many) passes over about as many entries of the others as there are of them for
    each of its own. (Lists per class, up to 80 of them a job at 100,000 GPUs in five regions,
    cost a third of the policy's time in their bisects and walks' first steps; per group,
    about 8.) first-fit and v1 keep a list per class (their walk has no limit, and each entry
    passed over would be a heap step).
    Beside each entry is the least floor at which its machine can give the job anything (its
    class's cheapest; 0 on a machine with GPUs of several classes, where a job may combine
    them): the walk passes over the entries of machines that ask more than the job's ceiling
    without looking at them, and they do not count towards the limit (a job with a low ceiling
    is not refused because hundreds of machines it cannot pay came first), and a job whose
    ceiling is below every floor offered in the groups it accepts is refused without a walk.
    Jobs are drawn from heaps (JobQueue), and a cycle stops drawing once no GPU is free; a
    caller that keeps its JobQueue across cycles (the simulator) pays for the jobs a cycle
    tries, not for the queue's length. Aged jobs, and each renter's others, are kept in one
    heap per tier of GPU count, and a tier no free machine can hold any more
    (`FreePool.tier_open`) is passed over for the rest of the cycle rather than each of its
    jobs offered and refused.

Approximations every policy shares: a machine is found through the class lists of the job's
tier, so a job for n GPUs is not placed across two classes of one machine that each have fewer
than tier(n) free GPUs (mixed-model machines). marketplace.matching runs these policies but
v1, which it matches with a pool of its own (FIFO, each chunk written as it is placed).

Every placement reports `p_finish`, the predicted probability that the job runs its whole
remaining duration without a preemption (the product of its GPUs' survival), and
`expected_lost_s`, the expected seconds of work lost per GPU to a preemption (work since the
last checkpoint), from the same forecasts.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from operator import itemgetter
from typing import Any, Protocol

from providers.forecasting import (
    SAFE_P,
    Forecast,
    StretchCounts,
    Survival,
    expected_lost_s,
    hour_of_week,
)

POLICIES = ("first-fit", "v1", "v2")


class SafeUntil(Protocol):
    """What v2 reads of a machine's days before (`providers.forecasting.Analogs`)."""

    def safe_until(self, idle_since: float, at: float) -> float | None: ...


class StretchForecast(Protocol):
    """What v2 reads of a GPU's forecast (`providers.forecasting.Forecast`): the survival curve
    of stretches begun in an hour of the week, and the days before (None: not read). The
    simulator hands the pool one stretch's worth of it, read ahead in its learning process."""

    def curve(self, began_hour: int) -> Survival: ...

    @property
    def analogs(self) -> SafeUntil | None: ...


# v2: a job waiting longer than this goes first (no job waits a day while GPUs fit it).
AGE_LIMIT_S = 6 * 3600.0
# v2: a job waiting longer than this goes before the fit pass too (module docstring, Fit): under
# the day, with the margin of the cycles that placing it may take.
OVERDUE_S = 20 * 3600.0
# v2's fit pass: at most this many free GPUs a cycle (those due back soonest), and at most this
# many of the aged jobs, and of each renter's, looked at for each, from the longest that fits down.
_FIT_GPUS = 1024
_FIT_WALK = 16
# v2's fit pass: at most this many renters asked for each GPU, in the order of the most they could
# bid (a cycle's cost stays GPUs x this x log jobs however many renters wait).
_FIT_RENTERS = 64
# v2's fit pass: a job whose renter bids less than this share of the highest bid among the jobs
# that fit is passed over (module docstring, Fit).
_FIT_BID_SHARE = 0.5
# v2: a GPU's horizon is the time its owner stays away with this probability.
P_TARGET = SAFE_P
# v2: entries looked at above the best-fit point before settling for the first that fits.
_WALK_LIMIT = 256

_NO_FORECAST = Forecast(StretchCounts(), StretchCounts())
_NO_CURVE = _NO_FORECAST.curve(0)
# Segments of expected_lost_s for a placement's report (a figure, not a decision).
_LOST_STEPS = 16
# A machine's entry for a class sits in the list of each tier up to its free count there, so a
# job for n GPUs walks only machines with at least tier(n) free GPUs of one class.
_TIERS = (1, 2, 4, 8)


def _negated(key: tuple[float, ...]) -> tuple[float, ...]:
    """A v2 entry's key (safe-until, machine id), negated: the downward walk's heap order."""
    return (-key[0], -key[1])


_Entry = tuple[tuple[float, ...], int, int]  # (key, machine id, class)


def _index(entries: list[_Entry], firsts: list[float], entry: _Entry) -> int:
    """Where `entry` is, or would go, in a group's tier (sorted `entries` and their keys' first
    figures): bisected on the floats, which compare faster than the entries' nested tuples, and
    among equal ones on the entries."""
    first = entry[0][0]
    i = bisect_left(firsts, first)
    if i < len(firsts) and firsts[i] == first:
        i = bisect_left(entries, entry, i, bisect_right(firsts, first, i))
    return i


def _insert(entries: list[_Entry], firsts: list[float], floors: list[int], entry: _Entry, floor: int) -> None:
    """Add `entry` to a group's tier: its sorted entries, their keys' first figures and the
    least ceiling each entry's machine can take a job at (`_Machine.keys`)."""
    i = _index(entries, firsts, entry)
    entries.insert(i, entry)
    firsts.insert(i, entry[0][0])
    floors.insert(i, floor)


def _drop(entries: list[_Entry], firsts: list[float], floors: list[int], entry: _Entry) -> None:
    """Remove `entry` from a group's tier (when it is there)."""
    i = _index(entries, firsts, entry)
    if i < len(entries) and entries[i] == entry:
        del entries[i]
        del firsts[i]
        del floors[i]


def _tier(count: int) -> int:
    """Index of the largest tier <= count (count >= 1)."""
    return 3 if count >= 8 else 2 if count >= 4 else 1 if count >= 2 else 0


# The records below are plain slotted dataclasses, not frozen ones: nothing changes them, and the
# simulator builds them by the million (a frozen dataclass's __init__ costs four times as much).


@dataclass(slots=True)
class JobRequest:
    id: int
    renter: int  # renter id, for the fair share
    submitted_at: float  # Unix seconds
    gpu_count: int
    min_vram_mb: int
    models: frozenset[str]  # lower-case model names; empty = any
    region: str  # "" = any
    max_price: int  # micro-units per GPU-hour (price ceiling)
    duration_s: int  # expected (remaining) run time
    checkpoint_interval_s: int | None  # None: a preemption loses all work
    kind_bit: int  # 1 container, 2 process (matching.KIND_BITS)


@dataclass(slots=True)
class GpuOffer:
    id: int
    model: str  # lower-case
    vram_mb: int
    floor: int  # micro-units per GPU-hour
    # Where each GPU has an owner of its own (the simulator's world), its own idle stretch and
    # forecast; None: the machine's.
    idle_since: float | None = None
    forecast: StretchForecast | None = None


@dataclass(slots=True)
class MachineOffer:
    id: int
    region: str
    kinds: int  # accepted kinds, KIND_BITS or-ed
    window_s: float  # declared availability left from now (math.inf: no declared end)
    idle_since: float | None  # Unix s: start of the current idle stretch (None: unknown)
    forecast: StretchForecast | None  # None: v2 forecasts it as an unknown machine (a mean of about an hour)
    gpus: list[GpuOffer]  # free candidate GPUs


@dataclass(slots=True)
class Placement:
    job_id: int
    machine_id: int
    gpu_ids: tuple[int, ...]
    price: int  # micro-units per GPU-hour: the highest floor among the chosen GPUs
    p_finish: float  # P(the job runs its whole remaining duration without a preemption)
    expected_lost_s: float  # expected seconds of work lost per GPU to a preemption


# --- the pool --------------------------------------------------------------------------------

_Class = tuple[str, int, str, int]  # model, VRAM, region, kinds


def _age_step(age_s: float) -> tuple[float, float]:
    """(the grid age at or below `age_s`, the next grid age). v2 judges a GPU at grid ages
    (0, then 60 s growing by half each step), so a pool kept across cycles recomputes a
    GPU's horizon O(log stretch) times per stretch and answers as one built from scratch."""
    if age_s < 60:
        return 0.0, 60.0
    k = math.floor(math.log(age_s / 60) / _LOG_STEP + 1e-9)
    return 60 * _AGE_GROWTH**k, 60 * _AGE_GROWTH ** (k + 1)


_AGE_GROWTH = 1.5
_LOG_STEP = math.log(_AGE_GROWTH)


def _judgement(curve: Survival, analogs: SafeUntil | None, idle_since: float, now: float) -> tuple[float, float]:
    """v2: (a GPU idle since `idle_since` is still free at this time with probability
    P_TARGET, judged at its grid age now; the next grid age)."""
    grid, following = _age_step(max(now - idle_since, 0.0))
    at = idle_since + grid
    safe = at + curve.quantile_more(grid, P_TARGET)
    if analogs is not None:
        # The same days' reading, calibrated to P_TARGET on this machine's record, where it
        # promises longer (providers.forecasting.Analogs).
        read = analogs.safe_until(idle_since, at)
        if read is not None and read > safe:
            safe = read
    return safe, following


@dataclass(slots=True, eq=False)  # identity: a pool's lists remove the very entry, not an equal one
class _Gpu:
    offer: GpuOffer
    machine: int
    cls: int
    curve: Survival
    idle_since: float
    safe_until: float  # v2: the owner is still away at this time with probability P_TARGET
    analogs: SafeUntil | None = None  # v2: the forecast's reading of the days before
    stamp: int = 0


# Whether v2's pool keeps its walk's lists per group of classes (model, VRAM) rather than per
# class (module docstring, Speed); first-fit's and v1's are per class (`find_ordered` counts on it).
_V2_BY_MODEL = True

# The order GPUs are taken in on one machine, per policy (v2: the safest first).
_GPU_ORDER: dict[str, Callable[[_Gpu], tuple[float, ...]]] = {
    "first-fit": lambda g: (g.offer.id,),
    "v1": lambda g: (g.offer.floor, g.offer.id),
    "v2": lambda g: (-g.safe_until, g.offer.floor, g.offer.id),
}


@dataclass(slots=True, eq=False)
class _Machine:
    offer: MachineOffer
    # class id -> free GPUs, in order (a class whose last free GPU is taken leaves it)
    free: dict[int, list[_Gpu]] = field(default_factory=dict)
    # class -> (key, top tier, floor): the key and tiers its entries are under, and the least
    # price ceiling at which a job can have any of the machine's GPUs through them: the class's
    # cheapest floor, or 0 while the machine has free GPUs of another class too (a job may then
    # combine classes, and 0 never rules the machine out).
    keys: dict[int, tuple[tuple[float, ...], int, int]] = field(default_factory=dict)


class FreePool:
    """The free GPUs a policy places jobs on, grouped by class (model, VRAM, region, kinds),
    with per group (model, VRAM) and tier a sorted list of (key, machine id, class) entries,
    one live entry per machine and class. `place()` builds one per call; a caller that sees
    GPUs come and go one by one (the simulator) keeps one and `add`s and `remove`s them, and
    gets the same answers as `place()` over the same free GPUs (a machine's region, kinds and window are
    taken from its first `add`)."""

    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        self.policy = policy
        self._order = _GPU_ORDER[policy]
        self.machines: dict[int, _Machine] = {}
        self.gpus: dict[int, _Gpu] = {}
        self.class_ids: dict[_Class, int] = {}
        self.class_keys: list[_Class] = []
        # Each class's group (v2: its model and VRAM; first-fit and v1: the class itself): the
        # entries of a group's classes share a list per tier, sorted (module docstring, Speed).
        self.group_ids: dict[tuple[Any, ...], int] = {}
        self.group_of: list[int] = []
        self.sorted: list[tuple[list[_Entry], ...]] = []
        # The same per group and tier: each entry's key's first figure (v2: its safe-until), so
        # a job's walk bisects plain floats.
        self.firsts: list[tuple[list[float], ...]] = []
        # And each entry's floor (`_Machine.keys`): v2's walk passes over, without looking at
        # the machine, the entries of machines that ask more than the job's ceiling (at 100,000
        # GPUs with floors of their own, 97 % of the machines a cycle looked at, see
        # benchmarks/README.md).
        self.floors: list[tuple[list[int], ...]] = []
        # Per group, the least floor any GPU offered in it asked (never raised as GPUs go: a
        # bound): a v2 job whose ceiling is below it in every group it accepts is refused
        # without a walk, which would have passed over every entry of its lists.
        self.cheapest: list[int | float] = []
        # The floor every GPU offered so far asks (None: they differ), so that a pool whose GPUs
        # all ask the same (the simulator's) finds a class's cheapest without looking.
        self._one_floor: int | None = None
        self._offered = False
        self._shape_classes: dict[tuple[frozenset[str], int, str, int], tuple[int, ...]] = {}
        # (classes, tier) -> the tier's lists of those classes' groups: (entries, firsts, floors)
        # side by side, and the classes as a set (a walk passes over the entries of the groups'
        # other classes). The lists are kept in place as entries come and go, so this holds
        # while no class is added (cleared with _shape_classes).
        self._tier_lists: dict[
            tuple[tuple[int, ...], int],
            tuple[list[list[_Entry]], list[list[float]], list[list[int]], frozenset[int], tuple[int, ...]],
        ] = {}
        self._due: list[tuple[float, int, int]] = []  # v2: (grid age reached at, gpu id, stamp)
        self._stamp = 0

    def __len__(self) -> int:
        return len(self.gpus)

    # --- keeping it -------------------------------------------------------------------------

    def add(self, machine: MachineOffer, gpu: GpuOffer, *, now: float) -> None:
        """Offer one free GPU of `machine` (a GPU already offered is left as it is)."""
        if gpu.id in self.gpus:
            return
        held = self.machines.get(machine.id)
        if held is None:
            held = self.machines[machine.id] = _Machine(machine)
        entry = self._entry(held.offer, gpu, now, None)
        cls = entry.cls
        gpus = held.free.get(cls)
        if gpus is None:
            gpus = held.free[cls] = []
            if len(held.free) == 2:  # a second class: the first's entries may no longer rule it out
                for other in held.free:
                    if other != cls:
                        self._reenter(held, other)
        insort(gpus, entry, key=self._order)
        self._reenter(held, cls)

    def add_machine(self, machine: MachineOffer, *, now: float) -> None:
        """Offer every GPU of `machine`: the pool `add` makes of them one by one, made in one
        go (the GPUs that share the machine's forecast and idle stretch judged once, each class
        entered once)."""
        if machine.id in self.machines:
            for gpu in machine.gpus:
                self.add(machine, gpu, now=now)
            return
        held = self._held(machine, now)
        if held is not None:
            for cls in held.free:
                self._reenter(held, cls)

    def _held(self, machine: MachineOffer, now: float) -> _Machine | None:
        """A machine new to the pool with its GPUs judged and sorted by class, in `machines`
        but not yet in the class lists (None: none of its GPUs is new to the pool)."""
        held = _Machine(machine)
        judged: dict[tuple[int, float], tuple[Survival, SafeUntil | None, float, float]] = {}
        for gpu in machine.gpus:
            if gpu.id not in self.gpus:
                entry = self._entry(machine, gpu, now, judged)
                held.free.setdefault(entry.cls, []).append(entry)
        if not held.free:
            return None
        self.machines[machine.id] = held
        for gpus in held.free.values():
            gpus.sort(key=self._order)  # as insort would have: the order has no ties
        return held

    def add_machines(self, machines: Iterable[MachineOffer], *, now: float) -> None:
        """`add_machine` for each of `machines`, the same pool made in one go (`place()` builds
        its pool so): into an empty pool, the entries of every class and tier are gathered and
        each list sorted once, where `add_machine` keeps them sorted entry by entry (at 100,000
        GPUs, 76,000 of them free, 12 % less time). A machine offered a second time, or into a
        pool that already holds GPUs, goes through `add_machine`."""
        if self.gpus:
            for machine in machines:
                self.add_machine(machine, now=now)
            return
        staged: dict[tuple[int, int], list[tuple[_Entry, int]]] = {}
        again: list[MachineOffer] = []
        for machine in machines:
            if machine.id in self.machines:
                again.append(machine)
                continue
            held = self._held(machine, now)
            if held is None:
                continue
            for cls, gpus in held.free.items():
                key, top, floor = self._key(held, cls), _tier(len(gpus)), self._least_floor(held, gpus)
                held.keys[cls] = (key, top, floor)
                item = ((key, machine.id, cls), floor)
                group = self.group_of[cls]
                for tier in range(top + 1):
                    staged.setdefault((group, tier), []).append(item)
        for (group, tier), items in staged.items():
            items.sort()  # entries differ in their machine id or class: the floors beside them are never compared
            self.sorted[group][tier][:] = [entry for entry, _ in items]
            self.firsts[group][tier][:] = [entry[0][0] for entry, _ in items]
            self.floors[group][tier][:] = [floor for _, floor in items]
        for machine in again:
            self.add_machine(machine, now=now)

    def _entry(
        self,
        offer: MachineOffer,
        gpu: GpuOffer,
        now: float,
        judged: dict[tuple[int, float], tuple[Survival, SafeUntil | None, float, float]] | None,
    ) -> _Gpu:
        """The pool's record of a GPU of the machine `offer`, in its class, judged (v2), kept in
        the pool's `gpus` (not yet in its machine's lists). `judged`: the judgements made so far for one
        machine, by forecast and idle stretch (GPUs without their own share the machine's)."""
        if not self._offered:
            self._one_floor, self._offered = gpu.floor, True
        elif gpu.floor != self._one_floor:
            self._one_floor = None
        key = (gpu.model, gpu.vram_mb, offer.region, offer.kinds)
        cls = self.class_ids.get(key)
        if cls is None:
            cls = self.class_ids[key] = len(self.class_keys)
            self.class_keys.append(key)
            group_key = key[:2] if self.policy == "v2" and _V2_BY_MODEL else key
            group = self.group_ids.get(group_key)
            if group is None:
                group = self.group_ids[group_key] = len(self.sorted)
                self.sorted.append(([], [], [], []))
                self.firsts.append(([], [], [], []))
                self.floors.append(([], [], [], []))
                self.cheapest.append(math.inf)
            self.group_of.append(group)
            self._shape_classes.clear()
            self._tier_lists.clear()
        group = self.group_of[cls]
        if gpu.floor < self.cheapest[group]:
            self.cheapest[group] = gpu.floor
        if self.policy != "v2":
            entry = self.gpus[gpu.id] = _Gpu(gpu, offer.id, cls, _NO_CURVE, now, 0.0, None)
            return entry
        forecast: StretchForecast = gpu.forecast or offer.forecast or _NO_FORECAST
        idle_since = gpu.idle_since if gpu.idle_since is not None else offer.idle_since
        if idle_since is None:
            idle_since = now
        memo = (id(forecast), idle_since)
        found = judged.get(memo) if judged is not None else None
        if found is None:
            curve, analogs = forecast.curve(hour_of_week(idle_since)), forecast.analogs
            found = (curve, analogs, *_judgement(curve, analogs, idle_since, now))
            if judged is not None:
                judged[memo] = found
        curve, analogs, safe, following = found
        entry = self.gpus[gpu.id] = _Gpu(gpu, offer.id, cls, curve, idle_since, safe, analogs)
        self._due_at(entry, following)
        return entry

    def remove(self, gpu_id: int) -> None:
        """Withdraw a free GPU (ignored when it is not in the pool)."""
        entry = self.gpus.pop(gpu_id, None)
        if entry is None:
            return
        machine = self.machines[entry.machine]
        gpus = machine.free[entry.cls]
        gpus.remove(entry)
        if not gpus:  # the machine holds classes with free GPUs only, as one offered afresh
            del machine.free[entry.cls]
        self._reenter(machine, entry.cls)
        if not machine.free:
            del self.machines[entry.machine]
        elif not gpus and len(machine.free) == 1:  # one class left: its own least floor rules it out again
            for cls in machine.free:
                self._reenter(machine, cls)

    def remove_machine(self, machine_id: int) -> None:
        """Withdraw every free GPU of the machine, and the machine with them (ignored when it
        has none in the pool): offered again, it is judged afresh from its new offer."""
        held = self.machines.pop(machine_id, None)
        if held is None:
            return
        for cls, gpus in held.free.items():
            for gpu in gpus:
                del self.gpus[gpu.offer.id]
            gpus.clear()
            self._reenter(held, cls)

    def window_moved(self, machine: MachineOffer) -> None:
        """The machine's declared window moved (`window_s`, seconds from now), and nothing else
        of its offer: the pool holds the new offer, its GPUs stand as judged (ignored when the
        machine is not in the pool)."""
        held = self.machines.get(machine.id)
        if held is not None:
            held.offer = machine

    def _judge(self, gpu: _Gpu, now: float) -> None:
        """v2: the GPU's safe_until at its current grid age; due again at the next grid age."""
        gpu.safe_until, following = _judgement(gpu.curve, gpu.analogs, gpu.idle_since, now)
        self._due_at(gpu, following)

    def _due_at(self, gpu: _Gpu, following: float) -> None:
        """v2: judge the GPU again at the grid age `following` (a new stamp: earlier dues lapse)."""
        self._stamp += 1
        gpu.stamp = self._stamp
        heapq.heappush(self._due, (gpu.idle_since + following, gpu.offer.id, gpu.stamp))

    def _refresh(self, now: float) -> None:
        due = self._due
        if len(due) > 2 * len(self.gpus) + 1024:
            # Mostly the lapsed dues of GPUs withdrawn or judged again (a pool kept for long):
            # only the live ones kept.
            due[:] = [item for item in due if (gpu := self.gpus.get(item[1])) is not None and gpu.stamp == item[2]]
            heapq.heapify(due)
        while due and due[0][0] <= now:
            _, gpu_id, stamp = heapq.heappop(due)
            gpu = self.gpus.get(gpu_id)
            if gpu is None or gpu.stamp != stamp:
                continue
            machine = self.machines[gpu.machine]
            gpus = machine.free[gpu.cls]
            head = gpus[0]
            gpus.remove(gpu)
            self._judge(gpu, now)
            insort(gpus, gpu, key=self._order)
            if gpus[0] is not head or head is gpu:  # the class's key moved
                self._reenter(machine, gpu.cls)

    def _key(self, machine: _Machine, cls: int) -> tuple[float, ...]:
        """A lower bound (first-fit, v1) or upper bound (v2) of the machine's rank for any job
        this class serves."""
        gpus = machine.free[cls]
        mid = machine.offer.id
        if self.policy == "first-fit":
            return (mid,)
        if self.policy == "v1":
            return (gpus[0].offer.floor, len(gpus), mid)
        return (gpus[0].safe_until, mid)

    def _least_floor(self, machine: _Machine, gpus: list[_Gpu]) -> int:
        """The least price ceiling at which a job can have any of the machine's GPUs through the
        entries of the class whose free GPUs are `gpus` (`_Machine.keys`)."""
        if len(machine.free) > 1:
            return 0
        if self._one_floor is not None:
            return self._one_floor
        return min(g.offer.floor for g in gpus)

    def _reenter(self, machine: _Machine, cls: int) -> None:
        """Bring the machine's entries for the class up to date: one per tier up to its free
        count there, under its current key. Only the entries that change are touched (a tier
        gained or lost under the same key: those tiers alone)."""
        gpus = machine.free.get(cls)
        old = machine.keys.get(cls)
        group = self.group_of[cls]
        tiers, firsts, floors = self.sorted[group], self.firsts[group], self.floors[group]
        mid = machine.offer.id
        if gpus:
            key = self._key(machine, cls)
            top = _tier(len(gpus))
            floor = self._least_floor(machine, gpus)
            if old is not None and old[0] == key:
                # Its entries stay where they are (a GPU taken from a machine whose GPUs share
                # one horizon leaves its key as it was): a new least floor is written beside
                # them, and only a tier gained or lost is touched.
                if old[1] != top or old[2] != floor:
                    entry = (key, mid, cls)
                    if old[2] != floor:
                        for t in range(min(old[1], top) + 1):
                            floors[t][_index(tiers[t], firsts[t], entry)] = floor
                    for t in range(old[1] + 1, top + 1):
                        _insert(tiers[t], firsts[t], floors[t], entry, floor)
                    for t in range(top + 1, old[1] + 1):
                        _drop(tiers[t], firsts[t], floors[t], entry)
                    machine.keys[cls] = (key, top, floor)
                return  # its other entries stand
        if old is not None:
            entry = (old[0], mid, cls)
            for t in range(old[1] + 1):
                _drop(tiers[t], firsts[t], floors[t], entry)
            del machine.keys[cls]
        if gpus:
            machine.keys[cls] = (key, top, floor)
            entry = (key, mid, cls)
            for t in range(top + 1):
                _insert(tiers[t], firsts[t], floors[t], entry, floor)

    def classes_for(self, job: JobRequest) -> tuple[int, ...]:
        shape = (job.models, job.min_vram_mb, job.region, job.kind_bit)
        found = self._shape_classes.get(shape)
        if found is None:
            found = self._shape_classes[shape] = tuple(
                cls
                for cls, (model, vram, region, kinds) in enumerate(self.class_keys)
                if kinds & job.kind_bit
                and (not job.models or model in job.models)
                and vram >= job.min_vram_mb
                and (not job.region or region == job.region)
            )
        return found

    def eligible(self, machine: _Machine, job: JobRequest, classes: tuple[int, ...]) -> list[_Gpu] | None:
        """The job's eligible free GPUs on the machine in the order they are taken, or None
        when the machine cannot take the job."""
        if machine.offer.window_s < job.duration_s or not machine.offer.kinds & job.kind_bit:
            return None
        # The machine's own classes (one or two) tested against the job's (up to every class of
        # the fleet), not the other way round: this ran for every candidate machine of every job.
        # With several classes the list is sorted below, by an order without ties (GPU id last).
        max_price = job.max_price
        gpus = [g for cls, free in machine.free.items() if cls in classes for g in free if g.offer.floor <= max_price]
        if len(gpus) < job.gpu_count:
            return None
        if len(machine.free) > 1:
            gpus.sort(key=self._order)
        return gpus

    def admits(self, gpu: _Gpu, job: JobRequest) -> bool:
        """Whether this one free GPU can take the job for one GPU: the rule `eligible` applies
        to a machine's GPUs together, asked of one (v2's fit pass)."""
        offer = self.machines[gpu.machine].offer
        return (
            offer.window_s >= job.duration_s
            and bool(offer.kinds & job.kind_bit)
            and gpu.offer.floor <= job.max_price
            and gpu.cls in self.classes_for(job)
        )

    def tier_open(self, tier: int) -> bool:
        """Whether some machine has a class with at least `_TIERS[tier]` free GPUs: without
        one, every job of that tier is refused (find_v2 and find_ordered walk only those)."""
        return any(map(itemgetter(tier), self.sorted))

    def take(self, chosen: Sequence[_Gpu]) -> None:
        for gpu in chosen:
            self.remove(gpu.offer.id)

    # --- search ---------------------------------------------------------------------------

    def find_ordered(self, job: JobRequest, classes: tuple[int, ...]) -> tuple[_Machine, list[_Gpu]] | None:
        """first-fit and v1: walk the job's classes in key order (merged; their lists are one per
        class, `_V2_BY_MODEL`, so every entry is of a class the job accepts); each entry's key
        is a lower bound of its machine's rank, so the walk stops at the first entry ranked
        above the best machine found."""
        tier = _tier(job.gpu_count)
        lists = [entries for entries in self._lists(classes, tier)[0] if entries]
        heads = [(entries[0], k, 0) for k, entries in enumerate(lists)]
        heapq.heapify(heads)
        seen: set[int] = set()
        best_rank: tuple[float, ...] | None = None
        best: tuple[_Machine, list[_Gpu]] | None = None
        while heads:
            entry, k, i = heads[0]
            key, machine_id, _ = entry
            if best_rank is not None and key > best_rank:
                break
            if self.policy == "v1" and key[0] > job.max_price:
                break
            if i + 1 < len(lists[k]):
                heapq.heapreplace(heads, (lists[k][i + 1], k, i + 1))
            else:
                heapq.heappop(heads)
            if machine_id in seen:
                continue
            seen.add(machine_id)
            machine = self.machines[machine_id]
            gpus = self.eligible(machine, job, classes)
            if gpus is None:
                continue
            chosen = gpus[: job.gpu_count]
            if self.policy == "first-fit":
                rank: tuple[float, ...] = (machine_id,)
            else:
                rank = (max(g.offer.floor for g in chosen), len(gpus), machine_id)
            if best_rank is None or rank < best_rank:
                best_rank, best = rank, (machine, chosen)
        return best

    def find_v2(self, job: JobRequest, classes: tuple[int, ...], *, now: float) -> tuple[_Machine, list[_Gpu]] | None:
        """The fitting placement with the smallest horizon >= the job's duration, else the one
        with the largest horizon. An entry's key (its best GPU's horizon) bounds the horizon of
        any placement on it from above."""
        need = now + float(job.duration_s)  # safe_until is a time
        tier = _tier(job.gpu_count)
        # Upward from the duration: the first fitting placement whose horizon covers the job
        # (the first entry whose safe-until is at least `need`). Entries whose machine asks more
        # than the job's ceiling are passed over unseen: the walk's limit counts the machines
        # that could take the job on price.
        ceiling = job.max_price
        lists, firsts, floors, allowed, groups = self._lists(classes, tier)  # an empty list gives no entry to walk
        if min(map(self.cheapest.__getitem__, groups), default=math.inf) > ceiling:
            return None  # every GPU it accepts asks more
        starts = list(map(bisect_left, firsts, repeat(need)))
        seen: set[int] = set()
        fallback: tuple[float, _Machine, list[_Gpu]] | None = None
        for machine_id in _walk_up(lists, floors, ceiling, allowed, starts, seen):
            found = self._v2_candidate(machine_id, job, classes)
            if found is None:
                continue
            if found[0] >= need:
                return found[1], found[2]
            if fallback is None or found[0] > fallback[0]:
                fallback = found
        if job.checkpoint_interval_s is None:
            # Nothing of its run is kept unless it runs to the end, and no placement is likely
            # to last that long: the one that costs least is the one due back soonest, and the
            # longer stretches stay for jobs they can finish (or checkpoint in).
            for machine_id in _walk_up(lists, floors, ceiling, allowed, [0] * len(lists), set()):
                found = self._v2_candidate(machine_id, job, classes)
                if found is not None:
                    return found[1], found[2]
        # Downward from the duration: the largest horizon among placements that fit.
        tails = []
        for k, i in enumerate(starts):
            if (i := _below(lists[k], floors[k], ceiling, allowed, i)) >= 0:
                tails.append((_negated(lists[k][i][0]), k, i))
        heapq.heapify(tails)
        walked = 0
        while tails and walked < _WALK_LIMIT:
            neg_key, k, i = heapq.heappop(tails)
            if fallback is not None and -neg_key[0] <= fallback[0]:
                break
            if (below := _below(lists[k], floors[k], ceiling, allowed, i)) >= 0:
                heapq.heappush(tails, (_negated(lists[k][below][0]), k, below))
            machine_id = lists[k][i][1]
            if machine_id in seen:
                continue
            seen.add(machine_id)
            walked += 1
            found = self._v2_candidate(machine_id, job, classes)
            if found is not None and (fallback is None or found[0] > fallback[0]):
                fallback = found
        return (fallback[1], fallback[2]) if fallback else None

    def _lists(
        self, classes: tuple[int, ...], tier: int
    ) -> tuple[list[list[_Entry]], list[list[float]], list[list[int]], frozenset[int], tuple[int, ...]]:
        """The tier's lists of the classes' groups (entries, firsts, floors), the classes as a
        set, and the groups (`_tier_lists`)."""
        kept = self._tier_lists.get((classes, tier))
        if kept is None:
            groups = sorted({self.group_of[cls] for cls in classes})
            kept = self._tier_lists[(classes, tier)] = (
                [self.sorted[group][tier] for group in groups],
                [self.firsts[group][tier] for group in groups],
                [self.floors[group][tier] for group in groups],
                frozenset(classes),
                tuple(groups),
            )
        return kept

    def _v2_candidate(
        self, machine_id: int, job: JobRequest, classes: tuple[int, ...]
    ) -> tuple[float, _Machine, list[_Gpu]] | None:
        """The job's placement on this machine (its steadiest eligible GPUs) and its horizon (the
        earliest safe-until among them), or None when the machine cannot take the job."""
        machine = self.machines[machine_id]
        gpus = self.eligible(machine, job, classes)
        if gpus is None:
            return None
        chosen = gpus[: job.gpu_count]
        return min(g.safe_until for g in chosen), machine, chosen


def _from(entries: list[_Entry], floors: list[int], ceiling: int, allowed: frozenset[int], i: int) -> int:
    """The first index from `i` up whose entry is of a class in `allowed` and whose floor is
    within `ceiling` (len(floors): none)."""
    n = len(floors)
    while i < n and (floors[i] > ceiling or entries[i][2] not in allowed):
        i += 1
    return i


def _below(entries: list[_Entry], floors: list[int], ceiling: int, allowed: frozenset[int], i: int) -> int:
    """The first index below `i`, going down, as `_from` takes them (-1: none)."""
    i -= 1
    while i >= 0 and (floors[i] > ceiling or entries[i][2] not in allowed):
        i -= 1
    return i


def _walk_up(
    lists: list[list[_Entry]],
    floors: list[list[int]],
    ceiling: int,
    allowed: frozenset[int],
    starts: list[int],
    seen: set[int],
) -> Iterator[int]:
    """The machines of the entries from `starts` up in each list that `_from` takes (a class in
    `allowed`, a floor within `ceiling`; the parallel `floors`), in key order across the lists,
    each once (those in `seen` passed over; each walked added to it), at most _WALK_LIMIT."""
    heads = []
    for k, i in enumerate(starts):
        if (i := _from(lists[k], floors[k], ceiling, allowed, i)) < len(lists[k]):
            heads.append((lists[k][i], k, i))
    heapq.heapify(heads)
    walked = 0
    while heads and walked < _WALK_LIMIT:
        entry, k, i = heads[0]
        if (i := _from(lists[k], floors[k], ceiling, allowed, i + 1)) < len(lists[k]):
            heapq.heapreplace(heads, (lists[k][i], k, i))
        else:
            heapq.heappop(heads)
        machine_id = entry[1]
        if machine_id in seen:
            continue
        seen.add(machine_id)
        walked += 1
        yield machine_id


# --- order -----------------------------------------------------------------------------------


class JobQueue:
    """The pending jobs in the order `policy` offers them, kept across cycles: FIFO
    (submitted_at, id) for first-fit and v1, v2's aged-then-fair-share order (module docstring)
    for v2. `place()` builds one per call from a list; a caller that sees jobs come and go one
    by one (the simulator) keeps one, `add`s arrivals and requeued jobs, and `pool_place` takes
    out the jobs it places. A cycle then costs the jobs it tries (it stops once no GPU is
    free), not the queue's length, and offers them in the order one built from scratch would.

    Heaps with lazy deletion: each entry carries a sequence number and is live while that is
    its job's current one; a job added again (its remaining duration changed) gets a new one."""

    def __init__(self, jobs: Sequence[JobRequest] = (), *, policy: str = "v2") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        self.policy = policy
        self.jobs: dict[int, JobRequest] = {}
        self._seq: dict[int, int] = {}
        self._next = 0
        self._fifo: list[tuple[float, int, int]] = []  # (submitted_at, id, seq); FIFO policies
        self._young: list[tuple[float, int, int]] = []  # v2: jobs not yet past AGE_LIMIT_S
        # v2: jobs past it, oldest first, one heap per tier of GPU count (_TIERS), so a cycle
        # passes over the jobs of a tier no free machine can hold without taking them out.
        self._aged: tuple[list[tuple[float, int, int]], ...] = ([], [], [], [])
        self._aged_ids: set[int] = set()
        # v2: each renter's jobs, (-ceiling, submitted_at, id, seq), one heap per tier as above.
        self._renters: dict[int, tuple[list[tuple[int, float, int, int]], ...]] = {}
        # v2's fit pass: each renter's jobs for one GPU by remaining run, (duration, -submitted_at,
        # -id), sorted, and how many of them ask each price ceiling; each such job's place in them.
        # Jobs past AGE_LIMIT_S leave their renter's list for one of their own, which the fit pass
        # asks first.
        self._runs: dict[int, list[tuple[int, float, int]]] = {}
        self._ceilings: dict[int, dict[int, int]] = {}
        self._aged_runs: list[tuple[int, float, int]] = []
        self._run_of: dict[int, tuple[int, int, tuple[int, float, int], bool]] = {}
        # Built at the first fit pass (a cycle with GPUs to spare never needs it), kept after.
        self._fit_indexed = False
        for job in jobs:
            self._enter(job, push=False)
        heapq.heapify(self._fifo)
        heapq.heapify(self._young)
        for queues in self._renters.values():
            for queue in queues:
                heapq.heapify(queue)

    def __len__(self) -> int:
        return len(self.jobs)

    def __contains__(self, job_id: int) -> bool:
        return job_id in self.jobs

    def _enter(self, job: JobRequest, *, push: bool) -> None:
        self._next += 1
        seq = self._next
        self.jobs[job.id] = job
        self._seq[job.id] = seq
        self._aged_ids.discard(job.id)
        entries: list[tuple[list[Any], tuple[Any, ...]]] = []
        if self.policy == "v2":
            if self._fit_indexed:
                self._unrun(job.id)
                self._run_add(job, aged=False, sort=True)
            entries.append((self._young, (job.submitted_at, job.id, seq)))
            queues = self._renters.get(job.renter)
            if queues is None:
                queues = self._renters[job.renter] = ([], [], [], [])
            entries.append((queues[_tier(job.gpu_count)], (-job.max_price, job.submitted_at, job.id, seq)))
        else:
            entries.append((self._fifo, (job.submitted_at, job.id, seq)))
        for heap, entry in entries:
            if push:
                heapq.heappush(heap, entry)
            else:
                heap.append(entry)

    def add(self, job: JobRequest) -> None:
        """Queue a job, or queue it again with new figures (same id)."""
        self._enter(job, push=True)

    def remove(self, job_id: int) -> None:
        """Take a job out (ignored when it is not queued)."""
        if self.jobs.pop(job_id, None) is not None:
            del self._seq[job_id]
            self._aged_ids.discard(job_id)
            self._unrun(job_id)

    def _run_add(self, job: JobRequest, *, aged: bool, sort: bool) -> None:
        """Enter a job in the fit pass's index: in the aged jobs' list, or its renter's; without
        `sort`, the list is left for the caller to sort."""
        if job.gpu_count != 1:
            return
        key = (job.duration_s, -job.submitted_at, -job.id)  # the longest, then the oldest, last
        if aged:
            runs = self._aged_runs
        else:
            runs = self._runs.setdefault(job.renter, [])
            ceilings = self._ceilings.setdefault(job.renter, {})
            ceilings[job.max_price] = ceilings.get(job.max_price, 0) + 1
        if sort:
            insort(runs, key)
        else:
            runs.append(key)
        self._run_of[job.id] = (job.renter, job.max_price, key, aged)

    def _fit_index(self) -> None:
        """Build the fit pass's index of the queued jobs."""
        for job in self.jobs.values():
            self._run_add(job, aged=job.id in self._aged_ids, sort=False)
        for runs in (self._aged_runs, *self._runs.values()):
            runs.sort()
        self._fit_indexed = True

    def _unrun(self, job_id: int) -> None:
        """Take the job out of the fit pass's index (ignored when it is not there)."""
        found = self._run_of.pop(job_id, None)
        if found is None:
            return
        renter, ceiling, key, aged = found
        if aged:
            del self._aged_runs[bisect_left(self._aged_runs, key)]
            return
        runs = self._runs[renter]
        del runs[bisect_left(runs, key)]
        ceilings = self._ceilings[renter]
        ceilings[ceiling] -= 1
        if not ceilings[ceiling]:
            del ceilings[ceiling]
        if not runs:
            del self._runs[renter], self._ceilings[renter]

    def _run_aged(self, job_id: int) -> None:
        """Move the job in the fit pass's index to the aged jobs' list (it has passed AGE_LIMIT_S)."""
        found = self._run_of.get(job_id)
        if found is not None and not found[3]:
            self._unrun(job_id)
            self._run_add(self.jobs[job_id], aged=True, sort=True)

    def fit_order(self, held: Mapping[int, int]) -> list[tuple[float, int]]:
        """The renters with jobs in the fit pass's index by the most they could bid (their
        highest ceiling ÷ (1 + GPUs held)), negated: for `fit`, made once per pass. As the pass
        places jobs their renters' holdings grow and their bids fall, so the order's figures
        only ever overstate a bid, which `fit`'s early stop allows."""
        if not self._fit_indexed:
            self._fit_index()
        return sorted((-max(ceilings) / (1 + held.get(r, 0)), r) for r, ceilings in self._ceilings.items())

    def fit(
        self,
        horizon_s: float,
        held: Mapping[int, int],
        accept: Callable[[JobRequest], bool],
        order: Sequence[tuple[float, int]] | None = None,
    ) -> JobRequest | None:
        """v2's fit pass (module docstring, Fit): for one GPU whose owner is still away
        `horizon_s` seconds from now, the job for one GPU that `accept`s it and would run to its
        end there: the longest (then the oldest) of those waiting past AGE_LIMIT_S; without one,
        of each renter's such jobs the longest (then the oldest); of those, the ones
        whose renter bids at least `_FIT_BID_SHARE` of the highest bid (the job's ceiling ÷ (1 +
        GPUs its renter holds)); of those the longest, then the highest bid, then the oldest.
        None: no such job. Bounded: at most _FIT_WALK jobs down from the longest that fits are
        looked at in each list, and at most _FIT_RENTERS renters (`fit_order`), so a job further
        down, or of a renter further on, may be missed."""
        if not self._fit_indexed:
            self._fit_index()
        if horizon_s < 1:
            return None
        bound = (int(horizon_s), math.inf, math.inf)  # every key of a duration within it
        # A job waiting past AGE_LIMIT_S goes first here too: the longest of them that fits.
        if (job := self._longest(self._aged_runs, bound, accept)) is not None:
            return job
        # Renters by the most they could bid: the walk stops at the first whose most is under the
        # share of the highest bid found, or after _FIT_RENTERS.
        if order is None:
            order = self.fit_order(held)
        found: list[tuple[float, JobRequest]] = []
        top = 0.0
        asked = 0
        for most, renter in order:
            if -most < _FIT_BID_SHARE * top or asked == _FIT_RENTERS:
                break
            if renter not in self._runs:  # its last job in the index was placed in this pass
                continue
            asked += 1
            if (job := self._longest(self._runs[renter], bound, accept)) is not None:
                bid = job.max_price / (1 + held.get(renter, 0))
                top = max(top, bid)
                found.append((bid, job))
        # The longest; of equal lengths the higher bid (the order's choice), then the oldest.
        kept = [
            (job.duration_s, bid, -job.submitted_at, -job.id, job) for bid, job in found if bid >= _FIT_BID_SHARE * top
        ]
        return max(kept, key=itemgetter(0, 1, 2, 3))[4] if kept else None

    def _longest(
        self,
        runs: list[tuple[int, float, int]],
        bound: tuple[float, float, float],
        accept: Callable[[JobRequest], bool],
    ) -> JobRequest | None:
        """The first job `accept`ed walking down `runs` from the last key within `bound`, at most
        _FIT_WALK of them (None: none)."""
        i = bisect_right(runs, bound)
        for k in range(i - 1, max(i - 1 - _FIT_WALK, -1), -1):
            if accept(job := self.jobs[-runs[k][2]]):
                return job
        return None

    def _live(self, job_id: int, seq: int) -> bool:
        return self._seq.get(job_id) == seq

    # --- driving a cycle ----------------------------------------------------------------------

    def drive_fifo(self, try_place: Callable[[JobRequest], bool], exhausted: Callable[[], bool]) -> None:
        """Offer the jobs oldest first until `exhausted()`; placed jobs leave the queue."""
        heap, tried = self._fifo, []
        while heap and not exhausted():
            entry = heapq.heappop(heap)
            if not self._live(entry[1], entry[2]):
                continue
            if try_place(self.jobs[entry[1]]):
                self.remove(entry[1])
            else:
                tried.append(entry)
        for entry in tried:
            heapq.heappush(heap, entry)

    def drive_v2(
        self,
        try_place: Callable[[JobRequest], bool],
        exhausted: Callable[[], bool],
        *,
        now: float,
        held: dict[int, int],
        tier_open: Callable[[int], bool],
        fit: Callable[[], None] | None = None,
    ) -> None:
        """Offer the jobs in v2's order (module docstring), counting each placement in the
        renter's holdings, until `exhausted()`; placed jobs leave the queue. `fit`: the fit
        pass, run once the jobs that go before it have been offered (`before_fit`; it places
        jobs itself, takes them out and counts them in `held`). `tier_open(t)`
        false: no job of tier t (`_tier` of its GPU count) can be placed any more in this
        cycle (the pool only shrinks), so jobs of that tier are passed over, not offered: they
        would be refused and nothing would change, and the order of the others stays as it
        would be."""
        young, aged = self._young, self._aged
        while young and now - young[0][0] > AGE_LIMIT_S:
            entry = heapq.heappop(young)
            if self._live(entry[1], entry[2]):
                heapq.heappush(aged[_tier(self.jobs[entry[1]].gpu_count)], entry)
                self._aged_ids.add(entry[1])
                self._run_aged(entry[1])
        if exhausted():
            return
        tiers = range(len(aged))
        open_ = [tier_open(t) for t in tiers]

        def first_open(heaps: Sequence[list[Any]]) -> int:
            """The open tier whose heap's head comes first (-1: none), as one heap of them all
            would give it."""
            first = -1
            for t in tiers:
                if open_[t] and heaps[t] and (first < 0 or heaps[t][0] < heaps[first][0]):
                    first = t
            return first

        def placed(job: JobRequest) -> None:
            """Count the job in its renter's holdings, take it out, close the tiers it filled."""
            held[job.renter] = held.get(job.renter, 0) + job.gpu_count
            self.remove(job.id)
            for t in tiers:
                if open_[t] and not tier_open(t):
                    open_[t] = False

        def fitted() -> None:
            """Run the fit pass (once), then close the tiers it filled."""
            nonlocal fit
            if fit is not None and not exhausted():
                fit()
                for t in tiers:
                    if open_[t] and not tier_open(t):
                        open_[t] = False
            fit = None

        def before_fit() -> int:
            """The open tier whose head comes first among the jobs that go before the fit pass
            (-1: none): a job for one GPU waiting over OVERDUE_S, and any job for several past
            AGE_LIMIT_S (the fit pass hands out GPUs one by one, and would take apart the
            machines such a job needs)."""
            first = -1
            for t in tiers:
                heap = aged[t]
                if (
                    open_[t]
                    and heap
                    and (t > 0 or now - heap[0][0] > OVERDUE_S)
                    and (first < 0 or heap[0] < aged[first][0])
                ):
                    first = t
            return first

        tried: list[tuple[float, int, int]] = []
        while not exhausted():
            tier = before_fit() if fit is not None else first_open(aged)
            if tier < 0:
                if fit is None:
                    break
                fitted()  # those that go before it have had their turn
                continue
            entry = heapq.heappop(aged[tier])
            if not self._live(entry[1], entry[2]):
                continue
            job = self.jobs[entry[1]]
            if try_place(job):
                placed(job)
            else:
                tried.append(entry)
        for entry in tried:
            if self._live(entry[1], entry[2]):  # the fit pass may have placed it since
                heapq.heappush(aged[_tier(self.jobs[entry[1]].gpu_count)], entry)
        fitted()

        renters = self._renters

        def head(renter: int) -> tuple[float, float, int, int, int] | None:
            """The renter's next job among the open tiers, as its place in the renters' heap
            (its tier last, never compared: id and renter come first); stale entries dropped."""
            queues = renters[renter]
            for queue in (queues[t] for t in tiers if open_[t]):
                while queue and (not self._live(queue[0][2], queue[0][3]) or queue[0][2] in self._aged_ids):
                    heapq.heappop(queue)
            best = first_open(queues)
            if best < 0:
                return None
            job = self.jobs[queues[best][0][2]]
            return (-job.max_price / (1 + held.get(renter, 0)), job.submitted_at, job.id, renter, best)

        heap = [key for renter in list(renters) if (key := head(renter)) is not None]
        heapq.heapify(heap)
        put_back: list[tuple[int, int, tuple[int, float, int, int]]] = []
        while heap and not exhausted():
            *_, renter, tier = heapq.heappop(heap)
            if not open_[tier]:  # closed since this key was made: the renter's next open job
                if (key := head(renter)) is not None:
                    heapq.heappush(heap, key)
                continue
            mine = heapq.heappop(renters[renter][tier])
            job = self.jobs[mine[2]]
            if try_place(job):
                placed(job)
            else:
                put_back.append((renter, tier, mine))
            if (key := head(renter)) is not None:
                heapq.heappush(heap, key)
        for renter, tier, mine in put_back:
            heapq.heappush(renters[renter][tier], mine)
        for renter in [r for r, queues in renters.items() if not any(queues)]:
            del renters[renter]


# --- the entry point ------------------------------------------------------------------------


def _shape_key(job: JobRequest) -> tuple[frozenset[str], int, str, int, int]:
    return (job.models, job.min_vram_mb, job.region, job.kind_bit, job.gpu_count)


def place(
    jobs: Sequence[JobRequest],
    machines: Sequence[MachineOffer],
    *,
    now: float,
    policy: str = "v2",
    held_by_renter: Mapping[int, int] | None = None,
    report: bool = True,
    on_placement: Callable[[Placement], None] | None = None,
) -> list[Placement]:
    """Place what `policy` places of `jobs` on the free GPUs of `machines` at time `now`
    (Unix s), honouring the hard constraints (module docstring). `held_by_renter`: GPUs each
    renter holds in running leases (v2's fair share; others ignore it). Placements come in
    the order they were made; a job appears at most once, a GPU at most once. Without
    `report`, placements carry no p_finish or expected_lost_s (NaN; see pool_place).
    `on_placement` is called with each placement as it is made (the matcher writes them
    while the policy goes on)."""
    pool = pool_of(machines, policy=policy, now=now)
    return pool_place(pool, jobs, now=now, held_by_renter=held_by_renter, report=report, on_placement=on_placement)


def offerable(machine: MachineOffer) -> bool:
    """Whether a pool takes the machine's offer: it accepts some kind of job and its declared
    window has not ended."""
    return bool(machine.kinds) and machine.window_s > 0


def pool_of(machines: Iterable[MachineOffer], *, policy: str, now: float) -> FreePool:
    """A pool of `policy` holding the free GPUs of the offerable `machines`, built in one go."""
    pool = FreePool(policy)
    pool.add_machines((machine for machine in machines if offerable(machine)), now=now)
    return pool


def pool_place(
    pool: FreePool,
    jobs: Sequence[JobRequest] | JobQueue,
    *,
    now: float,
    held_by_renter: Mapping[int, int] | None = None,
    report: bool = True,
    on_placement: Callable[[Placement], None] | None = None,
) -> list[Placement]:
    """`place()` over a pool kept by the caller: the GPUs placed leave the pool, and, when
    `jobs` is a JobQueue the caller keeps, the jobs placed leave it. Without `report`,
    placements carry no p_finish or expected_lost_s (NaN): figures for people, which decide
    nothing, and cost a third of a simulated cycle. `on_placement` as in place()."""
    policy = pool.policy
    if policy == "v2":
        pool._refresh(now)
    placements: list[Placement] = []
    # (shape) -> {max_price: shortest duration that failed}: the pool only shrinks, so a job no
    # looser than one that failed (no higher ceiling, no shorter duration) fails too.
    failed: dict[tuple[frozenset[str], int, str, int, int], dict[int, int]] = {}
    placed_ids: set[int] = set()

    def record(job: JobRequest, machine: _Machine, chosen: Sequence[_Gpu]) -> None:
        placement = _placement(job, machine, chosen, now=now, with_forecast=report and policy == "v2")
        placements.append(placement)
        pool.take(chosen)
        placed_ids.add(job.id)
        if on_placement is not None:
            on_placement(placement)

    def try_place(job: JobRequest) -> bool:
        if job.id in placed_ids or job.gpu_count <= 0:
            return False
        shape = _shape_key(job)
        for max_price, duration in failed.get(shape, {}).items():
            if job.max_price <= max_price and job.duration_s >= duration:
                return False
        classes = pool.classes_for(job)
        found = pool.find_v2(job, classes, now=now) if policy == "v2" else pool.find_ordered(job, classes)
        if found is None:
            known = failed.setdefault(shape, {})
            known[job.max_price] = min(known.get(job.max_price, job.duration_s), job.duration_s)
            return False
        record(job, *found)
        return True

    def exhausted() -> bool:
        return not pool.gpus

    queue = jobs if isinstance(jobs, JobQueue) else JobQueue(jobs, policy=policy)
    if queue.policy != policy:
        raise ValueError(f"a {queue.policy} queue cannot drive a {policy} pool")
    held = dict(held_by_renter or {})

    def fit() -> None:
        """v2's fit pass (module docstring, Fit), when jobs outnumber the free GPUs."""
        if len(queue) <= len(pool.gpus):
            return
        order = queue.fit_order(held)
        for gpu in heapq.nsmallest(_FIT_GPUS, pool.gpus.values(), key=_soonest):
            if gpu.offer.id not in pool.gpus:
                continue
            job = queue.fit(gpu.safe_until - now, held, partial(pool.admits, gpu), order)
            if job is not None:  # (a job placed this cycle has left the queue and its index)
                record(job, pool.machines[gpu.machine], [gpu])
                held[job.renter] = held.get(job.renter, 0) + 1
                queue.remove(job.id)

    if policy == "v2":
        # With a GPU to spare for every job there is no fit pass, and the order is as without one.
        scarce = len(queue) > len(pool.gpus)
        queue.drive_v2(try_place, exhausted, now=now, held=held, tier_open=pool.tier_open, fit=fit if scarce else None)
    else:
        queue.drive_fifo(try_place, exhausted)
    return placements


def _soonest(gpu: _Gpu) -> tuple[float, int]:
    return (gpu.safe_until, gpu.offer.id)


def _placement(
    job: JobRequest, machine: _Machine, chosen: Sequence[_Gpu], *, now: float, with_forecast: bool
) -> Placement:
    price = max(g.offer.floor for g in chosen)
    gpu_ids = tuple(g.offer.id for g in chosen)
    if not with_forecast:
        return Placement(job.id, machine.offer.id, gpu_ids, price, math.nan, math.nan)

    ages = [max(now - g.idle_since, 0.0) for g in chosen]

    def survive(x: float) -> float:
        p = 1.0
        for g, age in zip(chosen, ages, strict=True):
            p *= g.curve.conditional(age, x)
        return p

    lost = expected_lost_s(
        survive, duration_s=job.duration_s, checkpoint_interval_s=job.checkpoint_interval_s, steps=_LOST_STEPS
    )
    return Placement(job.id, machine.offer.id, gpu_ids, price, survive(job.duration_s), lost)


__all__ = [
    "POLICIES",
    "FreePool",
    "GpuOffer",
    "JobQueue",
    "JobRequest",
    "MachineOffer",
    "Placement",
    "SafeUntil",
    "StretchForecast",
    "place",
    "pool_place",
]
