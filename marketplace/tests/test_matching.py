"""The matching engine, as renters and providers see it: which job lands on which GPUs, at
what price, and why a job waits."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from jobs.models import Job, Lease
from jobs.services import lease_end
from marketplace import matching
from providers.availability import days_to_mask
from providers.models import GPU, AvailabilityWindow, Blackout, Machine
from tests.factories import GPUFactory, JobFactory, MachineFactory, ProviderFactory

pytestmark = pytest.mark.django_db

EVERY_DAY = days_to_mask(range(7))


@pytest.fixture(autouse=True, params=["v1", "v2"])
def policy(request: pytest.FixtureRequest, settings: Any) -> str:
    """Every guarantee here holds under both placement policies (settings.MATCH_POLICY);
    tests of v1's own order (FIFO, cheapest first) are marked `v1_only`."""
    settings.MATCH_POLICY = request.param
    return str(request.param)


# v1's own order: FIFO, the cheapest machine, the best fit (v2 orders by fair share and forecast:
# marketplace/tests/test_matching_v2.py).
v1_only = pytest.mark.parametrize("policy", ["v1"], indirect=True)


def machine(
    *,
    gpus: int = 1,
    region: str = "eu-west",
    provider: Any = None,
    kinds: tuple[str, ...] = ("container", "process"),
    **gpu_kwargs: Any,
) -> Machine:
    """An online machine with `gpus` idle GPUs (RTX 4090, 24 GB unless told otherwise) that
    accepts jobs of `kinds`."""
    kwargs = {"region": region, "accepts_container": "container" in kinds, "accepts_process": "process" in kinds}
    if provider is not None:
        kwargs["provider"] = provider
    m = MachineFactory(**kwargs)
    for i in range(gpus):
        GPUFactory(machine=m, index=i, **gpu_kwargs)
    return m


def job(**kwargs) -> Job:  # type: ignore[no-untyped-def]
    """A pending job whose budget the escrow has reserved (the matcher places no other)."""
    kwargs.setdefault("budget_reserved", True)
    return JobFactory(**kwargs)


def lease_of(j: Job) -> Lease:
    return Lease.objects.get(job=j)


def leased_gpu_ids(j: Job) -> set[int]:
    return set(lease_of(j).gpus.values_list("pk", flat=True))


def reason(j: Job) -> tuple[str, str]:
    j.refresh_from_db()
    return j.unplaced_code, j.unplaced_detail


# --- placement ------------------------------------------------------------------------------


def test_job_is_placed_on_an_idle_gpu_at_the_gpu_floor():
    m = machine(gpus=1, price_floor=Decimal("0.35"))
    j = job(max_price_per_gpu_hour=Decimal("1.00"))

    result = matching.match_cycle()

    j.refresh_from_db()
    assert j.status == Job.Status.SCHEDULED
    lease = lease_of(j)
    assert lease.machine_id == m.pk
    assert lease.price_per_gpu_hour == Decimal("0.35")
    assert GPU.objects.get(machine=m).state == GPU.State.LEASED
    assert result.as_dict()["placed"] == 1
    assert result.as_dict()["considered"] == 1
    assert result.as_dict()["unplaced"] == 0


