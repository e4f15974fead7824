"""The job and lease state machines, as a renter and a provider would see them."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction
from django.test import override_settings

from jobs.errors import IdempotencyKeyReused, InvalidTransition, ValidationFailed
from jobs.models import Event, Job, Lease, LeaseGPU
from jobs.services import (
    JobSpec,
    Placement,
    job_cancel,
    lease_end,
    lease_mark_started,
    lease_request_stop,
    leases_assign,
    leases_end_for_machine,
)
from marketplace.submit import job_submit
from providers.models import GPU
from tests.factories import JobFactory, RenterFactory, machine_with_gpus, placed_lease

pytestmark = pytest.mark.django_db

SPEC = JobSpec(
    kind="process",
    command=["python", "train.py"],
    gpu_count=1,
    max_price_per_gpu_hour=Decimal("1.50"),
    expected_duration_s=600,
    max_duration_s=900,
)


def statuses(job: Job) -> list[tuple[str, str, str]]:
    return list(Event.objects.filter(job=job).values_list("kind", "from_status", "to_status"))


# --- submitting -----------------------------------------------------------------------------


def test_job_is_created_pending_with_an_audit_event():
    job, created = job_submit(renter=RenterFactory(), spec=SPEC)
    assert created and job.status == Job.Status.PENDING
    assert statuses(job) == [("job.created", "", "pending")]


def test_same_idempotency_key_and_body_returns_the_first_job():
    renter = RenterFactory()
    first, created = job_submit(renter=renter, spec=SPEC, idempotency_key="k-1")
    again, created_again = job_submit(renter=renter, spec=SPEC, idempotency_key="k-1")
    assert created and not created_again and again.pk == first.pk
    assert Job.objects.filter(renter=renter).count() == 1


def test_same_idempotency_key_with_another_body_is_refused():
    renter = RenterFactory()
    job_submit(renter=renter, spec=SPEC, idempotency_key="k-1")
    other = JobSpec(**{**SPEC.__dict__, "gpu_count": 2})
    with pytest.raises(IdempotencyKeyReused):
        job_submit(renter=renter, spec=other, idempotency_key="k-1")


def test_idempotency_keys_are_per_renter():
    a, _ = job_submit(renter=RenterFactory(), spec=SPEC, idempotency_key="shared")
    b, created = job_submit(renter=RenterFactory(), spec=SPEC, idempotency_key="shared")
    assert created and a.pk != b.pk


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"gpu_count": 0}, "gpu_count"),
        ({"gpu_count": 17}, "gpu_count"),
        ({"max_price_per_gpu_hour": Decimal("0")}, "max_price_per_gpu_hour"),
        ({"expected_duration_s": 0}, "expected_duration_s"),
        ({"max_duration_s": 10}, "max_duration_s"),
        ({"kind": "container", "image": ""}, "image"),
        ({"command": ()}, "command"),
    ],
)
def test_invalid_job_is_refused_and_nothing_is_stored(change, field):
    with pytest.raises(ValidationFailed) as err:
        job_submit(renter=RenterFactory(), spec=JobSpec(**{**SPEC.__dict__, **change}))
    assert field in err.value.extra["fields"]
    assert Job.objects.count() == 0


# --- leases ---------------------------------------------------------------------------------


def test_job_runs_to_success_through_its_lease():
    job = JobFactory()
    lease = placed_lease(job=job)
    job.refresh_from_db()
    assert job.status == Job.Status.SCHEDULED and job.attempts == 1
    assert GPU.objects.get(lease_gpus__lease=lease).state == GPU.State.LEASED

    assert lease_mark_started(lease_id=lease.pk, actor="machine:1")
    assert lease_end(lease_id=lease.pk, reason="succeeded", exit_code=0, actor="machine:1")

    job.refresh_from_db()
    lease.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED and job.exit_code == 0 and job.finished_at
    assert lease.status == Lease.Status.ENDED and lease.end_reason == "succeeded"
    assert GPU.objects.get(lease_gpus__lease=lease).state == GPU.State.IDLE
    assert not LeaseGPU.objects.filter(lease=lease, active=True).exists()
    assert [s[0] for s in statuses(job)] == ["lease.assigned", "lease.started", "lease.ended", "job.succeeded"]


def test_non_zero_exit_fails_the_job_with_the_code():
    job = JobFactory()
    lease = placed_lease(job=job)
    lease_mark_started(lease_id=lease.pk, actor="m")
    lease_end(lease_id=lease.pk, reason="failed", exit_code=3, actor="m")
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and job.exit_code == 3 and "3" in job.failure_reason


def test_repeated_transitions_change_nothing_the_second_time():
    job = JobFactory()
    lease = placed_lease(job=job)
    assert lease_mark_started(lease_id=lease.pk, actor="m")
    assert not lease_mark_started(lease_id=lease.pk, actor="m")
    assert lease_end(lease_id=lease.pk, reason="succeeded", exit_code=0, actor="m")
    assert not lease_end(lease_id=lease.pk, reason="failed", exit_code=1, actor="m")
    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED
    assert Event.objects.filter(job=job, kind="lease.ended").count() == 1


def test_owner_reclaim_puts_an_interruptible_job_back_in_the_queue():
    job = JobFactory(interruptible=True)
    lease = placed_lease(job=job)
    lease_mark_started(lease_id=lease.pk, actor="m")
    lease_end(lease_id=lease.pk, reason="preempted_by_owner", actor="m")
    job.refresh_from_db()
    assert job.status == Job.Status.PENDING
    assert GPU.objects.get(lease_gpus__lease=lease).state == GPU.State.OWNER_BUSY


def test_owner_reclaim_fails_a_job_that_cannot_be_interrupted():
    job = JobFactory(interruptible=False)
    lease = placed_lease(job=job)
    lease_mark_started(lease_id=lease.pk, actor="m")
    lease_end(lease_id=lease.pk, reason="preempted_by_owner", actor="m")
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and "not interruptible" in job.failure_reason


@override_settings(GPGPU={**__import__("django.conf").conf.settings.GPGPU, "JOB_MAX_ATTEMPTS": 2})
def test_failed_starts_are_retried_until_attempts_run_out():
    job = JobFactory()
    lease_end(lease_id=placed_lease(job=job).pk, reason="failed_to_start", detail="image not found", actor="m")
    job.refresh_from_db()
    assert job.status == Job.Status.PENDING
    lease_end(lease_id=placed_lease(job=job).pk, reason="failed_to_start", detail="image not found", actor="m")
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and job.attempts == 2 and "image not found" in job.failure_reason


def test_lost_machine_ends_all_its_leases():
    job_a, job_b = JobFactory(interruptible=True), JobFactory(interruptible=False)
    machine = machine_with_gpus(count=2)
    placed_lease(job=job_a, machine=machine)
    placed_lease(job=job_b, machine=machine)
    assert leases_end_for_machine(machine_id=machine.pk, reason="lost", actor="sweeper") == 2
    job_a.refresh_from_db()
    job_b.refresh_from_db()
    assert (job_a.status, job_b.status) == (Job.Status.PENDING, Job.Status.FAILED)
    assert set(GPU.objects.filter(machine=machine).values_list("state", flat=True)) == {GPU.State.OFFLINE}


# --- cancelling -----------------------------------------------------------------------------


def test_cancelling_a_pending_job_is_immediate_and_repeatable():
    job = JobFactory()
    assert job_cancel(job=job, actor="renter").status == Job.Status.CANCELLED
    assert job_cancel(job=job, actor="renter").status == Job.Status.CANCELLED
    assert Event.objects.filter(job=job, kind="job.cancelled").count() == 1


def test_cancelling_a_scheduled_job_releases_its_gpus_at_once():
    job = JobFactory()
    lease = placed_lease(job=job)
    job_cancel(job=job, actor="renter")
    lease.refresh_from_db()
    assert lease.status == Lease.Status.ENDED and lease.end_reason == "cancelled"
    assert GPU.objects.get(lease_gpus__lease=lease).state == GPU.State.IDLE


def test_cancelling_a_running_job_asks_the_agent_to_stop_and_the_exit_ends_it_as_cancelled():
    job = JobFactory()
    lease = placed_lease(job=job)
    lease_mark_started(lease_id=lease.pk, actor="m")
    job_cancel(job=job, actor="renter")
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RUNNING and lease.stop_requested_at and lease.stop_reason == "cancelled"
    # The process is killed by the agent and exits non-zero: the lease still ends as cancelled.
    lease_end(lease_id=lease.pk, reason="failed", exit_code=-15, actor="m")
    lease.refresh_from_db()
    job.refresh_from_db()
    assert lease.end_reason == "cancelled" and job.status == Job.Status.CANCELLED


def test_a_finished_job_cannot_be_cancelled():
    job = JobFactory()
    lease = placed_lease(job=job)
    lease_mark_started(lease_id=lease.pk, actor="m")
    lease_end(lease_id=lease.pk, reason="succeeded", exit_code=0, actor="m")
    with pytest.raises(InvalidTransition):
        job_cancel(job=job, actor="renter")


def test_stop_request_is_recorded_once():
    job = JobFactory()
    lease = placed_lease(job=job)
    lease_mark_started(lease_id=lease.pk, actor="m")
    assert lease_request_stop(lease_id=lease.pk, reason="max_duration", actor="sweeper")
    assert not lease_request_stop(lease_id=lease.pk, reason="cancelled", actor="renter")
    lease.refresh_from_db()
    assert lease.stop_reason == "max_duration"


# --- never two leases on one GPU ------------------------------------------------------------


def test_database_refuses_a_gpu_in_two_active_leases():
    machine = machine_with_gpus(count=1)
    gpu_id = machine.gpus.get().pk
    leases_assign(placements=[Placement(JobFactory().pk, machine.pk, (gpu_id,), Decimal("1"))])
    with pytest.raises(IntegrityError), transaction.atomic():
        leases_assign(placements=[Placement(JobFactory().pk, machine.pk, (gpu_id,), Decimal("1"))])
    assert LeaseGPU.objects.filter(gpu_id=gpu_id, active=True).count() == 1


def test_a_job_no_longer_pending_is_not_placed_again():
    job = JobFactory()
    placed_lease(job=job)
    machine = machine_with_gpus(count=1)
    assert leases_assign(placements=[Placement(job.pk, machine.pk, (machine.gpus.get().pk,), Decimal("1"))]) == {}
    assert Lease.objects.filter(job=job).count() == 1
