"""The fleet a matcher worker keeps between cycles (marketplace.matching._KeptFleet) gives each
cycle what reading every row would give, after every kind of change the fleet sees, and reads
only the changed rows to get it."""

from __future__ import annotations

import math
import random
import threading
from datetime import time as clock
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections, transaction
from django.utils import timezone

from jobs.models import LeaseGPU
from jobs.services import Placement, leases_assign
from marketplace import matching, placement
from providers.idle_history import machines_idle_since
from providers.models import GPU, AvailabilityWindow, FleetIdleProfile, Machine
from tests.factories import GPUFactory, JobFactory, MachineFactory, ProviderFactory, fickle_owner_history

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _kept_fresh(settings: Any) -> Any:
    settings.GPGPU = {**settings.GPGPU, "MATCH_FLEET_FULL_READ_S": 300}
    matching._fleet_forget()
    yield
    matching._fleet_forget()


def _as_plain(free_fleet: matching._FreeFleet, fleet: matching._Fleet) -> dict[str, Any]:
    """What a cycle takes from a read, in a form that compares whatever the order rows came in."""
    return {
        "available": dict(free_fleet.machines),
        "free": {
            machine_id: {group: [(g.id, g.model, g.vram_mb, g.floor) for g in gpus] for group, gpus in groups.items()}
            for machine_id, groups in free_fleet.free.items()
        },
        "fleet": {
            machine_id: (region, seconds, kinds, sorted(gpus))
            for machine_id, (region, seconds, kinds, gpus) in fleet.machines.items()
        },
        "kinds": fleet.kinds,
        # The reasons' index of the machines (by model, VRAM and kinds, and the mixed ones).
        "index": {key: sorted(rows) for key, rows in fleet._index().items()},
        "mixed": sorted((region, seconds, kinds, sorted(groups)) for region, seconds, kinds, groups in fleet._mixed),
    }


def _kept_read() -> tuple[dict[str, Any], str]:
    """A cycle's read through the kept fleet, checked against a read of every row: (what it
    read, "full" or "changes")."""
    now = timezone.now()
    kept_free, kept_fleet = matching._fleet_read(now=now)
    assert matching._kept is not None
    how = matching._kept.last_read[0]
    whole_free, whole_fleet = matching._fleet_load(now=now)
    kept, whole = _as_plain(kept_free, kept_fleet), _as_plain(whole_free, whole_fleet)
    assert kept == whole
    ids = [machine_id for machine_id, groups in whole_free.free.items() if groups]
    assert kept_free.idle_since == machines_idle_since(machine_ids=ids)
    return kept, how


