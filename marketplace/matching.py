"""The matching engine: places pending jobs on idle GPUs, and says why the others wait.

Which job goes where is decided by a placement policy, settings.MATCH_POLICY:

- `v2` (the default): marketplace.placement's forecast-aware policy, the same code the
  trace-replay simulator measures (docs/simulator.md). A cycle reads the free fleet (below), each
  machine's idle forecast and current stretch (providers.idle_history), the pending jobs (oldest
  MATCH_BATCH_SIZE, with their renters and checkpoint intervals) and the GPUs each renter holds;
  `placement.place` returns the plan (fair share across renters, price when short, aging, long
  jobs where owners stay away longest); `_PlanWriter` writes it in transactions of CHUNK_SIZE
  placements, each locking its jobs (still pending) and GPUs (still candidates) with SKIP
  LOCKED, so a placement another worker got to first is dropped, never written twice; on
  PostgreSQL MATCH_WRITERS connections write the chunks at once.
- `v1`: the rule below, matched and written chunk by chunk in FIFO order (also
  `placement.place(..., policy="v1")` for the simulator); `first-fit` for comparison.

Both keep the same hard constraints and reasons. The v1 rule (one cycle, `match_cycle`):

- Candidates are GPUs in state "idle", on machines that are online and inside their
  availability stretch now (providers.selectors.machines_available_until), and in no active
  lease. A GPU's effective floor is its own price_floor, else its provider's default.
- A job goes only to a machine that accepts its kind (Machine.accepts_container /
  accepts_process, from its agent's reported capabilities): renter code never reaches a
  machine in a way its owner did not allow. (Should a machine stop accepting a kind after a
  placement, its next heartbeat never hands that lease over: see machine_heartbeat.)
- Pending jobs are taken in FIFO order (created_at, id), at most GPGPU["MATCH_BATCH_SIZE"].
  A job fits a machine when the machine has at least gpu_count candidate GPUs that each have
  vram_mb >= min_vram_mb, a model in allowed_models (empty = any; case-insensitive), a floor
  <= max_price_per_gpu_hour, when job.region is empty or the machine's region, and when the
  machine's availability stretch lasts at least expected_duration_s. All GPUs of a lease are
  on one machine.
- Among fitting machines the cheapest wins (a lease costs the highest floor among its GPUs),
  then the best fit (fewest eligible free GPUs left), then the lowest machine id; on that
  machine the cheapest eligible GPUs are taken. The agreed price is that highest floor.
- A job that is not placed gets a reason (jobs.services.job_set_unplaced): its constraints are
  checked against the whole online fleet (idle or not), one after the other, and the first
  that no machine passes is reported with a stable code (see `REASON_CODES`).
- Billing gate: only a job whose budget the escrow has reserved on chain, with a deadline after
  a whole run of the job and its settlement, is placed (billing.selectors.jobs_budget_unreserved);
  the others wait with code budget_not_reserved or budget_deadline_too_close.

Safety with several workers at once: each chunk of jobs is one transaction that locks its
pending jobs and the GPUs it is about to lease with SELECT … FOR UPDATE SKIP LOCKED and
re-checks the GPUs' state under the lock, so two workers never lease one GPU; a GPU another
worker holds is given up and the chunk is matched again without it. The partial unique index
gpu_in_one_active_lease is the last line of defence: an IntegrityError rolls that chunk back
and the cycle carries on. On SQLite, transactions begin IMMEDIATE and so run one at a time.

Heartbeats: the matcher never waits for a lock a heartbeat holds (SKIP LOCKED on GPUs; the
heartbeat's machine lock is FOR NO KEY UPDATE, which a lease's foreign key check does not wait
for), so the two cannot deadlock; and a heartbeat locks its machine's GPUs before it reads
their leases, so it never shows a GPU leased here as idle (providers.services, "GPU state").

Speed: the fleet is read in a handful of queries (on PostgreSQL a worker keeps what it read,
and the planning policy's pool, and reads only the GPU rows written since: `_KeptFleet`; with
500 jobs or more waiting, they are read beside it by a thread of its own: `_Beside`),
matching runs in memory over per-class heaps (class = model, VRAM, region, accepted job kinds)
ordered by price, and writes are bulk (while the policy places, and while the jobs it left out
are explained), so a cycle over 100,000 GPUs and 10,000 jobs takes about a second
(benchmarks/matching.py).
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import math
import sys
import threading
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from itertools import accumulate
from operator import attrgetter, itemgetter
from typing import Any, Generic, TypeVar

from django.conf import settings
from django.db import IntegrityError, connection, connections, transaction
from django.db.models import BigIntegerField, Count, F, FloatField, Func, Q, QuerySet, TextField
from django.db.models.functions import Cast, Round
from django.utils import timezone

from billing import selectors as billing_selectors  # the billing gate
from core import prom, soon
from core.collector import collector_paused
from core.lookups import int_array
from core.rows import rows as core_rows
from jobs.models import Job, LeaseGPU
from jobs.services import Placement, job_set_unplaced, leases_assign
from marketplace import placement as policy
from providers import services as providers_services
from providers.availability import seconds_available
from providers.idle_history import AWAY_STATES, machine_forecasts, machines_idle_since
from providers.models import GPU, Machine
from providers.selectors import machines_available_until

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Jobs per transaction: small enough that locks are held briefly, large enough that the bulk
# writes stay cheap.
CHUNK_SIZE = 500
# How often a chunk is matched again after losing GPUs to a concurrent worker before it keeps
# only the placements whose GPUs it holds.
MAX_LOCK_ROUNDS = 5

REASON_CODES = (
    "kind_not_accepted",
    "no_gpu_model",
    "insufficient_vram",
    "price_below_every_floor",
    "region_unavailable",
    "no_window_long_enough",
    "no_idle_gpu",
    # Billing gate: the job's budget is not reserved in the escrow yet, or its deadline comes
    # before a run of the job could be settled.
    "budget_not_reserved",
    "budget_deadline_too_close",
)

# A machine's accepted job kinds as a bit mask, so the hot loop tests an int.
KIND_BITS = {Job.Kind.CONTAINER.value: 1, Job.Kind.PROCESS.value: 2}

_MICROS = 1_000_000
_PRICE_QUANTUM = Decimal("0.000001")


@functools.lru_cache(maxsize=4096)  # a cycle converts each online machine's provider floor: a few hundred values
def _to_micros(value: Decimal) -> int:
    """A price (6 decimals at most, as the models store them) as an integer count of
    millionths, so the hot loop compares ints rather than Decimals."""
    return int((value * _MICROS).to_integral_value())


@functools.lru_cache(maxsize=4096)  # a fleet asks a few hundred prices; a chunk converts 500
def _from_micros(micros: int) -> Decimal:
    return (Decimal(micros) / _MICROS).quantize(_PRICE_QUANTUM)


def _price_text(micros: int) -> str:
    text = format(_from_micros(micros).normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@dataclass
class MatchResult:
    """What one cycle did. `unplaced` counts the considered jobs left pending (each with a
    reason); `conflicts` counts chunks rolled back by the unique index. Where its `seconds`
    went: reading the fleet, the pending jobs and what the policy needs of them (`read`), the
    policy's choice (`plan`), the writes under row locks (`write`) and the reasons of the jobs
    left pending (`reasons`); v1 adds up its chunks' parts. A planning policy (v2, first-fit)
    works out the reasons of the jobs it left out of its plan while its last chunks are written:
    that time is in `write`, and `reasons` is what follows the writes."""

    considered: int = 0
    placed: int = 0
    unplaced: int = 0
    gpus_leased: int = 0
    candidate_gpus: int = 0
    chunks: int = 0
    conflicts: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0
    plan_seconds: float = 0.0
    write_seconds: float = 0.0
    reasons_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "considered": self.considered,
            "placed": self.placed,
            "unplaced": self.unplaced,
            "gpus_leased": self.gpus_leased,
            "candidate_gpus": self.candidate_gpus,
            "chunks": self.chunks,
            "conflicts": self.conflicts,
            "seconds": round(self.seconds, 4),
            "read_seconds": round(self.read_seconds, 4),
            "plan_seconds": round(self.plan_seconds, 4),
            "write_seconds": round(self.write_seconds, 4),
            "reasons_seconds": round(self.reasons_seconds, 4),
        }


# --- in-memory view of the fleet ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    id: int
    created_at: datetime
    gpu_count: int
    min_vram_mb: int
    models: frozenset[str]  # lower-cased; empty = any
    models_text: str  # as the renter wrote them, for sentences
    region: str
    max_price: int  # micros
    duration_s: int
    kind: str
    kind_bit: int  # KIND_BITS[kind]; 0 for a kind no machine can accept

    @property
    def shape(self) -> tuple[frozenset[str], int, str, int]:
        return (self.models, self.min_vram_mb, self.region, self.kind_bit)


@dataclass(slots=True)
class _Machine:
    id: int
    region: str
    seconds: float  # how long its availability lasts from now (0: not available now)
    kinds: int  # accepted job kinds, KIND_BITS ored
    # Free candidate GPUs by class id: [(floor micros, gpu id)], sorted.
    free: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # Bumped whenever free[class] changes, so older heap entries are recognised as stale.
    version: dict[int, int] = field(default_factory=dict)


class _Pool:
    """The candidate GPUs of one cycle, grouped by class (model, VRAM, region, accepted job
    kinds), with one heap per class of (cheapest free floor, free count of the class, machine
    id, class, version) entries, one live entry per machine and class. Entries go stale lazily
    (version)."""

    def __init__(self) -> None:
        self.machines: dict[int, _Machine] = {}
        self.class_ids: dict[tuple[str, int, str, int], int] = {}
        self.class_keys: list[tuple[str, int, str, int]] = []
        self.heaps: list[list[tuple[int, int, int, int, int]]] = []
        self.gpu_home: dict[int, tuple[int, int, int]] = {}  # gpu id -> (machine id, class, floor)
        self._shape_classes: dict[tuple[frozenset[str], int, str, int], tuple[tuple[int, ...], frozenset[int]]] = {}

    # building
    def add_machine(self, machine_id: int, region: str, seconds: float, kinds: int) -> None:
        self.machines[machine_id] = _Machine(machine_id, region, seconds, kinds)

    def add_gpu(self, *, gpu_id: int, machine_id: int, model: str, vram_mb: int, floor: int) -> None:
        machine = self.machines[machine_id]
        key = (model, vram_mb, machine.region, machine.kinds)
        cls = self.class_ids.get(key)
        if cls is None:
            cls = self.class_ids[key] = len(self.class_keys)
            self.class_keys.append(key)
            self.heaps.append([])
        machine.free.setdefault(cls, []).append((floor, gpu_id))
        self.gpu_home[gpu_id] = (machine_id, cls, floor)

    def seal(self) -> None:
        for machine in self.machines.values():
            for cls, gpus in machine.free.items():
                gpus.sort()
                machine.version[cls] = 0
                if gpus:
                    self.heaps[cls].append((gpus[0][0], len(gpus), machine.id, cls, 0))
        for heap in self.heaps:
            heapq.heapify(heap)

    @property
    def free_count(self) -> int:
        return sum(len(g) for m in self.machines.values() for g in m.free.values())

    # maintenance
    def _touch(self, machine: _Machine, cls: int) -> None:
        version = machine.version[cls] = machine.version[cls] + 1
        gpus = machine.free[cls]
        if gpus:
            heapq.heappush(self.heaps[cls], (gpus[0][0], len(gpus), machine.id, cls, version))

    def _live(self, entry: tuple[int, int, int, int, int]) -> bool:
        return self.machines[entry[2]].version[entry[3]] == entry[4]

    def _clean(self, heap: list[tuple[int, int, int, int, int]]) -> None:
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)

    def take(self, machine: _Machine, gpus: Sequence[tuple[int, int]]) -> None:
        touched = set()
        for floor, gpu_id in gpus:
            cls = self.gpu_home[gpu_id][1]
            machine.free[cls].remove((floor, gpu_id))
            touched.add(cls)
        for cls in touched:
            self._touch(machine, cls)

    def give_back(self, machine_id: int, gpu_ids: Iterable[int]) -> None:
        machine = self.machines[machine_id]
        touched = set()
        for gpu_id in gpu_ids:
            _, cls, floor = self.gpu_home[gpu_id]
            insort(machine.free[cls], (floor, gpu_id))
            touched.add(cls)
        for cls in touched:
            self._touch(machine, cls)

    def drop(self, gpu_ids: Iterable[int]) -> None:
        """Forget free GPUs that are no longer candidates (ids not free here are ignored)."""
        touched: set[tuple[int, int]] = set()
        for gpu_id in gpu_ids:
            home = self.gpu_home.get(gpu_id)
            if home is None:
                continue
            machine_id, cls, floor = home
            gpus = self.machines[machine_id].free[cls]
            i = bisect_left(gpus, (floor, gpu_id))
            if i < len(gpus) and gpus[i] == (floor, gpu_id):
                del gpus[i]
                touched.add((machine_id, cls))
        for machine_id, cls in touched:
            self._touch(self.machines[machine_id], cls)

    def free_ids(self) -> set[int]:
        return {g for m in self.machines.values() for gpus in m.free.values() for _, g in gpus}

    # matching
    def classes_for(self, job: _Job) -> tuple[tuple[int, ...], frozenset[int]]:
        """The classes whose GPUs satisfy the job's model, VRAM and region, on machines that
        accept its kind (memoised)."""
        shape = job.shape
        found = self._shape_classes.get(shape)
        if found is None:
            ids = tuple(
                cls
                for cls, (model, vram, region, kinds) in enumerate(self.class_keys)
                if kinds & job.kind_bit
                and (not job.models or model in job.models)
                and vram >= job.min_vram_mb
                and (not job.region or region == job.region)
            )
            found = self._shape_classes[shape] = (ids, frozenset(ids))
        return found

    def find(self, job: _Job) -> tuple[_Machine, list[tuple[int, int]]] | None:
        """The machine and GPUs the policy gives `job` now, or None.

        Walks the job's class heaps in order of (floor, class free count, machine id). For any
        machine, its first entry in that order is a lower bound of its true rank (lease price,
        eligible free count, machine id), so the walk stops at the first entry ranked above the
        best machine found, usually after one or two machines."""
        classes, class_set = self.classes_for(job)
        heads: list[tuple[tuple[int, int, int, int, int], int]] = []
        for cls in classes:
            heap = self.heaps[cls]
            self._clean(heap)
            if heap:
                heads.append((heap[0], cls))
        heapq.heapify(heads)
        popped: list[tuple[int, tuple[int, int, int, int, int]]] = []
        seen: set[int] = set()
        best_rank: tuple[int, int, int] | None = None
        best: tuple[_Machine, list[tuple[int, int]]] | None = None
        while heads:
            entry, cls = heads[0]
            if entry[0] > job.max_price or (best_rank is not None and entry[:3] > best_rank):
                break
            heap = self.heaps[cls]
            heapq.heappop(heap)
            popped.append((cls, entry))
            self._clean(heap)
            if heap:
                heapq.heapreplace(heads, (heap[0], cls))
            else:
                heapq.heappop(heads)
            machine_id = entry[2]
            if machine_id in seen:
                continue
            seen.add(machine_id)
            machine = self.machines[machine_id]
            if machine.seconds < job.duration_s:
                continue
            eligible = [gpu for c, gpus in machine.free.items() if c in class_set for gpu in gpus]
            if len(eligible) < job.gpu_count:
                continue
            eligible.sort()
            chosen = eligible[: job.gpu_count]
            price = chosen[-1][0]
            if price > job.max_price:
                continue
            rank = (price, len(eligible), machine_id)
            if best_rank is None or rank < best_rank:
                best_rank, best = rank, (machine, chosen)
        for cls, entry in popped:
            if self._live(entry):
                heapq.heappush(self.heaps[cls], entry)
        return best


class _ByRegion:
    """What some machines offer a request, by region ("": every region): each machine's
    availability in seconds, ascending, and the least lease price from each on (`get`), so the
    cheapest machine lasting at least d seconds is a bisect away. A region's is made when it
    is first asked for: a cycle's reasons ask for the whole fleet's (""), and for one region's
    only where a request names it."""

    __slots__ = ("_made", "_regions", "_rows")

    def __init__(self, rows: list[tuple[float, int, str]]) -> None:
        self._rows = rows  # (seconds, price, region) of each machine
        self._regions: dict[str, list[tuple[float, int]]] | None = None  # the rows by region, once one is asked for
        self._made: dict[str, tuple[list[float], list[int]] | None] = {}

    def __bool__(self) -> bool:
        return bool(self._rows)

    def get(self, region: str) -> tuple[list[float], list[int]] | None:
        if region in self._made:
            return self._made[region]
        if not region:
            items = [(seconds, price) for seconds, price, _ in self._rows]
        else:
            if self._regions is None:
                self._regions = {}
                for seconds, price, at in self._rows:
                    self._regions.setdefault(at, []).append((seconds, price))
            items = self._regions.get(region, [])
        items.sort()
        made = None
        if items:
            # The least price from each row on, made in C (itertools.accumulate).
            suffix = list(accumulate(reversed(list(map(_second, items))), min))
            suffix.reverse()
            made = (list(map(_first, items)), suffix)
        self._made[region] = made
        return made


_first, _second = itemgetter(0), itemgetter(1)


@dataclass(slots=True)
class _Shape:
    """What the online fleet offers a (models, min VRAM, GPU count) request, for reasons: the
    answer of each kind of machine that qualifies (`parts`), combined when asked."""

    has_model: bool
    parts: list[_ByRegion]

    def cheapest(self, region: str, duration_s: float = 0.0) -> int | None:
        best: int | None = None
        for by_region in self.parts:
            entry = by_region.get(region)
            if entry is None:
                continue
            seconds, suffix_min = entry
            i = bisect_left(seconds, duration_s)
            if i < len(seconds) and (best is None or suffix_min[i] < best):
                best = suffix_min[i]
        return best


def _grouped(gpus: Iterable[tuple[str, int, int]]) -> list[tuple[str, int, list[int]]]:
    """A machine's GPUs (model, VRAM, floor) grouped by model and VRAM, each group's floors
    ascending (never changed afterwards: _Fleet's index shares them)."""
    groups: dict[tuple[str, int], list[int]] = {}
    for model, vram, floor in gpus:
        groups.setdefault((model, vram), []).append(floor)
    return [(model, vram, sorted(floors)) for (model, vram), floors in groups.items()]


class _Fleet:
    """Every GPU of every online machine, idle or not: what unplaced jobs are explained
    against. Answers are memoised by the job's constraints.

    Machines are indexed once by what they hold: most have GPUs of one model and VRAM, and
    those are grouped by (model, VRAM, accepted kinds), each group's answer for a GPU count
    built once; a request combines the answers of the groups it accepts. Only machines mixing
    models or VRAM sizes are scanned per request (before, every machine was, for each
    distinct request: a fifth of a cycle at 100,000 GPUs)."""

    def __init__(self) -> None:
        # machine id -> (region, seconds, accepted kinds, [(model lower-cased, vram, floor micros)])
        self.machines: dict[int, tuple[str, float, int, list[tuple[str, int, int]]]] = {}
        # machine id -> its GPUs grouped by (model, VRAM) with floors ascending, where the read
        # kept them so (_MachineView.grouped); the others are grouped when the index is made.
        self.grouped: dict[int, list[tuple[str, int, list[int]]]] = {}
        # The job kinds some online machine accepts (KIND_BITS ored).
        self.kinds = 0
        # (model, VRAM, kinds) -> [(region, seconds, floors ascending)] of the machines whose GPUs
        # are all of that model and VRAM; and the other machines, their GPUs grouped by (model,
        # VRAM) with floors ascending.
        self._uniform: dict[tuple[str, int, int], list[tuple[str, float, list[int]]]] | None = None
        self._mixed: list[tuple[str, float, int, list[tuple[str, int, list[int]]]]] = []
        # ((model, VRAM, kinds), GPU count) -> (machines with that many GPUs, their answer)
        self._parts: dict[tuple[tuple[str, int, int], int], tuple[int, _ByRegion]] = {}
        self._shapes: dict[tuple[frozenset[str], int, int, int], _Shape] = {}
        # (models, min VRAM, GPU count, region, max price, duration, kind bit) -> reason
        self._reasons: dict[tuple[frozenset[str], int, int, str, int, int, int], tuple[str, str]] = {}

    def _index(self) -> dict[tuple[str, int, int], list[tuple[str, float, list[int]]]]:
        if self._uniform is None:
            self._uniform = {}
            for machine_id, (region, seconds, kinds, gpus) in self.machines.items():
                grouped = self.grouped.get(machine_id)
                if grouped is None:
                    grouped = _grouped(gpus)
                if len(grouped) == 1:
                    model, vram, floors = grouped[0]
                    self._uniform.setdefault((model, vram, kinds), []).append((region, seconds, floors))
                elif grouped:
                    self._mixed.append((region, seconds, kinds, grouped))
        return self._uniform

    def _part(self, key: tuple[str, int, int], count: int) -> tuple[int, _ByRegion]:
        """How many machines of the group have `count` GPUs, and what they offer."""
        found = self._parts.get((key, count))
        if found is None:
            i = count - 1
            rows = [(seconds, floors[i], region) for region, seconds, floors in self._index()[key] if len(floors) > i]
            found = self._parts[(key, count)] = (len(rows), _ByRegion(rows))
        return found

    def _shape(self, models: frozenset[str], min_vram: int, count: int, kind_bit: int) -> _Shape:
        """What the online machines that accept the kind offer this request."""
        key = (models, min_vram, count, kind_bit)
        shape = self._shapes.get(key)
        if shape is not None:
            return shape
        has_model = False
        parts: list[_ByRegion] = []
        for group in self._index():
            model, vram, kinds = group
            if not kinds & kind_bit or (models and model not in models):
                continue
            n, by_region = self._part(group, count)
            has_model = has_model or n > 0
            if vram >= min_vram and by_region:
                parts.append(by_region)
        rows: list[tuple[float, int, str]] = []
        for region, seconds, kinds, groups in self._mixed:
            if not kinds & kind_bit:
                continue
            of_model = 0
            eligible: list[list[int]] = []
            for model, vram, floors in groups:
                if models and model not in models:
                    continue
                of_model += len(floors)
                if vram >= min_vram:
                    eligible.append(floors)
            if of_model < count:
                continue
            has_model = True
            floors = sorted(f for group_floors in eligible for f in group_floors)
            if len(floors) < count:
                continue
            rows.append((seconds, floors[count - 1], region))
        mixed = _ByRegion(rows)
        if mixed:
            parts.append(mixed)
        shape = self._shapes[key] = _Shape(has_model=has_model, parts=parts)
        return shape

    def explain(self, job: _Job) -> tuple[str, str]:
        """(code, sentence) for the first constraint no online machine meets, else no_idle_gpu.
        The job's kind comes first (when some machine is online): machines that do not accept
        it are not counted for the other constraints."""
        key = (job.models, job.min_vram_mb, job.gpu_count, job.region, job.max_price, job.duration_s, job.kind_bit)
        reason = self._reasons.get(key)
        if reason is None:
            reason = self._reasons[key] = self._explain(job)
        return reason

    def _explain(self, job: _Job) -> tuple[str, str]:
        if self.machines and not self.kinds & job.kind_bit:
            opt_in = "; providers opt in to them" if job.kind == Job.Kind.PROCESS else ""
            return "kind_not_accepted", f"no online machine accepts {job.kind} jobs{opt_in}"
        n = job.gpu_count
        gpus = f"{n} GPU" if n == 1 else f"{n} GPUs"
        of_models = f" of the allowed models ({job.models_text})" if job.models else ""
        shape = self._shape(job.models, job.min_vram_mb, n, job.kind_bit)
        if not shape.has_model:
            return "no_gpu_model", f"no online machine has {gpus}{of_models}"
        cheapest = shape.cheapest("")
        if cheapest is None:
            return (
                "insufficient_vram",
                f"no online machine has {gpus}{of_models} with at least {job.min_vram_mb} MB of memory",
            )
        if cheapest > job.max_price:
            return (
                "price_below_every_floor",
                f"the cheapest matching GPU costs {_price_text(cheapest)} per GPU-hour; "
                f"your maximum is {_price_text(job.max_price)}",
            )
        region = job.region
        in_region = shape.cheapest(region)
        if in_region is None or in_region > job.max_price:
            return (
                "region_unavailable",
                f"no online machine in region {region!r} has {gpus}{of_models} within your maximum price",
            )
        lasting = shape.cheapest(region, job.duration_s)
        if lasting is None or lasting > job.max_price:
            return (
                "no_window_long_enough",
                f"no matching machine is available for expected_duration_s={job.duration_s} seconds from now",
            )
        return "no_idle_gpu", "matching GPUs exist but all are busy or leased now; the job waits"


@dataclass(slots=True)
class _FreeFleet:
    """The online fleet as one read gives it: the machines available now (id -> region,
    seconds, kinds; in the machines query's order) and their candidate GPUs grouped by
    (model, VRAM) in the order each group first appears, each group sorted by (floor micros,
    gpu id), as the offers the policy takes (v1's pool reads them too)."""

    machines: dict[int, tuple[str, float, int]]
    free: dict[int, dict[tuple[str, int], list[policy.GpuOffer]]]
    # When each machine with free GPUs began its current stretch, where the read knew it (the
    # kept fleet does); None: _offers asks providers.idle_history.
    idle_since: dict[int, float | None] | None = None
    # The kept fleet that gave this read (None: read whole), which keeps a pool beside it.
    source: _KeptFleet | None = None

    @property
    def free_count(self) -> int:
        return sum(len(gpus) for groups in self.free.values() for gpus in groups.values())

    def pool(self) -> _Pool:
        """As v1 matches from: one class per (model, VRAM, region, kinds)."""
        pool = _Pool()
        for machine_id, (region, seconds, kinds) in self.machines.items():
            pool.add_machine(machine_id, region, seconds, kinds)
            for (model, vram_mb), gpus in self.free.get(machine_id, {}).items():
                for gpu in gpus:
                    pool.add_gpu(gpu_id=gpu.id, machine_id=machine_id, model=model, vram_mb=vram_mb, floor=gpu.floor)
        pool.seal()
        return pool


def _micros_of(price_field: str) -> Cast:
    """A price column as a count of millionths, as _to_micros makes it (a price has 6 decimals
    at most): an int from the driver, where a Decimal per row cost a conversion and a lookup."""
    return Cast(Round(F(price_field) * _MICROS), BigIntegerField())


def _online_machines() -> list[tuple[Any, ...]]:
    """(id, provider id, region, provider's default floor in micros, accepts_container,
    accepts_process) of every online machine."""
    return list(
        Machine.objects.filter(status=Machine.Status.ONLINE)
        .order_by()
        .annotate(floor_micros=_micros_of("provider__default_price_floor"))
        .values_list("id", "provider_id", "region", "floor_micros", "accepts_container", "accepts_process")
    )


def _fleet_load(*, now: datetime) -> tuple[_FreeFleet, _Fleet]:
    """Read the online fleet in four queries: machines, their availability, GPUs, and the GPUs
    in active leases."""
    machines = _online_machines()
    until = machines_available_until(machines=[(row[0], row[1]) for row in machines], now=now)
    free_fleet, fleet = _FreeFleet(machines={}, free={}), _Fleet()
    available, free = free_fleet.machines, free_fleet.free
    default_floor: dict[int, int] = {}
    for machine_id, _, region, provider_floor, accepts_container, accepts_process in machines:
        seconds = seconds_available(until.get(machine_id), now)
        default_floor[machine_id] = provider_floor
        kinds = (KIND_BITS[Job.Kind.CONTAINER] if accepts_container else 0) | (
            KIND_BITS[Job.Kind.PROCESS] if accepts_process else 0
        )
        fleet.machines[machine_id] = (region, seconds, kinds, [])
        fleet.kinds |= kinds
        if kinds and until.get(machine_id) is not None and seconds > 0:
            available[machine_id] = (region, seconds, kinds)
    in_lease = set(
        LeaseGPU.objects.filter(active=True, gpu__machine__status=Machine.Status.ONLINE).values_list(
            "gpu_id", flat=True
        )
    )
    model_keys: dict[str, str] = {}  # a fleet has few models: each lower-cased once
    idle = GPU.State.IDLE
    offer = policy.GpuOffer
    machine_gpus = fleet.machines
    online_gpus = (
        GPU.objects.filter(machine__status=Machine.Status.ONLINE)
        .order_by()
        .annotate(floor_micros=_micros_of("price_floor"))
        .values_list("id", "machine_id", "model", "vram_mb", "state", "floor_micros")
    )
    for gpu_id, machine_id, model, vram_mb, state, floor in core_rows(online_gpus):
        of_machine = machine_gpus.get(machine_id)
        if of_machine is None:  # went online after the machine query
            continue
        if floor is None:
            floor = default_floor[machine_id]
        model_key = model_keys.get(model)
        if model_key is None:
            model_key = model_keys[model] = model.strip().lower()
        of_machine[3].append((model_key, vram_mb, floor))
        if state == idle and machine_id in available and gpu_id not in in_lease:
            groups = free.get(machine_id)
            if groups is None:
                groups = free[machine_id] = {}
            group = groups.get((model_key, vram_mb))
            if group is None:
                groups[(model_key, vram_mb)] = [offer(gpu_id, model_key, vram_mb, floor)]
            else:
                group.append(offer(gpu_id, model_key, vram_mb, floor))
    by_floor = attrgetter("floor", "id")
    for groups in free.values():
        for gpus in groups.values():
            if len(gpus) > 1:
                gpus.sort(key=by_floor)
    return free_fleet, fleet


# --- the kept fleet ---------------------------------------------------------------------------

# What the kept fleet holds of a GPU row: machine id, model (lower-cased and stripped), VRAM,
# state, own floor in micros (None: its provider's default), and idle_since in Unix seconds.
_GpuRow = tuple[int, str, int, str, "int | None", "float | None"]

_GPU_COLUMNS = (
    "g.id, g.machine_id, g.model, g.vram_mb, g.state, "
    "(round(g.price_floor * 1000000))::bigint, extract(epoch from g.idle_since)::float8"
)


@dataclass(slots=True)
class _MachineView:
    """What one machine's GPU rows give a cycle (as _fleet_load's loop makes them): every GPU as
    _Fleet holds it, the free ones grouped by (model, VRAM) as _FreeFleet holds them, and when its
    current stretch began (providers.idle_history.machines_idle_since). Never changed once made:
    a cycle that read it may still be using it when the next cycle makes the machine's next."""

    gpus: list[tuple[str, int, int]]
    grouped: list[tuple[str, int, list[int]]]  # gpus as _Fleet's index takes them (_grouped)
    free: dict[tuple[str, int], list[policy.GpuOffer]]
    idle_since: float | None


class _KeptFleet:
    """The fleet a matcher worker read, kept between its cycles (PostgreSQL, outside a
    transaction), so that a cycle reads only what changed: at 100,000 GPUs the read of every GPU
    row and the loop over it were a quarter of a cycle, and most of a cycle of a few jobs.

    Each cycle, in one REPEATABLE READ transaction (one snapshot):
    - the online machines and their windows, in full (a few rows per machine, cheap);
    - the GPU rows written since the last read: those whose `xmin` (the transaction that wrote
      the row's version) is at or past the last read's snapshot xmin. A transaction the last
      read could not see has an id at least that: every version it missed is read now;
    - the GPUs in active leases, in full;
    - the GPU table's row count: a row gone since (a machine removed) leaves the kept rows more
      numerous than the table's, and everything is read again.
    A machine is worked out again (_MachineView) when one of its GPU rows changed, one of its GPUs
    entered or left an active lease, or its provider's default floor moved (a row rewritten with
    the same values, a telemetry sample, changes nothing); windows are judged every cycle. Every
    row is read again at least every GPGPU["MATCH_FLEET_FULL_READ_S"] seconds, after a read that
    failed midway, and on another database or server (another start time, or a snapshot xmin
    lower than the last). A cycle gets the same _FreeFleet and _Fleet as _fleet_load would read
    (marketplace/tests/test_matching_kept_fleet.py). A long transaction elsewhere holds the
    snapshot xmin back, and the rows written meanwhile are read again each cycle until it ends.

    Beside it the planning policy's pool (pool_update, _cycle_pool), which a cycle brings up to
    its offers rather than building: about 96 MiB kept with the fleet at 100,000 GPUs. The
    judgements of a GPU's horizon are a pure function of its stretch and the time, made at grid
    ages (placement._age_step); a kept GPU is judged again when its next grid age comes, one
    built afresh at its current grid age, which agree but within a billionth of the age around
    a grid boundary."""

    def __init__(self, database: tuple[Any, ...]) -> None:
        self.database = database
        self.rows: dict[int, _GpuRow] = {}
        self.of_machine: dict[int, set[int]] = {}
        self.in_lease: set[int] = set()
        self.views: dict[int, tuple[int, _MachineView]] = {}  # machine -> (default floor it was made with, view)
        self.dirty: set[int] = set()
        self.watermark: str | None = None
        self.server: Any = None  # pg_postmaster_start_time() at the last read
        self.read_at = -math.inf
        self.model_keys: dict[str, str] = {}
        self.last_read = ("", 0)  # ("full" or "changes", GPU rows read): for tests and logs
        # The planning policy's pool, kept beside the fleet (pool_update), with what each machine
        # in it was offered as (_offered_as); one cycle at a time uses it (pool_lock).
        self.pool: policy.FreePool | None = None
        self.offered: dict[int, tuple[Any, ...]] = {}
        self.pool_now = -math.inf  # the latest cycle time the pool was judged at
        self.pool_stale = False  # set by a full read (which holds no pool_lock), read by pool_update
        self.pool_lock = threading.Lock()

    def load(self, *, now: datetime) -> tuple[_FreeFleet, _Fleet]:
        try:
            return self._load(now)
        except BaseException:
            # Rows may be kept whose machines were not marked (a time limit mid-read): the next
            # cycle reads every row.
            self.watermark = None
            raise

    def _load(self, now: datetime) -> tuple[_FreeFleet, _Fleet]:
        gpus, leased = (connection.ops.quote_name(model._meta.db_table) for model in (GPU, LeaseGPU))
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                machines = _online_machines()
                until = machines_available_until(machines=[(row[0], row[1]) for row in machines], now=now)
                cursor.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text, pg_postmaster_start_time()")
                watermark, server = _row(cursor)
                full = (
                    self.watermark is None
                    or time.monotonic() - self.read_at >= settings.GPGPU["MATCH_FLEET_FULL_READ_S"]
                    # Another server behind the same address (a restore, a failover to another
                    # history): its transaction ids say nothing of the last read's.
                    or server != self.server
                    or int(watermark) < int(self.watermark)
                )
                self.server = server
                if not full:
                    # age() >= 0 leaves out the frozen rows' (and any older than 2^31 transactions).
                    cursor.execute(
                        f"SELECT {_GPU_COLUMNS} FROM {gpus} g "  # noqa: S608
                        "WHERE age(g.xmin) BETWEEN 0 AND age(xid(%s::xid8))",
                        [self.watermark],
                    )
                    changed = cursor.fetchall()
                    self._apply(changed)
                    cursor.execute(f"SELECT count(*) FROM {gpus}")  # noqa: S608
                    if _row(cursor)[0] != len(self.rows):
                        full = True  # a row left the table
                    else:
                        self.last_read = ("changes", len(changed))
                if full:
                    cursor.execute(f"SELECT {_GPU_COLUMNS} FROM {gpus} g")  # noqa: S608
                    self._reset()
                    rows = cursor.fetchall()
                    self._apply(rows)
                    self.read_at = time.monotonic()
                    self.last_read = ("full", len(rows))
                cursor.execute(f"SELECT gpu_id FROM {leased} WHERE active")  # noqa: S608
                in_lease = {row[0] for row in cursor.fetchall()}
                self.watermark = watermark
        for gpu_id in in_lease.symmetric_difference(self.in_lease):
            row = self.rows.get(gpu_id)
            if row is not None:
                self.dirty.add(row[0])
        self.in_lease = in_lease
        return self._assemble(machines, until, now)

    def _reset(self) -> None:
        self.pool_stale = True  # every view is new: the pool is built again, in one go
        self.rows.clear()
        self.of_machine.clear()
        self.views.clear()
        self.dirty.clear()

    def _apply(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Keep these GPU rows (read as _GPU_COLUMNS), and mark the machines of those that changed
        for working out."""
        kept, of_machine, dirty, model_keys = self.rows, self.of_machine, self.dirty, self.model_keys
        for gpu_id, machine_id, model, vram_mb, state, floor, idle_since in rows:
            before = kept.get(gpu_id)
            if before is not None and before[0] != machine_id:
                of_machine[before[0]].discard(gpu_id)
                dirty.add(before[0])
            model_key = model_keys.get(model)
            if model_key is None:
                model_key = model_keys[model] = model.strip().lower()
            row = (machine_id, model_key, vram_mb, state, floor, idle_since)
            if row == before:
                continue  # written for columns a cycle does not read (a telemetry sample)
            kept[gpu_id] = row
            of_machine.setdefault(machine_id, set()).add(gpu_id)
            dirty.add(machine_id)

    def _view(self, machine_id: int, default_floor: int) -> _MachineView:
        """The machine's view as _fleet_load's loop makes it from the same rows."""
        rows = self.rows
        in_lease = self.in_lease
        idle = GPU.State.IDLE
        gpus: list[tuple[str, int, int]] = []
        free: dict[tuple[str, int], list[policy.GpuOffer]] = {}
        since: float | None = None
        for gpu_id in sorted(self.of_machine.get(machine_id, ())):
            _, model_key, vram_mb, state, floor, idle_since = rows[gpu_id]
            if floor is None:
                floor = default_floor
            gpus.append((model_key, vram_mb, floor))
            if state == idle and gpu_id not in in_lease:
                free.setdefault((model_key, vram_mb), []).append(policy.GpuOffer(gpu_id, model_key, vram_mb, floor))
            if idle_since is not None and state in AWAY_STATES and (since is None or idle_since > since):
                since = idle_since
        by_floor = attrgetter("floor", "id")
        for group in free.values():
            group.sort(key=by_floor)
        return _MachineView(gpus=gpus, grouped=_grouped(gpus), free=free, idle_since=since)

    def _assemble(
        self, machines: list[tuple[Any, ...]], until: dict[int, datetime | None], now: datetime
    ) -> tuple[_FreeFleet, _Fleet]:
        free_fleet, fleet = _FreeFleet(machines={}, free={}, idle_since={}, source=self), _Fleet()
        available, free, idle_since = free_fleet.machines, free_fleet.free, free_fleet.idle_since
        views, dirty = self.views, self.dirty
        assert idle_since is not None
        # A provider's machines share their window's end (providers.selectors): each end is
        # worked out in seconds once.
        seconds_until: dict[datetime | None, float] = {}
        container, process = KIND_BITS[Job.Kind.CONTAINER], KIND_BITS[Job.Kind.PROCESS]
        for machine_id, _, region, default_floor, accepts_container, accepts_process in machines:
            end = until.get(machine_id)
            seconds = seconds_until.get(end)
            if seconds is None:
                seconds = seconds_until[end] = seconds_available(end, now)
            kept = views.get(machine_id)
            if kept is None or kept[0] != default_floor or machine_id in dirty:
                kept = views[machine_id] = (default_floor, self._view(machine_id, default_floor))
                dirty.discard(machine_id)
            view = kept[1]
            kinds = (container if accepts_container else 0) | (process if accepts_process else 0)
            fleet.machines[machine_id] = (region, seconds, kinds, view.gpus)
            fleet.grouped[machine_id] = view.grouped
            fleet.kinds |= kinds
            if kinds and end is not None and seconds > 0:
                available[machine_id] = (region, seconds, kinds)
                if view.free:
                    free[machine_id] = view.free
                    idle_since[machine_id] = view.idle_since
        return free_fleet, fleet

    # --- the pool ---------------------------------------------------------------------------

    def pool_update(
        self, name: str, free_fleet: _FreeFleet, offers: Sequence[policy.MachineOffer], now: float
    ) -> policy.FreePool:
        """The kept pool of policy `name` brought up to this cycle's offers (the caller holds
        pool_lock): a machine whose offer changed is withdrawn and offered again, one no longer
        offered is withdrawn, the others stand as the cycles before left them. The pool gives
        the answers a pool built from the same offers gives (placement.FreePool); built in one
        go after a full read, for another policy, or for a cycle earlier than one it served (its
        GPUs are judged again only as time goes on)."""
        wanted = {offer.id: offer for offer in offers if policy.offerable(offer)}
        offered = self.offered
        pool = self.pool
        earlier, self.pool_now = now < self.pool_now, max(now, self.pool_now)
        changed: list[tuple[policy.MachineOffer, tuple[Any, ...]]] = []
        windows: list[tuple[policy.MachineOffer, tuple[Any, ...]]] = []
        if pool is not None and pool.policy == name and not earlier and not self.pool_stale:
            for machine_id, offer in wanted.items():
                now_as = _offered_as(free_fleet, offer, now)
                before = offered.get(machine_id)
                if (
                    before is None
                    or before[0] is not now_as[0]
                    or before[1] is not now_as[1]
                    or before[2:4] != now_as[2:4]
                ):
                    changed.append((offer, now_as))
                elif before[4:] != now_as[4:]:
                    (windows if before[5] == now_as[5] else changed).append((offer, now_as))
        else:
            pool = None
        if pool is None or len(changed) > len(wanted) // 2:
            # New, or most machines changed (the fleet prior moved every forecast): built in one go.
            self.pool_now, self.pool_stale = now, False
            pool = self.pool = policy.pool_of(wanted.values(), policy=name, now=now)
            self.offered = {machine_id: _offered_as(free_fleet, offer, now) for machine_id, offer in wanted.items()}
            return pool
        # Every machine to withdraw is withdrawn before any is offered again: a GPU that moved
        # from one machine to another is then offered under the second.
        for machine_id in [machine_id for machine_id in offered if machine_id not in wanted]:
            pool.remove_machine(machine_id)
            del offered[machine_id]
        for offer, _ in changed:
            pool.remove_machine(offer.id)
        for offer, now_as in changed:
            pool.add_machine(offer, now=now)
            offered[offer.id] = now_as
        for offer, now_as in windows:
            pool.window_moved(offer)  # only its declared window: its GPUs stand as judged
            offered[offer.id] = now_as
        return pool


def _row(cursor: Any) -> tuple[Any, ...]:
    """The one row the cursor's statement returned."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("the statement returned no row")
    return tuple(row)


# What a machine placed on was offered as: no offer is, so it is withdrawn and offered again.
_OFFER_AGAIN: tuple[Any, ...] = (None,)


def _offered_as(free_fleet: _FreeFleet, offer: policy.MachineOffer, now: float) -> tuple[Any, ...]:
    """What a machine's offer is made of, to tell whether it changed: its free GPUs (the kept
    fleet's _MachineView.free, a new object whenever they change) and forecast (the same object
    while its profile and the fleet prior stand: providers.idle_history) by identity; its region,
    kinds, window (seconds from now: it moves every cycle for a machine with a declared end) and
    stretch by value. A machine whose stretch start is unknown is judged as beginning now
    (FreePool), so it is offered again every cycle."""
    since = offer.idle_since if offer.idle_since is not None else ("now", now)
    return (free_fleet.free[offer.id], offer.forecast, offer.region, offer.kinds, offer.window_s, since)


@contextmanager
def _cycle_pool(
    name: str, free_fleet: _FreeFleet, offers: Sequence[policy.MachineOffer], now: float
) -> Iterator[tuple[policy.FreePool, set[int]]]:
    """The pool a planned cycle places on, and a set the cycle adds each machine it placed on to:
    the kept fleet's pool when this read came from it and no other cycle of this process uses it
    now, else one built from the offers. The machines placed on are offered again next cycle
    (their GPUs left the pool whether or not their leases were written); a cycle that fails
    leaves the pool to be built again."""
    touched: set[int] = set()
    kept = free_fleet.source
    if kept is None or not kept.pool_lock.acquire(blocking=False):
        yield policy.pool_of(offers, policy=name, now=now), touched
        return
    try:
        done = False
        try:
            yield kept.pool_update(name, free_fleet, offers, now), touched
            done = True
        finally:
            if done:
                for machine_id in touched:
                    if machine_id in kept.offered:
                        kept.offered[machine_id] = _OFFER_AGAIN
            else:
                kept.pool = None
    finally:
        kept.pool_lock.release()


_kept_lock = threading.Lock()
_kept: _KeptFleet | None = None


def _fleet_read(*, now: datetime) -> tuple[_FreeFleet, _Fleet]:
    """The online fleet for a cycle: from this process's kept fleet where it can be kept
    (PostgreSQL, outside a transaction, MATCH_FLEET_FULL_READ_S above 0), else read whole
    (_fleet_load)."""
    global _kept
    if (
        connection.vendor != "postgresql"
        or connection.in_atomic_block
        or settings.GPGPU["MATCH_FLEET_FULL_READ_S"] <= 0
    ):
        return _fleet_load(now=now)
    database = (connection.alias, *(connection.settings_dict.get(k) for k in ("HOST", "PORT", "NAME")))
    with _kept_lock:
        if _kept is None or _kept.database != database:
            _kept = _KeptFleet(database)
        return _kept.load(now=now)


def _fleet_forget() -> None:
    """Drop this process's kept fleet: the next cycle reads every row."""
    global _kept
    with _kept_lock:
        _kept = None


def _busy_gpu_ids() -> set[int]:
    """GPUs of online machines that are no longer candidates (a concurrent worker leased them,
    or their owner took them back)."""
    busy = set(
        GPU.objects.filter(machine__status=Machine.Status.ONLINE)
        .exclude(state=GPU.State.IDLE)
        .values_list("id", flat=True)
    )
    busy.update(LeaseGPU.objects.filter(active=True).values_list("gpu_id", flat=True))
    return busy


# --- one chunk ------------------------------------------------------------------------------


_JOB_FIELDS = (
    "id",
    "created_at",
    "gpu_count",
    "min_vram_mb",
    "allowed_text",  # _with_allowed_text
    "region",
    "max_price_per_gpu_hour",
    "expected_duration_s",
    "kind",
)


def _with_allowed_text(jobs: QuerySet[Job]) -> QuerySet[Job]:
    """The jobs with `allowed_text`: their allowed models as the JSON text stored, which
    _allowed_models reads once per distinct list (a queue's jobs share a few), where reading the
    JSON field decoded every job's."""
    return jobs.annotate(allowed_text=Cast("allowed_models", TextField()))


@functools.lru_cache(maxsize=1024)
def _allowed_models(text: str | None) -> tuple[frozenset[str], str]:
    """A job's allowed models from their JSON text: (lower-cased names, the names as written,
    sorted and comma-joined, for sentences)."""
    listed = json.loads(text) if text else None
    allowed = [str(m) for m in (listed or []) if str(m).strip()]  # as the JSON field's value was read
    return frozenset(m.strip().lower() for m in allowed), ", ".join(sorted(allowed))


def _job_from_row(row: tuple[Any, ...]) -> _Job:  # values_list(*_JOB_FIELDS): each of its field's type
    job_id, created_at, gpu_count, min_vram_mb, allowed_text, region, max_price, duration, kind = row
    models, models_text = _allowed_models(allowed_text)
    return _Job(
        id=job_id,
        created_at=created_at,
        gpu_count=gpu_count,
        min_vram_mb=min_vram_mb or 0,
        models=models,
        models_text=models_text,
        region=region or "",
        max_price=_to_micros(max_price),
        duration_s=duration,
        kind=kind,
        kind_bit=KIND_BITS.get(kind, 0),
    )


def _jobs_lock(*, after: tuple[datetime, int] | None, limit: int) -> list[_Job]:
    """The next `limit` pending jobs in FIFO order after the cursor, locked; jobs another
    worker holds are skipped. The caller holds a transaction."""
    qs = _with_allowed_text(Job.objects.filter(status=Job.Status.PENDING))
    if after is not None:
        created_at, job_id = after
        qs = qs.filter(Q(created_at__gt=created_at) | Q(created_at=created_at, pk__gt=job_id))
    rows = qs.order_by("created_at", "id").select_for_update(skip_locked=True).values_list(*_JOB_FIELDS)[:limit]
    return [_job_from_row(row) for row in rows]


def _jobs_hold(job_ids: Iterable[int]) -> set[int]:
    """Lock the given jobs that are still pending and return their ids; jobs another worker
    holds are skipped, not waited for. The caller holds a transaction."""
    ids = list(job_ids)
    if connection.vendor == "postgresql":  # one statement without the ORM's making: a chunk's Python shares the GIL
        table = connection.ops.quote_name(Job._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id FROM {table} WHERE id = ANY(%s::bigint[]) AND status = %s FOR UPDATE SKIP LOCKED",  # noqa: S608
                [int_array(ids), Job.Status.PENDING],
            )
            return {row[0] for row in cursor.fetchall()}
    return set(
        Job.objects.filter(pk__any=ids, status=Job.Status.PENDING)
        .order_by()
        .select_for_update(skip_locked=True)
        .values_list("pk", flat=True)
    )


def _gpus_lock(gpu_ids: Iterable[int]) -> dict[int, int]:
    """Lock the given GPUs and return those that are still candidates (idle, machine online,
    in no active lease), each with the machine it is on now: a GPU whose rig registered again
    since the plan was read has moved to the new machine, and is not leased under the old one.
    GPUs another worker holds are skipped, not waited for. The caller holds a transaction.

    The lock is taken by primary key alone (providers.services.gpus_lock, in primary-key
    order), and the state re-checked on the rows it returns (the latest committed version under
    the lock), so its plan stays an index lookup even before the planner has statistics on
    freshly loaded tables."""
    rows = providers_services.gpus_lock(gpu_ids=gpu_ids, skip_locked=True)
    if not rows:
        return {}
    idle = [(gpu_id, machine_id) for gpu_id, state, machine_id in rows if state == GPU.State.IDLE]
    if connection.vendor == "postgresql":  # the machines' and leases' checks in one statement
        with connection.cursor() as cursor:
            cursor.execute(
                f"""SELECT g.id, g.machine_id FROM unnest(%s::bigint[], %s::bigint[]) AS g(id, machine_id)
                JOIN {connection.ops.quote_name(Machine._meta.db_table)} m ON m.id = g.machine_id AND m.status = %s
                WHERE NOT EXISTS (SELECT 1 FROM {connection.ops.quote_name(LeaseGPU._meta.db_table)} l
                    WHERE l.gpu_id = g.id AND l.active)""",  # noqa: S608 (table names from the models)
                [int_array(g for g, _ in idle), int_array(m for _, m in idle), Machine.Status.ONLINE],
            )
            return dict(cursor.fetchall())
    online = set(
        Machine.objects.filter(pk__any={m for _, m in idle}, status=Machine.Status.ONLINE).values_list("pk", flat=True)
    )
    candidates = {gpu_id: machine_id for gpu_id, machine_id in idle if machine_id in online}
    ids = list(candidates)
    in_lease: set[int] = set()
    for start in range(0, len(ids), 1000):
        in_lease.update(
            LeaseGPU.objects.filter(gpu_id__any=ids[start : start + 1000], active=True).values_list("gpu_id", flat=True)
        )
    return {gpu_id: machine_id for gpu_id, machine_id in candidates.items() if gpu_id not in in_lease}


_Chosen = tuple[_Job, _Machine, list[tuple[int, int]]]


def _match_jobs(pool: _Pool, jobs: Sequence[_Job]) -> list[_Chosen]:
    """Match jobs in order against the pool, taking the GPUs each placement uses."""
    placements: list[_Chosen] = []
    hopeless: set[tuple[tuple[frozenset[str], int, str, int], int, int, int]] = set()  # the pool only shrinks
    for job in jobs:
        key = (job.shape, job.gpu_count, job.max_price, job.duration_s)
        if key in hopeless:
            continue
        found = pool.find(job)
        if found is None:
            hopeless.add(key)
            continue
        machine, chosen = found
        pool.take(machine, chosen)
        placements.append((job, machine, chosen))
    return placements


def _give_back(pool: _Pool, placements: Iterable[_Chosen]) -> None:
    for _, machine, chosen in placements:
        pool.give_back(machine.id, [gpu_id for _, gpu_id in chosen])


def _chunk_place(pool: _Pool, jobs: Sequence[_Job]) -> list[_Chosen]:
    """Match the chunk and lock the GPUs it uses. A GPU that cannot be locked (a concurrent
    worker holds or leased it) leaves the pool, with every GPU found busy since the cycle
    began, and the chunk is matched again so FIFO order still holds. The caller holds a
    transaction; returns placements whose GPUs are all locked."""
    locked: set[int] = set()
    for attempt in range(MAX_LOCK_ROUNDS):
        placements = _match_jobs(pool, jobs)
        on = {gpu_id: machine.id for _, machine, chosen in placements for _, gpu_id in chosen}
        wanted = set(on) - locked
        got = {gpu_id for gpu_id, machine_id in _gpus_lock(wanted).items() if on[gpu_id] == machine_id}
        locked |= got
        lost = wanted - got
        if not lost:
            return placements
        logger.info("matching: %d GPUs taken by a concurrent worker; matching the chunk again", len(lost))
        if attempt == MAX_LOCK_ROUNDS - 1:
            kept = [p for p in placements if all(gpu_id in locked for _, gpu_id in p[2])]
            _give_back(pool, [p for p in placements if not all(gpu_id in locked for _, gpu_id in p[2])])
            pool.drop(lost)
            return kept
        _give_back(pool, placements)
        pool.drop(lost)
        pool.drop(_busy_gpu_ids() - locked)
    return []


# --- the cycle ------------------------------------------------------------------------------


def match_cycle(*, now: datetime | None = None, batch_size: int | None = None) -> MatchResult:
    """Place as many pending jobs as the policy allows (see the module docstring) and record a
    reason on each considered job left pending.

    Considers at most `batch_size` jobs (default GPGPU["MATCH_BATCH_SIZE"]) in FIFO order, in
    transactions of CHUNK_SIZE jobs. Safe to run in several workers at once. `now` decides
    availability windows (default: the current time). A cycle that ends is counted in /metrics
    (gpgpu_match_cycles_total, gpgpu_match_cycle_seconds, gpgpu_match_placements_total)."""
    with collector_paused():  # a burst of short-lived rows, offers and placements (core.collector)
        result = _match_cycle(now=now, batch_size=batch_size)
    prom.match_cycle_observe(seconds=result.seconds, placed=result.placed)
    return result


def _match_cycle(*, now: datetime | None, batch_size: int | None) -> MatchResult:
    """match_cycle without the counting."""
    started = time.perf_counter()
    now = now or timezone.now()
    limit = batch_size if batch_size is not None else settings.GPGPU["MATCH_BATCH_SIZE"]
    result = MatchResult()
    # The pending jobs, counted up to a chunk's worth (an index range, as cheap as asking
    # whether there is one).
    pending = Job.objects.filter(status=Job.Status.PENDING).order_by()[:CHUNK_SIZE].count() if limit > 0 else 0
    if not pending:
        result.seconds = time.perf_counter() - started
        return result

    name = settings.MATCH_POLICY
    if name != "v1":
        _match_cycle_planned(
            now=now, limit=limit, name=name, result=result, read_beside=min(pending, limit) >= CHUNK_SIZE
        )
        result.unplaced = result.considered - result.placed
        result.seconds = time.perf_counter() - started
        if result.placed or result.conflicts:
            logger.info("matching: %s", result.as_dict())
        return result

    free_fleet, fleet = _fleet_read(now=now)
    pool = free_fleet.pool()
    result.candidate_gpus = pool.free_count
    result.read_seconds = time.perf_counter() - started
    cursor: tuple[datetime, int] | None = None
    while result.considered < limit:
        chunk_jobs: list[_Job] = []
        placements: list[_Chosen] = []
        try:
            with transaction.atomic():
                mark = time.perf_counter()
                chunk_jobs = _jobs_lock(after=cursor, limit=min(CHUNK_SIZE, limit - result.considered))
                if not chunk_jobs:
                    break
                # Billing gate: only jobs whose budget the escrow holds are placed.
                unfunded = billing_selectors.jobs_budget_unreserved(job_ids=[job.id for job in chunk_jobs], now=now)
                placeable = [job for job in chunk_jobs if job.id not in unfunded]
                result.read_seconds += time.perf_counter() - mark
                mark = time.perf_counter()
                placements = _chunk_place(pool, placeable) if pool.free_count else []
                result.plan_seconds += time.perf_counter() - mark
                mark = time.perf_counter()
                placed_ids = leases_assign(
                    placements=[
                        Placement(
                            job_id=job.id,
                            machine_id=machine.id,
                            gpu_ids=tuple(gpu_id for _, gpu_id in chosen),
                            price_per_gpu_hour=_from_micros(chosen[-1][0]),
                        )
                        for job, machine, chosen in placements
                    ]
                )
                # leases_assign skips a job that stopped being pending (it cannot while we hold
                # its lock, but the count should say what was written).
                placements = [p for p in placements if p[0].id in placed_ids]
                result.write_seconds += time.perf_counter() - mark
                mark = time.perf_counter()
                job_set_unplaced(
                    reasons={
                        job.id: unfunded.get(job.id) or fleet.explain(job)  # the billing gate first
                        for job in chunk_jobs
                        if job.id not in placed_ids
                    },
                    now=now,
                )
                result.reasons_seconds += time.perf_counter() - mark
        except IntegrityError:
            # The unique index refused a GPU already in an active lease: our view of the fleet
            # is stale. Nothing of this chunk was written; the GPUs it chose stay out of the
            # pool and its jobs wait for the next cycle.
            logger.warning("matching: chunk of %d jobs rolled back on a lease conflict", len(chunk_jobs), exc_info=True)
            result.conflicts += 1
            placements = []
        result.chunks += 1
        result.considered += len(chunk_jobs)
        result.placed += len(placements)
        result.gpus_leased += sum(len(chosen) for _, _, chosen in placements)
        last = chunk_jobs[-1]
        cursor = (last.created_at, last.id)
        if len(chunk_jobs) < CHUNK_SIZE and result.considered < limit:
            break
    result.unplaced = result.considered - result.placed
    result.seconds = time.perf_counter() - started
    if result.placed or result.conflicts:
        logger.info("matching: %s", result.as_dict())
    return result


# --- the planned cycle (policies other than v1) -------------------------------------------------


# A pending job as the planned cycle reads it (_pending_requests).
_PENDING_FIELDS = (
    "id",
    "submitted_at",  # _EpochSeconds of created_at (on PostgreSQL), else created_at
    "gpu_count",
    "min_vram_mb",
    "allowed_text",  # _with_allowed_text
    "region",
    "price_micros",  # _micros_of the ceiling
    "expected_duration_s",
    "kind",
    "renter_id",
    "checkpoint_interval_s",
)


class _EpochSeconds(Func):
    """A timestamp as Unix seconds, worked out by PostgreSQL: EXTRACT gives them exactly (a
    numeric, to the microsecond), rounded once to the nearest double, as datetime.timestamp()
    rounds the same number; the driver then hands over a float, where a datetime per row cost
    half a pending job's read."""

    template = "EXTRACT(EPOCH FROM %(expressions)s)::float8"
    output_field = FloatField()


def _pending_requests(
    limit: int, *, epoch_in_database: bool | None = None
) -> tuple[dict[int, tuple[str | None, str]], dict[int, policy.JobRequest]]:
    """The oldest `limit` pending jobs (not locked: the plan is written under locks later), as
    the policy's requests, with what else the reasons' view of a job needs (_job_view: its
    allowed models as stored, its kind) by id: the view is made only for the jobs a reason is
    needed for (making it for every job was half this read's time). `epoch_in_database`: the
    submission times as PostgreSQL works them out (default: on PostgreSQL), else as Python
    does from the datetimes; the two agree (test_matching.py)."""
    in_database = connection.vendor == "postgresql" if epoch_in_database is None else epoch_in_database
    rows = (
        _with_allowed_text(Job.objects.filter(status=Job.Status.PENDING))
        .annotate(
            submitted_at=_EpochSeconds("created_at") if in_database else F("created_at"),
            price_micros=_micros_of("max_price_per_gpu_hour"),
        )
        .order_by("created_at", "id")
        .values_list(*_PENDING_FIELDS)[:limit]
    )
    views: dict[int, tuple[str | None, str]] = {}
    requests: dict[int, policy.JobRequest] = {}
    for job_id, submitted, gpu_count, min_vram_mb, allowed_text, region, price, duration, kind, renter, every in rows:
        views[job_id] = (allowed_text, kind)
        # _job_view's conversions, written out: a call a job cost as much again.
        requests[job_id] = policy.JobRequest(
            id=job_id,
            renter=renter,
            submitted_at=submitted if in_database else submitted.timestamp(),
            gpu_count=gpu_count,
            min_vram_mb=min_vram_mb or 0,
            models=_allowed_models(allowed_text)[0],
            region=region or "",
            max_price=price,
            duration_s=duration,
            checkpoint_interval_s=every,
            kind_bit=KIND_BITS.get(kind, 0),
        )
    return views, requests


def _job_view(request: policy.JobRequest, view: tuple[str | None, str]) -> _Job:
    """The reasons' view of a job _pending_requests read, from its request and view."""
    allowed_text, kind = view
    models, models_text = _allowed_models(allowed_text)
    return _Job(
        id=request.id,
        created_at=datetime.fromtimestamp(request.submitted_at, UTC),
        gpu_count=request.gpu_count,
        min_vram_mb=request.min_vram_mb,
        models=models,
        models_text=models_text,
        region=request.region,
        max_price=request.max_price,
        duration_s=request.duration_s,
        kind=kind,
        kind_bit=request.kind_bit,
    )


def _offers(free_fleet: _FreeFleet) -> list[policy.MachineOffer]:
    """The available machines with free GPUs, with each machine's idle forecast, for the
    policy."""
    ids = [machine_id for machine_id in free_fleet.machines if free_fleet.free.get(machine_id)]
    forecasts = machine_forecasts(machine_ids=ids)
    idle_since = free_fleet.idle_since
    if idle_since is None:
        idle_since = machines_idle_since(machine_ids=ids)
    offers = []
    for machine_id in ids:
        region, seconds, kinds = free_fleet.machines[machine_id]
        groups = free_fleet.free[machine_id]
        gpus = next(iter(groups.values())) if len(groups) == 1 else [g for free in groups.values() for g in free]
        offers.append(
            policy.MachineOffer(
                id=machine_id,
                region=region,
                kinds=kinds,
                window_s=seconds,
                idle_since=idle_since.get(machine_id),
                forecast=forecasts.get(machine_id),
                gpus=gpus,
            )
        )
    return offers


def _jobs_read(
    limit: int, now: datetime
) -> tuple[dict[int, tuple[str | None, str]], dict[int, policy.JobRequest], dict[int, tuple[str, str]], dict[int, int]]:
    """A planned cycle's read of the jobs: the pending jobs (_pending_requests), those whose
    budget the escrow does not hold for a run from `now`, and the GPUs each renter holds."""
    views, requests = _pending_requests(limit)
    unfunded = billing_selectors.jobs_budget_unreserved(job_ids=list(requests), now=now)
    return views, requests, unfunded, _gpus_held_by_renter()


class _Beside(Generic[_T]):
    """`work` run in a thread with a connection of its own while the caller's thread goes on:
    while one waits for PostgreSQL, the other's Python runs (a planned cycle's reads of the
    jobs and of the fleet, 0.1 s each at 100,000 GPUs, were one after the other on one core).
    `result()` waits for it and returns its value or raises its error; `join()` only waits. On
    PostgreSQL outside a transaction only; elsewhere (SQLite, a caller's or a test's
    transaction, whose rows other connections do not see), or without `in_thread`, `work`
    runs in the caller's thread at `result()`."""

    def __init__(self, work: Callable[[], _T], *, in_thread: bool = True) -> None:
        self._work = work
        self._done: list[_T] = []
        self._failed: list[BaseException] = []
        self._thread: threading.Thread | None = None
        if in_thread and connection.vendor == "postgresql" and not connection.in_atomic_block:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._done.append(self._work())
        except BaseException as error:  # raised in the caller's thread, at result()
            self._failed.append(error)
        finally:
            connections.close_all()  # a thread of its own: its connection goes with it

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def result(self) -> _T:
        if self._thread is None:
            return self._work()
        self._thread.join()
        if self._failed:
            raise self._failed[0]
        return self._done[0]


def _gpus_held_by_renter() -> dict[int, int]:
    """GPUs in active leases per renter: the fair share's starting point."""
    return dict(
        LeaseGPU.objects.filter(active=True)
        .order_by()
        .values_list("lease__job__renter_id")
        .annotate(n=Count("id"))
        .values_list("lease__job__renter_id", "n")
    )


# While writer threads run beside the policy: how long the policy's thread may hold the GIL
# before a thread waiting for it (a writer back from PostgreSQL) gets it (sys.setswitchinterval;
# CPython's default is 5 ms). A chunk is a dozen statements, and after each reply its writer
# waited for the policy's thread to give the GIL up: at the default, a chunk written beside
# the policy took 0.23-0.30 s against 0.08 s alone, and most of the plan was left to write
# after the policy ended (benchmarks/README.md).
WRITER_SWITCH_INTERVAL_S = 0.0002
_switch_lock = threading.Lock()
_switch_users = 0
_switch_before = 0.0


@contextmanager
def _short_switch_interval() -> Iterator[None]:
    """sys.setswitchinterval(WRITER_SWITCH_INTERVAL_S) while any cycle of this process has
    writer threads, put back as it was when the last ends (it is the process's setting)."""
    global _switch_users, _switch_before
    with _switch_lock:
        if _switch_users == 0:
            _switch_before = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_before, WRITER_SWITCH_INTERVAL_S))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_before)


