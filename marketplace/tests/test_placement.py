"""The placement policies (marketplace.placement): hard constraints, each policy's choice, v2's
fair share, price priority and aging, and the kept pool answering as a fresh one."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from marketplace import placement
from marketplace.placement import (
    P_TARGET,
    POLICIES,
    FreePool,
    GpuOffer,
    JobQueue,
    JobRequest,
    MachineOffer,
    place,
    pool_place,
)
from providers.forecasting import Analogs, Forecast, StretchCounts, hour_of_week

NOW = 1_767_571_200.0 + 10 * 3600


def job(
    id: int,
    *,
    renter: int = 1,
    at: float = NOW - 60,
    gpus: int = 1,
    vram: int = 0,
    models: frozenset[str] = frozenset(),
    region: str = "",
    price: int = 2_000_000,
    duration: int = 600,
    kind: int = 1,
) -> JobRequest:
    return JobRequest(id, renter, at, gpus, vram, models, region, price, duration, 600, kind)


def machine(
    id: int,
    gpus: list[GpuOffer],
    *,
    region: str = "eu",
    kinds: int = 1,
    window: float = math.inf,
    idle_since: float | None = None,
    forecast: Forecast | None = None,
) -> MachineOffer:
    return MachineOffer(id, region, kinds, window, idle_since, forecast, gpus)


def gpu(id: int, *, model: str = "a100", vram: int = 40_000, floor: int = 500_000) -> GpuOffer:
    return GpuOffer(id, model, vram, floor)


def random_world(rng: random.Random) -> tuple[list[JobRequest], list[MachineOffer]]:
    machines = []
    gid = 0
    for m in range(30):
        gpus = []
        for _ in range(rng.choice((1, 2, 4, 8))):
            gid += 1
            gpus.append(
                gpu(
                    gid,
                    model=rng.choice(("a100", "t4", "h100")),
                    vram=rng.choice((16_000, 40_000, 80_000)),
                    floor=rng.choice((300_000, 800_000, 1_500_000)),
                )
            )
        machines.append(
            machine(
                m,
                gpus,
                region=rng.choice(("eu", "us")),
                kinds=rng.choice((1, 2, 3)),
                window=rng.choice((math.inf, 3600.0, 600.0)),
                idle_since=NOW - rng.uniform(0, 20_000),
            )
        )
    jobs = [
        job(
            j,
            renter=rng.randrange(4),
            at=NOW - rng.uniform(0, 90_000),
            gpus=rng.choice((1, 1, 2, 4, 8)),
            vram=rng.choice((0, 20_000, 60_000)),
            models=rng.choice((frozenset(), frozenset({"t4"}), frozenset({"a100", "h100"}))),
            region=rng.choice(("", "eu", "us")),
            price=rng.choice((400_000, 1_000_000, 2_000_000)),
            duration=rng.choice((60, 1200, 7200)),
            kind=rng.choice((1, 2)),
        )
        for j in range(120)
    ]
    return jobs, machines


@pytest.mark.parametrize("policy", POLICIES)
def test_every_placement_keeps_the_hard_constraints(policy: str) -> None:
    rng = random.Random(7)
    for _ in range(5):
        jobs, machines = random_world(rng)
        by_job = {j.id: j for j in jobs}
        by_machine = {m.id: m for m in machines}
        placements = place(jobs, machines, now=NOW, policy=policy, held_by_renter={0: 3})
        assert placements, "a world with spare GPUs places something"
        given: set[int] = set()
        placed_jobs: set[int] = set()
        for p in placements:
            j, m = by_job[p.job_id], by_machine[p.machine_id]
            gpus = {g.id: g for g in m.gpus}
            assert p.job_id not in placed_jobs
            placed_jobs.add(p.job_id)
            assert len(p.gpu_ids) == j.gpu_count
            assert all(g in gpus for g in p.gpu_ids), "all GPUs on the one machine"
            assert not given & set(p.gpu_ids), "a GPU given twice"
            given |= set(p.gpu_ids)
            assert m.kinds & j.kind_bit
            assert not j.region or m.region == j.region
            assert m.window_s >= j.duration_s
            for g in (gpus[i] for i in p.gpu_ids):
                assert not j.models or g.model in j.models
                assert g.vram_mb >= j.min_vram_mb
                assert g.floor <= j.max_price
            assert p.price == max(gpus[i].floor for i in p.gpu_ids) <= j.max_price


def test_first_fit_takes_the_lowest_machine_in_fifo_order() -> None:
    machines = [machine(5, [gpu(50)]), machine(2, [gpu(20, floor=900_000)]), machine(9, [gpu(90, floor=100_000)])]
    jobs = [job(2, at=NOW - 10), job(1, at=NOW - 20)]
    placements = place(jobs, machines, now=NOW, policy="first-fit")
    assert [(p.job_id, p.machine_id) for p in placements] == [(1, 2), (2, 5)]


def test_v1_takes_the_cheapest_then_the_best_fit() -> None:
    machines = [
        machine(1, [gpu(10, floor=900_000)]),
        machine(2, [gpu(20, floor=400_000), gpu(21, floor=400_000), gpu(22, floor=400_000)]),
        machine(3, [gpu(30, floor=400_000)]),
    ]
    placements = place([job(1)], machines, now=NOW, policy="v1")
    assert [(p.machine_id, p.gpu_ids, p.price) for p in placements] == [(3, (30,), 400_000)]


def test_a_renters_flood_does_not_starve_another_renter() -> None:
    # Given renter 1 floods 40 jobs before renter 2 submits 5, and 10 GPUs are free
    machines = [machine(m, [gpu(m * 10 + k) for k in range(2)]) for m in range(5)]
    flood = [job(i, renter=1, at=NOW - 1000 + i) for i in range(40)]
    late = [job(100 + i, renter=2, at=NOW - 100 + i) for i in range(5)]
    # When v2 places
    placed = {p.job_id for p in place(flood + late, machines, now=NOW, policy="v2")}
    # Then renter 2 gets its share; first-fit gives the flood everything
    assert len(placed) == 10
    assert len(placed & {j.id for j in late}) == 5
    assert not {p.job_id for p in place(flood + late, machines, now=NOW, policy="first-fit")} & {j.id for j in late}


def test_a_renter_holding_many_gpus_waits_behind_one_holding_none() -> None:
    machines = [machine(1, [gpu(1)])]
    jobs = [job(1, renter=1, at=NOW - 500), job(2, renter=2, at=NOW - 100)]
    placements = place(jobs, machines, now=NOW, policy="v2", held_by_renter={1: 20})
    assert [p.job_id for p in placements] == [2]


def test_a_higher_price_ceiling_goes_first_when_capacity_is_short() -> None:
    machines = [machine(1, [gpu(1)])]
    jobs = [job(1, renter=1, at=NOW - 500, price=1_000_000), job(2, renter=2, at=NOW - 100, price=1_500_000)]
    assert [p.job_id for p in place(jobs, machines, now=NOW, policy="v2")] == [2]
    assert [p.job_id for p in place(jobs, machines, now=NOW, policy="v1")] == [1]


def test_a_job_waiting_past_the_age_limit_goes_before_richer_ones() -> None:
    machines = [machine(1, [gpu(1)])]
    jobs = [job(1, renter=1, at=NOW - 86_000, price=600_000), job(2, renter=2, at=NOW - 10, price=2_000_000)]
    assert [p.job_id for p in place(jobs, machines, now=NOW, policy="v2")] == [1]


def _history(lengths: list[float]) -> StretchCounts:
    counts = StretchCounts()
    for i, length in enumerate(lengths):
        counts.add(began_hour=i % 168, length_s=length, ended=True)
    return counts


def test_v2_puts_a_long_job_where_the_owner_stays_away_and_a_short_one_on_the_flaky_gpu() -> None:
    fleet = _history([300.0] * 50 + [20_000.0] * 50)
    steady = Forecast(_history([30_000.0] * 40), fleet)
    flaky = Forecast(_history([400.0] * 40), fleet)
    since = NOW - 200  # both owners away 200 s: the flaky one is due back, the steady one not
    machines = [
        machine(1, [GpuOffer(1, "a100", 40_000, 500_000, since, flaky)]),
        machine(2, [GpuOffer(2, "a100", 40_000, 500_000, since, steady)]),
    ]
    long_job = job(1, duration=10_000, at=NOW - 20)
    short_job = job(2, duration=60, at=NOW - 10)
    placements = {p.job_id: p for p in place([long_job, short_job], machines, now=NOW, policy="v2")}
    assert placements[1].machine_id == 2
    assert placements[2].machine_id == 1
    assert placements[1].p_finish > 0.5
    assert place([long_job], machines[:1], now=NOW, policy="v2")[0].p_finish < 0.5
    # first-fit sends the long job to the flaky GPU
    assert place([long_job], machines, now=NOW, policy="first-fit")[0].machine_id == 1


def test_v2_reads_the_owners_days_where_the_statistics_see_a_flaky_gpu() -> None:
    """Two machines whose stretches look alike in the statistics (mostly a few minutes); one
    owner was away from this time until 5 hours later on each of the days before, the other's
    days say nothing. The long job goes where the days before say it will finish."""
    fleet = _history([300.0] * 50 + [20_000.0] * 50)
    since = NOW - 200
    nights = Analogs()
    for day in range(1, 5):
        began = since - day * 86400
        nights.add(began, began + 5 * 3600)
        nights.add(began + 6 * 3600, began + 6 * 3600 + 300)
    nights.calibrate(P_TARGET)
    statistics = _history([400.0] * 40)
    knows_the_nights = Forecast(statistics, fleet, nights)
    flaky = Forecast(statistics, fleet)
    machines = [
        machine(1, [GpuOffer(1, "a100", 40_000, 500_000, since, knows_the_nights)]),
        machine(2, [GpuOffer(2, "a100", 40_000, 500_000, since, flaky)]),
    ]
    long_job = job(1, duration=4 * 3600, at=NOW - 20)
    short_job = job(2, duration=60, at=NOW - 10)
    placements = {p.job_id: p for p in place([long_job, short_job], machines, now=NOW, policy="v2")}
    assert (placements[1].machine_id, placements[2].machine_id) == (1, 2)
    # Without the days before the two machines are alike, and the long job goes to the other.
    blind = [machine(m.id, [GpuOffer(m.id, "a100", 40_000, 500_000, since, flaky)]) for m in machines]
    assert place([long_job], blind, now=NOW, policy="v2")[0].machine_id == 2


def test_v2_gives_a_job_without_checkpoints_that_nothing_covers_the_gpu_due_back_soonest() -> None:
    """A 10-hour job that keeps nothing if cut short, and GPUs due back in about 10 minutes, an
    hour and three hours: wherever it goes it is lost, so it takes the one that costs least.
    The same job with checkpoints takes the longest (it keeps what it checkpoints there)."""
    fleet = _history([300.0] * 50 + [20_000.0] * 50)
    since = NOW - 200
    machines = [
        machine(m, [GpuOffer(m, "a100", 40_000, 500_000, since, Forecast(_history([length] * 40), fleet))])
        for m, length in ((1, 3 * 3600.0), (2, 800.0), (3, 3600.0))
    ]
    keeps_nothing = JobRequest(1, 1, NOW - 20, 1, 0, frozenset(), "", 2_000_000, 10 * 3600, None, 1)
    assert place([keeps_nothing], machines, now=NOW, policy="v2")[0].machine_id == 2
    checkpoints = JobRequest(1, 1, NOW - 20, 1, 0, frozenset(), "", 2_000_000, 10 * 3600, 600, 1)
    assert place([checkpoints], machines, now=NOW, policy="v2")[0].machine_id == 1


def test_v2_finds_the_one_machine_a_low_ceiling_affords_behind_hundreds_it_does_not() -> None:
    """600 machines whose GPUs ask 2.00 an hour, all a good fit for the job, then one asking
    0.30. A job bidding 0.50 goes to that one: the machines it cannot pay are not counted in
    the walk's limit, so they cannot hide it (they did: the job waited with no placement)."""
    since = NOW - 100
    pricey = [machine(m, [GpuOffer(m, "a100", 40_000, 2_000_000, since)]) for m in range(1, 601)]
    cheap = machine(601, [GpuOffer(601, "a100", 40_000, 300_000, since)])
    low_bid = job(1, price=500_000, duration=60)
    placements = place([low_bid], [*pricey, cheap], now=NOW, policy="v2")
    assert [(p.job_id, p.machine_id, p.price) for p in placements] == [(1, 601, 300_000)]
    # A machine with two pricey GPUs of one model and one cheap GPU each of two others: it is
    # found through its pricey model's entry (the others have too few GPUs for a two-GPU job to
    # be looked for under them), and the job for two GPUs at 0.50 takes the two cheap ones.
    mixed = machine(
        602,
        [
            GpuOffer(602, "a100", 40_000, 2_000_000, since),
            GpuOffer(603, "a100", 40_000, 2_000_000, since),
            GpuOffer(604, "h100", 80_000, 300_000, since),
            GpuOffer(605, "l4", 24_000, 300_000, since),
        ],
    )
    two = job(2, gpus=2, price=500_000, duration=60)
    placed = place([two], [mixed], now=NOW, policy="v2")
    assert [(p.machine_id, sorted(p.gpu_ids)) for p in placed] == [(602, [604, 605])]