def test_a_jobs_request_and_its_reasons_view_read_its_row_alike() -> None:
    """The planned cycle reads a pending job once, into the policy's request, and makes the view
    its reason is worked out from (_job_view) from it; v1 reads the same row into a view
    (_job_from_row). All must see the same job, with the submission time as Python works it
    out (on PostgreSQL the database works it out: to the same double)."""
    jobs = [
        JobFactory(),
        JobFactory(
            kind=Job.Kind.CONTAINER,
            gpu_count=2,
            min_vram_mb=24000,
            allowed_models=["NVIDIA L4", " A100 "],
            region="eu-west",
            max_price_per_gpu_hour=Decimal("0.123456"),
            expected_duration_s=90,
            checkpoint_interval_s=600,
        ),
        JobFactory(kind="unknown", allowed_models=[], region=""),
    ]
    # Submission times whose microseconds a double cannot hold exactly.
    for j, micro in zip(jobs, (1, 999_999, 123_457), strict=True):
        Job.objects.filter(pk=j.pk).update(created_at=datetime(2026, 12, 7, 17, 3, 9, micro, tzinfo=UTC))
    views, requests = matching._pending_requests(10)
    in_python = matching._pending_requests(10, epoch_in_database=False)[1]
    rows = {row[0]: row for row in matching._with_allowed_text(Job.objects.all()).values_list(*matching._JOB_FIELDS)}

    assert set(views) == set(requests) == set(in_python) == {j.pk for j in jobs}
    assert requests == in_python
    for j in jobs:
        request = requests[j.pk]
        assert request.submitted_at == Job.objects.get(pk=j.pk).created_at.timestamp()
        for view in (matching._job_view(request, views[j.pk]), matching._job_from_row(rows[j.pk])):
            assert (view.id, view.created_at.timestamp()) == (request.id, request.submitted_at)
            assert (view.gpu_count, view.min_vram_mb, view.models, view.region) == (
                request.gpu_count,
                request.min_vram_mb,
                request.models,
                request.region,
            )
            assert (view.max_price, view.duration_s, view.kind_bit) == (
                request.max_price,
                request.duration_s,
                request.kind_bit,
            )
    assert requests[jobs[1].pk].models == frozenset({"nvidia l4", "a100"})
    assert requests[jobs[1].pk].max_price == 123456
    assert requests[jobs[1].pk].checkpoint_interval_s == 600
    assert requests[jobs[2].pk].kind_bit == 0


def test_a_cycle_says_where_its_time_went() -> None:
    """Reading, the policy's plan, the writes and the reasons, each measured, together no more
    than the whole cycle (benchmarks/matching.py prints them)."""
    machine(gpus=2, price_floor=Decimal("0.35"))
    job(max_price_per_gpu_hour=Decimal("1.00"))
    job(max_price_per_gpu_hour=Decimal("0.10"))  # below every floor: a reason is written

    figures = matching.match_cycle().as_dict()

    assert figures["placed"] == 1
    parts = [figures[f"{part}_seconds"] for part in ("read", "plan", "write", "reasons")]
    assert all(part > 0 for part in parts), figures
    assert sum(parts) <= figures["seconds"] + 0.001


def test_multi_gpu_job_gets_all_its_gpus_on_one_machine():
    machine(gpus=2)
    machine(gpus=2)
    j = job(gpu_count=3)

    matching.match_cycle()

    assert reason(j)[0] == "no_gpu_model"
    assert "3 GPUs" in reason(j)[1]
    assert j.status == Job.Status.PENDING

    big = machine(gpus=4)
    matching.match_cycle()

    j.refresh_from_db()
    assert j.status == Job.Status.SCHEDULED
    lease = lease_of(j)
    assert lease.machine_id == big.pk
    assert lease.gpu_count == 3
    assert set(GPU.objects.filter(pk__in=leased_gpu_ids(j)).values_list("machine_id", flat=True)) == {big.pk}


def test_multi_gpu_job_waits_when_its_machine_has_too_few_idle_gpus():
    m = machine(gpus=4)
    GPU.objects.filter(machine=m, index__in=[0, 1]).update(state=GPU.State.OWNER_BUSY)
    j = job(gpu_count=3)

    matching.match_cycle()

    assert reason(j)[0] == "no_idle_gpu"
    assert not Lease.objects.exists()


def test_job_needing_more_memory_gets_the_bigger_gpu():
    machine(gpus=1, vram_mb=16384, price_floor=Decimal("0.10"))
    big = machine(gpus=1, vram_mb=81920, price_floor=Decimal("2.00"))
    j = job(min_vram_mb=40000, max_price_per_gpu_hour=Decimal("3.00"))

    matching.match_cycle()

    assert lease_of(j).machine_id == big.pk


def test_job_needing_more_memory_than_any_gpu_has_says_so():
    machine(gpus=2, vram_mb=24564)
    j = job(min_vram_mb=100_000)

    matching.match_cycle()

    code, detail = reason(j)
    assert code == "insufficient_vram"
    assert "100000 MB" in detail


