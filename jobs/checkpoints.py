"""Checkpoints that follow a job from lease to lease (docs/agent-api.md, "Checkpoints").

A job that declares a `checkpoint_dir` (a directory of its view, under /work) has it carried
over: when its lease is stopped under it (the owner comes back, the owner's window closes, the
agent is stopped), the agent sends the job SIGTERM, waits its stop grace, packs the directory as
a tar archive and uploads it here with its SHA-256 before it reports the lease's end; the job's
next lease, on any machine, starts with it restored. Only the newest checkpoint of a job is
kept (Checkpoint, one per job), in the `checkpoints` storage (Django's storage API: local files
by default), under a random key; it is deleted when the job ends.

A renter who cancels a job asking to keep its checkpoint (jobs.services.job_cancel,
keep_checkpoint) has the running lease's agent told to upload it as it stops the job (the stop
order's save_checkpoint), and the checkpoint is kept after the job ended, for
CHECKPOINT_KEEP_AFTER_CANCEL_H hours from then; the hourly sweep deletes it after that.

Who may touch one: an upload is accepted only from the machine of the job's newest lease while
that lease is live or ended less than CHECKPOINT_UPLOAD_GRACE_S ago, and while the job has not
ended, or was cancelled keeping its checkpoint. A download by an agent only by the machine of the
job's live lease; by a renter, of their own job's checkpoint (GET /api/v1/jobs/{id}/checkpoint/).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, Any, Protocol

from django.conf import settings
from django.core import signing
from django.core.files import File
from django.core.files.storage import Storage
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from jobs.errors import Conflict, NotFound, ValidationFailed
from jobs.models import Checkpoint, Job, Lease, Renter
from jobs.services import checkpoint_file_delete, checkpoint_storage, checkpoints_delete, event_record
from providers.services import LeaseCheckpoint

logger = logging.getLogger(__name__)


class Readable(Protocol):
    """A request's body, or a file: read(n) returns at most n bytes, b"" at the end."""

    def read(self, n: int, /) -> bytes: ...


SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_READ_BYTES = 1 << 20

CODE_TOO_LARGE = "checkpoint_too_large"
CODE_HASH_MISMATCH = "checkpoint_hash_mismatch"
CODE_NOT_ACCEPTED = "checkpoint_not_accepted"
CODE_NO_CHECKPOINT = "no_checkpoint"
CODE_UPLOAD_INVALID = "checkpoint_upload_invalid"
CODE_NOT_UPLOADED = "checkpoint_not_uploaded"
CODE_UPLOADS_SPENT = "checkpoint_uploads_spent"

# Pre-signed uploads a lease's machine may ask for: each is an object of up to CHECKPOINT_MAX_BYTES
# the store keeps, committed or not, until the hourly sweep (checkpoint_orphans_delete), so a
# machine asking again and again filled the bucket. The agent uploads a lease's checkpoint once,
# as the lease stops, in at most 3 tries; twice that leaves room for an agent started again.
DIRECT_UPLOADS_PER_LEASE = 6

# What a direct upload's commit carries back (signed by the marketplace, so that an agent can
# commit only the object it was given a URL for): salt of django.core.signing.
_UPLOAD_SALT = "jobs.checkpoints.direct-upload"


def max_bytes() -> int:
    return int(settings.GPGPU["CHECKPOINT_MAX_BYTES"])


def kept_until(job: Job) -> datetime | None:
    """When the checkpoint of a job its renter cancelled keeping it is deleted; None for any other
    job (its checkpoint, if any, goes when it ends)."""
    if not job.keep_checkpoint or job.status != Job.Status.CANCELLED or job.finished_at is None:
        return None
    return job.finished_at + timedelta(hours=int(settings.GPGPU["CHECKPOINT_KEEP_AFTER_CANCEL_H"]))


# --- what a lease's start order says --------------------------------------------------------


def checkpoint_order(*, lease: Lease) -> LeaseCheckpoint | None:
    """The checkpoint part of `lease`'s start order; None when its job declares no directory."""
    job = lease.job
    if not job.checkpoint_dir:
        return None
    url = f"leases/{lease.pk}/checkpoint"
    current = Checkpoint.objects.filter(job_id=job.pk).first()
    restore = None
    if current is not None:
        restore = presigned_get(current.storage_key) or url
    # Resumed: each earlier lease of the job that ran (its workload started).
    resumed = Lease.objects.filter(job_id=job.pk, pk__lt=lease.pk, started_at__isnull=False).count()
    return LeaseCheckpoint(
        dir=job.checkpoint_dir,
        max_bytes=max_bytes(),
        upload_url=url,
        restore_url=restore,
        restore_sha256=current.sha256 if current is not None else "",
        restore_size=current.size if current is not None else 0,
        resume_count=resumed,
        upload_direct=direct_uploads(),
    )