class _PlanWriter:
    """Writes a plan as the policy makes it (`add`, then `close`), in transactions of CHUNK_SIZE
    placements: each locks its jobs (still pending) and GPUs (still candidates), skipping rows
    another worker holds, and writes the placements whose job and GPUs it holds; the others
    wait for the next cycle. `close` returns what was written and how many chunks the unique
    index refused.

    On PostgreSQL, outside a caller's transaction, each full chunk goes to a writer thread with
    a connection of its own while the policy goes on (MATCH_WRITERS - 1 of them, started at the
    first full chunk), and at `close` this thread writes what is left beside them. A chunk's
    time is mostly PostgreSQL's, on the core the policy does not use; the chunks of one plan
    share no job and no GPU, so they lock nothing of each other's (as two matcher workers'
    chunks do not). Inside a transaction (a caller's, a test's) other connections would not see
    its rows: the chunks are written at `close`, in this thread, one after another. A writer
    that fails stops the others and the policy (its error raised at the next `add` or at
    `close`); chunks written before stay written, each complete. From the start of its threads
    until it is left (`with`), the process's GIL switch interval is short
    (WRITER_SWITCH_INTERVAL_S)."""

    def __init__(self) -> None:
        self._threads_wanted = settings.GPGPU["MATCH_WRITERS"] - 1
        if connection.vendor != "postgresql" or connection.in_atomic_block:
            self._threads_wanted = 0
        self._chunk: list[policy.Placement] = []
        self._chunks: list[list[policy.Placement]] = []
        self._done: dict[int, tuple[list[policy.Placement], bool]] = {}
        self._threads: list[threading.Thread] = []
        self._failures: list[BaseException] = []
        self._ready = threading.Condition()
        self._next = 0  # the first chunk no writer has taken
        self._closed = False
        self._switch = ExitStack()  # the short switch interval while the threads run

    def __enter__(self) -> _PlanWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._ready:  # stops the writers after the chunk each is writing
            self._closed = True
            self._next = len(self._chunks)
            self._ready.notify_all()
        try:
            for thread in self._threads:
                thread.join()
        finally:
            self._switch.close()

    @property
    def chunks(self) -> int:
        return len(self._chunks)

    def add(self, placement: policy.Placement) -> None:
        if self._failures:
            raise self._failures[0]
        self._chunk.append(placement)
        if len(self._chunk) >= CHUNK_SIZE:
            self._hand_over()

    def close(self, beside: Callable[[], None] | None = None) -> tuple[list[policy.Placement], int]:
        """Write what is left, and return what was written and the refused chunks' count.
        `beside` is this thread's other work, done first, while the writer threads (if any)
        write; then this thread writes beside them."""
        if self._chunk:
            self._hand_over()
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        if beside is not None:
            beside()
        self._write_taken()
        for thread in self._threads:
            thread.join()
        if self._failures:
            raise self._failures[0]
        done = [self._done[index] for index in sorted(self._done)]
        written = [p for placed, _ in done for p in placed]
        return written, sum(1 for _, refused in done if refused)

    def _hand_over(self) -> None:
        full = len(self._chunk) >= CHUNK_SIZE
        with self._ready:
            self._chunks.append(self._chunk)
            self._ready.notify()
        self._chunk = []
        if full and len(self._chunks) == 1 and self._threads_wanted:  # the plan fills a chunk: worth the threads
            self._switch.enter_context(_short_switch_interval())
            for _ in range(self._threads_wanted):
                thread = threading.Thread(target=self._write_in_thread, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _take(self) -> int | None:
        """The next chunk to write; None once every chunk is taken and the plan closed, or a
        writer failed. Waits for the policy's next chunk."""
        with self._ready:
            while self._next >= len(self._chunks) and not self._closed and not self._failures:
                self._ready.wait()
            if self._failures or self._next >= len(self._chunks):
                return None
            self._next += 1
            return self._next - 1

    def _write_taken(self) -> None:
        try:
            while (index := self._take()) is not None:
                self._done[index] = _chunk_write(self._chunks[index])
        except BaseException as error:  # raised by add() or close() in the policy's thread
            with self._ready:
                self._failures.append(error)
                self._ready.notify_all()

    def _write_in_thread(self) -> None:
        try:
            self._write_taken()
        finally:
            connections.close_all()  # a thread of its own: its connection goes with it


def _chunk_write(chunk: Sequence[policy.Placement]) -> tuple[list[policy.Placement], bool]:
    """One chunk of _PlanWriter in a transaction of its own: (what it wrote, whether the unique
    index refused it)."""
    try:
        with transaction.atomic():
            held_jobs = _jobs_hold(p.job_id for p in chunk)
            wanted = [p for p in chunk if p.job_id in held_jobs]
            held_gpus = _gpus_lock({gpu_id for p in wanted for gpu_id in p.gpu_ids})
            ready = [p for p in wanted if all(held_gpus.get(gpu_id) == p.machine_id for gpu_id in p.gpu_ids)]
            placed_ids = leases_assign(
                placements=[
                    Placement(
                        job_id=p.job_id,
                        machine_id=p.machine_id,
                        gpu_ids=p.gpu_ids,
                        price_per_gpu_hour=_from_micros(p.price),
                    )
                    for p in ready
                ],
                held=True,  # the jobs locked pending and the GPUs locked above
            )
            return [p for p in ready if p.job_id in placed_ids], False
    except IntegrityError:
        logger.warning("matching: %d placements rolled back on a lease conflict", len(chunk), exc_info=True)
        return [], True


def _match_cycle_planned(*, now: datetime, limit: int, name: str, result: MatchResult, read_beside: bool) -> None:
    """One cycle of a planning policy (v2, first-fit): read the pending jobs and the free fleet,
    let marketplace.placement choose which jobs go where (its order is not FIFO: fair share,
    price and expected lost work), write the plan under row locks as it is made (_PlanWriter),
    and record a reason on each job left pending. `read_beside`: a chunk's worth of jobs or
    more wait, and they are read in a thread of their own while the fleet is read (_Beside;
    for a few jobs, the thread's connection would cost more than their read)."""
    mark = time.perf_counter()
    jobs_read = _Beside(lambda: _jobs_read(limit, now), in_thread=read_beside)
    try:
        free_fleet, fleet = _fleet_read(now=now)
        result.candidate_gpus = free_fleet.free_count
        # Beside the jobs' read, the offers are made meanwhile, before it is known whether a
        # job can be placed (a chunk's worth of jobs waits: most likely).
        offers = _offers(free_fleet) if read_beside and result.candidate_gpus else None
    except BaseException:
        jobs_read.join()  # its connection closed before the error goes on
        raise
    views, requests, unfunded, held = jobs_read.result()
    placeable = [request for job_id, request in requests.items() if job_id not in unfunded]
    if not (placeable and result.candidate_gpus):
        offers = None  # nothing to plan
    elif offers is None:  # not made beside the jobs' read
        offers = _offers(free_fleet)
    result.read_seconds = time.perf_counter() - mark
    mark = time.perf_counter()
    planned: set[int] = set()
    reasons: dict[int, tuple[str, str]] = {}

    def explain(wanted: Callable[[int], bool]) -> None:
        for job_id, view in views.items():
            if wanted(job_id):
                reasons[job_id] = unfunded.get(job_id) or fleet.explain(_job_view(requests[job_id], view))

    with _PlanWriter() as writer:
        if offers is not None:  # a plan to make
            with _cycle_pool(name, free_fleet, offers, now.timestamp()) as (pool, touched):

                def placed(placement: policy.Placement) -> None:
                    touched.add(placement.machine_id)
                    planned.add(placement.job_id)
                    writer.add(placement)  # written while the policy goes on (_PlanWriter)

                policy.pool_place(
                    pool,
                    placeable,
                    now=now.timestamp(),
                    held_by_renter=held,
                    report=False,  # a placement's p_finish and expected loss are written nowhere (9 % of a cycle)
                    on_placement=placed,
                )
        result.plan_seconds = time.perf_counter() - mark
        mark = time.perf_counter()
        # The jobs left out of the plan are explained while the writer threads write its last
        # chunks (explaining is this process's CPU, writing mostly the database's).
        written, result.conflicts = writer.close(beside=lambda: explain(lambda job_id: job_id not in planned))
    result.write_seconds = time.perf_counter() - mark
    mark = time.perf_counter()
    placed_ids = {p.job_id for p in written}
    explain(lambda job_id: job_id in planned and job_id not in placed_ids)  # planned, but not written
    job_set_unplaced(reasons=reasons, now=now)
    result.reasons_seconds = time.perf_counter() - mark
    result.considered = len(views)
    result.placed = len(written)
    result.gpus_leased = sum(len(p.gpu_ids) for p in written)
    result.chunks = max(1, writer.chunks)


# ----------------------------------------------------------------------------------- trigger

# A burst of requests within this many seconds makes one run (see matching_request_soon); every
# submitted job waits it, and a run placing a burst takes milliseconds.
COALESCE_S = 0.1
# How often a requested run that finds a cycle going tries again, and how long after.
LOCKED_TRIES, LOCKED_RETRY_S = 10, 0.5
_QUEUED_KEY = "marketplace.matching.run_queued"


def matching_request_soon() -> None:
    """Ask for a matching run within about COALESCE_S seconds, once the caller's transaction
    commits (a job submitted, a budget reserved, a lease ended): a renter's job starts without
    waiting for the beat entry `match-pending-jobs`, which stays as the safety net. A burst of
    requests dispatches one task (core.soon). The run takes the beat run's lock; finding it
    held, it asks Celery to run it again shortly (a message with an ETA, never a sleeping
    worker)."""

    def send() -> None:
        from marketplace.tasks import match_pending_jobs_soon

        match_pending_jobs_soon.apply_async(countdown=COALESCE_S, expires=60)

    soon.request_soon(key=_QUEUED_KEY, send=send, what="matching")


def matching_request_clear() -> None:
    """Called by the requested run as it starts: a request from now on asks for another run."""
    soon.request_clear(key=_QUEUED_KEY, what="matching")
