"""Checkpoints uploaded straight to an S3-compatible store (jobs.checkpoints' direct upload),
against a real S3 endpoint (moto's server on 127.0.0.1): the agent asks the marketplace for a
pre-signed PUT, writes the archive to the store, and commits it; the marketplace checks the
stored object before it becomes the job's checkpoint. Each attack below tries to get bytes into a
job's checkpoint, or a machine's hands on a URL, that it should not."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.core import signing
from rest_framework.test import APIClient

from jobs.models import Checkpoint, Event, Job, Lease
from jobs.services import lease_end
from tests.factories import (
    RenterFactory,
    agent_client,
    gpu_entry,
    heartbeat,
    machine_with_gpus,
    placed_lease,
    token_for,
)
from tests.s3 import S3Store

pytestmark = pytest.mark.django_db

API = "/api/agent/v1/"
ARCHIVE = b"the job's checkpoint directory, packed" * 200
SHA = hashlib.sha256(ARCHIVE).hexdigest()


@pytest.fixture(autouse=True)
def limits(settings: Any) -> None:
    settings.GPGPU = {**settings.GPGPU, "CHECKPOINT_MAX_BYTES": 64 * 1024, "CHECKPOINT_UPLOAD_GRACE_S": 60}


def running_lease(**fields: Any) -> Lease:
    fields.setdefault("checkpoint_dir", "/work/ckpt")
    return placed_lease(started=True, interruptible=True, **fields)


def begin(client: APIClient, lease_id: int, size: int = len(ARCHIVE), sha256: str = SHA) -> Any:
    return client.post(f"{API}leases/{lease_id}/checkpoint/upload", {"size": size, "sha256": sha256}, format="json")


def commit(client: APIClient, lease_id: int, token: str) -> Any:
    return client.post(f"{API}leases/{lease_id}/checkpoint/commit", {"token": token}, format="json")


def put(answer: dict[str, Any], data: bytes = ARCHIVE) -> requests.Response:
    """PUT `data` to the pre-signed URL as the agent does: with exactly the headers named."""
    headers = dict(answer["headers"])
    headers["Content-Length"] = str(len(data))
    return requests.put(answer["url"], data=data, headers=headers, timeout=10)


def test_the_agent_uploads_to_the_store_commits_and_the_next_lease_restores_from_it(s3_store: S3Store) -> None:
    lease = running_lease()
    machine = agent_client(lease.machine)
    started = begin(machine, lease.pk)
    assert started.status_code == 201, started.content
    answer = started.json()
    url = urlsplit(answer["url"])
    assert f"{url.scheme}://{url.netloc}" == s3_store.endpoint
    assert url.path.startswith(f"/{s3_store.bucket}/job-{lease.job_id}/")
    query = parse_qs(url.query)
    # The size and the SHA-256 are part of the signature: the store refuses a PUT of anything else.
    assert query["X-Amz-SignedHeaders"] == ["content-length;content-type;host;x-amz-checksum-sha256"]
    assert query["X-Amz-Expires"] == ["120"]
    assert answer["headers"]["Content-Length"] == str(len(ARCHIVE))
    assert "Authorization" not in answer["headers"]
    assert not Checkpoint.objects.exists()  # nothing is the job's until the commit

    assert put(answer).status_code == 200
    committed = commit(machine, lease.pk, answer["token"])
    assert committed.status_code == 201, committed.content
    assert committed.json() == {"lease_id": lease.pk, "size": len(ARCHIVE), "sha256": SHA}
    row = Checkpoint.objects.get(job_id=lease.job_id)
    assert s3_store.keys() == [row.storage_key]
    assert Event.objects.filter(job_id=lease.job_id, kind="checkpoint.stored").count() == 1
    # Committing again (a retry whose answer was lost) changes nothing.
    assert commit(machine, lease.pk, answer["token"]).json()["sha256"] == SHA
    assert Checkpoint.objects.get().pk == row.pk
    assert s3_store.keys() == [row.storage_key]

    # The owner comes back; the job's next lease, on another machine, is told where to fetch it.
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    second = placed_lease(job=Job.objects.get(pk=lease.job_id))
    gpu = second.gpus.get()
    (order,) = heartbeat(agent_client(second.machine), [gpu_entry(gpu.uuid, gpu.index)]).json()["start"]
    assert order["checkpoint"]["upload_direct"] is True
    fetched = requests.get(order["checkpoint"]["restore_url"], timeout=10)
    assert fetched.content == ARCHIVE
    assert order["checkpoint"]["restore_sha256"] == SHA

    # The renter downloads it by a pre-signed URL too.
    renter = APIClient()
    renter.credentials(HTTP_AUTHORIZATION=f"Token {token_for(lease.job.renter.user)}")
    redirect = renter.get(f"/api/v1/jobs/{lease.job_id}/checkpoint/")
    assert redirect.status_code == 302
    assert requests.get(redirect["Location"], timeout=10).content == ARCHIVE


def test_a_newer_checkpoint_replaces_the_old_one_and_its_object(
    s3_store: S3Store, django_capture_on_commit_callbacks: Any
) -> None:
    lease = running_lease()
    machine = agent_client(lease.machine)
    first = begin(machine, lease.pk).json()
    put(first)
    assert commit(machine, lease.pk, first["token"]).status_code == 201
    newer = b"a later state" * 10
    second = begin(machine, lease.pk, len(newer), hashlib.sha256(newer).hexdigest()).json()
    put(second, newer)
    with django_capture_on_commit_callbacks(execute=True):  # the old object goes once the swap commits
        assert commit(machine, lease.pk, second["token"]).status_code == 201
    row = Checkpoint.objects.get()
    assert row.size == len(newer)
    assert s3_store.keys() == [row.storage_key]


def test_other_bytes_in_the_store_are_refused_at_the_commit_and_deleted(s3_store: S3Store) -> None:
    """A store that kept other bytes than the ones declared (this one checks no x-amz-checksum;
    S3 and MinIO refuse such a PUT themselves): the commit reads the object back and refuses it."""
    lease = running_lease()
    machine = agent_client(lease.machine)
    answer = begin(machine, lease.pk).json()
    tampered = ARCHIVE[:-1] + b"!"  # same size, other bytes
    assert put(answer, tampered).status_code == 200
    refused = commit(machine, lease.pk, answer["token"])
    assert (refused.status_code, refused.json()["code"]) == (400, "checkpoint_hash_mismatch")
    assert not Checkpoint.objects.exists()
    assert s3_store.keys() == []


def test_another_size_in_the_store_is_refused_at_the_commit(s3_store: S3Store) -> None:
    lease = running_lease()
    machine = agent_client(lease.machine)
    answer = begin(machine, lease.pk).json()
    requests.put(answer["url"], data=ARCHIVE + b"more", headers={"Content-Type": "application/x-tar"}, timeout=10)
    refused = commit(machine, lease.pk, answer["token"])
    assert (refused.status_code, refused.json()["code"]) == (400, "checkpoint_hash_mismatch")
    assert s3_store.keys() == []


def test_a_commit_with_nothing_uploaded_is_refused(s3_store: S3Store) -> None:
    lease = running_lease()
    machine = agent_client(lease.machine)
    answer = begin(machine, lease.pk).json()
    refused = commit(machine, lease.pk, answer["token"])
    assert (refused.status_code, refused.json()["code"]) == (400, "checkpoint_not_uploaded")
    assert not Checkpoint.objects.exists()


def test_a_token_commits_only_its_own_lease_on_its_own_machine(s3_store: S3Store) -> None:
    """A machine replaying another lease's token, or its own token on another lease of its own,
    or a token it wrote itself naming another job's object: all refused, nothing stored."""
    victim = running_lease(machine=machine_with_gpus(count=2), gpus=1)
    victim_answer = begin(agent_client(victim.machine), victim.pk).json()
    put(victim_answer)
    attacker = running_lease()
    attacker_client = agent_client(attacker.machine)
    stolen = commit(attacker_client, attacker.pk, victim_answer["token"])
    assert (stolen.status_code, stolen.json()["code"]) == (400, "checkpoint_upload_invalid")
    # Its own machine, another lease of its own: the token names the lease it was given for.
    other_lease = placed_lease(machine=victim.machine, started=True, interruptible=True, checkpoint_dir="/work/ckpt")
    moved = commit(agent_client(victim.machine), other_lease.pk, victim_answer["token"])
    assert (moved.status_code, moved.json()["code"]) == (400, "checkpoint_upload_invalid")
    # A token made up by the machine, naming the victim's object for its own lease.
    key = urlsplit(victim_answer["url"]).path.split("/", 2)[2]
    forged = signing.dumps(
        {"machine": attacker.machine_id, "lease": attacker.pk, "key": key, "size": len(ARCHIVE), "sha256": SHA},
        salt="not the marketplace's",
    )
    made_up = commit(attacker_client, attacker.pk, forged)
    assert (made_up.status_code, made_up.json()["code"]) == (400, "checkpoint_upload_invalid")
    assert not Checkpoint.objects.exists()