def _signs_urls(storage: Storage) -> bool:
    """Whether `storage` is an S3-compatible bucket that hands out pre-signed URLs (django-storages'
    S3Storage with querystring_auth); local files do not: the agent API serves them."""
    return bool(getattr(storage, "querystring_auth", False)) and hasattr(storage, "bucket_name")


def presigned_get(key: str) -> str | None:
    """A short-lived pre-signed GET URL of the stored archive, when the checkpoints' storage signs
    URLs (valid its querystring_expire seconds); None for one that does not."""
    storage = checkpoint_storage()
    if not _signs_urls(storage):
        return None
    return str(storage.url(key))


def direct_uploads() -> bool:
    """Whether agents upload checkpoints straight to the store (pre-signed PUT, then a commit) rather
    than through `PUT leases/{id}/checkpoint`: a store that signs URLs, unless
    CHECKPOINT_DIRECT_UPLOAD is off (a store that does not check the SHA-256 a PUT declares)."""
    return bool(settings.GPGPU["CHECKPOINT_DIRECT_UPLOAD"]) and _signs_urls(checkpoint_storage())


# --- upload ---------------------------------------------------------------------------------


def _lease_of_machine(*, machine_id: int, lease_id: int) -> Lease:
    lease = Lease.objects.select_related("job").filter(pk=lease_id, machine_id=machine_id).first()
    if lease is None:
        raise NotFound(f"Lease {lease_id} is not a lease of this machine.")
    return lease


def _upload_refusal(lease: Lease) -> str | None:
    """Why the machine of `lease` may not write its job's checkpoint now, or None."""
    job = lease.job
    if not job.checkpoint_dir:
        return "the job keeps no checkpoint"
    if job.status in Job.TERMINAL and kept_until(job) is None:
        return f"the job is {job.status}"
    if Lease.objects.filter(job_id=job.pk, pk__gt=lease.pk).exists():
        return "a later lease of the job has been placed"
    if lease.status == Lease.Status.ENDED:
        grace = timedelta(seconds=int(settings.GPGPU["CHECKPOINT_UPLOAD_GRACE_S"]))
        if lease.ended_at is None or timezone.now() - lease.ended_at > grace:
            return "the lease ended too long ago"
    return None


def _spool(stream: Readable, *, declared: int) -> tuple[IO[bytes], str]:
    """Copy at most `declared` bytes of `stream` to a temporary file, hashing them; raises
    ValidationFailed when the body is shorter than declared (a cut upload)."""
    digest = hashlib.sha256()
    out = tempfile.TemporaryFile()
    left = declared
    while left > 0:
        chunk = stream.read(min(_READ_BYTES, left))
        if not chunk:
            out.close()
            raise ValidationFailed(f"The upload ended {left} bytes short of its Content-Length.")
        digest.update(chunk)
        out.write(chunk)
        left -= len(chunk)
    out.seek(0)
    return out, digest.hexdigest()


def _upload_admitted(*, machine_id: int, lease_id: int, size: int, sha256: str, header: str) -> Lease:
    """The machine's lease `lease_id`, when it may write its job's checkpoint of `size` bytes now;
    raises as checkpoint_upload says."""
    if not SHA256_RE.fullmatch(sha256):
        raise ValidationFailed(f"{header} must be 64 lower-case hex digits.")
    limit = max_bytes()
    if size > limit:
        raise ValidationFailed(
            f"The checkpoint is {size} bytes; a job's checkpoint may be at most {limit}.", code=CODE_TOO_LARGE
        )
    lease = _lease_of_machine(machine_id=machine_id, lease_id=lease_id)
    refusal = _upload_refusal(lease)
    if refusal is not None:
        raise Conflict(f"Lease {lease_id} may not write a checkpoint: {refusal}.", code=CODE_NOT_ACCEPTED)
    return lease


def _new_key(job_id: int) -> str:
    return f"job-{job_id}/{secrets.token_hex(16)}.tar"