def test_allowed_models_are_compared_case_insensitively():
    machine(gpus=1, model="RTX 4090", price_floor=Decimal("0.10"))
    a100 = machine(gpus=1, model="NVIDIA A100-SXM4-80GB", vram_mb=81920, price_floor=Decimal("1.50"))
    j = job(allowed_models=["nvidia a100-sxm4-80gb"], max_price_per_gpu_hour=Decimal("2.00"))

    matching.match_cycle()

    assert lease_of(j).machine_id == a100.pk


def test_allowed_models_named_beyond_ascii_are_matched():
    """The matcher reads a job's allowed models as their stored JSON text (escaped on SQLite)."""
    machine(gpus=1, model="RTX 4090", price_floor=Decimal("0.10"))
    named = machine(gpus=1, model="Quadro RTX 8000 Ä", price_floor=Decimal("0.50"))
    j = job(allowed_models=["quadro rtx 8000 ä"], max_price_per_gpu_hour=Decimal("2.00"))

    matching.match_cycle()

    assert lease_of(j).machine_id == named.pk


def test_a_floor_of_six_decimals_is_the_price_to_the_millionth():
    """The fleet's floors are read as integer millionths (computed by the database): a ceiling a
    millionth below the floor is refused, and at the floor the lease is at that exact price."""
    machine(gpus=1, price_floor=Decimal("0.123457"))
    short = job(max_price_per_gpu_hour=Decimal("0.123456"))

    matching.match_cycle()

    code, detail = reason(short)
    assert code == "price_below_every_floor"
    assert "0.123457" in detail

    exact = job(max_price_per_gpu_hour=Decimal("0.123457"))
    matching.match_cycle()

    assert lease_of(exact).price_per_gpu_hour == Decimal("0.123457")


def test_job_asking_for_a_model_nobody_has_says_so():
    machine(gpus=2, model="RTX 4090")
    j = job(allowed_models=["H100"])

    matching.match_cycle()

    code, detail = reason(j)
    assert code == "no_gpu_model"
    assert "H100" in detail


@v1_only
def test_gpu_floor_overrides_the_provider_default():
    cheap_default = ProviderFactory(default_price_floor=Decimal("0.15"))
    dear_default = ProviderFactory(default_price_floor=Decimal("0.90"))
    by_default = machine(gpus=1, provider=cheap_default, price_floor=None)
    overridden = machine(gpus=1, provider=dear_default, price_floor=Decimal("0.05"))
    first = job(max_price_per_gpu_hour=Decimal("1.00"))
    second = job(max_price_per_gpu_hour=Decimal("1.00"))

    matching.match_cycle()

    assert lease_of(first).machine_id == overridden.pk
    assert lease_of(first).price_per_gpu_hour == Decimal("0.05")
    assert lease_of(second).machine_id == by_default.pk
    assert lease_of(second).price_per_gpu_hour == Decimal("0.15")


def test_job_whose_maximum_is_below_every_floor_is_told_the_cheapest_price():
    machine(gpus=1, price_floor=Decimal("0.40"))
    machine(gpus=1, price_floor=Decimal("0.25"))
    j = job(max_price_per_gpu_hour=Decimal("0.10"))

    matching.match_cycle()

    code, detail = reason(j)
    assert code == "price_below_every_floor"
    assert "0.25" in detail
    assert "0.10" in detail


def test_job_goes_only_to_its_region():
    machine(gpus=1, region="eu-west", price_floor=Decimal("0.10"))
    us = machine(gpus=1, region="us-east", price_floor=Decimal("0.80"))
    j = job(region="us-east")

    matching.match_cycle()

    assert lease_of(j).machine_id == us.pk


def test_job_in_a_region_without_machines_says_so():
    machine(gpus=1, region="eu-west")
    j = job(region="ap-south")

    matching.match_cycle()

    code, detail = reason(j)
    assert code == "region_unavailable"
    assert "ap-south" in detail


# --- job kinds: only where the owner allows them ---------------------------------------------


