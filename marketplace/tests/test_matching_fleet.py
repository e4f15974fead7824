"""The fleet's answers for reasons (marketplace.matching._Fleet), indexed by kind of machine,
give what a scan of every machine gives."""

from __future__ import annotations

import random

from marketplace.matching import KIND_BITS, _Fleet, _Job

MODELS = [("rtx 3090", 24576), ("rtx 4090", 24564), ("a100-sxm4-80gb", 81920), ("h100-sxm5-80gb", 81920)]
REGIONS = ["eu-west", "us-east", "ap-south"]


def _random_fleet(rng: random.Random, machines: int) -> _Fleet:
    """Machines of 1 to 8 GPUs, most of one model, some mixing models or VRAM sizes."""
    fleet = _Fleet()
    for machine_id in range(machines):
        kinds = rng.choice([1, 1, 3, 2, 0])
        seconds = rng.choice([0.0, 3600.0, 7200.0, 86400.0, float("inf")])
        models = [rng.choice(MODELS)] if rng.random() < 0.8 else rng.sample(MODELS, 2)
        gpus = []
        for _ in range(rng.randint(1, 8)):
            model, vram = rng.choice(models)
            if rng.random() < 0.05:
                vram //= 2  # the same model with less memory: a mixed machine too
            gpus.append((model, vram, rng.randrange(100_000, 3_000_000, 10_000)))
        fleet.machines[machine_id] = (rng.choice(REGIONS), seconds, kinds, gpus)
        fleet.kinds |= kinds
    return fleet


def _cheapest_by_scan(fleet: _Fleet, job: _Job, region: str, duration_s: float) -> tuple[bool, int | None]:
    """(some machine has gpu_count GPUs of the models, the cheapest lease price among machines
    in `region` ("" any) lasting duration_s with gpu_count GPUs of the models and VRAM)."""
    has_model = False
    best: int | None = None
    for machine_region, seconds, kinds, gpus in fleet.machines.values():
        if not kinds & job.kind_bit:
            continue
        of_model = [g for g in gpus if not job.models or g[0] in job.models]
        if len(of_model) < job.gpu_count:
            continue
        has_model = True
        floors = sorted(floor for _, vram, floor in of_model if vram >= job.min_vram_mb)
        if len(floors) < job.gpu_count or seconds < duration_s or (region and machine_region != region):
            continue
        price = floors[job.gpu_count - 1]
        best = price if best is None else min(best, price)
    return has_model, best


def _job(rng: random.Random) -> _Job:
    models = frozenset(m for m, _ in rng.sample(MODELS, rng.choice([1, 2]))) if rng.random() < 0.5 else frozenset()
    kind = rng.choice(["container", "process"])
    return _Job(
        id=0,
        created_at=None,  # type: ignore[arg-type]  # not read by the fleet
        gpu_count=rng.choice([1, 1, 2, 4, 8, 12]),  # 12: more than any machine has
        min_vram_mb=rng.choice([0, 24000, 40000, 80000]),
        models=models,
        models_text="",
        region=rng.choice(["", *REGIONS]),
        max_price=rng.randrange(100_000, 3_000_000),
        duration_s=rng.choice([60, 7200, 90000]),
        kind=kind,
        kind_bit=KIND_BITS[kind],
    )


def test_indexed_fleet_answers_every_request_as_a_scan_of_every_machine_does() -> None:
    rng = random.Random(20260114)
    fleet = _random_fleet(rng, machines=400)
    for _ in range(500):
        job = _job(rng)
        shape = fleet._shape(job.models, job.min_vram_mb, job.gpu_count, job.kind_bit)
        for region in ("", job.region):
            for duration in (0.0, float(job.duration_s)):
                has_model, cheapest = _cheapest_by_scan(fleet, job, region, duration)
                assert shape.has_model == has_model, job
                assert shape.cheapest(region, duration) == cheapest, (job, region, duration)


def test_reasons_are_the_same_whatever_order_requests_come_in() -> None:
    rng = random.Random(7)
    jobs = [_job(rng) for _ in range(300)]
    first, second = _random_fleet(random.Random(3), 200), _random_fleet(random.Random(3), 200)
    forward = [first.explain(job) for job in jobs]
    backward = [second.explain(job) for job in reversed(jobs)][::-1]
    assert forward == backward
    assert len({code for code, _ in forward}) >= 4  # the fleet is varied enough to say several things