def test_after_every_kind_of_change_a_cycle_reads_what_a_whole_read_gives_reading_only_the_changes() -> None:
    provider = ProviderFactory(default_price_floor=Decimal("0.25"))
    a = MachineFactory(provider=provider, region="eu-west")
    b = MachineFactory(provider=provider, region="us-east", accepts_process=False)
    c = MachineFactory(region="eu-west")
    for i in range(4):
        GPUFactory(machine=a, index=i, price_floor=None if i % 2 else Decimal("0.40"))
    GPUFactory(machine=b, index=0, model="A100-SXM4-80GB", vram_mb=81920)
    GPUFactory(machine=b, index=1, model=" rtx 4090 ", price_floor=Decimal("0.31"))
    c_gpu = GPUFactory(machine=c, index=0, state=GPU.State.OWNER_BUSY, idle_since=None)
    a_gpus = list(GPU.objects.filter(machine=a).order_by("index"))

    read, how = _kept_read()
    assert how == "full"
    assert set(read["free"]) == {a.pk, b.pk}

    def changed(expect: str = "changes") -> dict[str, Any]:
        read, how = _kept_read()
        assert how == expect
        return read

    # A telemetry sample rewrites every GPU row: read, but no machine is worked out again.
    assert matching._kept is not None
    views = {machine_id: view for machine_id, (_, view) in matching._kept.views.items()}
    GPU.objects.update(utilization_pct=3.0, last_telemetry_at=timezone.now())
    changed()
    assert matching._kept.last_read == ("changes", 7)
    assert all(matching._kept.views[machine_id][1] is view for machine_id, view in views.items())
    # The owner takes a GPU back, and leaves another: its stretch begins now.
    GPU.objects.filter(pk=a_gpus[0].pk).update(state=GPU.State.OWNER_BUSY, idle_since=None)
    later = timezone.now() + timedelta(seconds=5)
    GPU.objects.filter(pk=c_gpu.pk).update(state=GPU.State.IDLE, idle_since=later)
    read = changed()
    assert a_gpus[0].pk not in {g[0] for gpus in read["free"][a.pk].values() for g in gpus}
    assert c.pk in read["free"]
    # A floor of its own, and the provider's default (no GPU row changes: the machine's does not either).
    GPU.objects.filter(pk=a_gpus[1].pk).update(price_floor=Decimal("0.90"))
    changed()
    provider.default_price_floor = Decimal("0.35")
    provider.save(update_fields=["default_price_floor"])
    read = changed()
    assert (a_gpus[3].model.strip().lower(), a_gpus[3].vram_mb, 350_000) in read["fleet"][a.pk][3]
    # A lease on two GPUs, then its end.
    job = JobFactory()
    leases_assign(
        placements=[
            Placement(
                job_id=job.pk,
                machine_id=a.pk,
                gpu_ids=(a_gpus[2].pk, a_gpus[3].pk),
                price_per_gpu_hour=Decimal("0.40"),
            )
        ]
    )
    read = changed()
    assert {g[0] for gpus in read["free"].get(a.pk, {}).values() for g in gpus}.isdisjoint({a_gpus[2].pk, a_gpus[3].pk})
    GPU.objects.filter(pk__in=[a_gpus[2].pk, a_gpus[3].pk]).update(state=GPU.State.IDLE)
    read = changed()
    assert {g[0] for gpus in read["free"].get(a.pk, {}).values() for g in gpus}.isdisjoint(
        {a_gpus[2].pk, a_gpus[3].pk}
    )  # idle, but still in the lease's active rows
    LeaseGPU.objects.filter(gpu_id=a_gpus[3].pk).update(active=False)  # no GPU row changes
    read = changed()
    assert a_gpus[3].pk in {g[0] for gpus in read["free"][a.pk].values() for g in gpus}
    # A machine goes offline, comes back, stops taking containers; a window closes another.
    Machine.objects.filter(pk=b.pk).update(status=Machine.Status.OFFLINE)
    read = changed()
    assert b.pk not in read["fleet"]
    Machine.objects.filter(pk=b.pk).update(status=Machine.Status.ONLINE, accepts_container=False)
    read = changed()
    assert b.pk not in read["available"]
    hour = (timezone.now() + timedelta(hours=3)).time().replace(minute=0, second=0, microsecond=0)
    AvailabilityWindow.objects.create(
        provider=c.provider, machine=c, days=127, start_time=hour, end_time=clock(hour.hour, 30)
    )
    read = changed()
    assert c.pk not in read["available"]
    # A new machine and GPU, and a GPU moved to another machine.
    d = MachineFactory(provider=provider, region="ap-south")
    GPUFactory(machine=d, index=0, model="L40S", vram_mb=46068)
    GPU.objects.filter(pk=a_gpus[1].pk).update(machine=d, index=1)
    read = changed()
    assert d.pk in read["free"]
    # A GPU leaves the table: the changes cannot show it, so everything is read again.
    GPU.objects.filter(pk=a_gpus[0].pk).delete()
    changed("full")
    changed()


