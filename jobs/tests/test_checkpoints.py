"""Checkpoints that follow a job (jobs.checkpoints): the agent API's upload and download, who
may use them, the start order that carries them, the job's end that deletes them. A cancel that
keeps the checkpoint: test_cancel_checkpoint."""

from __future__ import annotations

import hashlib
import io
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from jobs import checkpoints, services
from jobs.errors import ValidationFailed
from jobs.models import Checkpoint, Event, Job, Lease
from jobs.services import lease_end
from jobs.tasks import sweep_checkpoints
from tests.factories import (
    RenterFactory,
    agent_client,
    gpu_entry,
    heartbeat,
    machine_with_gpus,
    placed_lease,
    token_for,
)

pytestmark = pytest.mark.django_db

API = "/api/agent/v1/"
ARCHIVE = b"a tar archive, as far as the marketplace cares" * 100


@pytest.fixture(autouse=True)
def checkpoint_store(settings: Any, tmp_path: Path) -> Path:
    root = tmp_path / "checkpoints"
    settings.STORAGES = {
        **settings.STORAGES,
        "checkpoints": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(root)}},
    }
    settings.GPGPU = {**settings.GPGPU, "CHECKPOINT_MAX_BYTES": 64 * 1024, "CHECKPOINT_UPLOAD_GRACE_S": 60}
    return root


def upload(client: APIClient, lease_id: int, data: bytes = ARCHIVE, sha256: str | None = None, **headers: str):  # type: ignore[no-untyped-def]
    digest = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
    return client.generic(
        "PUT",
        f"{API}leases/{lease_id}/checkpoint",
        data,
        content_type="application/x-tar",
        HTTP_X_CHECKPOINT_SHA256=digest,
        **headers,
    )


def download(client: APIClient, lease_id: int):  # type: ignore[no-untyped-def]
    return client.get(f"{API}leases/{lease_id}/checkpoint")


def body_of(response: Any) -> bytes:
    return b"".join(response.streaming_content)


def running_lease(**fields: Any) -> Lease:
    fields.setdefault("checkpoint_dir", "/work/ckpt")
    return placed_lease(started=True, interruptible=True, **fields)


def files_in(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# --- the job's spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "ckpt",
        "/work",
        "/work/",
        "/work/../etc",
        "/work/a/../../etc",
        "/etc/ckpt",
        "/work//a",
        "/work/./a",
        "/work/a\n",
        "/work/.gpgpu",
        "/work/" + "a" * 200,
    ],
)
def test_a_checkpoint_dir_outside_the_jobs_work_directory_is_refused(value: str) -> None:
    assert services.checkpoint_dir_problem(value) is not None