def checkpoint_upload(*, machine_id: int, lease_id: int, stream: Readable, size: int, sha256: str) -> Checkpoint:
    """Store the archive `stream` (`size` bytes, SHA-256 `sha256`) as the checkpoint of the job of
    the machine's lease `lease_id`, replacing the job's previous one (its file deleted after
    commit). Raises NotFound for a lease that is not the machine's; Conflict
    `checkpoint_not_accepted` when it may not write it now (module docstring); ValidationFailed
    `checkpoint_too_large` over CHECKPOINT_MAX_BYTES (checked before a byte is read), and
    `checkpoint_hash_mismatch` when the bytes are not the ones the agent hashed."""
    lease = _upload_admitted(
        machine_id=machine_id, lease_id=lease_id, size=size, sha256=sha256, header="X-Checkpoint-SHA256"
    )
    spooled, actual = _spool(stream, declared=size)
    with spooled:
        if not secrets.compare_digest(actual, sha256):
            raise ValidationFailed(
                "The checkpoint's bytes do not match X-Checkpoint-SHA256: it was damaged on the way.",
                code=CODE_HASH_MISMATCH,
            )
        key = checkpoint_storage().save(_new_key(lease.job_id), File(spooled))
    return _store(machine_id=machine_id, lease_id=lease_id, key=key, size=size, sha256=actual)


def _store(*, machine_id: int, lease_id: int, key: str, size: int, sha256: str) -> Checkpoint:
    """Make the stored file `key` the checkpoint of the job of the machine's lease `lease_id`,
    replacing the job's previous one, once more checking that the lease may write it (under the
    job's row lock); the file is deleted when it is refused or anything fails."""
    try:
        job_id = _lease_of_machine(machine_id=machine_id, lease_id=lease_id).job_id
        with transaction.atomic():
            # The job's row lock orders this against its end (which deletes the checkpoint) and
            # against a racing upload of the same job.
            Job.objects.select_for_update().filter(pk=job_id).first()
            lease = _lease_of_machine(machine_id=machine_id, lease_id=lease_id)
            refusal = _upload_refusal(lease)
            if refusal is not None:
                raise Conflict(f"Lease {lease_id} may not write a checkpoint: {refusal}.", code=CODE_NOT_ACCEPTED)
            old = Checkpoint.objects.filter(job_id=lease.job_id).first()
            if old is not None and old.storage_key == key:
                return old  # the same direct upload committed twice at once
            if old is not None:
                old.delete()
                transaction.on_commit(lambda: checkpoint_file_delete(old.storage_key))
            checkpoint = Checkpoint.objects.create(
                job_id=lease.job_id, lease=lease, storage_key=key, size=size, sha256=sha256
            )
            event_record(
                job_id=lease.job_id,
                lease_id=lease.pk,
                kind="checkpoint.stored",
                actor=f"machine:{machine_id}",
                detail={"size": size, "sha256": sha256},
            )
    except BaseException:
        checkpoint_file_delete(key)
        raise
    return checkpoint


# --- direct upload (a store that signs URLs) -------------------------------------------------


@dataclass(frozen=True)
class DirectUpload:
    """Where an agent PUTs a checkpoint itself: `url` (pre-signed, valid `expires_s`), with exactly
    `headers` (the size and SHA-256 are part of the signature: the store refuses other bytes), then
    commits with `token`."""

    url: str
    headers: dict[str, str]
    token: str
    expires_s: int