def test_a_change_committed_after_a_read_began_is_read_by_the_next() -> None:
    """A transaction that was running when a cycle read the fleet, and commits afterwards, has
    its rows read by the next cycle: the rows are asked for from the read's snapshot xmin,
    which is at most that transaction's id (a watermark of the last transaction id the read saw
    would pass over them)."""
    machine = MachineFactory()
    gpu = GPUFactory(machine=machine, index=0)
    other = GPUFactory(machine=MachineFactory(), index=0)
    _kept_read()
    written, release, done = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def owner_takes_it_back() -> None:
        try:
            with transaction.atomic():
                GPU.objects.filter(pk=gpu.pk).update(state=GPU.State.OWNER_BUSY, idle_since=None)
                written.set()
                assert release.wait(30)
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            connections.close_all()
            done.set()

    thread = threading.Thread(target=owner_takes_it_back)
    thread.start()
    assert written.wait(30)
    # A later transaction commits while the first is still open.
    GPU.objects.filter(pk=other.pk).update(price_floor=Decimal("0.70"))
    read, how = _kept_read()
    assert how == "changes"
    assert gpu.pk in {g[0] for gpus in read["free"][machine.pk].values() for g in gpus}  # not yet committed
    release.set()
    assert done.wait(30)
    thread.join(30)
    assert not errors
    read, how = _kept_read()
    assert how == "changes"
    assert machine.pk not in read["free"]


def test_every_row_is_read_again_once_the_full_read_interval_has_passed(settings: Any, monkeypatch: Any) -> None:
    GPUFactory(machine=MachineFactory(), index=0)
    assert _kept_read()[1] == "full"
    assert _kept_read()[1] == "changes"
    assert matching._kept is not None
    monkeypatch.setattr(matching._kept, "read_at", matching._kept.read_at - 301)
    assert _kept_read()[1] == "full"
    settings.GPGPU = {**settings.GPGPU, "MATCH_FLEET_FULL_READ_S": 0}
    matching._fleet_forget()
    matching._fleet_read(now=timezone.now())
    assert matching._kept is None  # not kept at all


def test_a_cycle_inside_a_transaction_reads_every_row() -> None:
    """Inside a transaction the kept fleet could take in rows that are then rolled back."""
    GPUFactory(machine=MachineFactory(), index=0)
    with transaction.atomic():
        matching._fleet_read(now=timezone.now())
    assert matching._kept is None


