"""A pending job's detail (GET /api/v1/jobs/<id>/) shows the machines it could be placed on now,
with what the renter risks on each (marketplace.apis, providers.selectors.machine_offers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs.models import Job
from marketplace.apis import JOB_OFFERS
from providers.models import GPU, Machine
from tests.factories import GPUFactory, JobFactory, MachineFactory, fickle_owner_history, nightly_owner_history

pytestmark = pytest.mark.django_db

TUESDAY_NIGHT = datetime(2026, 11, 24, 22, 5, tzinfo=UTC)


def at(when: datetime):  # type: ignore[no-untyped-def]
    return mock.patch("django.utils.timezone.now", return_value=when)


def idle_machine(*, gpus: int = 1, model: str = "RTX 4090", **machine: object) -> Machine:
    m = MachineFactory(last_heartbeat_at=TUESDAY_NIGHT, **machine)
    for i in range(gpus):
        GPUFactory(
            machine=m, index=i, model=model, state=GPU.State.IDLE, idle_since=TUESDAY_NIGHT - timedelta(minutes=1)
        )
    return m


def two_hour_job(renter, **fields) -> Job:  # type: ignore[no-untyped-def]
    defaults: dict[str, object] = {
        "allowed_models": ["RTX 4090"],
        "expected_duration_s": 7200,
        "max_duration_s": 7200,
        "max_price_per_gpu_hour": Decimal("1.00"),
    }
    return JobFactory(renter=renter, **{**defaults, **fields})


def offers(client, job: Job) -> list[dict]:  # type: ignore[no-untyped-def]
    with at(TUESDAY_NIGHT):
        response = client.get(f"/api/v1/jobs/{job.pk}/")
    assert response.status_code == 200, response.content
    return response.json()["offers"]


def test_a_pending_job_sees_the_owner_away_all_night_first_with_a_likelier_finish(renter_client):
    client, renter = renter_client
    fickle = idle_machine()
    night_owl = idle_machine()
    fickle_owner_history(fickle, until=TUESDAY_NIGHT)
    nightly_owner_history(night_owl, until=TUESDAY_NIGHT)
    job = two_hour_job(renter)

    shown = offers(client, job)

    assert [o["machine"] for o in shown] == [night_owl.pk, fickle.pk]
    best, worst = shown
    assert best["p_finish"] > 0.5 > 0.1 > worst["p_finish"]
    assert best["predicted_idle_s"] > worst["predicted_idle_s"]
    assert best["gpus"][0]["model"] == "RTX 4090"
    assert best["price_per_gpu_hour"] == "0.200000"


def test_offers_keep_to_the_jobs_constraints(renter_client):
    client, renter = renter_client
    fits = idle_machine(gpus=2)
    idle_machine(gpus=1)  # one GPU short
    idle_machine(gpus=2, model="RTX 3060")  # another model
    idle_machine(gpus=2, region="us-east")  # another region
    idle_machine(gpus=2, accepts_process=False)  # refuses process jobs
    dear = idle_machine(gpus=2)
    GPU.objects.filter(machine=dear).update(price_floor=Decimal("1.50"))  # over the ceiling
    job = two_hour_job(renter, gpu_count=2, region="eu-west")

    shown = offers(client, job)

    assert [o["machine"] for o in shown] == [fits.pk]
    assert len(shown[0]["gpus"]) == 2


def test_at_most_a_few_offers_in_a_bounded_number_of_queries(renter_client):
    client, renter = renter_client
    job = two_hour_job(renter)
    idle_machine()
    offers(client, job)  # the token's last use is written once, on the first

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            offers(client, job)
        return len(captured.captured_queries)

    few = queries()
    for _ in range(JOB_OFFERS + 3):
        idle_machine()
    many = queries()

    assert len(offers(client, job)) == JOB_OFFERS
    assert many == few


def test_a_job_no_longer_pending_shows_no_offers(renter_client):
    client, renter = renter_client
    idle_machine()
    job = two_hour_job(renter, status=Job.Status.CANCELLED)

    assert offers(client, job) is None