def _placed(jobs: list[JobRequest], machines: list[MachineOffer]) -> list[tuple[int, int, tuple[int, ...], int]]:
    return [(p.job_id, p.machine_id, p.gpu_ids, p.price) for p in place(jobs, machines, now=NOW, policy="v2")]


@pytest.mark.parametrize("walk_limit", [2, 3, 256])
def test_v2_walking_a_models_list_places_as_walking_each_class_list(walk_limit: int, monkeypatch: Any) -> None:
    """v2 keeps one list per model and VRAM, a job passing over the entries of the classes
    (regions, kinds) it does not accept without counting them: it places every job where
    lists per class placed it, in the same order, whatever the walk's limit (mixed machines,
    jobs of 1 to 8 GPUs, with and without checkpoints, low ceilings)."""
    monkeypatch.setattr(placement, "_WALK_LIMIT", walk_limit)
    for seed in range(25):
        jobs, machines = random_world(random.Random(seed))
        for j in jobs[::3]:
            j.checkpoint_interval_s = None

        by_model = _placed(jobs, machines)
        monkeypatch.setattr(placement, "_V2_BY_MODEL", False)
        per_class = _placed(jobs, machines)
        monkeypatch.setattr(placement, "_V2_BY_MODEL", True)
        assert by_model == per_class, seed
        assert per_class  # a world where something was placed


