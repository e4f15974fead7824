"""A job is matched as soon as it may be placed (submitted, its budget reserved, a GPU freed), not at
the next beat run: one coalesced matching run per burst, under the beat run's lock."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from celery import current_app
from django.db import transaction

from billing.models import BudgetAuthorization, BudgetReservation
from billing.signals import budgets_reserved
from core.locks import try_lock
from jobs.models import Job, Lease
from jobs.services import JobSpec, lease_end
from marketplace import matching, tasks
from marketplace.submit import job_submit
from tests.factories import BudgetAuthorizationFactory, JobFactory, RenterFactory, machine_with_gpus

pytestmark = pytest.mark.django_db


def _submit() -> Job:
    spec = JobSpec(
        gpu_count=1,
        max_price_per_gpu_hour=Decimal("1.00"),
        expected_duration_s=600,
        kind=Job.Kind.PROCESS,
        command=["true"],
    )
    job, _ = job_submit(renter=RenterFactory(), spec=spec)
    return job


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Requested matching runs run at once, in this process (Celery's eager mode)."""
    monkeypatch.undo()  # the root conftest's recording of requests
    was = current_app.conf.task_always_eager
    current_app.conf.task_always_eager = True
    try:
        yield
    finally:
        current_app.conf.task_always_eager = was


def test_a_burst_of_submitted_jobs_asks_for_one_matching_run(
    matching_requested: list[dict[str, Any]], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        jobs = [_submit() for _ in range(10)]

    assert len(jobs) == 10 and len(matching_requested) == 1
    assert matching_requested[0]["countdown"] <= 1  # soon, not at the next beat run


def test_nothing_is_asked_for_before_the_submission_commits(
    matching_requested: list[dict[str, Any]], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        _submit()

    assert matching_requested == [] and len(callbacks) == 1


def test_a_request_after_the_run_started_asks_for_another(
    matching_requested: list[dict[str, Any]], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        _submit()
    matching.matching_request_clear()  # what the requested run does as it starts
    with django_capture_on_commit_callbacks(execute=True):
        _submit()

    assert len(matching_requested) == 2


def test_a_job_whose_budget_is_reserved_is_placed_without_waiting_for_beat(
    eager: None, django_capture_on_commit_callbacks: Any
) -> None:
    machine_with_gpus(count=1)
    with django_capture_on_commit_callbacks(execute=True):
        job = _submit()
    job.refresh_from_db()
    assert job.status == Job.Status.PENDING  # its budget is not reserved yet: it may not be placed
    BudgetAuthorizationFactory(job=job, status="reserving", activated_at=None)

    # The escrow reserves it (billing.reservations.reservation_confirm, in one transaction).
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        BudgetAuthorization.objects.filter(job=job).update(status="reserved")
        budgets_reserved.send(sender=BudgetReservation, batch=None, job_ids=[job.pk])

    job.refresh_from_db()
    assert job.status == Job.Status.SCHEDULED


def test_the_requested_run_takes_the_beat_runs_lock() -> None:
    assert tasks.match_pending_jobs_soon.periodic_lock == tasks.match_pending_jobs.periodic_lock
    with try_lock(tasks.match_pending_jobs.periodic_lock):
        assert tasks.match_pending_jobs_soon.apply().get() == {"skipped": "locked"}


def test_a_job_waiting_for_a_gpu_gets_the_one_a_lease_just_freed_without_waiting_for_beat(
    eager: None, django_capture_on_commit_callbacks: Any
) -> None:
    machine_with_gpus(count=1)
    first, second = JobFactory(budget_reserved=True), JobFactory(budget_reserved=True)
    matching.match_cycle()
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == (Job.Status.SCHEDULED, Job.Status.PENDING)

    # The first job's process exits; the agent reports it and the lease ends.
    with django_capture_on_commit_callbacks(execute=True):
        lease_end(lease_id=Lease.objects.get(job=first).pk, reason="succeeded", actor="agent", exit_code=0)

    second.refresh_from_db()
    assert second.status == Job.Status.SCHEDULED
