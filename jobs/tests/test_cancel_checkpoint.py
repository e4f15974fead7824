"""A renter cancels a running job keeping its checkpoint (POST /api/v1/jobs/{id}/cancel/ with
keep_checkpoint): the agent is told to save it as it stops the job, the marketplace takes that
upload although the job is cancelled, keeps it for CHECKPOINT_KEEP_AFTER_CANCEL_H hours, and
only the job's renter downloads it (GET /api/v1/jobs/{id}/checkpoint/)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from gpgpu_agent import protocol
from jobs.models import Checkpoint, Event, Job, Lease
from jobs.services import lease_end
from jobs.tasks import sweep_checkpoints
from jobs.tests.test_checkpoints import ARCHIVE, body_of, download, files_in, running_lease, upload
from tests.factories import (
    JobFactory,
    ProviderFactory,
    RenterFactory,
    agent_client,
    gpu_entry,
    heartbeat,
    placed_lease,
    token_for,
)

pytestmark = pytest.mark.django_db

DIGEST = hashlib.sha256(ARCHIVE).hexdigest()


@pytest.fixture(autouse=True)
def checkpoint_store(settings: Any, tmp_path: Path) -> Path:
    root = tmp_path / "checkpoints"
    settings.STORAGES = {
        **settings.STORAGES,
        "checkpoints": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(root)}},
    }
    settings.GPGPU = {
        **settings.GPGPU,
        "CHECKPOINT_MAX_BYTES": 64 * 1024,
        "CHECKPOINT_UPLOAD_GRACE_S": 60,
        "CHECKPOINT_KEEP_AFTER_CANCEL_H": 24,
    }
    return root


def renter_of(job: Job) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(job.renter.user)}")
    return client


def cancel(client: APIClient, job_id: int, **body: Any) -> Any:
    return client.post(f"/api/v1/jobs/{job_id}/cancel/", body, format="json")


def fetch(client: APIClient, job_id: int) -> Any:
    return client.get(f"/api/v1/jobs/{job_id}/checkpoint/")


def stop_orders(agent: APIClient, lease: Lease) -> list[dict[str, Any]]:
    gpu = lease.gpus.get()
    leases = [{"lease_id": lease.pk, "state": "running"}]
    response = heartbeat(agent, [gpu_entry(gpu.uuid, gpu.index)], leases)
    assert response.status_code == 200, response.content
    return list(response.json()["stop"])


def exited(agent: APIClient, lease: Lease) -> Any:
    body = {"event_id": secrets.token_hex(8), "type": "exited", "at": timezone.now().isoformat(), "exit_code": -15}
    return agent.post(f"/api/agent/v1/leases/{lease.pk}/events", body, format="json")


def cancelled_keeping(lease: Lease) -> tuple[APIClient, APIClient]:
    """Cancel the lease's job keeping its checkpoint, have its agent upload it and report the
    exit; the renter's and the agent's clients."""
    renter, agent = renter_of(lease.job), agent_client(lease.machine)
    assert cancel(renter, lease.job_id, keep_checkpoint=True).status_code == 200
    assert upload(agent, lease.pk).status_code == 201
    assert exited(agent, lease).status_code == 200
    return renter, agent


# --- the whole story ---------------------------------------------------------------------------


def test_a_job_cancelled_keeping_its_checkpoint_has_it_saved_by_its_agent_and_downloaded_by_its_renter() -> None:
    lease = running_lease()
    renter, agent = renter_of(lease.job), agent_client(lease.machine)

    response = cancel(renter, lease.job_id, keep_checkpoint=True)

    assert response.status_code == 200, response.content
    assert (response.json()["status"], response.json()["keep_checkpoint"]) == ("cancelled", True)
    stop = {"lease_id": lease.pk, "reason": "cancelled", protocol.STOP_SAVE_CHECKPOINT: True}
    assert stop_orders(agent, lease) == [stop]
    # The agent stops the job, uploads its directory, then reports the exit.
    assert upload(agent, lease.pk).status_code == 201
    assert exited(agent, lease).status_code == 200
    lease.refresh_from_db()
    assert (lease.status, lease.end_reason) == (Lease.Status.ENDED, "cancelled")

    job = renter.get(f"/api/v1/jobs/{lease.job_id}/").json()
    assert job["status"] == "cancelled"
    assert (job["checkpoint"]["lease"], job["checkpoint"]["sha256"]) == (lease.pk, DIGEST)
    finished = Job.objects.get(pk=lease.job_id).finished_at
    assert finished is not None
    kept_until = finished + timedelta(hours=24)
    assert job["checkpoint"]["kept_until"] == kept_until.isoformat().replace("+00:00", "Z")
    archive = fetch(renter, lease.job_id)
    assert archive.status_code == 200
    assert archive["Content-Type"] == "application/x-tar"
    assert archive["X-Checkpoint-SHA256"] == DIGEST
    assert body_of(archive) == ARCHIVE
    kinds = {e.kind: e.detail for e in Event.objects.filter(job_id=lease.job_id)}
    assert kinds["job.cancelled"] == {"keep_checkpoint": True}
    assert kinds["lease.stop_requested"] == {"reason": "cancelled", "save_checkpoint": True}
    assert "checkpoint.stored" in kinds


def test_an_upload_just_after_the_cancelled_lease_ended_is_taken_but_not_long_after() -> None:
    lease = running_lease()
    renter, agent = renter_of(lease.job), agent_client(lease.machine)
    assert cancel(renter, lease.job_id, keep_checkpoint=True).status_code == 200
    assert exited(agent, lease).status_code == 200
    assert upload(agent, lease.pk).status_code == 201
    Lease.objects.filter(pk=lease.pk).update(ended_at=timezone.now() - timedelta(seconds=61))
    late = upload(agent, lease.pk, data=b"later state")
    assert late.status_code == 409
    assert late.json()["code"] == "checkpoint_not_accepted"
    assert body_of(fetch(renter, lease.job_id)) == ARCHIVE


def test_a_cancel_keeping_the_checkpoint_of_a_pending_job_keeps_the_one_of_its_earlier_lease() -> None:
    lease = running_lease()
    assert upload(agent_client(lease.machine), lease.pk).status_code == 201
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    assert Job.objects.get(pk=lease.job_id).status == Job.Status.PENDING
    renter = renter_of(lease.job)

    response = cancel(renter, lease.job_id, keep_checkpoint=True)

    assert response.json()["status"] == "cancelled"
    assert body_of(fetch(renter, lease.job_id)) == ARCHIVE


# --- who may touch it ---------------------------------------------------------------------------


def test_only_the_jobs_renter_downloads_a_kept_checkpoint() -> None:
    lease = running_lease()
    cancelled_keeping(lease)
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Token {token_for(RenterFactory().user)}")
    refused = fetch(other, lease.job_id)
    assert (refused.status_code, refused.json()["code"]) == (404, "not_found")
    provider = APIClient()
    provider.credentials(HTTP_AUTHORIZATION=f"Token {token_for(ProviderFactory().user)}")
    assert fetch(provider, lease.job_id).status_code in (403, 404)
    assert fetch(APIClient(), lease.job_id).status_code == 401


def test_the_machine_that_saved_it_reads_it_no_more_once_its_lease_ended() -> None:
    lease = running_lease()
    _, agent = cancelled_keeping(lease)
    assert download(agent, lease.pk).status_code == 409
    assert fetch(agent, lease.job_id).status_code in (401, 403)


def test_another_machine_cannot_write_the_checkpoint_of_a_cancelled_job() -> None:
    lease = running_lease()
    renter = renter_of(lease.job)
    assert cancel(renter, lease.job_id, keep_checkpoint=True).status_code == 200
    other = running_lease()
    assert upload(agent_client(other.machine), lease.pk).status_code == 404
    assert not Checkpoint.objects.filter(job_id=lease.job_id).exists()
    assert fetch(renter, lease.job_id).json()["code"] == "no_checkpoint"


def test_an_earlier_lease_cannot_write_the_checkpoint_of_a_job_cancelled_on_its_next_one() -> None:
    first = running_lease()
    lease_end(lease_id=first.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    second = placed_lease(job=Job.objects.get(pk=first.job_id), started=True)
    assert cancel(renter_of(first.job), first.job_id, keep_checkpoint=True).status_code == 200
    assert upload(agent_client(first.machine), first.pk).status_code == 409
    assert upload(agent_client(second.machine), second.pk).status_code == 201


# --- without keep_checkpoint, and refusals ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_plain_cancel_still_deletes_the_checkpoint_and_asks_for_no_upload(checkpoint_store: Path) -> None:
    lease = running_lease()
    renter, agent = renter_of(lease.job), agent_client(lease.machine)
    assert upload(agent, lease.pk).status_code == 201

    assert cancel(renter, lease.job_id).status_code == 200

    assert stop_orders(agent, lease) == [
        {"lease_id": lease.pk, "reason": "cancelled", protocol.STOP_SAVE_CHECKPOINT: False}
    ]
    assert files_in(checkpoint_store) == []
    assert upload(agent, lease.pk).status_code == 409
    assert fetch(renter, lease.job_id).status_code == 404
    assert renter.get(f"/api/v1/jobs/{lease.job_id}/").json()["checkpoint"] is None


def test_keeping_the_checkpoint_of_a_job_without_a_checkpoint_dir_is_refused_and_cancels_nothing() -> None:
    lease = running_lease(checkpoint_dir="")
    renter = renter_of(lease.job)
    response = cancel(renter, lease.job_id, keep_checkpoint=True)
    assert response.status_code == 400
    assert response.json()["code"] == "no_checkpoint_dir"
    assert "checkpoint_dir" in response.json()["detail"]
    assert Job.objects.get(pk=lease.job_id).status == Job.Status.RUNNING


def test_a_cancel_body_with_an_unknown_field_is_refused() -> None:
    job = JobFactory(checkpoint_dir="/work/ckpt")
    response = cancel(renter_of(job), job.pk, keep_checkpint=True)
    assert response.status_code == 400
    assert Job.objects.get(pk=job.pk).status == Job.Status.PENDING


def test_asking_again_to_keep_a_checkpoint_a_plain_cancel_deleted_is_refused() -> None:
    lease = running_lease()
    renter = renter_of(lease.job)
    assert cancel(renter, lease.job_id).status_code == 200
    again = cancel(renter, lease.job_id, keep_checkpoint=True)
    assert (again.status_code, again.json()["code"]) == (409, "invalid_transition")


def test_a_second_plain_cancel_does_not_undo_a_kept_checkpoint() -> None:
    lease = running_lease()
    renter, _ = cancelled_keeping(lease)
    assert cancel(renter, lease.job_id).json()["keep_checkpoint"] is True
    assert body_of(fetch(renter, lease.job_id)) == ARCHIVE


# --- how long it is kept ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_sweep_deletes_a_kept_checkpoint_after_its_retention_and_not_before(checkpoint_store: Path) -> None:
    lease = running_lease()
    renter, _ = cancelled_keeping(lease)
    job = Job.objects.get(pk=lease.job_id)
    assert job.finished_at is not None

    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(hours=23, minutes=59))
    sweep_checkpoints.apply().get()
    assert Checkpoint.objects.filter(job_id=job.pk).exists()
    assert len(files_in(checkpoint_store)) == 1
    assert fetch(renter, job.pk).status_code == 200

    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(hours=24, seconds=1))
    # Past its retention it is gone for the renter even before the sweep comes.
    assert fetch(renter, job.pk).json()["code"] == "no_checkpoint"
    sweep_checkpoints.apply().get()
    assert not Checkpoint.objects.filter(job_id=job.pk).exists()
    assert files_in(checkpoint_store) == []


# --- an S3-compatible store ---------------------------------------------------------------------


def test_with_an_s3_store_the_renter_is_sent_to_a_short_lived_presigned_url(s3_checkpoint_store: str) -> None:
    lease = running_lease()
    Checkpoint.objects.create(job_id=lease.job_id, lease=lease, storage_key="job-1/abc.tar", size=10, sha256=DIGEST)
    renter = renter_of(lease.job)
    assert cancel(renter, lease.job_id, keep_checkpoint=True).status_code == 200

    response = fetch(renter, lease.job_id)

    assert response.status_code == 302
    assert response["Location"].startswith(f"{s3_checkpoint_store}/job-1/abc.tar?")
    assert "X-Amz-Expires=120" in response["Location"]
    assert response["X-Checkpoint-SHA256"] == DIGEST