@pytest.mark.parametrize("policy", POLICIES)
def test_a_job_finds_the_one_machine_of_its_region_and_kind_behind_hundreds_of_others(policy: str) -> None:
    """600 machines of the job's model in another region, or in its region but not accepting
    its kind, all fitting it better, then one that it can have. The job goes to that one: a
    model's machines of every region and kind share the walk's lists, and those the job does
    not accept are passed over without counting in its limit."""
    since = NOW - 100
    elsewhere = [machine(m, [GpuOffer(m, "a100", 40_000, 500_000, since)], region="us") for m in range(1, 301)]
    no_process = [machine(m, [GpuOffer(m, "a100", 40_000, 500_000, since)], kinds=1) for m in range(301, 601)]
    mine = machine(601, [GpuOffer(601, "a100", 40_000, 500_000, NOW - 60)], kinds=3)
    wanted = job(1, region="eu", kind=2, duration=60)
    placements = place([wanted], [*elsewhere, *no_process, mine], now=NOW, policy=policy)
    assert [(p.job_id, p.machine_id) for p in placements] == [(1, 601)]


def test_v2_leaves_no_gpu_idle_when_more_jobs_wait_than_gpus_are_free() -> None:
    fleet = _history([200.0] * 100)
    flaky = Forecast(_history([150.0] * 40), fleet)
    machines = [machine(m, [GpuOffer(m, "a100", 40_000, 500_000, NOW - 130, flaky)]) for m in range(3)]
    jobs = [job(i, duration=50_000) for i in range(4)]
    assert len(place(jobs, machines, now=NOW, policy="v2")) == 3