def test_process_job_never_goes_to_a_container_only_machine_even_the_cheapest():
    machine(gpus=1, kinds=("container",), price_floor=Decimal("0.10"))
    opted_in = machine(gpus=1, kinds=("container", "process"), price_floor=Decimal("0.90"))
    j = job(kind=Job.Kind.PROCESS, max_price_per_gpu_hour=Decimal("1.00"))

    matching.match_cycle()

    assert lease_of(j).machine_id == opted_in.pk
    assert lease_of(j).price_per_gpu_hour == Decimal("0.90")


def test_container_job_never_goes_to_a_process_only_machine():
    machine(gpus=1, kinds=("process",), price_floor=Decimal("0.10"))
    containers = machine(gpus=1, kinds=("container",), price_floor=Decimal("0.90"))
    first = job(kind=Job.Kind.CONTAINER, image="pytorch/pytorch:2.3.0", command=[])
    second = job(kind=Job.Kind.CONTAINER, image="pytorch/pytorch:2.3.0", command=[])

    matching.match_cycle()

    assert lease_of(first).machine_id == containers.pk
    assert reason(second)[0] == "no_idle_gpu"
    assert Lease.objects.count() == 1


def test_process_job_no_online_machine_accepts_waits_and_says_providers_opt_in():
    container_only = machine(gpus=2, kinds=("container",), price_floor=Decimal("0.10"))
    j = job(kind=Job.Kind.PROCESS)

    matching.match_cycle()

    j.refresh_from_db()
    assert j.status == Job.Status.PENDING
    assert reason(j) == ("kind_not_accepted", "no online machine accepts process jobs; providers opt in to them")
    assert not Lease.objects.exists()
    assert set(GPU.objects.filter(machine=container_only).values_list("state", flat=True)) == {GPU.State.IDLE}


def test_machine_accepting_no_kind_gets_no_job():
    machine(gpus=1, kinds=())
    container_job = job(kind=Job.Kind.CONTAINER, image="alpine", command=[])
    process_job = job(kind=Job.Kind.PROCESS)

    matching.match_cycle()

    assert reason(container_job) == ("kind_not_accepted", "no online machine accepts container jobs")
    assert reason(process_job)[0] == "kind_not_accepted"
    assert not Lease.objects.exists()


def test_other_reasons_count_only_machines_that_accept_the_kind():
    # The only RTX 4090 takes containers only: for a process job asking for one, no machine
    # has that model, rather than "all busy".
    machine(gpus=1, kinds=("container",), model="RTX 4090")
    machine(gpus=1, kinds=("process",), model="L4")
    j = job(kind=Job.Kind.PROCESS, allowed_models=["RTX 4090"])

    matching.match_cycle()

    assert reason(j)[0] == "no_gpu_model"


# --- availability windows -------------------------------------------------------------------

# Wednesday 14 January 2026, 21:00 in Paris (CET, UTC+1).
WED_EVENING = datetime(2026, 1, 14, 20, 0, tzinfo=UTC)


def nightly_machine() -> Machine:
    """A machine rentable every night from 20:00 to 08:00 Paris time: at WED_EVENING it has
    11 hours left (until Thursday 08:00 Paris = 07:00 UTC)."""
    m = machine(gpus=1)
    AvailabilityWindow.objects.create(
        provider=m.provider, machine=m, days=EVERY_DAY, start_time=time(20), end_time=time(8), timezone="Europe/Paris"
    )
    return m


def test_job_longer_than_the_window_left_is_not_placed():
    nightly_machine()
    j = job(expected_duration_s=12 * 3600, max_duration_s=12 * 3600)

    matching.match_cycle(now=WED_EVENING)

    code, detail = reason(j)
    assert code == "no_window_long_enough"
    assert str(12 * 3600) in detail
    assert not Lease.objects.exists()


def test_job_shorter_than_the_window_left_is_placed():
    m = nightly_machine()
    j = job(expected_duration_s=10 * 3600, max_duration_s=12 * 3600)

    matching.match_cycle(now=WED_EVENING)

    assert lease_of(j).machine_id == m.pk


