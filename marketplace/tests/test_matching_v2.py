"""The matcher under placement policy v2 (marketplace.placement), as renters and owners see it:
long jobs go where the owner is predictably away, one renter's flood does not starve another,
a higher price ceiling goes first when GPUs are short, and a job waiting for hours goes first.
The guarantees v1 and v2 share (constraints, windows, reasons, no double booking) are tested
under both in test_matching.py and test_matching_concurrency.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from unittest import mock

import pytest

from jobs.models import Job, Lease
from marketplace import matching
from marketplace.placement import AGE_LIMIT_S
from providers.models import GPU, Machine
from tests.factories import (
    GPUFactory,
    JobFactory,
    MachineFactory,
    RenterFactory,
    fickle_owner_history,
    nightly_owner_history,
)

pytestmark = pytest.mark.django_db

TUESDAY_NIGHT = datetime(2026, 11, 24, 22, 5, tzinfo=UTC)


@pytest.fixture(autouse=True)
def v2(settings: Any) -> None:
    settings.MATCH_POLICY = "v2"


def idle_machine(*, gpus: int = 1, idle_for_s: float = 60, **machine: object) -> Machine:
    m = MachineFactory(last_heartbeat_at=TUESDAY_NIGHT, **machine)
    for i in range(gpus):
        GPUFactory(machine=m, index=i, state=GPU.State.IDLE, idle_since=TUESDAY_NIGHT - timedelta(seconds=idle_for_s))
    return m


def job(*, renter: Any = None, age_s: float = 0, **fields: Any) -> Job:
    fields.setdefault("budget_reserved", True)
    if renter is not None:
        fields["renter"] = renter
    made = JobFactory(**fields)
    Job.objects.filter(pk=made.pk).update(created_at=TUESDAY_NIGHT - timedelta(seconds=age_s))
    return made


def cycle() -> matching.MatchResult:
    with mock.patch("django.utils.timezone.now", return_value=TUESDAY_NIGHT):
        return matching.match_cycle(now=TUESDAY_NIGHT)


def machine_of(j: Job) -> int | None:
    lease = Lease.objects.filter(job=j).first()
    return lease.machine_id if lease else None


def test_the_long_job_goes_where_the_owner_is_away_all_night_and_the_short_one_where_he_comes_back():
    night_owl = idle_machine()
    fickle = idle_machine()
    fickle_owner_history(fickle, until=TUESDAY_NIGHT)
    nightly_owner_history(night_owl, until=TUESDAY_NIGHT)
    # The short job was submitted first, and the owl's machine has the lower id: v1 (FIFO, then
    # price, then the lowest id) gives the short job the owl's night.
    short = job(expected_duration_s=60, max_duration_s=600, age_s=30)
    long = job(expected_duration_s=4 * 3600, max_duration_s=5 * 3600, age_s=10)

    assert cycle().placed == 2

    assert machine_of(long) == night_owl.pk
    assert machine_of(short) == fickle.pk


def test_one_renters_flood_does_not_starve_another_renter():
    idle_machine(gpus=4)
    flooder, latecomer = RenterFactory(), RenterFactory()
    flood = [job(renter=flooder, age_s=300 - i) for i in range(10)]
    late = job(renter=latecomer, age_s=1)

    assert cycle().placed == 4

    assert Job.objects.get(pk=late.pk).status == Job.Status.SCHEDULED
    assert sum(Job.objects.get(pk=j.pk).status == Job.Status.SCHEDULED for j in flood) == 3
    # The flood's jobs that wait are told why, as under v1.
    waiting = Job.objects.filter(renter=flooder, status=Job.Status.PENDING)
    assert set(waiting.values_list("unplaced_code", flat=True)) == {"no_idle_gpu"}


def test_when_gpus_are_short_a_higher_price_ceiling_goes_first():
    idle_machine(gpus=1)
    thrifty = job(renter=RenterFactory(), max_price_per_gpu_hour=Decimal("0.50"), age_s=120)
    generous = job(renter=RenterFactory(), max_price_per_gpu_hour=Decimal("2.00"), age_s=5)

    cycle()

    assert Job.objects.get(pk=generous.pk).status == Job.Status.SCHEDULED
    assert Job.objects.get(pk=thrifty.pk).status == Job.Status.PENDING


def test_a_job_waiting_past_the_age_limit_goes_before_a_higher_bid():
    idle_machine(gpus=1)
    patient = job(renter=RenterFactory(), max_price_per_gpu_hour=Decimal("0.50"), age_s=AGE_LIMIT_S + 60)
    generous = job(renter=RenterFactory(), max_price_per_gpu_hour=Decimal("2.00"), age_s=5)

    cycle()

    assert Job.objects.get(pk=patient.pk).status == Job.Status.SCHEDULED
    assert Job.objects.get(pk=generous.pk).status == Job.Status.PENDING


def test_a_job_whose_budget_is_not_reserved_waits_and_says_so_under_v2():
    idle_machine(gpus=1)
    unfunded = job(budget_reserved=False)

    assert cycle().placed == 0

    unfunded.refresh_from_db()
    assert (unfunded.status, unfunded.unplaced_code) == (Job.Status.PENDING, "budget_not_reserved")


def test_a_placement_taken_by_another_worker_between_plan_and_write_is_not_written_twice(monkeypatch):
    """v2 plans the cycle, then writes it under row locks: a GPU that another worker leased in
    between (here: already leased when the write locks it) is not written, and the job waits
    for the next cycle instead of double booking."""
    m = idle_machine(gpus=1)
    first = job(age_s=10)
    real_lock = matching._gpus_lock
    monkeypatch.setattr(matching, "_gpus_lock", lambda gpu_ids: {})  # every GPU held elsewhere

    assert cycle().placed == 0
    assert Job.objects.get(pk=first.pk).status == Job.Status.PENDING

    monkeypatch.setattr(matching, "_gpus_lock", real_lock)
    assert cycle().placed == 1
    assert machine_of(first) == m.pk