@pytest.mark.parametrize("policy_name", ["v2", "first-fit"])
def test_a_kept_pool_places_as_a_pool_built_from_the_same_offers(policy_name: str) -> None:
    """Thirty cycles over a fleet that changes between them (owners come and go, floors move,
    machines go offline, windows, some of a cycle's placements written and some not, time going
    on): each cycle's placements on the kept pool are those of a pool built from its offers."""
    rng = random.Random(3)
    start = timezone.now()
    models = [("RTX 4090", 24564), ("A100-SXM4-80GB", 81920), ("RTX 3090", 24576)]
    machines = []
    for i in range(36):
        machine = MachineFactory(region=rng.choice(["eu-west", "us-east"]), accepts_process=rng.random() < 0.5)
        model, vram = rng.choice(models)
        for index in range(rng.choice([1, 1, 2, 4, 8])):
            mixed = rng.random() < 0.1
            GPUFactory(
                machine=machine,
                index=index,
                model=rng.choice(models)[0] if mixed else model,
                vram_mb=vram,
                price_floor=rng.choice([None, Decimal("0.30"), Decimal("0.55")]),
                idle_since=start - timedelta(seconds=rng.uniform(0, 20000)),
            )
        if i % 9 == 0:
            fickle_owner_history(machine, until=start)
        machines.append(machine)
    hour = (start + timedelta(hours=1)).time().replace(minute=0, second=0, microsecond=0)
    AvailabilityWindow.objects.create(
        provider=machines[1].provider, machine=machines[1], days=127, start_time=clock(0), end_time=hour
    )
    now = start
    job_id = 0
    rebuilt = 0
    for cycle in range(30):
        free_fleet, _ = matching._fleet_read(now=now)
        offers = matching._offers(free_fleet)
        jobs = []
        for _ in range(rng.randint(3, 25)):
            job_id += 1
            jobs.append(
                placement.JobRequest(
                    id=job_id,
                    renter=rng.randint(1, 3),
                    submitted_at=now.timestamp() - rng.uniform(0, 30000),
                    gpu_count=rng.choice([1, 1, 1, 2, 4, 8]),
                    min_vram_mb=rng.choice([0, 40000]),
                    models=frozenset(rng.choice([[], ["rtx 4090"], ["rtx 4090", "rtx 3090"]])),
                    region=rng.choice(["", "", "eu-west"]),
                    max_price=rng.choice([400_000, 1_000_000]),
                    duration_s=rng.choice([300, 3600, 20000]),
                    checkpoint_interval_s=rng.choice([None, 600]),
                    kind_bit=rng.choice([1, 1, 2]),
                )
            )
        kept = matching._kept
        assert kept is not None
        pool_before = kept.pool
        with matching._cycle_pool(policy_name, free_fleet, offers, now.timestamp()) as (pool, touched):
            rebuilt += pool is not pool_before
            made = placement.pool_place(
                pool, jobs, now=now.timestamp(), report=False, on_placement=lambda p: touched.add(p.machine_id)
            )
        built = placement.place(jobs, offers, now=now.timestamp(), policy=policy_name, report=False)
        assert [(p.job_id, p.machine_id, p.gpu_ids, p.price) for p in made] == [
            (p.job_id, p.machine_id, p.gpu_ids, p.price) for p in built
        ]
        # The world moves on: half the placements written (their GPUs leased), owners, floors, machines.
        written = [gpu_id for p in made[::2] for gpu_id in p.gpu_ids]
        GPU.objects.filter(pk__in=written).update(state=GPU.State.LEASED)
        gpus = list(GPU.objects.values_list("pk", "state"))
        for gpu_id, state in rng.sample(gpus, 6):
            if state == GPU.State.IDLE:
                GPU.objects.filter(pk=gpu_id).update(state=GPU.State.OWNER_BUSY, idle_since=None)
            else:
                GPU.objects.filter(pk=gpu_id).update(state=GPU.State.IDLE, idle_since=now)
        GPU.objects.filter(pk=rng.choice(gpus)[0]).update(price_floor=Decimal("0.45"))
        Machine.objects.filter(pk=rng.choice(machines).pk).update(
            status=rng.choice([Machine.Status.ONLINE, Machine.Status.OFFLINE])
        )
        if cycle % 3 == 1:  # a GPU moves to another machine
            GPU.objects.filter(pk=rng.choice(gpus)[0]).update(machine=rng.choice(machines), index=100 + cycle)
        if cycle == 10:  # a GPU leaves: every row read again, the pool built again
            GPU.objects.filter(pk=rng.choice(gpus)[0]).delete()
        if cycle == 20:  # the fleet prior moves every forecast: the pool built again
            FleetIdleProfile.objects.update(counts={})
        now += timedelta(seconds=rng.choice([5, 60, 400, 2000]))
    # Built at the first cycle, after the full read, after the prior's change, and when most of
    # this small fleet's offers changed at once; brought up to date in the other cycles.
    assert 3 <= rebuilt <= 20


def _offer(machine_id: int, gpu_ids: list[int], *, window_s: float = math.inf) -> placement.MachineOffer:
    return placement.MachineOffer(
        id=machine_id,
        region="eu-west",
        kinds=1,
        window_s=window_s,
        idle_since=1_000.0,
        forecast=None,
        gpus=[placement.GpuOffer(gpu_id, "rtx 4090", 24564, 300_000) for gpu_id in gpu_ids],
    )


_VIEWS: dict[tuple[int, tuple[int, ...]], dict[tuple[str, int], list[placement.GpuOffer]]] = {}