def test_machine_outside_its_window_gets_no_job():
    nightly_machine()
    j = job(expected_duration_s=60, max_duration_s=60)

    matching.match_cycle(now=datetime(2026, 1, 14, 11, 0, tzinfo=UTC))  # noon in Paris

    assert reason(j)[0] == "no_window_long_enough"
    assert not Lease.objects.exists()


def test_machine_in_a_blackout_gets_no_job():
    m = machine(gpus=1)
    now = timezone.now()
    Blackout.objects.create(
        provider=m.provider, machine=m, starts_at=now - timedelta(hours=1), ends_at=now + timedelta(hours=1)
    )
    j = job(expected_duration_s=60, max_duration_s=60)

    matching.match_cycle(now=now)

    assert reason(j)[0] == "no_window_long_enough"
    assert not Lease.objects.exists()


# --- what is not a candidate ----------------------------------------------------------------


@pytest.mark.parametrize("state", [GPU.State.OWNER_BUSY, GPU.State.OFFLINE])
def test_gpu_not_idle_gets_no_job(state):
    machine(gpus=1, state=state)
    j = job()

    matching.match_cycle()

    assert reason(j)[0] == "no_idle_gpu"
    assert not Lease.objects.exists()


def test_leased_gpu_gets_no_second_job():
    m = machine(gpus=1)
    first = job()
    matching.match_cycle()
    second = job()

    matching.match_cycle()

    assert lease_of(first).machine_id == m.pk
    assert reason(second)[0] == "no_idle_gpu"
    assert Lease.objects.count() == 1


def test_offline_machine_gets_no_job():
    m = machine(gpus=2)
    Machine.objects.filter(pk=m.pk).update(status=Machine.Status.OFFLINE)
    j = job()

    matching.match_cycle()

    assert reason(j)[0] == "no_gpu_model"
    assert not Lease.objects.exists()


# --- choice among machines ------------------------------------------------------------------


@v1_only
def test_cheapest_machine_wins():
    machine(gpus=1, price_floor=Decimal("0.50"))
    cheapest = machine(gpus=1, price_floor=Decimal("0.30"))
    machine(gpus=1, price_floor=Decimal("0.40"))
    j = job()

    matching.match_cycle()

    assert lease_of(j).machine_id == cheapest.pk
    assert lease_of(j).price_per_gpu_hour == Decimal("0.30")


@v1_only
def test_lease_price_is_the_dearest_of_its_gpus():
    uneven = MachineFactory()
    GPUFactory(machine=uneven, index=0, price_floor=Decimal("0.10"))
    GPUFactory(machine=uneven, index=1, price_floor=Decimal("0.90"))
    even = machine(gpus=2, price_floor=Decimal("0.50"))
    j = job(gpu_count=2)

    matching.match_cycle()

    assert lease_of(j).machine_id == even.pk
    assert lease_of(j).price_per_gpu_hour == Decimal("0.50")


def test_cheapest_gpus_of_the_machine_are_taken():
    m = MachineFactory()
    floors = ["0.90", "0.10", "0.50", "0.20"]
    gpus = [GPUFactory(machine=m, index=i, price_floor=Decimal(f)) for i, f in enumerate(floors)]
    j = job(gpu_count=2)

    matching.match_cycle()

    assert leased_gpu_ids(j) == {gpus[1].pk, gpus[3].pk}
    assert lease_of(j).price_per_gpu_hour == Decimal("0.20")


@v1_only
def test_equal_prices_go_to_the_machine_left_with_fewest_free_gpus():
    machine(gpus=4, price_floor=Decimal("0.30"))
    snug = machine(gpus=1, price_floor=Decimal("0.30"))
    j = job()

    matching.match_cycle()

    assert lease_of(j).machine_id == snug.pk