def _client_and_name(storage: Storage, key: str) -> tuple[Any, str, str]:
    """boto3's client, the bucket and the object's name for the storage's `key` (as
    django-storages' S3Storage.url names it)."""
    from storages.utils import clean_name

    s3: Any = storage
    return s3.connection.meta.client, str(s3.bucket_name), str(s3._normalize_name(clean_name(key)))


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def checkpoint_upload_begin(*, machine_id: int, lease_id: int, size: int, sha256: str) -> DirectUpload:
    """A pre-signed PUT for the checkpoint (`size` bytes, SHA-256 `sha256`) of the job of the
    machine's lease `lease_id`, under a new random key. Content-Length and x-amz-checksum-sha256
    are signed: the store refuses a body of another size (the signature) or other bytes (S3 and
    MinIO answer BadDigest). Raises as checkpoint_upload, Conflict `checkpoint_not_accepted`
    when the store takes uploads through the marketplace only (direct_uploads() false), and
    Conflict `checkpoint_uploads_spent` once the lease was given DIRECT_UPLOADS_PER_LEASE."""
    lease = _upload_admitted(machine_id=machine_id, lease_id=lease_id, size=size, sha256=sha256, header="sha256")
    if not direct_uploads():
        raise Conflict(
            f"This marketplace takes checkpoints through PUT leases/{lease_id}/checkpoint only.",
            code=CODE_NOT_ACCEPTED,
        )
    # Counted in one statement, so that parallel requests cannot pass the bound together.
    counted = Lease.objects.filter(pk=lease.pk, checkpoint_uploads__lt=DIRECT_UPLOADS_PER_LEASE).update(
        checkpoint_uploads=F("checkpoint_uploads") + 1
    )
    if not counted:
        raise Conflict(
            f"Lease {lease_id} has been given {DIRECT_UPLOADS_PER_LEASE} checkpoint upload URLs; it gets no more.",
            code=CODE_UPLOADS_SPENT,
        )
    storage = checkpoint_storage()
    key = _new_key(lease.job_id)
    client, bucket, name = _client_and_name(storage, key)
    expires = int(getattr(storage, "querystring_expire", 120))
    headers = {"Content-Type": "application/x-tar", "Content-Length": str(size), "x-amz-checksum-sha256": _b64(sha256)}
    url = client.generate_presigned_url(
        "put_object",
        Params={
            "Bucket": bucket,
            "Key": name,
            "ContentType": headers["Content-Type"],
            "ContentLength": size,
            "ChecksumSHA256": headers["x-amz-checksum-sha256"],
        },
        ExpiresIn=expires,
        HttpMethod="PUT",
    )
    token = signing.dumps(
        {"machine": machine_id, "lease": lease_id, "key": key, "size": size, "sha256": sha256}, salt=_UPLOAD_SALT
    )
    return DirectUpload(url=str(url), headers=headers, token=token, expires_s=expires)


def _stored_digest(storage: Storage, key: str, size: int) -> str:
    """The SHA-256 (hex) of the stored object `key`, which must be `size` bytes: the store's own
    checksum when it keeps one (it checked the PUT's against the bytes), else read back and hashed.
    Raises ValidationFailed `checkpoint_not_uploaded` when there is no such object."""
    from botocore.exceptions import ClientError

    client, bucket, name = _client_and_name(storage, key)
    try:
        head = client.head_object(Bucket=bucket, Key=name, ChecksumMode="ENABLED")
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            raise ValidationFailed(
                "Nothing was uploaded to the checkpoint's URL (or it expired).", code=CODE_NOT_UPLOADED
            ) from None
        raise
    if int(head.get("ContentLength", -1)) != size:
        return ""  # not the size declared: not the archive
    kept = head.get("ChecksumSHA256")
    if isinstance(kept, str) and "-" not in kept:  # a multipart upload's checksum is of its parts
        try:
            return base64.b64decode(kept, validate=True).hex()
        except binascii.Error:
            return ""
    digest = hashlib.sha256()
    with storage.open(key, "rb") as handle:
        while chunk := handle.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_upload_commit(*, machine_id: int, lease_id: int, token: str) -> Checkpoint:
    """Make the object a direct upload wrote (checkpoint_upload_begin's `token`) the checkpoint of
    the job of the machine's lease `lease_id`, once its size and SHA-256 are the ones declared.
    Raises ValidationFailed `checkpoint_upload_invalid` for a token this marketplace did not give
    this machine for this lease (or older than an hour: the sweep may have deleted its object),
    `checkpoint_not_uploaded` when the store holds nothing under it, `checkpoint_hash_mismatch`
    for other bytes (the object is deleted); and as checkpoint_upload. Committing the same token
    again answers the checkpoint it made."""
    try:
        upload = signing.loads(token, salt=_UPLOAD_SALT, max_age=ORPHAN_MIN_AGE)
    except signing.BadSignature:
        raise ValidationFailed(
            "This upload token was not given for this lease, or has expired.", code=CODE_UPLOAD_INVALID
        ) from None
    if not isinstance(upload, dict) or upload.get("machine") != machine_id or upload.get("lease") != lease_id:
        raise ValidationFailed("This upload token was not given for this lease.", code=CODE_UPLOAD_INVALID)
    key, size, sha256 = str(upload["key"]), int(upload["size"]), str(upload["sha256"])
    done = Checkpoint.objects.filter(storage_key=key, lease_id=lease_id).first()
    if done is not None:
        return done
    _upload_admitted(machine_id=machine_id, lease_id=lease_id, size=size, sha256=sha256, header="sha256")
    storage = checkpoint_storage()
    actual = _stored_digest(storage, key, size)
    if not secrets.compare_digest(actual, sha256):
        checkpoint_file_delete(key)
        raise ValidationFailed(
            "The uploaded checkpoint is not the archive declared (size or SHA-256): it was deleted.",
            code=CODE_HASH_MISMATCH,
        )
    return _store(machine_id=machine_id, lease_id=lease_id, key=key, size=size, sha256=sha256)