def test_no_url_for_a_lease_that_may_not_write_or_an_archive_over_the_limit(s3_store: S3Store) -> None:
    lease = running_lease()
    machine = agent_client(lease.machine)
    over = begin(machine, lease.pk, size=64 * 1024 + 1)
    assert (over.status_code, over.json()["code"]) == (400, "checkpoint_too_large")
    assert begin(machine, lease.pk, sha256="XYZ").status_code == 400
    other = running_lease()
    assert begin(agent_client(other.machine), lease.pk).status_code == 404  # another machine's lease
    no_dir = placed_lease(started=True, interruptible=True)
    refused = begin(agent_client(no_dir.machine), no_dir.pk)
    assert (refused.status_code, refused.json()["code"]) == (409, "checkpoint_not_accepted")
    # A renter's token is not a machine's.
    renter = APIClient()
    renter.credentials(HTTP_AUTHORIZATION=f"Token {token_for(RenterFactory().user)}")
    assert begin(renter, lease.pk).status_code in (401, 403)


def test_a_lease_that_ended_long_ago_cannot_commit_what_it_uploaded(s3_store: S3Store, settings: Any) -> None:
    lease = running_lease()
    machine = agent_client(lease.machine)
    answer = begin(machine, lease.pk).json()
    put(answer)
    settings.GPGPU = {**settings.GPGPU, "CHECKPOINT_UPLOAD_GRACE_S": 0}
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    refused = commit(machine, lease.pk, answer["token"])
    assert (refused.status_code, refused.json()["code"]) == (409, "checkpoint_not_accepted")
    assert not Checkpoint.objects.exists()