def test_a_job_declares_its_checkpoint_dir_through_the_api(settings: Any) -> None:
    client = APIClient()
    renter = RenterFactory()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(renter.user)}")
    body = {
        "kind": "process",
        "command": ["python3", "train.py"],
        "gpu_count": 1,
        "max_price_per_gpu_hour": "1.00",
        "expected_duration_s": 600,
        "checkpoint_dir": "/work/../../etc",
    }
    refused = client.post("/api/v1/jobs/", body, format="json")
    assert refused.status_code == 400
    assert "checkpoint_dir" in str(refused.json())
    body["checkpoint_dir"] = "/work/ckpt"
    created = client.post("/api/v1/jobs/", body, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["checkpoint_dir"] == "/work/ckpt"


# --- upload -----------------------------------------------------------------------------------


def test_the_agent_of_the_running_lease_stores_its_jobs_checkpoint(checkpoint_store: Path) -> None:
    lease = running_lease()
    response = upload(agent_client(lease.machine), lease.pk)
    assert response.status_code == 201, response.content
    digest = hashlib.sha256(ARCHIVE).hexdigest()
    assert response.json() == {"lease_id": lease.pk, "size": len(ARCHIVE), "sha256": digest}
    row = Checkpoint.objects.get(job_id=lease.job_id)
    assert (row.lease_id, row.size) == (lease.pk, len(ARCHIVE))
    (stored,) = files_in(checkpoint_store)
    assert stored.read_bytes() == ARCHIVE
    assert Event.objects.filter(job_id=lease.job_id, kind="checkpoint.stored").exists()


def test_a_newer_checkpoint_replaces_the_old_one_and_its_file(
    checkpoint_store: Path, django_capture_on_commit_callbacks: Any
) -> None:
    lease = running_lease()
    agent = agent_client(lease.machine)
    assert upload(agent, lease.pk, b"first").status_code == 201
    with django_capture_on_commit_callbacks(execute=True):
        assert upload(agent, lease.pk, b"second").status_code == 201
    assert Checkpoint.objects.filter(job_id=lease.job_id).count() == 1
    assert [p.read_bytes() for p in files_in(checkpoint_store)] == [b"second"]


def test_bytes_damaged_on_the_way_are_refused_and_nothing_is_kept(checkpoint_store: Path) -> None:
    lease = running_lease()
    response = upload(agent_client(lease.machine), lease.pk, sha256=hashlib.sha256(b"other bytes").hexdigest())
    assert response.status_code == 400
    assert response.json()["code"] == "checkpoint_hash_mismatch"
    assert not Checkpoint.objects.exists()
    assert files_in(checkpoint_store) == []


def test_a_checkpoint_over_the_limit_is_refused_before_it_is_read(checkpoint_store: Path) -> None:
    lease = running_lease()
    big = b"x" * (64 * 1024 + 1)
    response = upload(agent_client(lease.machine), lease.pk, big)
    assert response.status_code == 400
    assert response.json()["code"] == "checkpoint_too_large"
    assert files_in(checkpoint_store) == []


def test_a_body_shorter_than_its_content_length_is_refused() -> None:
    # (The test client cannot send a cut body: the service is given one.)
    lease = running_lease()
    with pytest.raises(ValidationFailed, match="short"):
        checkpoints.checkpoint_upload(
            machine_id=lease.machine_id,
            lease_id=lease.pk,
            stream=io.BytesIO(b"short"),
            size=5000,
            sha256=hashlib.sha256(b"short").hexdigest(),
        )
    assert not Checkpoint.objects.exists()


def test_a_malformed_hash_is_refused() -> None:
    lease = running_lease()
    response = upload(agent_client(lease.machine), lease.pk, sha256="../../etc/passwd")
    assert response.status_code == 400


def test_another_machine_cannot_write_a_jobs_checkpoint() -> None:
    lease = running_lease()
    intruder = agent_client(machine_with_gpus())
    response = upload(intruder, lease.pk)
    assert response.status_code == 404
    assert not Checkpoint.objects.exists()


def test_a_job_without_a_checkpoint_dir_takes_no_upload() -> None:
    lease = running_lease(checkpoint_dir="")
    response = upload(agent_client(lease.machine), lease.pk)
    assert response.status_code == 409
    assert response.json()["code"] == "checkpoint_not_accepted"


def test_an_earlier_lease_cannot_overwrite_the_checkpoint_of_a_later_one() -> None:
    # Given a job preempted on machine A and placed again on machine B …
    first = running_lease()
    lease_end(lease_id=first.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    second = placed_lease(job=Job.objects.get(pk=first.job_id), started=True)
    # … A's agent may no longer write it, even within the upload grace.
    response = upload(agent_client(first.machine), first.pk)
    assert response.status_code == 409
    assert upload(agent_client(second.machine), second.pk).status_code == 201


def test_an_upload_just_after_the_lease_ended_is_accepted_but_not_long_after() -> None:
    lease = running_lease()
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    agent = agent_client(lease.machine)
    assert upload(agent, lease.pk).status_code == 201
    Lease.objects.filter(pk=lease.pk).update(ended_at=timezone.now() - timedelta(seconds=61))
    assert upload(agent, lease.pk).status_code == 409


def test_a_finished_job_takes_no_upload() -> None:
    lease = running_lease()
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, exit_code=0, actor="test")
    response = upload(agent_client(lease.machine), lease.pk)
    assert response.status_code == 409


# --- download ---------------------------------------------------------------------------------


def _preempted_then_placed_again() -> tuple[Lease, Lease]:
    first = running_lease()
    assert upload(agent_client(first.machine), first.pk).status_code == 201
    lease_end(lease_id=first.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    second = placed_lease(job=Job.objects.get(pk=first.job_id))
    return first, second


def test_the_next_lease_of_the_job_downloads_the_checkpoint_on_another_machine() -> None:
    _, second = _preempted_then_placed_again()
    response = download(agent_client(second.machine), second.pk)
    assert response.status_code == 200
    assert body_of(response) == ARCHIVE
    assert response["X-Checkpoint-SHA256"] == hashlib.sha256(ARCHIVE).hexdigest()


def test_the_machine_of_an_ended_lease_cannot_read_the_checkpoint_any_more() -> None:
    first, _ = _preempted_then_placed_again()
    response = download(agent_client(first.machine), first.pk)
    assert response.status_code == 409


def test_another_machine_cannot_read_a_jobs_checkpoint() -> None:
    _, second = _preempted_then_placed_again()
    # Another provider's machine, running a lease of another renter's job, names this lease.
    other = running_lease()
    response = download(agent_client(other.machine), second.pk)
    assert response.status_code == 404


def test_a_renter_cannot_read_the_checkpoint_through_the_agent_api() -> None:
    _, second = _preempted_then_placed_again()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(second.job.renter.user)}")
    assert download(client, second.pk).status_code in (401, 403)


# --- the start order --------------------------------------------------------------------------


def test_the_start_order_carries_the_checkpoint_to_restore_and_the_resume_count() -> None:
    _, second = _preempted_then_placed_again()
    agent = agent_client(second.machine)
    gpu = second.gpus.get()
    reply = heartbeat(agent, [gpu_entry(gpu.uuid, gpu.index)])
    assert reply.status_code == 200, reply.json()
    (order,) = reply.json()["start"]
    assert order["checkpoint"] == {
        "dir": "/work/ckpt",
        "max_bytes": 64 * 1024,
        "upload_url": f"leases/{second.pk}/checkpoint",
        "restore_url": f"leases/{second.pk}/checkpoint",
        "restore_sha256": hashlib.sha256(ARCHIVE).hexdigest(),
        "restore_size": len(ARCHIVE),
        "resume_count": 1,
        "upload_direct": False,  # local files: through PUT upload_url
    }
    assert "predicted_idle_s" in reply.json()


def test_a_first_lease_has_nothing_to_restore_and_a_job_without_a_dir_no_checkpoint() -> None:
    lease = placed_lease(checkpoint_dir="/work/ckpt")
    gpu = lease.gpus.get()
    (order,) = heartbeat(agent_client(lease.machine), [gpu_entry(gpu.uuid, gpu.index)]).json()["start"]
    assert order["checkpoint"]["restore_url"] is None
    assert order["checkpoint"]["resume_count"] == 0
    plain = placed_lease()
    gpu = plain.gpus.get()
    (order,) = heartbeat(agent_client(plain.machine), [gpu_entry(gpu.uuid, gpu.index)]).json()["start"]
    assert order["checkpoint"] is None


# --- deletion ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("reason", [Lease.EndReason.SUCCEEDED, Lease.EndReason.FAILED])
def test_the_checkpoint_is_deleted_when_the_job_ends(reason: str, checkpoint_store: Path) -> None:
    lease = running_lease()
    assert upload(agent_client(lease.machine), lease.pk).status_code == 201
    lease_end(lease_id=lease.pk, reason=reason, exit_code=0 if reason == "succeeded" else 1, actor="test")
    assert Job.objects.get(pk=lease.job_id).status in Job.TERMINAL
    assert not Checkpoint.objects.exists()
    assert files_in(checkpoint_store) == []


@pytest.mark.django_db(transaction=True)
def test_the_checkpoint_is_deleted_when_the_renter_cancels(checkpoint_store: Path) -> None:
    lease = running_lease()
    assert upload(agent_client(lease.machine), lease.pk).status_code == 201
    services.job_cancel(job=Job.objects.get(pk=lease.job_id), actor="test")
    assert not Checkpoint.objects.exists()
    assert files_in(checkpoint_store) == []


# --- an S3-compatible store ---------------------------------------------------------------------


def test_with_an_s3_store_the_next_lease_restores_from_a_short_lived_presigned_url(s3_checkpoint_store: str) -> None:
    first = running_lease()
    Checkpoint.objects.create(job_id=first.job_id, lease=first, storage_key="job-1/abc.tar", size=10, sha256="0" * 64)
    lease_end(lease_id=first.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    second = placed_lease(job=Job.objects.get(pk=first.job_id))
    gpu = second.gpus.get()
    (order,) = heartbeat(agent_client(second.machine), [gpu_entry(gpu.uuid, gpu.index)]).json()["start"]
    restore = order["checkpoint"]["restore_url"]
    assert restore.startswith(f"{s3_checkpoint_store}/job-1/abc.tar?")
    assert "X-Amz-Signature=" in restore
    assert "X-Amz-Expires=120" in restore
    # The upload goes to the store too: a pre-signed PUT asked at {upload_url}/upload, then a
    # commit (test_checkpoints_direct).
    assert order["checkpoint"]["upload_url"] == f"leases/{second.pk}/checkpoint"
    assert order["checkpoint"]["upload_direct"] is True


def test_the_renter_sees_the_saved_checkpoint_on_the_job_and_downloads_it() -> None:
    lease = running_lease()
    renter = APIClient()
    renter.credentials(HTTP_AUTHORIZATION=f"Token {token_for(lease.job.renter.user)}")
    assert renter.get(f"/api/v1/jobs/{lease.job_id}/").json()["checkpoint"] is None
    assert upload(agent_client(lease.machine), lease.pk).status_code == 201
    shown = renter.get(f"/api/v1/jobs/{lease.job_id}/").json()["checkpoint"]
    assert shown["lease"] == lease.pk
    assert shown["size"] == len(ARCHIVE)
    assert shown["sha256"] == hashlib.sha256(ARCHIVE).hexdigest()
    assert shown["kept_until"] is None  # it goes when the job ends
    listed = renter.get("/api/v1/jobs/").json()["results"]
    assert listed[0]["checkpoint"]["size"] == len(ARCHIVE)
    archive = renter.get(f"/api/v1/jobs/{lease.job_id}/checkpoint/")
    assert (body_of(archive), archive["X-Checkpoint-SHA256"]) == (ARCHIVE, shown["sha256"])
    # Asked for by its own type (the only one the schema gives it: a generated client's Accept).
    as_tar = renter.get(f"/api/v1/jobs/{lease.job_id}/checkpoint/", HTTP_ACCEPT="application/x-tar")
    assert (as_tar.status_code, as_tar["Content-Type"], body_of(as_tar)) == (200, "application/x-tar", ARCHIVE)
    # Another renter sees nothing of it, and is told so in JSON whatever it accepts.
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Token {token_for(RenterFactory().user)}")
    assert other.get(f"/api/v1/jobs/{lease.job_id}/").status_code == 404
    assert other.get(f"/api/v1/jobs/{lease.job_id}/checkpoint/").status_code == 404
    refused = other.get(f"/api/v1/jobs/{lease.job_id}/checkpoint/", HTTP_ACCEPT="application/x-tar")
    assert (refused.status_code, refused["Content-Type"]) == (404, "application/json")
    assert refused.json()["code"] == "not_found"


@pytest.mark.django_db(transaction=True)
def test_the_sweep_deletes_old_files_no_job_holds_and_keeps_the_rest(checkpoint_store: Path) -> None:
    lease = running_lease()
    assert upload(agent_client(lease.machine), lease.pk).status_code == 201
    (kept,) = files_in(checkpoint_store)
    # A file whose deletion failed when its job ended, and one being uploaded right now.
    orphan = checkpoint_store / "job-999" / "lost.tar"
    fresh = checkpoint_store / "job-999" / "uploading.tar"
    orphan.parent.mkdir()
    orphan.write_bytes(b"old")
    fresh.write_bytes(b"new")
    two_hours_ago = (timezone.now() - timedelta(hours=2)).timestamp()
    os.utime(orphan, (two_hours_ago, two_hours_ago))
    os.utime(kept, (two_hours_ago, two_hours_ago))

    result = sweep_checkpoints.apply().get()

    assert result == {"deleted": 1}
    assert sorted(files_in(checkpoint_store)) == sorted([kept, fresh])


# --- what the job is told of its machine's forecast -----------------------------------------------


def test_a_machine_running_a_lease_is_told_its_predicted_idle_time_and_an_idle_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from providers import idle_history
    from providers import services as providers_services

    lease = running_lease()
    gpu = lease.gpus.get()
    agent = agent_client(lease.machine)
    listed = [{"lease_id": lease.pk, "state": "running"}]
    away = (timezone.now() - timedelta(minutes=10)).isoformat()
    reply = heartbeat(agent, [gpu_entry(gpu.uuid, gpu.index, idle_since=away)], listed)
    assert reply.status_code == 200, reply.json()
    assert isinstance(reply.json()["predicted_idle_s"], int)
    assert reply.json()["predicted_idle_s"] > 0

    idle = machine_with_gpus()
    idle_gpu = idle.gpus.get()
    assert heartbeat(agent_client(idle), [gpu_entry(idle_gpu.uuid, 0)]).json()["predicted_idle_s"] is None

    # Cached (here for an interval far longer than the test, so that the machine's turn does not
    # fall between the two heartbeats): the forecast is not read again at each heartbeat.
    monkeypatch.setattr(providers_services, "PREDICTED_IDLE_CACHE_S", 10**6)
    calls: list[int] = []
    real = idle_history.machine_predicted_idle_s
    monkeypatch.setattr(
        idle_history, "machine_predicted_idle_s", lambda **kw: calls.append(kw["machine_id"]) or real(**kw)
    )
    first = heartbeat(agent, [gpu_entry(gpu.uuid, gpu.index, idle_since=away)], listed).json()["predicted_idle_s"]
    second = heartbeat(agent, [gpu_entry(gpu.uuid, gpu.index, idle_since=away)], listed).json()["predicted_idle_s"]
    assert calls == [lease.machine_id]
    assert 0 <= first - second <= 1


def test_a_checkpoint_larger_than_an_ordinary_request_body_is_taken(settings: Any) -> None:
    settings.GPGPU = {**settings.GPGPU, "CHECKPOINT_MAX_BYTES": 4 * 1024 * 1024}
    big = os.urandom(3 * settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
    lease = running_lease()
    response = upload(agent_client(lease.machine), lease.pk, big)
    assert response.status_code == 201, response.content
    assert body_of(download_after_requeue(lease)) == big


def download_after_requeue(first: Lease) -> Any:
    lease_end(lease_id=first.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    second = placed_lease(job=Job.objects.get(pk=first.job_id))
    return download(agent_client(second.machine), second.pk)
