"""Time one matching cycle over a synthetic fleet and queue.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/gpgpu_bench \\
        python benchmarks/matching.py --machines 1250 --gpus-per-machine 8 --jobs 10000

or pass --database-url. Fills the database with M machines x G GPUs and N pending jobs (drawn
with a fixed seed), runs ONE marketplace.matching.match_cycle, prints one JSON line and deletes
every row it created (unless --keep).

The matcher places every pending job of the database, so the script refuses a database that
already holds machines or pending jobs (a real deployment's) unless --force; give it a
database of its own. It refuses unapplied migrations unless --migrate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from decimal import Decimal
from pathlib import Path
from typing import Any

from _django import django_setup, migrations_ready, refuse
from _proc import database_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent

# (model, VRAM MB, typical floor per GPU-hour, share of machines)
CATALOGUE = [
    ("RTX 3090", 24576, 0.18, 0.22),
    ("RTX 4090", 24564, 0.30, 0.30),
    ("RTX A6000", 49140, 0.45, 0.10),
    ("L40S", 46068, 0.80, 0.10),
    ("A100-SXM4-40GB", 40960, 1.10, 0.10),
    ("A100-SXM4-80GB", 81920, 1.50, 0.10),
    ("H100-SXM5-80GB", 81920, 2.40, 0.08),
]
REGIONS = [("eu-west", 0.3), ("eu-central", 0.2), ("us-east", 0.25), ("us-west", 0.15), ("ap-south", 0.1)]
TIMEZONES = ["Europe/Paris", "America/New_York", "Asia/Kolkata", "America/Los_Angeles", "Europe/Berlin"]
# GPUs per job as in public cluster traces: almost all single-GPU, a few 2/4/8.
GPU_COUNTS = [(1, 0.98), (2, 0.008), (4, 0.006), (8, 0.006)]
MACHINES_PER_PROVIDER = 20
RENTERS = 50
# Every machine accepts containers; this share of them also process jobs (their providers
# opted in). This share of the jobs are process jobs, the rest containers.
PROCESS_OPT_IN = 0.25
PROCESS_JOBS = 0.2


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machines", type=int, required=True)
    parser.add_argument("--gpus-per-machine", type=int, required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=20260114)
    parser.add_argument(
        "--now",
        type=datetime.fromisoformat,
        default=datetime(2026, 1, 14, 12, 0, tzinfo=UTC),
        help="the instant the cycle decides availability windows at (ISO 8601; fixed so runs compare)",
    )
    parser.add_argument("--database-url", help="the database to use (default: DATABASE_URL, else the SQLite file)")
    parser.add_argument("--keep", action="store_true", help="leave the generated rows in the database")
    parser.add_argument("--force", action="store_true", help="run even if the database holds machines or jobs")
    parser.add_argument("--migrate", action="store_true", help="apply unapplied migrations first")
    parser.add_argument(
        "--policy", choices=("v2", "v1", "first-fit"), default="v2", help="the placement policy (MATCH_POLICY)"
    )
    parser.add_argument(
        "--writers",
        type=int,
        help="connections writing the plan's chunks at once (MATCH_WRITERS; default: the setting's)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="time a worker's first cycle, which reads every GPU row (default: a later cycle, which reads "
        "only the rows changed since the one before: MATCH_FLEET_FULL_READ_S); the database is the same",
    )
    parser.add_argument(
        "--changed-share",
        type=float,
        default=0.1,
        help="the share of GPU rows written between the worker's cycle before and the timed one, as a "
        "telemetry sample writes them (default 0.1: a minute's sampling over a 5 s interval is 0.08)",
    )
    parser.add_argument(
        "--owners-share",
        type=float,
        default=0.01,
        help="the share of GPUs whose owner comes back or leaves between the two cycles (idle <-> "
        "owner_busy; default 0.01)",
    )
    args = parser.parse_args()
    for name in ("changed_share", "owners_share"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    if args.writers is not None and args.writers < 1:
        parser.error("--writers must be at least 1")
    for name in ("machines", "gpus_per_machine", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.gpus_per_machine > 64:
        parser.error("--gpus-per-machine must be at most 64")
    return args


def _setup(args: argparse.Namespace) -> None:
    os.environ["MATCH_POLICY"] = args.policy
    if args.writers is not None:
        os.environ["MATCH_WRITERS"] = str(args.writers)
    django_setup(database_url=args.database_url)


def _check_database(args: argparse.Namespace) -> None:
    migrations_ready(migrate=args.migrate)

    from jobs.models import Job
    from providers.models import Machine

    if not args.force and (Machine.objects.exists() or Job.objects.filter(status=Job.Status.PENDING).exists()):
        refuse(
            "the database already holds machines or pending jobs; the benchmark would match them. "
            "Use a database of its own (e.g. `createdb gpgpu_bench`), or pass --force."
        )


def _pick(rng: random.Random, weighted: list[tuple[Any, float]]) -> Any:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def _cents(value: float) -> Decimal:
    return Decimal(f"{max(value, 0.01):.2f}")


def _fill(args: argparse.Namespace, tag: str) -> dict[str, list[int]]:
    """Create the fleet and the queue; returns the ids of what it created, for cleanup."""
    from django.contrib.auth import get_user_model

    from billing.models import BudgetAuthorization
    from billing.services import job_budget_micro_for
    from jobs.models import Job, Renter
    from providers.models import GPU, AvailabilityWindow, Machine, Provider

    rng = random.Random(args.seed)
    # How long each idle GPU's owner has been away (v2 reads it), drawn apart too.
    idle_rng = random.Random(args.seed + 2)
    # Job kinds are drawn apart, so the rest of the fleet and queue is what it was before kinds.
    kinds_rng = random.Random(args.seed + 1)
    user_model = get_user_model()
    providers_n = (args.machines + MACHINES_PER_PROVIDER - 1) // MACHINES_PER_PROVIDER
    users = user_model.objects.bulk_create(
        [user_model(username=f"{tag}-p{i}") for i in range(providers_n)]
        + [user_model(username=f"{tag}-r{i}") for i in range(RENTERS)]
    )
    providers = Provider.objects.bulk_create(
        [
            Provider(user=u, display_name=u.username, default_price_floor=_cents(rng.uniform(0.15, 0.60)))
            for u in users[:providers_n]
        ]
    )
    renters = Renter.objects.bulk_create([Renter(user=u, display_name=u.username) for u in users[providers_n:]])

    # A fifth of the providers rent only at night, in their own time zone.
    windows = [
        AvailabilityWindow(
            provider=p,
            days=127,
            start_time=clock(rng.choice([18, 19, 20, 21])),
            end_time=clock(rng.choice([6, 7, 8])),
            timezone=rng.choice(TIMEZONES),
        )
        for p in providers
        if rng.random() < 0.2
    ]
    AvailabilityWindow.objects.bulk_create(windows)

    machine_models: list[tuple[str, int, float]] = []
    machines = []
    for i in range(args.machines):
        model, vram, base, _ = rng.choices(CATALOGUE, weights=[c[3] for c in CATALOGUE])[0]
        machine_models.append((model, vram, base))
        machines.append(
            Machine(
                provider=providers[i // MACHINES_PER_PROVIDER],
                hostname=f"{tag}-host-{i}",
                credential_digest=hashlib.sha256(f"{tag}-machine-{i}".encode()).hexdigest(),
                status=Machine.Status.ONLINE,
                region=_pick(rng, REGIONS),
                accepts_container=True,
                accepts_process=kinds_rng.random() < PROCESS_OPT_IN,
            )
        )
    machines = Machine.objects.bulk_create(machines, batch_size=2000)

    gpus = []
    for machine, (model, vram, base) in zip(machines, machine_models, strict=True):
        for index in range(args.gpus_per_machine):
            state = _pick(rng, [(GPU.State.IDLE, 0.9), (GPU.State.OWNER_BUSY, 0.07), (GPU.State.OFFLINE, 0.03)])
            floor = None if rng.random() < 0.4 else _cents(base * rng.uniform(0.7, 1.4))
            gpus.append(
                GPU(
                    machine=machine,
                    uuid=f"GPU-{tag}-{machine.pk}-{index}",
                    index=index,
                    model=model,
                    vram_mb=vram,
                    state=state,
                    price_floor=floor,
                    idle_since=(
                        args.now - timedelta(seconds=idle_rng.expovariate(1 / 1800))
                        if state == GPU.State.IDLE
                        else None
                    ),
                )
            )
    gpus = GPU.objects.bulk_create(gpus, batch_size=5000)

    model_names = [c[0] for c in CATALOGUE]
    jobs = []
    for i in range(args.jobs):
        allowed: list[str] = []
        roll = rng.random()
        if roll < 0.3:
            allowed = rng.sample(model_names, rng.choice([1, 2, 3]))
        expected = int(min(2 * 86400, max(60, rng.lognormvariate(8, 1.5))))
        process = kinds_rng.random() < PROCESS_JOBS
        jobs.append(
            Job(
                renter=renters[i % RENTERS],
                name=f"{tag}-job-{i}",
                kind=Job.Kind.PROCESS if process else Job.Kind.CONTAINER,
                image="" if process else "pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime",
                command=["python", "train.py"],
                gpu_count=_pick(rng, GPU_COUNTS),
                min_vram_mb=_pick(rng, [(0, 0.7), (24000, 0.15), (40000, 0.1), (80000, 0.05)]),
                allowed_models=allowed,
                region=_pick(rng, [("", 0.8)] + [(r, 0.2 / len(REGIONS)) for r, _ in REGIONS]),
                max_price_per_gpu_hour=_cents(rng.uniform(0.10, 3.50)),
                expected_duration_s=expected,
                max_duration_s=expected * 2,
            )
        )
    jobs = Job.objects.bulk_create(jobs, batch_size=5000)
    # The matcher places only jobs whose budget the escrow has reserved (the billing gate): the
    # rows a confirmed reservation leaves (the chain half is billing's own benchmark's and tests').
    BudgetAuthorization.objects.bulk_create(
        [
            BudgetAuthorization(
                job=job,
                renter_address="0x" + f"{job.pk:040x}",
                max_amount=job_budget_micro_for(job),
                deadline=args.now + timedelta(days=30),
                signature="0x" + "00" * 65,
                status=BudgetAuthorization.Status.RESERVED,
                activated_at=args.now,
            )
            for job in jobs
        ],
        batch_size=5000,
    )
    return {
        "users": [u.pk for u in users],
        "providers": [p.pk for p in providers],
        "renters": [r.pk for r in renters],
        "machines": [m.pk for m in machines],
        "gpus": [g.pk for g in gpus],
        "jobs": [j.pk for j in jobs],
    }


def _analyze() -> None:
    """Give PostgreSQL's planner statistics on the tables the benchmark filled, as autovacuum
    would have on a live database; without them it may plan small lookups as scans.

    Not the lease tables (leases, their GPUs, events): they are empty until the cycle fills
    them, and statistics taken now would say "empty" while the cycle writes thousands of rows.
    Before, this ANALYZEd them too, and the foreign-key checks of the lease rows (planned once
    per connection, cached) scanned the growing jobs_lease table at every commit: at 100,000
    jobs three quarters of the cycle. jobs.services.leases_assign now plans those checks as
    index scans whatever the statistics say (see there); leaving the tables alone here keeps
    the benchmark from measuring a state autovacuum would not leave either."""
    from django.contrib.auth import get_user_model
    from django.db import connection

    from billing.models import BudgetAuthorization
    from jobs.models import Job, Renter
    from providers.models import GPU, AvailabilityWindow, Machine, Provider

    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for model in (get_user_model(), Provider, Renter, AvailabilityWindow, Machine, GPU, Job, BudgetAuthorization):
            cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")


def _cleanup(created: dict[str, list[int]]) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.db.models import Q

    from billing.models import BudgetAuthorization
    from jobs.models import Event, Job, Lease, LeaseGPU, Renter
    from providers.models import GPU, AvailabilityWindow, Machine, Provider

    if connection.vendor == "postgresql":
        # The lease tables now hold the cycle's rows; statistics that still say "empty" (taken
        # before, autovacuum off) make the deletes below nested loops over every lease.
        with connection.cursor() as cursor:
            for model in (Lease, LeaseGPU, Event):
                cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")
    # Leases of the benchmark's jobs, and (with --force) other jobs' leases on its machines.
    leases = Lease.objects.filter(
        Q(job__renter_id__in=created["renters"]) | Q(machine__provider_id__in=created["providers"])
    )
    with transaction.atomic():
        Event.objects.filter(Q(job__renter_id__in=created["renters"]) | Q(lease__in=leases)).delete()
        LeaseGPU.objects.filter(lease__in=leases).delete()
        leases.delete()
        BudgetAuthorization.objects.filter(job__renter_id__in=created["renters"]).delete()
        Job.objects.filter(renter_id__in=created["renters"]).delete()
        Renter.objects.filter(pk__in=created["renters"]).delete()
        GPU.objects.filter(machine__provider_id__in=created["providers"]).delete()
        Machine.objects.filter(provider_id__in=created["providers"]).delete()
        AvailabilityWindow.objects.filter(provider_id__in=created["providers"]).delete()
        Provider.objects.filter(pk__in=created["providers"]).delete()
        get_user_model().objects.filter(pk__in=created["users"]).delete()


def _placements_digest(created: dict[str, list[int]]) -> str:
    """A digest of the cycle's leases: (job, GPUs, price) by the job's and GPUs' places in the
    generated queue and fleet, so that runs on fresh databases compare."""
    from jobs.models import LeaseGPU

    job_at = {job_id: i for i, job_id in enumerate(created["jobs"])}
    gpu_at = {gpu_id: i for i, gpu_id in enumerate(created["gpus"])}
    leases: dict[int, tuple[int, str, list[int]]] = {}
    for lease_id, job_id, price, gpu_id in LeaseGPU.objects.filter(lease__job_id__in=created["jobs"]).values_list(
        "lease_id", "lease__job_id", "lease__price_per_gpu_hour", "gpu_id"
    ):
        leases.setdefault(lease_id, (job_at[job_id], str(price), []))[2].append(gpu_at[gpu_id])
    rows = sorted((job, price, sorted(gpus)) for job, price, gpus in leases.values())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _cycle_before(created: dict[str, list[int]], *, now: datetime, share: float, owners: float, cold: bool) -> None:
    """What a worker's cycle before leaves (marketplace.matching): the fleet read and kept, and
    the policy's pool built; then `share` of the GPU rows written, as heartbeats write a
    telemetry sample, and `owners` of the GPUs taken back by their owner or left by them. With
    `cold`, the worker forgets what it kept: the timed cycle reads every row, over the same
    database."""
    from django.conf import settings
    from django.db import connection

    from marketplace import matching
    from providers.models import GPU

    matching._fleet_forget()
    free_fleet, _ = matching._fleet_read(now=now)
    if settings.MATCH_POLICY != "v1":
        with matching._cycle_pool(settings.MATCH_POLICY, free_fleet, matching._offers(free_fleet), now.timestamp()):
            pass
    gpu_ids = created["gpus"]
    table = connection.ops.quote_name(GPU._meta.db_table)
    with connection.cursor() as cursor:
        if share:
            cursor.execute(
                f"UPDATE {table} SET last_telemetry_at = %s WHERE id = ANY(%s)",  # noqa: S608
                [now, gpu_ids[:: round(1 / share)]],
            )
        if owners:
            # Every n-th GPU from the middle of the list, so not only the telemetry's rows.
            cursor.execute(
                f"UPDATE {table} SET state = CASE WHEN state = 'idle' THEN 'owner_busy' ELSE 'idle' END, "  # noqa: S608
                "idle_since = CASE WHEN state = 'idle' THEN NULL ELSE %s END "
                "WHERE id = ANY(%s) AND state IN ('idle', 'owner_busy')",
                [now, gpu_ids[1 + round(0.5 / owners) :: round(1 / owners)]],
            )
    if cold:
        matching._fleet_forget()


def main() -> None:
    args = _parse()
    _setup(args)
    _check_database(args)

    from django.conf import settings
    from django.db import connection

    from marketplace import matching
    from marketplace.matching import match_cycle

    tag = f"bench{int(time.time())}"
    setup_started = time.perf_counter()
    created = _fill(args, tag)
    _analyze()
    now = args.now if args.now.tzinfo else args.now.replace(tzinfo=UTC)
    _cycle_before(created, now=now, share=args.changed_share, owners=args.owners_share, cold=args.cold)
    setup_seconds = time.perf_counter() - setup_started
    cpu_started, database_started = time.process_time(), database_cpu_seconds()
    try:
        result = match_cycle(now=now, batch_size=args.jobs)
        cpu_seconds = time.process_time() - cpu_started
        database_after = database_cpu_seconds()
        digest = _placements_digest(created)
    finally:
        if not args.keep:
            _cleanup(created)
    seconds = result.seconds
    kept = matching._kept.last_read if matching._kept is not None else None
    print(
        json.dumps(
            {
                "policy": args.policy,
                "writers": settings.GPGPU["MATCH_WRITERS"],
                "gpus": len(created["gpus"]),
                "jobs": len(created["jobs"]),
                "placed": result.placed,
                "gpus_leased": result.gpus_leased,
                "candidate_gpus": result.candidate_gpus,
                "unplaced": result.unplaced,
                "seconds": round(seconds, 3),
                "placements_per_s": round(result.placed / seconds, 1) if seconds else None,
                # Where `seconds` went (marketplace.matching.MatchResult).
                "read_seconds": round(result.read_seconds, 3),
                "plan_seconds": round(result.plan_seconds, 3),
                "write_seconds": round(result.write_seconds, 3),
                "reasons_seconds": round(result.reasons_seconds, 3),
                # This process's CPU time: the database's share of `seconds` is the rest.
                "cpu_seconds": round(cpu_seconds, 3),
                # PostgreSQL's CPU over the cycle, where it runs on this machine (else null): with
                # cpu_seconds, what the cycle asks of the cores, whatever overlapped.
                "database_cpu_seconds": (
                    round(database_after - database_started, 3)
                    if database_started is not None and database_after is not None
                    else None
                ),
                # How the cycle read the fleet: every GPU row ("full"), or the rows changed since
                # the worker's cycle before ("changes"); and how many rows.
                "fleet_read": kept[0] if kept else "full",
                "gpu_rows_read": kept[1] if kept else len(created["gpus"]),
                # Which job went on which GPUs at which price, by their places in the generated
                # fleet and queue: equal digests, equal placements (e.g. --cold and not).
                "placements_digest": digest,
                "setup_seconds": round(setup_seconds, 3),
                "database": f"{connection.vendor}:{connection.settings_dict['NAME']}",
            }
        )
    )


if __name__ == "__main__":
    main()
