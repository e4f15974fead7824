"""Job admission: a job's budget is reserved when it is submitted, and what it did not spend
goes back to the renter when it ends."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from billing import selectors, services
from billing.models import LedgerEntry
from billing.tasks import release_budgets
from billing.tests.support import available, submit_job
from jobs.models import Event, Job, Lease, UsageReport
from jobs.services import job_cancel, lease_end
from tests.factories import RenterFactory, placed_lease, token_for

pytestmark = pytest.mark.django_db

ER = Lease.EndReason
BODY = {
    "kind": "process",
    "command": ["python", "train.py"],
    "gpu_count": 2,
    "max_price_per_gpu_hour": "0.80",
    "expected_duration_s": 3600,
    "max_duration_s": 3601,
}
# 0.80 × 2 GPUs × 3601 s / 3600 = 1.600444… tokens, rounded up to the micro.
BUDGET = 1_600_445


def client_for(renter) -> APIClient:  # type: ignore[no-untyped-def]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(renter.user)}")
    return client


def test_job_is_refused_without_funds_and_nothing_is_created():
    renter = RenterFactory(funds=1_600_444)

    response = client_for(renter).post("/api/v1/jobs/", BODY, format="json")

    assert response.status_code == 402
    assert response.json()["code"] == "insufficient_funds"
    assert "1.600445" in response.json()["detail"] and "1.600444" in response.json()["detail"]
    assert not Job.objects.exists() and not Event.objects.exists()
    assert not LedgerEntry.objects.filter(kind="reserve").exists()
    assert available(renter) == 1_600_444


def test_job_with_funds_reserves_its_budget_and_shows_it():
    renter = RenterFactory(funds=2_000_000)

    response = client_for(renter).post("/api/v1/jobs/", BODY, format="json")

    assert response.status_code == 201, response.json()
    assert response.json()["budget"] == {
        "reserved": "1.600445",
        "charged": "0.000000",
        "released": "0.000000",
        "remaining": "1.600445",
    }
    assert available(renter) == 2_000_000 - BUDGET


def test_repeating_a_request_with_its_idempotency_key_reserves_once():
    renter = RenterFactory(funds=2_000_000)
    client = client_for(renter)

    first = client.post("/api/v1/jobs/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="once")
    again = client.post("/api/v1/jobs/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="once")

    assert (first.status_code, again.status_code) == (201, 200)
    assert available(renter) == 2_000_000 - BUDGET


def _run(job: Job, *, seconds: int) -> Lease:
    """Place and start the job on a 1-GPU machine at 1.00/GPU-hour, reporting `seconds` of usage."""
    t0 = timezone.now() - timedelta(hours=2)
    lease = placed_lease(job=job, gpus=1, price="1", started=t0)
    UsageReport.objects.create(
        lease=lease, report_id="r", period_start=t0, period_end=t0 + timedelta(seconds=seconds), gpu_seconds=seconds
    )
    lease.started = t0
    return lease


@pytest.mark.parametrize(
    ("reason", "exit_code", "status"),
    [(ER.SUCCEEDED, 0, Job.Status.SUCCEEDED), (ER.FAILED, 3, Job.Status.FAILED)],
)
def test_unused_budget_goes_back_to_the_renter_when_the_job_ends(reason, exit_code, status):
    renter = RenterFactory(funds=5_000_000)
    job = submit_job(renter)  # budget 1_000_000
    lease = _run(job, seconds=900)
    lease_end(
        lease_id=lease.pk,
        reason=reason,
        actor="machine",
        exit_code=exit_code,
        at=lease.started + timedelta(seconds=900),
    )

    assert release_budgets() == {"released": 0, "waiting_for_metering": 1}  # not metered yet
    services.leases_meter()
    assert release_budgets() == {"released": 1, "waiting_for_metering": 0}

    job.refresh_from_db()
    assert job.status == status
    # 900 s at 1.00/hour = 250_000 charged; 750_000 back.
    assert selectors.job_budget(job_id=job.pk) == selectors.JobBudget(
        reserved=1_000_000, charged=250_000, released=750_000, remaining=0
    )
    assert available(renter) == 5_000_000 - 250_000
    assert release_budgets() == {"released": 0, "waiting_for_metering": 0}
    assert available(renter) == 5_000_000 - 250_000


def test_cancelling_a_pending_job_releases_its_whole_budget():
    renter = RenterFactory(funds=1_000_000)
    job = submit_job(renter)
    assert available(renter) == 0

    job_cancel(job=job, actor="test")
    release_budgets()

    assert available(renter) == 1_000_000


def test_a_cancelled_running_job_keeps_its_budget_until_its_lease_is_finally_metered():
    renter = RenterFactory(funds=1_000_000)
    job = submit_job(renter)
    lease = _run(job, seconds=360)
    job_cancel(job=job, actor="test")  # the lease is asked to stop and is still running

    release_budgets()
    assert available(renter) == 0

    lease_end(lease_id=lease.pk, reason=ER.CANCELLED, actor="machine", at=lease.started + timedelta(seconds=360))
    services.leases_meter()
    release_budgets()

    assert available(renter) == 1_000_000 - 100_000
    with pytest.raises(services.ValidationFailed):
        services.job_budget_release(job_id=submit_job(RenterFactory()).pk)  # a pending job keeps its budget
