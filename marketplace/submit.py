"""Submitting a job: what spans jobs and billing, so it lives above both.

A job and its budget are made in one transaction: the job is created (jobs.services.job_create)
and its budget reserved from the renter's available balance (billing.services.job_budget_reserve);
without enough, InsufficientFunds (402) and no job. The unused rest is released once the job has
finished (billing.tasks.release_budgets)."""

from __future__ import annotations

from django.db import transaction

from billing import services as billing_services
from jobs import services as job_services
from jobs.models import Job, Renter
from marketplace import matching


def job_submit(*, renter: Renter, spec: job_services.JobSpec, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Submit a job and reserve its budget, in one transaction. With an idempotency key, a repeat
    of the same request returns the job created the first time (and False), reserving nothing
    again; the same key with a different body is refused (jobs.services.job_create)."""
    with transaction.atomic():
        job, created = job_services.job_create(renter=renter, spec=spec, idempotency_key=idempotency_key)
        if created:
            # In the same transaction: a renter who cannot fund the budget gets no job (402).
            billing_services.job_budget_reserve(job=job)
            # Placed at once once it may be (its budget reserved): not at the next beat run.
            matching.matching_request_soon()
    return job, created