def test_earlier_jobs_are_served_first_when_gpus_are_scarce():
    machine(gpus=2)
    now = timezone.now()
    # Created (ids) in one order, submitted (created_at) in another: created_at decides.
    late, early, middle = job(), job(), job()
    for j, age in ((late, 1), (early, 30), (middle, 20)):
        Job.objects.filter(pk=j.pk).update(created_at=now - timedelta(seconds=age))

    matching.match_cycle()

    for j in (late, early, middle):
        j.refresh_from_db()
    assert early.status == Job.Status.SCHEDULED
    assert middle.status == Job.Status.SCHEDULED
    assert late.status == Job.Status.PENDING
    assert late.unplaced_code == "no_idle_gpu"


@v1_only
def test_fifo_holds_across_chunks(monkeypatch):
    monkeypatch.setattr(matching, "CHUNK_SIZE", 2)
    machine(gpus=3)
    jobs = [job() for _ in range(5)]

    result = matching.match_cycle()

    statuses = [Job.objects.get(pk=j.pk).status for j in jobs]
    assert statuses == [Job.Status.SCHEDULED] * 3 + [Job.Status.PENDING] * 2
    assert result.considered == 5
    assert result.chunks == 3


def test_batch_size_limits_the_jobs_considered():
    machine(gpus=5)
    jobs = [job() for _ in range(4)]

    result = matching.match_cycle(batch_size=2)

    assert result.considered == 2
    assert [Job.objects.get(pk=j.pk).status for j in jobs].count(Job.Status.SCHEDULED) == 2


def test_waiting_job_is_placed_once_a_gpu_frees_up():
    machine(gpus=1)
    first, second = job(), job()
    matching.match_cycle()
    assert reason(second)[0] == "no_idle_gpu"

    lease_end(lease_id=lease_of(first).pk, reason=Lease.EndReason.SUCCEEDED, actor="test", exit_code=0)
    matching.match_cycle()

    second.refresh_from_db()
    assert second.status == Job.Status.SCHEDULED
    assert second.unplaced_code == ""


def test_cycle_with_nothing_to_do_changes_nothing():
    machine(gpus=2)
    finished = job(status=Job.Status.SUCCEEDED)

    result = matching.match_cycle()

    assert result.as_dict()["considered"] == 0
    assert result.as_dict()["placed"] == 0
    assert not Lease.objects.exists()
    finished.refresh_from_db()
    assert finished.unplaced_code == ""


def test_many_jobs_each_get_distinct_gpus():
    for floor in ("0.10", "0.20", "0.30"):
        machine(gpus=8, price_floor=Decimal(floor))
    big = [job(gpu_count=4) for _ in range(2)]
    small = [job() for _ in range(12)]

    result = matching.match_cycle()

    leased = [g for j in big + small if Lease.objects.filter(job=j).exists() for g in leased_gpu_ids(j)]
    assert len(leased) == len(set(leased)) == 20
    assert result.placed == 14
    for lease in Lease.objects.all():
        assert set(lease.gpus.values_list("machine_id", flat=True)) == {lease.machine_id}


# --- billing gate (issue 8): only jobs whose budget the escrow holds are placed -------------


def test_a_job_is_placed_only_once_its_budget_is_reserved_on_chain():
    from tests.factories import BudgetAuthorizationFactory

    machine(gpus=4)
    unsigned = job(budget_reserved=False)
    reserving = job(budget_reserved=False)
    BudgetAuthorizationFactory(job=reserving, status="reserving", activated_at=None)
    refused = job(budget_reserved=False)
    BudgetAuthorizationFactory(
        job=refused, status="refused", activated_at=None, rejected_reason="its authorization's deadline had passed"
    )
    reserved = job()

    result = matching.match_cycle()

    assert Job.objects.get(pk=reserved.pk).status == Job.Status.SCHEDULED
    assert result.placed == 1 and result.unplaced == 3
    for waiting in (unsigned, reserving, refused):
        assert Job.objects.get(pk=waiting.pk).status == Job.Status.PENDING
        assert not Lease.objects.filter(job=waiting).exists()
    assert reason(unsigned) == (
        "budget_not_reserved",
        f"sign the job's budget authorization (GET, then PUT with the signature, "
        f"/api/v1/jobs/{unsigned.pk}/budget-authorization/); it is placed once the escrow has reserved it",
    )
    assert reason(reserving) == (
        "budget_not_reserved",
        "its budget is being reserved on chain; it is placed once the escrow has reserved it",
    )
    assert reason(refused) == (
        "budget_not_reserved",
        "the escrow refused its budget: its authorization's deadline had passed",
    )
    assert "budget_not_reserved" in matching.REASON_CODES