def _kept_pool_cycle(kept: matching._KeptFleet, offers: list[placement.MachineOffer], now: float) -> placement.FreePool:
    """A cycle's pool_update over these offers; a machine whose GPUs are as before has the same
    free GPUs object, as the kept fleet's unchanged view gives it."""
    free = {}
    for o in offers:
        key = (o.id, tuple(g.id for g in o.gpus))
        free[o.id] = _VIEWS.setdefault(key, {("rtx 4090", 24564): o.gpus})
    free_fleet = matching._FreeFleet(
        machines={o.id: (o.region, o.window_s, o.kinds) for o in offers}, free=free, source=kept
    )
    return kept.pool_update("v2", free_fleet, offers, now)


@pytest.mark.django_db(transaction=False)
def test_a_gpu_moved_to_a_machine_offered_before_its_old_one_stays_in_the_kept_pool() -> None:
    kept = matching._KeptFleet(("test",))
    others = [_offer(machine_id, [machine_id * 10]) for machine_id in range(3, 8)]
    pool = _kept_pool_cycle(kept, [_offer(1, [10, 11]), _offer(2, [20]), *others], 2_000.0)
    assert pool.gpus[10].machine == 1

    # GPU 10 is now machine 2's, and machine 2 comes first.
    again = _kept_pool_cycle(kept, [_offer(2, [10, 20]), _offer(1, [11]), *others], 2_005.0)

    assert again is pool  # brought up to date, not built again
    assert {gpu_id: gpu.machine for gpu_id, gpu in pool.gpus.items() if gpu_id < 30} == {10: 2, 11: 1, 20: 2}


@pytest.mark.django_db(transaction=False)
def test_a_machine_whose_window_alone_moved_keeps_its_gpus_as_judged_and_refuses_longer_jobs() -> None:
    kept = matching._KeptFleet(("test",))
    others = [_offer(machine_id, [machine_id * 10]) for machine_id in range(3, 8)]
    pool = _kept_pool_cycle(kept, [_offer(1, [10], window_s=4_000.0), *others], 2_000.0)
    judged = pool.gpus[10]
    dues = len(pool._due)

    pool = _kept_pool_cycle(kept, [_offer(1, [10], window_s=2_500.0), *others], 3_500.0)

    assert pool.gpus[10] is judged and len(pool._due) == dues  # not withdrawn and judged again
    assert pool.machines[1].offer.window_s == 2_500.0
    job = placement.JobRequest(
        id=1,
        renter=1,
        submitted_at=0.0,
        gpu_count=1,
        min_vram_mb=0,
        models=frozenset(),
        region="eu-west",
        max_price=1_000_000,
        duration_s=3_000,
        checkpoint_interval_s=None,
        kind_bit=1,
    )
    placed = placement.pool_place(pool, [job], now=3_500.0, report=False)
    assert [p.machine_id for p in placed] != [1]


def test_a_read_that_fails_midway_makes_the_next_read_every_row(monkeypatch: Any) -> None:
    GPUFactory(machine=MachineFactory(), index=0)
    _kept_read()
    GPU.objects.update(state=GPU.State.OWNER_BUSY, idle_since=None)
    assert matching._kept is not None

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise TimeoutError("the task's time limit")

    with monkeypatch.context() as patched:
        patched.setattr(matching._KeptFleet, "_assemble", fail)
        with pytest.raises(TimeoutError):
            matching._fleet_read(now=timezone.now())
    # The changed row was kept but its machine never worked out: only a full read mends that.
    read, how = _kept_read()
    assert how == "full"
    assert read["free"] == {}


def test_another_server_behind_the_same_address_makes_the_next_read_every_row() -> None:
    GPUFactory(machine=MachineFactory(), index=0)
    _kept_read()
    assert matching._kept is not None
    matching._kept.server = "a server started at another time"
    assert _kept_read()[1] == "full"
    assert _kept_read()[1] == "changes"
    matching._kept.watermark = str(2**40)  # a transaction id this server has not reached
    assert _kept_read()[1] == "full"
