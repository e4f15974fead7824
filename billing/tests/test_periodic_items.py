"""The billing sweeps commit item by item: a lease or job that fails is logged, skipped, counted in
its task's state and reported by the run, and the others' charges and releases stand."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from billing import services, tasks
from billing.models import LeaseCharge
from billing.tests.support import available, heartbeat, report, start, submit, submit_job, unsettled
from core.models import PeriodicTaskState
from jobs.models import Lease
from jobs.services import job_cancel
from tests.factories import RenterFactory

pytestmark = pytest.mark.django_db(transaction=True)


def running_leases(count: int) -> list[Lease]:
    leases = []
    for _ in range(count):
        with transaction.atomic():  # placing a lease takes row locks: the matcher's transaction
            lease = start(submit(), price="0.40", started=-600)
        report(lease, -600, -1)
        heartbeat(lease, timezone.now())
        leases.append(lease)
    return leases


def charge_committed_and_unlocked(lease_id: int) -> bool:
    """Whether another connection sees the lease's charge row and can lock it at once (NOWAIT)."""
    answer: list[bool] = []

    def other() -> None:
        try:
            with transaction.atomic():
                LeaseCharge.objects.select_for_update(nowait=True).get(lease_id=lease_id)
            answer.append(True)
        except (DatabaseError, LeaseCharge.DoesNotExist):
            answer.append(False)
        finally:
            connection.close()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(10)
    return answer[0]


def test_a_lease_that_cannot_be_metered_is_skipped_and_reported_and_the_others_are_charged(monkeypatch):
    first, broken, last = running_leases(3)
    real_lease_meter = services.lease_meter
    first_lockable_meanwhile: list[bool] = []

    def lease_meter(*, lease_id: int, **kwargs: Any) -> Any:
        if lease_id == broken.pk:
            real_lease_meter(lease_id=lease_id, **kwargs)  # its writes, then a failure: all rolled back
            if connection.vendor == "postgresql":  # row locks: PostgreSQL's
                first_lockable_meanwhile.append(charge_committed_and_unlocked(first.pk))
            raise RuntimeError("the ledger said no")
        return real_lease_meter(lease_id=lease_id, **kwargs)

    monkeypatch.setattr(services, "lease_meter", lease_meter)

    result = tasks.meter_leases()

    assert (result["metered"], result["failed"], result["items_failed"]) == (2, 1, 1)
    assert result["failed_items"] == [f"lease {broken.pk}: RuntimeError: the ledger said no"]
    assert unsettled(first) > 0 and unsettled(last) > 0
    assert unsettled(broken) == 0 and not LeaseCharge.objects.filter(lease=broken, cumulative_micro__gt=0).exists()
    if connection.vendor == "postgresql":
        assert first_lockable_meanwhile == [True]  # metered and committed: no lock held to the end
    state = PeriodicTaskState.objects.get(name="billing.tasks.meter_leases")
    assert (state.last_ok, state.items_ok, state.items_failed, state.consecutive_failures) == (False, 2, 1, 1)
    assert state.last_error == f"lease {broken.pk}: RuntimeError: the ledger said no"

    monkeypatch.setattr(services, "lease_meter", real_lease_meter)
    assert tasks.meter_leases()["failed"] == 0
    assert unsettled(broken) == unsettled(first) > 0
    state.refresh_from_db()
    assert (state.last_ok, state.consecutive_failures, state.total_failures) == (True, 0, 1)


def test_a_budget_that_cannot_be_released_is_skipped_and_reported_and_the_others_go_back(monkeypatch):
    renters = [RenterFactory(funds=1_000_000) for _ in range(3)]
    jobs = [submit_job(renter) for renter in renters]
    for job in jobs:
        job_cancel(job=job, actor="test")
    broken = jobs[1]
    real_release = services.job_budget_release

    def job_budget_release(*, job_id: int) -> Any:
        if job_id == broken.pk:
            raise RuntimeError("the ledger said no")
        return real_release(job_id=job_id)

    monkeypatch.setattr(services, "job_budget_release", job_budget_release)

    result = tasks.release_budgets()

    assert result == {
        "released": 2,
        "waiting_for_metering": 0,
        "items_failed": 1,
        "failed_items": [f"job {broken.pk}: RuntimeError: the ledger said no"],
    }
    assert [available(renter) for renter in renters] == [1_000_000, 0, 1_000_000]
    state = PeriodicTaskState.objects.get(name="billing.tasks.release_budgets")
    assert (state.last_ok, state.items_ok, state.items_failed, state.total_failures) == (False, 2, 1, 1)

    monkeypatch.setattr(services, "job_budget_release", real_release)
    assert tasks.release_budgets() == {"released": 1, "waiting_for_metering": 0}
    assert available(renters[1]) == 1_000_000