def test_a_reserved_budget_whose_deadline_comes_before_a_run_and_its_settlement_places_nothing():
    """Past the deadline the escrow lets the renter take the budget back (releaseJob) and skips
    the job's later settlements: a lease placed too close to it could run unpaid."""
    from billing.models import BudgetAuthorization
    from billing.selectors import SETTLE_MARGIN

    machine(gpus=2)
    now = timezone.now()
    close, covered = job(), job()
    run = timedelta(seconds=close.max_duration_s)
    BudgetAuthorization.objects.filter(job=close).update(deadline=now + run + SETTLE_MARGIN - timedelta(minutes=1))
    BudgetAuthorization.objects.filter(job=covered).update(deadline=now + run + SETTLE_MARGIN + timedelta(minutes=1))

    result = matching.match_cycle(now=now)

    assert result.placed == 1
    assert Job.objects.get(pk=covered.pk).status == Job.Status.SCHEDULED
    assert Job.objects.get(pk=close.pk).status == Job.Status.PENDING
    assert not Lease.objects.filter(job=close).exists()
    code, detail = reason(close)
    assert code == "budget_deadline_too_close" and code in matching.REASON_CODES
    assert "cancel it and submit it again" in detail


def test_the_billing_gate_judges_each_job_by_its_own_run_to_the_microsecond():
    """On PostgreSQL the database leaves out the jobs the gate passes: the same answer as the
    gate's own judgement, at the boundary and for jobs of different lengths."""
    from billing.models import BudgetAuthorization
    from billing.selectors import SETTLE_MARGIN, jobs_budget_unreserved
    from tests.factories import BudgetAuthorizationFactory

    now = timezone.now()
    tick = timedelta(microseconds=1)
    cases = {}
    for max_duration_s in (60, 3600, 7 * 86400):
        bound = now + timedelta(seconds=max_duration_s) + SETTLE_MARGIN
        for name, deadline in (("at", bound), ("before", bound - tick), ("after", bound + tick)):
            j = job(expected_duration_s=30, max_duration_s=max_duration_s)
            BudgetAuthorization.objects.filter(job=j).update(deadline=deadline)
            cases[(max_duration_s, name)] = j.pk
    unsigned = job(budget_reserved=False)
    reserving = job(budget_reserved=False)
    BudgetAuthorizationFactory(job=reserving, status="reserving", activated_at=None)
    far_but_refused = job(budget_reserved=False)
    BudgetAuthorizationFactory(
        job=far_but_refused, status="refused", activated_at=None, deadline=now + timedelta(days=365)
    )

    waiting = jobs_budget_unreserved(job_ids=[*cases.values(), unsigned.pk, reserving.pk, far_but_refused.pk], now=now)

    too_close = {pk for (_, name), pk in cases.items() if name == "before"}
    assert {pk for pk, (code, _) in waiting.items() if code == "budget_deadline_too_close"} == too_close
    assert {pk for pk, (code, _) in waiting.items() if code == "budget_not_reserved"} == {
        unsigned.pk,
        reserving.pk,
        far_but_refused.pk,
    }


def test_a_job_whose_budget_becomes_reserved_is_placed_in_the_next_cycle():
    from billing.models import BudgetAuthorization
    from tests.factories import BudgetAuthorizationFactory

    machine(gpus=1)
    j = job(budget_reserved=False)
    BudgetAuthorizationFactory(job=j, status="reserving", activated_at=None)
    matching.match_cycle()
    assert reason(j)[0] == "budget_not_reserved"

    BudgetAuthorization.objects.filter(job=j).update(status="reserved", activated_at=timezone.now())
    matching.match_cycle()

    j.refresh_from_db()
    assert j.status == Job.Status.SCHEDULED and j.unplaced_code == ""