def test_with_direct_uploads_off_or_local_files_uploads_go_through_the_marketplace(
    s3_store: S3Store, settings: Any
) -> None:
    settings.GPGPU = {**settings.GPGPU, "CHECKPOINT_DIRECT_UPLOAD": False}
    lease = running_lease()
    refused = begin(agent_client(lease.machine), lease.pk)
    assert (refused.status_code, refused.json()["code"]) == (409, "checkpoint_not_accepted")
    gpu = placed_lease(checkpoint_dir="/work/ckpt")
    (order,) = heartbeat(agent_client(gpu.machine), [gpu_entry(g.uuid, g.index) for g in gpu.gpus.all()]).json()[
        "start"
    ]
    assert order["checkpoint"]["upload_direct"] is False
    assert order["checkpoint"]["upload_url"] == f"leases/{gpu.pk}/checkpoint"
    # And the marketplace's own PUT still stores into the bucket.
    stored = agent_client(lease.machine).generic(
        "PUT",
        f"{API}leases/{lease.pk}/checkpoint",
        ARCHIVE,
        content_type="application/x-tar",
        HTTP_X_CHECKPOINT_SHA256=SHA,
    )
    assert stored.status_code == 201, stored.content
    assert s3_store.keys() == [Checkpoint.objects.get().storage_key]


def test_a_machine_gets_a_bounded_number_of_upload_urls_per_lease(s3_store: S3Store) -> None:
    """Each pre-signed PUT may leave an object of up to CHECKPOINT_MAX_BYTES in the store, committed
    or not, until the hourly sweep: a machine asking for URLs in a loop filled the bucket at the
    marketplace's cost."""
    from jobs.checkpoints import DIRECT_UPLOADS_PER_LEASE

    lease = running_lease()
    machine = agent_client(lease.machine)
    given = [begin(machine, lease.pk) for _ in range(DIRECT_UPLOADS_PER_LEASE)]
    assert [r.status_code for r in given] == [201] * DIRECT_UPLOADS_PER_LEASE
    for answer in given:
        assert put(answer.json()).status_code == 200
    spent = begin(machine, lease.pk)
    assert (spent.status_code, spent.json()["code"]) == (409, "checkpoint_uploads_spent")
    assert len(s3_store.keys()) == DIRECT_UPLOADS_PER_LEASE
    # The URLs given still commit (the agent's last try is not lost), and the job's next lease
    # starts with a budget of its own.
    assert commit(machine, lease.pk, given[-1].json()["token"]).status_code == 201
    lease_end(lease_id=lease.pk, reason=Lease.EndReason.PREEMPTED_BY_OWNER, actor="test")
    second = placed_lease(job=Job.objects.get(pk=lease.job_id), started=True)
    assert begin(agent_client(second.machine), second.pk).status_code == 201
