"""Time one `marketplace.placement.place` call per policy over a synthetic fleet and queue (no
database): M machines x G GPUs, N pending jobs, forecasts learnt from random histories. Prints
one JSON line per policy. A benchmark, not a test: it asserts nothing.

    .venv/bin/python benchmarks/placement.py --machines 1250 --gpus-per-machine 8 --jobs 10000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marketplace.placement import POLICIES, GpuOffer, JobRequest, MachineOffer, place
from providers.forecasting import Forecast, StretchCounts

MODELS = (("rtx3090", 24_576), ("rtx4090", 24_576), ("a100", 81_920), ("h100", 81_920), ("l4", 24_576))
REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south")
NOW = 1_767_571_200.0 + 3 * 86400


def build(machines: int, gpus: int, jobs: int, seed: int) -> tuple[list[JobRequest], list[MachineOffer]]:
    rng = random.Random(seed)
    fleet = StretchCounts()
    for _ in range(5000):
        fleet.add(began_hour=rng.randrange(168), length_s=rng.paretovariate(0.8) * 120, ended=True)
    offers = []
    gid = 0
    for m in range(machines):
        own = StretchCounts()
        mean = rng.choice((300, 1800, 7200, 30_000))
        for _ in range(rng.randrange(0, 200)):
            own.add(began_hour=rng.randrange(168), length_s=rng.expovariate(1 / mean), ended=True)
        model, vram = rng.choice(MODELS)
        floor = rng.randrange(100_000, 2_000_000, 10_000)
        gpu_list = []
        for _ in range(gpus):
            gid += 1
            gpu_list.append(GpuOffer(gid, model, vram, floor))
        offers.append(
            MachineOffer(
                m,
                rng.choice(REGIONS),
                rng.choice((1, 1, 1, 3)),
                rng.choice((math.inf, math.inf, 3 * 3600.0)),
                NOW - rng.uniform(120, 20_000),
                Forecast(own, fleet),
                gpu_list,
            )
        )
    queue = [
        JobRequest(
            id=j,
            renter=rng.randrange(200),
            submitted_at=NOW - rng.uniform(0, 86400),
            gpu_count=rng.choices((1, 2, 4, 8), (98, 0.7, 0.7, 0.6))[0],
            min_vram_mb=rng.choice((0, 0, 0, 40_000)),
            models=rng.choice((frozenset(), frozenset(), frozenset({rng.choice(MODELS)[0]}))),
            region=rng.choice(("",) * 4 + (rng.choice(REGIONS),)),
            max_price=rng.randrange(100_000, 3_500_000, 10_000),
            duration_s=int(rng.uniform(60, 2 * 86400)),
            checkpoint_interval_s=rng.choice((None, 600)),
            kind_bit=rng.choice((1, 1, 1, 1, 2)),
        )
        for j in range(jobs)
    ]
    return queue, offers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--machines", type=int, default=1250)
    parser.add_argument("--gpus-per-machine", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    queue, offers = build(args.machines, args.gpus_per_machine, args.jobs, args.seed)
    for policy in POLICIES:
        started = time.perf_counter()
        placements = place(queue, offers, now=NOW, policy=policy)
        seconds = time.perf_counter() - started
        print(
            json.dumps(
                {
                    "policy": policy,
                    "gpus": args.machines * args.gpus_per_machine,
                    "jobs": args.jobs,
                    "placed": len(placements),
                    "gpus_leased": sum(len(p.gpu_ids) for p in placements),
                    "seconds": round(seconds, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