@pytest.mark.parametrize("policy", POLICIES)
def test_a_pool_kept_across_cycles_answers_as_a_fresh_one(policy: str) -> None:
    rng = random.Random(3)
    jobs, machines = random_world(rng)
    forecast = Forecast(_history([rng.expovariate(1 / 2000) for _ in range(200)]), StretchCounts())
    for m in machines:
        m.forecast = forecast
    pool = FreePool(policy)
    # Added in another order, some added, removed and added again, an hour before
    for m in reversed(machines):
        for g in m.gpus:
            pool.add(m, g, now=NOW - 3600)
            if g.id % 3 == 0:
                pool.remove(g.id)
                pool.add(m, g, now=NOW - 3600)
    kept = pool_place(pool, jobs, now=NOW)
    fresh = place(jobs, machines, now=NOW, policy=policy)
    assert [(p.job_id, p.machine_id, p.gpu_ids) for p in kept] == [(p.job_id, p.machine_id, p.gpu_ids) for p in fresh]
    assert len(pool) == sum(len(m.gpus) for m in machines) - sum(len(p.gpu_ids) for p in kept)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_pool_built_a_machine_at_a_time_places_as_one_built_a_gpu_at_a_time(policy: str) -> None:
    """`add_machine` (what place() uses) against `add` one GPU after another, on machines of
    mixed models and floors, some GPUs with forecasts and idle stretches of their own, and a
    machine offered twice (the second time with one more GPU)."""
    rng = random.Random(7)
    jobs, machines = random_world(rng)
    forecasts = [
        Forecast(_history([rng.expovariate(1 / mean) for _ in range(60)]), StretchCounts()) for mean in (300, 3000)
    ]
    for m in machines:
        m.forecast = rng.choice(forecasts)
        for g in m.gpus[::3]:
            g.forecast, g.idle_since = rng.choice(forecasts), NOW - rng.uniform(0, 9000)
    again = machine(
        machines[4].id, [*machines[4].gpus, gpu(10_000)], region=machines[4].region, kinds=machines[4].kinds
    )
    by_machine, by_gpu, in_one_go = FreePool(policy), FreePool(policy), FreePool(policy)
    for m in [*machines, again]:
        by_machine.add_machine(m, now=NOW)
        for g in m.gpus:
            by_gpu.add(m, g, now=NOW)
    in_one_go.add_machines([*machines, again], now=NOW)
    assert len(by_machine) == len(by_gpu) == len(in_one_go) == sum(len(m.gpus) for m in machines) + 1
    # The same lists, entry for entry, with the same least floor beside each (what the walks skip by).
    assert (in_one_go.sorted, in_one_go.firsts, in_one_go.floors) == (
        by_machine.sorted,
        by_machine.firsts,
        by_machine.floors,
    )
    placed = [pool_place(pool, jobs, now=NOW) for pool in (by_machine, by_gpu, in_one_go)]
    assert placed[0]
    made = [[(p.job_id, p.machine_id, p.gpu_ids, p.price) for p in each] for each in placed]
    assert made[0] == made[1] == made[2]


def _lists_by_class(pool: FreePool) -> dict[tuple[Any, ...], tuple[list[Any], ...]]:
    """A pool's lists per group, each tier's entries (with their class's key for its id: ids go
    as classes come) and the floors beside them; groups with no entry left out."""
    found = {}
    for key, group in pool.group_ids.items():
        tiers = [[(k, mid, pool.class_keys[cls]) for k, mid, cls in entries] for entries in pool.sorted[group]]
        if tiers[0]:
            found[key] = (*tiers, *pool.floors[group])
    return found


@pytest.mark.parametrize("policy", POLICIES)
def test_a_pool_its_gpus_were_taken_from_holds_the_lists_of_one_built_from_the_rest(policy: str) -> None:
    """GPUs taken one after another, the cheapest of each machine first (on machines whose GPUs
    share one horizon, the machine's key stays and only the least floor beside its entries
    moves): every list, and the floor beside each entry (what a walk passes over a machine by),
    is what a pool built from the GPUs left holds."""
    rng = random.Random(11)
    _, machines = random_world(rng)
    pool = FreePool(policy)
    pool.add_machines(machines, now=NOW)
    left = {m.id: list(m.gpus) for m in machines}
    for _ in range(40):
        m = rng.choice([m for m in machines if left[m.id]])
        taken = min(left[m.id], key=lambda g: (g.floor, g.id))
        left[m.id].remove(taken)
        pool.remove(taken.id)
        rest = [
            machine(m.id, left[m.id], region=m.region, kinds=m.kinds, idle_since=m.idle_since, forecast=m.forecast)
            for m in machines
            if left[m.id]
        ]
        fresh = FreePool(policy)
        fresh.add_machines(rest, now=NOW)
        assert _lists_by_class(fresh) == _lists_by_class(pool)