# --- download -------------------------------------------------------------------------------


def checkpoint_for_download(*, machine_id: int, lease_id: int) -> Checkpoint:
    """The checkpoint to restore for the machine's live lease `lease_id`. Raises NotFound for a
    lease that is not the machine's, or a job with no checkpoint; Conflict when the lease is no
    longer live (an ended lease's machine reads nothing more of the job)."""
    lease = _lease_of_machine(machine_id=machine_id, lease_id=lease_id)
    if lease.status not in Lease.ACTIVE:
        raise Conflict(f"Lease {lease_id} has ended: its job's checkpoint is no longer this machine's to read.")
    checkpoint = Checkpoint.objects.filter(job_id=lease.job_id).first()
    if checkpoint is None:
        raise NotFound(f"The job of lease {lease_id} has no checkpoint.")
    return checkpoint


def checkpoint_for_renter(*, renter: Renter, job_id: int) -> Checkpoint:
    """The checkpoint of the renter's job `job_id`: the newest one while the job lives, the kept
    one after a cancel that kept it. Raises NotFound for a job that is not the renter's (as every
    renter read does) and for a job with no checkpoint, or whose kept one has expired."""
    checkpoint = Checkpoint.objects.select_related("job").filter(job_id=job_id, job__renter=renter).first()
    if checkpoint is None:
        if not Job.objects.filter(pk=job_id, renter=renter).exists():
            raise NotFound(f"Job {job_id} not found.")
        raise NotFound(f"Job {job_id} has no checkpoint.", code=CODE_NO_CHECKPOINT)
    until = kept_until(checkpoint.job)
    if until is not None and until <= timezone.now():
        raise NotFound(
            f"Job {job_id}'s checkpoint was kept until {until.isoformat()} and is gone.", code=CODE_NO_CHECKPOINT
        )
    return checkpoint


def checkpoint_open(checkpoint: Checkpoint) -> IO[bytes]:
    """The checkpoint's archive, open for reading. Raises NotFound when its file is gone."""
    try:
        return checkpoint_storage().open(checkpoint.storage_key, "rb")
    except FileNotFoundError:
        raise NotFound("The checkpoint's file is gone.") from None


def checkpoint_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(_READ_BYTES):
            yield chunk


# --- the sweep --------------------------------------------------------------------------------

# A stored file younger than this may be an upload whose row is not committed yet: left alone.
ORPHAN_MIN_AGE = timedelta(hours=1)


def checkpoint_orphans_delete(*, now: datetime | None = None) -> int:
    """Delete the checkpoints' files no Checkpoint row names (a deletion that failed when their job
    ended, an upload whose row was never written), once they are ORPHAN_MIN_AGE old, and the rows
    of jobs that have ended (none should be left), except those kept after a cancel, until
    CHECKPOINT_KEEP_AFTER_CANCEL_H hours after the job ended. Returns how many files were
    deleted. For the hourly beat task jobs.tasks.sweep_checkpoints."""
    now = now or timezone.now()
    kept_since = now - timedelta(hours=int(settings.GPGPU["CHECKPOINT_KEEP_AFTER_CANCEL_H"]))
    ended = Checkpoint.objects.filter(job__status__in=Job.TERMINAL).exclude(
        job__status=Job.Status.CANCELLED, job__keep_checkpoint=True, job__finished_at__gt=kept_since
    )
    for job_id in ended.values_list("job_id", flat=True):
        with transaction.atomic():
            checkpoints_delete(job_id=job_id)
    storage = checkpoint_storage()
    known = set(Checkpoint.objects.values_list("storage_key", flat=True))
    deleted = 0
    try:
        folders, _ = storage.listdir("")
    except FileNotFoundError:
        return 0
    for folder in folders:
        if not folder.startswith("job-"):
            continue
        _, files = storage.listdir(folder)
        for name in files:
            key = f"{folder}/{name}"
            if key in known:
                continue
            try:
                if now - storage.get_modified_time(key) < ORPHAN_MIN_AGE:
                    continue
            except (FileNotFoundError, NotImplementedError):
                continue
            checkpoint_file_delete(key)
            deleted += 1
    return deleted