def test_a_job_below_every_floor_of_its_models_is_refused_and_one_offered_later_within_it_is_taken() -> None:
    """v2 refuses a job whose ceiling is below the floor of every GPU it accepts without
    walking the pool's lists; a GPU offered later at a floor within the ceiling is found."""
    pool = FreePool("v2")
    pool.add_machines([machine(1, [gpu(1, floor=900_000)]), machine(2, [gpu(2, model="t4", floor=100_000)])], now=NOW)
    wanted = job(1, models=frozenset({"a100"}), price=500_000)
    assert pool_place(pool, [wanted], now=NOW) == []  # the t4 is cheap enough, not of its model
    pool.add_machine(machine(3, [gpu(3, floor=400_000)]), now=NOW)
    assert [(p.job_id, p.machine_id, p.gpu_ids) for p in pool_place(pool, [wanted], now=NOW)] == [(1, 3, (3,))]


@pytest.mark.parametrize("policy", POLICIES)
def test_machines_added_in_one_go_to_a_pool_that_holds_gpus_place_as_added_one_by_one(policy: str) -> None:
    """`add_machines` into a pool that already holds GPUs (the lists are sorted already: it
    adds machine by machine) places as `add_machine` does."""
    rng = random.Random(13)
    jobs, machines = random_world(rng)
    half = len(machines) // 2
    one_by_one, in_one_go = FreePool(policy), FreePool(policy)
    for m in machines:
        one_by_one.add_machine(m, now=NOW)
    in_one_go.add_machines(machines[:half], now=NOW)
    in_one_go.add_machines(machines[half:], now=NOW)
    placed = [pool_place(pool, jobs, now=NOW) for pool in (one_by_one, in_one_go)]
    assert placed[0]
    assert [(p.job_id, p.machine_id, p.gpu_ids, p.price) for p in placed[0]] == [
        (p.job_id, p.machine_id, p.gpu_ids, p.price) for p in placed[1]
    ]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_queue_kept_across_cycles_offers_jobs_as_a_fresh_one(policy: str) -> None:
    """Cycle after cycle: jobs arrive, some age past AGE_LIMIT_S between cycles, placed jobs
    come back with less work left (a preemption), renters' holdings change. A JobQueue kept
    across all of it places exactly what a queue built from the pending list each cycle does."""
    rng = random.Random(11)
    jobs, _ = random_world(rng)
    # Arrivals spread over the run; about a third arrive before it, some over 6 h before.
    arrivals = sorted(jobs, key=lambda j: j.submitted_at)
    kept = JobQueue(policy=policy)
    pending: dict[int, JobRequest] = {}
    placed_total = 0
    for cycle in range(40):
        now = NOW + cycle * 1800.0  # half an hour apart: jobs cross the age limit mid-run
        for request in arrivals[cycle * 3 : cycle * 3 + 3]:
            shifted = JobRequest(**{**_fields(request), "submitted_at": request.submitted_at + cycle * 1800.0})
            kept.add(shifted)
            pending[shifted.id] = shifted
        _, machines = random_world(random.Random(cycle))
        held = {r: rng.randrange(6) for r in range(4)}
        rebuilt = place(list(pending.values()), machines, now=now, policy=policy, held_by_renter=held)
        # The same machines for both: place() builds its own pool from them.
        from_queue = pool_place(_pool(policy, machines, now), kept, now=now, held_by_renter=held)
        assert [(p.job_id, p.machine_id, p.gpu_ids) for p in from_queue] == [
            (p.job_id, p.machine_id, p.gpu_ids) for p in rebuilt
        ]
        for p in from_queue:
            request = pending.pop(p.job_id)
            placed_total += 1
            if rng.random() < 0.5:  # preempted: back in the queue with less work left
                again = JobRequest(**{**_fields(request), "duration_s": max(1, request.duration_s // 2)})
                kept.add(again)
                pending[again.id] = again
        assert set(kept.jobs) == set(pending)
    assert placed_total > 40  # the check above compared real cycles, not empty ones


def test_jobs_no_free_machine_can_hold_are_passed_over_and_the_placements_stay_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """v2 passes over jobs (aged, and each renter's) of a GPU count no free machine can hold
    (FreePool.tier_open) rather than offering each to be refused: it places exactly what
    offering every one does."""
    rng = random.Random(5)
    closed = 0
    real_tier_open = FreePool.tier_open
    for _ in range(25):
        jobs, machines = random_world(rng)
        skipping = place(jobs, machines, now=NOW, policy="v2")
        with monkeypatch.context() as patched:
            patched.setattr(FreePool, "tier_open", lambda self, tier: True)
            offering_all = place(jobs, machines, now=NOW, policy="v2")
        assert [(p.job_id, p.machine_id, p.gpu_ids) for p in skipping] == [
            (p.job_id, p.machine_id, p.gpu_ids) for p in offering_all
        ]
        pool = _pool("v2", machines, NOW)
        pool_place(pool, jobs, now=NOW)
        closed += sum(not real_tier_open(pool, t) for t in range(4))
    assert closed > 0  # some cycles ended with a tier closed: the skip was exercised

    # Passed over is not dropped: the 8-GPU jobs stay queued, and go first (the oldest aged
    # one, then the renter's richest young one) once a machine with 8 free GPUs is offered.
    queue = JobQueue(policy="v2")
    queue.add(job(1, at=NOW - 8 * 3600, gpus=8))
    queue.add(job(2, at=NOW - 7 * 3600))
    queue.add(job(3, at=NOW - 7 * 3600 + 1))
    queue.add(job(4, renter=2, at=NOW - 60, gpus=8, price=2_000_000))
    queue.add(job(5, renter=2, at=NOW - 30, price=1_000_000))
    one_free = _pool("v2", [machine(1, [gpu(1)]), machine(3, [gpu(2)])], NOW)
    assert [p.job_id for p in pool_place(one_free, queue, now=NOW)] == [2, 3]
    eight_free = _pool("v2", [machine(2, [gpu(10 + n) for n in range(17)])], NOW + 30)
    assert [p.job_id for p in pool_place(eight_free, queue, now=NOW + 30)] == [1, 4, 5]
    assert len(queue) == 0

    # A tier that closes during the cycle: renter 1's 8-GPU job was its next when renter 2's job
    # took one of the 8 free GPUs; renter 1's 1-GPU job goes instead, and the 8-GPU job waits.
    queue.add(job(10, renter=1, at=NOW - 60, gpus=8, price=1_500_000))
    queue.add(job(11, renter=1, at=NOW - 50, price=1_000_000))
    queue.add(job(12, renter=2, at=NOW - 40, price=2_000_000))
    closing = _pool("v2", [machine(4, [gpu(40 + n) for n in range(8)])], NOW + 60)
    assert [p.job_id for p in pool_place(closing, queue, now=NOW + 60)] == [12, 11]
    reopened = _pool("v2", [machine(5, [gpu(50 + n) for n in range(8)])], NOW + 90)
    assert [p.job_id for p in pool_place(reopened, queue, now=NOW + 90)] == [10]


def _fields(request: JobRequest) -> dict[str, object]:
    return {name: getattr(request, name) for name in JobRequest.__slots__}


def _pool(policy: str, machines: list[MachineOffer], now: float) -> FreePool:
    pool = FreePool(policy)
    for m in machines:
        for g in m.gpus:
            pool.add(m, g, now=now)
    return pool


def test_a_queue_drives_only_its_own_policy() -> None:
    with pytest.raises(ValueError, match="cannot drive"):
        pool_place(FreePool("v2"), JobQueue(policy="v1"), now=NOW)


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        place([], [], now=NOW, policy="best")


def test_hour_of_week_of_now_is_plain() -> None:
    assert hour_of_week(1_767_571_200.0) == 0  # a Monday, midnight UTC


def test_a_pool_whose_machines_are_offered_again_and_again_keeps_its_due_heap_to_its_live_gpus() -> None:
    """A kept pool (marketplace.matching) withdraws and offers machines again every cycle: each
    offer pushes a due judgement per GPU, and the lapsed ones are dropped once they outnumber the
    live ones, while the pool answers as one built from the same offers."""
    rng = random.Random(5)
    offers = [machine(m, [gpu(m * 10 + i) for i in range(4)], idle_since=NOW - rng.uniform(0, 9000)) for m in range(50)]
    pool = FreePool("v2")
    pool.add_machines(offers, now=NOW)
    for cycle in range(1, 40):
        for offer in offers:
            pool.remove_machine(offer.id)
            pool.add_machine(offer, now=NOW + cycle)
    assert len(pool._due) > 2 * len(pool.gpus) + 1024  # lapsed judgements piled up
    jobs = [job(j, duration=rng.choice((300, 3600, 20000))) for j in range(30)]

    made = pool_place(pool, jobs, now=NOW + 40)

    assert len(pool._due) <= 2 * (len(pool.gpus) + len(made)) + 1024
    built = place(jobs, offers, now=NOW + 40)
    assert [(p.job_id, p.machine_id, p.gpu_ids) for p in made] == [(p.job_id, p.machine_id, p.gpu_ids) for p in built]


# --- v2's fit pass ----------------------------------------------------------------------------


def _flaky_gpu(id: int, *, away_s: float = 200.0) -> tuple[GpuOffer, float]:
    """A GPU whose owner steps away for about 20 minutes at a time, away `away_s` now, and
    its horizon (the pool's safe-until less now)."""
    fleet = _history([300.0] * 50 + [20_000.0] * 50)
    offer = GpuOffer(id, "a100", 40_000, 500_000, NOW - away_s, Forecast(_history([1200.0] * 40), fleet))
    pool = _pool("v2", [machine(id, [offer])], NOW)
    return offer, pool.gpus[id].safe_until - NOW


def test_when_jobs_outnumber_the_free_gpus_one_due_back_soon_goes_to_a_job_it_can_finish() -> None:
    """At full load the oldest job is a long one: on a GPU whose owner is due back in minutes it
    would be cut short. The GPU goes to a younger job it can run to the end, the long one waits
    for a GPU that can hold it, and one waiting past OVERDUE_S still goes first."""
    offer, horizon = _flaky_gpu(1)
    assert 60 < horizon < 3600  # the world this test means: due back in minutes
    long_old = job(1, at=NOW - 7 * 3600, duration=int(10 * horizon))  # aged (past AGE_LIMIT_S)
    short_young = job(2, at=NOW - 60, duration=int(horizon * 0.5))
    longer_young = job(3, at=NOW - 30, duration=int(horizon * 0.9))
    too_long = job(4, at=NOW - 20, duration=int(horizon * 1.5))
    jobs = [long_old, short_young, longer_young, too_long]
    placed = place(jobs, [machine(1, [offer])], now=NOW, policy="v2")
    # The longest job that fits, not the oldest (before the fit pass: the 7-hour-old one).
    assert [p.job_id for p in placed] == [3]
    assert placed[0].p_finish > 0.5

    # A steady GPU beside it: the long job is placed on it, the flaky one still gets a job it fits.
    fleet = _history([300.0] * 50 + [20_000.0] * 50)
    steady = GpuOffer(2, "a100", 40_000, 500_000, NOW - 200, Forecast(_history([30_000.0] * 40), fleet))
    both = {p.job_id: p.machine_id for p in place(jobs, [machine(1, [offer]), machine(2, [steady])], now=NOW)}
    assert both[3] == 1 and 1 in both and both[1] == 2

    # Overdue: a job waiting past OVERDUE_S is offered before the fit pass, long as it is.
    overdue = job(1, at=NOW - placement.OVERDUE_S - 60, duration=int(10 * horizon))
    assert [p.job_id for p in place([overdue, *jobs[1:]], [machine(1, [offer])], now=NOW)] == [1]

    # With a GPU to spare for every job, the jobs choose (as before): the oldest goes first.
    spare = [machine(10 + n, [GpuOffer(10 + n, "a100", 40_000, 500_000, NOW - 200, offer.forecast)]) for n in range(5)]
    assert place(jobs, spare, now=NOW)[0].job_id == 1


def test_the_fit_pass_keeps_the_fair_share_within_a_factor_of_two() -> None:
    """Two renters with jobs the GPU can finish: the fit picks the longest, but not from a
    renter bidding under half the best bid (one holding many GPUs), and a renter's higher
    ceiling raises its bid."""
    offer, horizon = _flaky_gpu(1)
    machines = [machine(1, [offer])]
    mine = job(1, renter=1, at=NOW - 600, duration=int(horizon * 0.9))
    theirs = job(2, renter=2, at=NOW - 60, duration=int(horizon * 0.3))
    blocked = job(
        3, renter=3, at=NOW - 30, duration=int(horizon * 4)
    )  # fits nowhere: the queue is longer than the pool
    jobs = [mine, theirs, blocked]
    # Renter 1 holds as many as renter 2 (none): the longer job.
    assert [p.job_id for p in place(jobs, machines, now=NOW, policy="v2")] == [1]
    # Renter 1 holds 2 GPUs, renter 2 none: bids 1/3 against 1 of the same ceiling, under half.
    assert [p.job_id for p in place(jobs, machines, now=NOW, policy="v2", held_by_renter={1: 2})] == [2]
    # Holding 1 against none is within the factor: the fit decides again.
    assert [p.job_id for p in place(jobs, machines, now=NOW, policy="v2", held_by_renter={1: 1})] == [1]
    # Renter 2's ceiling is the higher one by far: renter 1's bid falls under half of it.
    rich = job(2, renter=2, at=NOW - 60, duration=int(horizon * 0.3), price=2_000_000)
    poor = job(1, renter=1, at=NOW - 600, duration=int(horizon * 0.9), price=900_000)
    assert [p.job_id for p in place([poor, rich, blocked], machines, now=NOW, policy="v2")] == [2]


def test_the_fit_pass_index_follows_the_queue_and_answers_as_a_search_of_every_job() -> None:
    """JobQueue.fit against a search over every queued job, through arrivals, jobs queued again
    with less work left, removals, jobs passing AGE_LIMIT_S and renters' holdings."""
    rng = random.Random(3)
    queue = JobQueue(policy="v2")
    live: dict[int, JobRequest] = {}
    checked = aged_answers = 0
    for step in range(600):
        roll = rng.random()
        if roll < 0.5 or not live:
            new = job(
                step,
                renter=rng.randrange(5),
                at=NOW - rng.uniform(0, 20_000),
                gpus=rng.choice((1, 1, 1, 2)),
                price=rng.choice((500_000, 1_000_000, 2_000_000)),
                duration=rng.choice((60, 300, 300, 900, 3600)),
            )
            queue.add(new)
            live[new.id] = new
        elif roll < 0.7:
            old = live[rng.choice(sorted(live))]
            again = JobRequest(**{**_fields(old), "duration_s": max(1, old.duration_s // 2)})
            queue.add(again)
            live[again.id] = again
        else:
            queue.remove(gone := rng.choice(sorted(live)))
            del live[gone]
        fresh = None
        if step % 50 == 49:  # a cycle that places nothing: jobs past AGE_LIMIT_S are aged
            queue.drive_v2(lambda j: False, lambda: False, now=NOW + step * 40, held={}, tier_open=lambda t: True)
            # And a queue built from the same jobs now, whose index is built at its first ask.
            fresh = JobQueue(list(live.values()), policy="v2")
            fresh.drive_v2(lambda j: False, lambda: False, now=NOW + step * 40, held={}, tier_open=lambda t: True)
        horizon = rng.choice((30.0, 299.0, 300.0, 1000.0, 5000.0))
        held = {r: rng.randrange(4) for r in range(5)}
        refused = {i for i in live if rng.random() < 0.2}

        def accept(j: JobRequest, refused: set[int] = refused) -> bool:
            return j.id not in refused

        aged = {i for i in live if i in queue._aged_ids}
        expected = _fit_by_search(list(live.values()), horizon, held, accept, aged)
        got = queue.fit(horizon, held, accept)
        assert (got.id if got else None) == (expected.id if expected else None)
        checked += expected is not None
        aged_answers += expected is not None and expected.id in aged
        if fresh is not None:
            expected = _fit_by_search(list(live.values()), horizon, held, accept, set(fresh._aged_ids))
            got = fresh.fit(horizon, held, accept)
            assert (got.id if got else None) == (expected.id if expected else None)
    assert checked > 100
    assert aged_answers > 10  # the aged jobs' list was asked, and answered


def _fit_by_search(
    jobs: list[JobRequest], horizon: float, held: dict[int, int], accept: Any, aged: set[int]
) -> JobRequest | None:
    """JobQueue.fit's answer from every job (its walk's limit never reached here)."""

    def key(j: JobRequest) -> tuple[float, ...]:
        return (j.duration_s, -j.submitted_at, -j.id)

    fits = [j for j in jobs if j.gpu_count == 1 and j.duration_s <= horizon and accept(j)]
    if old := [j for j in fits if j.id in aged]:
        return max(old, key=key)
    best_of: dict[int, JobRequest] = {}
    for j in fits:
        if j.renter not in best_of or key(j) > key(best_of[j.renter]):
            best_of[j.renter] = j
    if not best_of:
        return None
    bids = {j.id: j.max_price / (1 + held.get(j.renter, 0)) for j in best_of.values()}
    top = max(bids.values())
    kept = [j for j in best_of.values() if bids[j.id] >= placement._FIT_BID_SHARE * top]
    return max(kept, key=lambda j: (j.duration_s, bids[j.id], -j.submitted_at, -j.id))


def test_the_fit_pass_keeps_the_machines_window_and_serves_the_gpu_due_back_soonest_first() -> None:
    """The fit pass's hard constraints are the placement's: a job longer than the machine's
    declared window does not go there, however well it fits the owner's stretch. And the GPUs
    choose in the order they are due back: a short job that fits both goes to the GPU that only
    it fits, not to the steadier one that a longer job can use."""
    offer, horizon = _flaky_gpu(1)
    long_old = job(1, at=NOW - 7 * 3600, duration=int(10 * horizon))
    past_window = job(2, at=NOW - 60, duration=int(horizon * 0.9))
    within = job(3, at=NOW - 30, duration=int(horizon * 0.3))
    windowed = machine(1, [offer], window=horizon * 0.5)
    assert [p.job_id for p in place([long_old, past_window, within], [windowed], now=NOW)] == [3]

    fleet = _history([300.0] * 50 + [20_000.0] * 50)
    steady = GpuOffer(2, "a100", 40_000, 500_000, NOW - 200, Forecast(_history([6000.0] * 40), fleet))
    machines = [machine(1, [offer]), machine(2, [steady])]
    assert _pool("v2", machines[1:], NOW).gpus[2].safe_until - NOW > 2 * horizon
    short = job(4, at=NOW - 60, duration=int(horizon * 0.5))
    others = [
        job(5, at=NOW - 7 * 3600, duration=int(100 * horizon)),
        job(6, at=NOW - 7 * 3600 + 1, duration=int(100 * horizon)),
    ]
    placed = {p.job_id: p.machine_id for p in place([short, *others], machines, now=NOW)}
    assert placed[4] == 1  # the GPU due back soonest chose first; the steady one went to the oldest
    assert placed[5] == 2


def test_a_job_for_several_gpus_past_the_age_limit_goes_before_the_fit_pass() -> None:
    """The fit pass hands out GPUs one by one: a 2-GPU job waiting 7 hours gets the 2-GPU machine
    before three young 1-GPU jobs could split it."""
    offer, horizon = _flaky_gpu(1)
    second = GpuOffer(2, "a100", 40_000, 500_000, offer.idle_since, offer.forecast)
    pair = machine(1, [offer, second])
    old_pair = job(1, at=NOW - 7 * 3600, gpus=2, duration=int(horizon * 0.5))
    young = [job(10 + n, at=NOW - 60 + n, duration=int(horizon * 0.4)) for n in range(3)]
    assert [(p.job_id, p.gpu_ids) for p in place([old_pair, *young], [pair], now=NOW)] == [(1, (1, 2))]


def test_with_a_gpu_to_spare_for_every_job_the_order_is_as_without_a_fit_pass() -> None:
    """Two jobs, two free GPUs: no fit pass, and the jobs past the age limit go oldest first, the
    1-GPU one before the younger 2-GPU one (which then finds one GPU left)."""
    offer, _ = _flaky_gpu(1)
    pair = machine(1, [offer, GpuOffer(2, "a100", 40_000, 500_000, offer.idle_since, offer.forecast)])
    older_single = job(1, at=NOW - 8 * 3600, duration=60)
    younger_pair = job(2, at=NOW - 7 * 3600, gpus=2, duration=60)
    assert [p.job_id for p in place([older_single, younger_pair], [pair], now=NOW)] == [1]
