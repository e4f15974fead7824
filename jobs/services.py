"""Writes for jobs and leases: the only place their status changes. What the agents report is
ingested by jobs.ingestion, the stuck-lease sweep is jobs.sweeps, and the leases of a machine as
providers asks for them are jobs.machine_leases; all three change status through this module.

Every transition is a conditional UPDATE (`… WHERE status IN (<allowed>)`): whoever updates
first wins, and a racing worker's update matches no row and does nothing. Each successful
transition appends an Event to the audit trail in the same transaction.

A GPU's state is not written here: providers.services owns it. A lease's GPUs are shown
`leased` (gpus_lease) and given back (gpus_release) in the transaction that writes the lease,
in that module's lock order (machine, leases, then GPUs in primary-key order), so that a
heartbeat can neither undo an assignment nor deadlock with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypedDict

from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.storage import Storage, storages
from django.db import IntegrityError, connection, models, transaction
from django.db.models import F
from django.utils import timezone

from core.lookups import decimal_array, int_array
from gpgpu_agent.protocol import IMAGE_REF, REFUSED_ENV, image_registry_refusal
from jobs import doorbell
from jobs.errors import IdempotencyKeyReused, InvalidTransition, ValidationFailed
from jobs.models import Checkpoint, Event, Job, Lease, LeaseGPU, LogChunk, Renter
from jobs.signals import lease_ended
from providers import services as providers_services
from providers.models import GPU, region_key

logger = logging.getLogger(__name__)

MAX_GPUS_PER_JOB = 16
MAX_DURATION_S = 30 * 24 * 3600
MAX_PRICE = Decimal("1000")
# A checkpoint promise: at least once a minute would be noise, more than a day apart no promise.
MIN_CHECKPOINT_INTERVAL_S = 60
MAX_CHECKPOINT_INTERVAL_S = 24 * 3600

ER = Lease.EndReason
JS = Job.Status


# --- audit ----------------------------------------------------------------------------------


def event_record(
    *,
    job_id: int,
    kind: str,
    actor: str,
    lease_id: int | None = None,
    from_status: str = "",
    to_status: str = "",
    detail: dict[str, object] | None = None,
    idempotency_key: str | None = None,
) -> Event:
    return Event.objects.create(
        job_id=job_id,
        lease_id=lease_id,
        kind=kind,
        actor=actor,
        from_status=from_status,
        to_status=to_status,
        detail=detail or {},
        idempotency_key=idempotency_key,
    )


def _job_move(
    *,
    job_id: int,
    from_statuses: Iterable[str],
    to: str,
    actor: str,
    kind: str,
    lease_id: int | None = None,
    detail: dict[str, object] | None = None,
    **fields: object,
) -> bool:
    """Move a job from one of `from_statuses` to `to`; False (and no change) if it was not in
    one of them. The caller holds a transaction."""
    from_statuses = list(from_statuses)
    current = Job.objects.filter(pk=job_id).values_list("status", flat=True).first()
    if current not in from_statuses:
        return False
    if to in Job.TERMINAL:
        fields.setdefault("finished_at", timezone.now())
    updated = Job.objects.filter(pk=job_id, status=current).update(status=to, updated_at=timezone.now(), **fields)
    if not updated:
        return False
    if to in Job.TERMINAL and not fields.get("keep_checkpoint"):
        checkpoints_delete(job_id=job_id)
    event_record(
        job_id=job_id, lease_id=lease_id, kind=kind, actor=actor, from_status=current, to_status=to, detail=detail
    )
    return True


# --- checkpoints' files (jobs.checkpoints) --------------------------------------------------

CHECKPOINT_STORAGE = "checkpoints"


def checkpoint_storage() -> Storage:
    """The storage of jobs' checkpoints (settings.STORAGES["checkpoints"])."""
    return storages[CHECKPOINT_STORAGE]


def checkpoint_file_delete(key: str) -> None:
    """Delete a checkpoint's file; a failure is logged (its row is gone: no lease can read it)."""
    try:
        checkpoint_storage().delete(key)
    except Exception as exc:
        logger.warning("could not delete checkpoint file %s: %s", key, exc)


def checkpoints_delete(*, job_id: int) -> None:
    """A job has ended (or the checkpoint its renter kept has expired): its checkpoint goes, the
    row now, the file once the caller's transaction commits."""
    for key in list(Checkpoint.objects.filter(job_id=job_id).values_list("storage_key", flat=True)):
        transaction.on_commit(functools.partial(checkpoint_file_delete, key))
    Checkpoint.objects.filter(job_id=job_id).delete()


# --- jobs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    gpu_count: int
    max_price_per_gpu_hour: Decimal
    expected_duration_s: int
    max_duration_s: int | None = None
    kind: str = Job.Kind.CONTAINER
    image: str = ""
    command: Sequence[str] = ()
    env: dict[str, str] | None = None
    name: str = ""
    min_vram_mb: int = 0
    allowed_models: Sequence[str] = ()
    region: str = ""
    interruptible: bool = True
    # Seconds between the job's checkpoints; None: an interruption loses all its work.
    checkpoint_interval_s: int | None = None
    # A directory under /work that follows the job from lease to lease (jobs.checkpoints); "": none.
    checkpoint_dir: str = ""


# The job's writable view (both runners mount the lease's work directory there).
WORKSPACE = "/work"
MAX_CHECKPOINT_DIR_CHARS = 200
_CHECKPOINT_DIR_RE = re.compile(r"^/work(/[A-Za-z0-9._@+-]+)+$")


def checkpoint_dir_problem(value: str) -> str | None:
    """Why `value` is not a valid checkpoint_dir, or None: an absolute path under /work, in
    normal form (no `.`, `..`, `//` or trailing `/`), of letters, digits and `._@+-`."""
    if len(value) > MAX_CHECKPOINT_DIR_CHARS:
        return f"must be at most {MAX_CHECKPOINT_DIR_CHARS} characters"
    if not _CHECKPOINT_DIR_RE.fullmatch(value) or posixpath.normpath(value) != value:
        return f"must be a directory under {WORKSPACE}, like /work/checkpoints (no '.' or '..' parts)"
    if any(part in {".", ".."} for part in value.split("/")):
        return "must not have '.' or '..' parts"
    if value.split("/")[2].startswith(".gpgpu"):
        return "must not be the agent's own /work/.gpgpu… files"
    return None


def _validate_spec(spec: JobSpec) -> None:
    problems: dict[str, str] = {}
    if not 1 <= spec.gpu_count <= MAX_GPUS_PER_JOB:
        problems["gpu_count"] = f"must be between 1 and {MAX_GPUS_PER_JOB}"
    if not Decimal("0") < spec.max_price_per_gpu_hour <= MAX_PRICE:
        problems["max_price_per_gpu_hour"] = f"must be above 0 and at most {MAX_PRICE}"
    if not 1 <= spec.expected_duration_s <= MAX_DURATION_S:
        problems["expected_duration_s"] = f"must be between 1 and {MAX_DURATION_S} seconds"
    max_duration = spec.max_duration_s if spec.max_duration_s is not None else spec.expected_duration_s
    if not spec.expected_duration_s <= max_duration <= MAX_DURATION_S:
        problems["max_duration_s"] = f"must be at least expected_duration_s and at most {MAX_DURATION_S}"
    if spec.kind not in Job.Kind.values:
        problems["kind"] = f"must be one of {', '.join(Job.Kind.values)}"
    if spec.kind == Job.Kind.CONTAINER and not spec.image:
        problems["image"] = "a container job needs an image"
    elif spec.kind == Job.Kind.CONTAINER and not IMAGE_REF.match(spec.image):
        # Every agent refuses it (failed_to_start): placed, it would only take GPUs attempt after attempt.
        problems["image"] = "must be a container image reference (repository[:tag][@digest])"
    elif spec.kind == Job.Kind.CONTAINER and (local := image_registry_refusal(spec.image)):
        problems["image"] = f"{local}: pull it from a public registry"
    if spec.kind == Job.Kind.CONTAINER and (refused := [name for name in REFUSED_ENV if name in (spec.env or {})]):
        problems["env"] = f"a container job may not set {refused[0]} (it would reach past the leased GPUs)"
    if spec.kind == Job.Kind.PROCESS and not spec.command:
        problems["command"] = "a process job needs a command"
    if not all(isinstance(part, str) for part in spec.command):
        problems["command"] = "must be a list of strings"
    if spec.min_vram_mb < 0:
        problems["min_vram_mb"] = "must not be negative"
    checkpoint = spec.checkpoint_interval_s
    if checkpoint is not None and not MIN_CHECKPOINT_INTERVAL_S <= checkpoint <= MAX_CHECKPOINT_INTERVAL_S:
        problems["checkpoint_interval_s"] = (
            f"must be between {MIN_CHECKPOINT_INTERVAL_S} and {MAX_CHECKPOINT_INTERVAL_S} seconds, or null "
            "(an interruption loses all the work)"
        )
    if spec.checkpoint_dir:
        problem = checkpoint_dir_problem(spec.checkpoint_dir)
        if problem is not None:
            problems["checkpoint_dir"] = problem
    if problems:
        field, message = next(iter(problems.items()))
        raise ValidationFailed(f"{field}: {message}", extra={"fields": {k: [v] for k, v in problems.items()}})


def _fingerprint(spec: JobSpec) -> str:
    data = {k: (str(v) if isinstance(v, Decimal) else v) for k, v in spec.__dict__.items()}
    data["command"] = list(spec.command)
    data["allowed_models"] = list(spec.allowed_models)
    if data.get("checkpoint_interval_s") is None:
        # Left out when absent, so requests made before the field existed keep their fingerprint.
        data.pop("checkpoint_interval_s", None)
    if not data.get("checkpoint_dir"):
        data.pop("checkpoint_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def job_create(*, renter: Renter, spec: JobSpec, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Submit a job. With an idempotency key, a repeat of the same request returns the job
    created the first time (and False); the same key with a different body is refused.

    This creates the job only: a renter's submission goes through marketplace.submit.job_submit,
    which reserves the job's budget in the same transaction (billing sits above jobs)."""
    _validate_spec(spec)
    fingerprint = _fingerprint(spec)
    if idempotency_key:
        existing = Job.objects.filter(renter=renter, idempotency_key=idempotency_key).first()
        if existing is not None:
            return _idempotent_match(existing, fingerprint), False
    try:
        with transaction.atomic():
            job = Job.objects.create(
                renter=renter,
                name=spec.name,
                kind=spec.kind,
                image=spec.image,
                command=list(spec.command),
                env=dict(spec.env or {}),
                gpu_count=spec.gpu_count,
                min_vram_mb=spec.min_vram_mb,
                allowed_models=sorted(set(spec.allowed_models)),
                region=region_key(spec.region),
                max_price_per_gpu_hour=spec.max_price_per_gpu_hour,
                expected_duration_s=spec.expected_duration_s,
                max_duration_s=spec.max_duration_s if spec.max_duration_s is not None else spec.expected_duration_s,
                interruptible=spec.interruptible,
                checkpoint_interval_s=spec.checkpoint_interval_s,
                checkpoint_dir=spec.checkpoint_dir,
                idempotency_key=idempotency_key or None,
                request_fingerprint=fingerprint,
            )
            event_record(job_id=job.pk, kind="job.created", actor=f"renter:{renter.pk}", to_status=JS.PENDING)
    except IntegrityError:
        if not idempotency_key:
            raise
        # A concurrent request with the same key won the insert.
        existing = Job.objects.get(renter=renter, idempotency_key=idempotency_key)
        return _idempotent_match(existing, fingerprint), False
    return job, True


def _idempotent_match(job: Job, fingerprint: str) -> Job:
    if job.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused("This Idempotency-Key was already used for a different job request; use a new key.")
    return job


CODE_NO_CHECKPOINT_DIR = "no_checkpoint_dir"


def job_cancel(*, job: Job, actor: str, keep_checkpoint: bool = False) -> Job:
    """Cancel a job that has not finished. A pending job is cancelled at once, and so is a
    scheduled one whose start order no agent has been sent; otherwise the job is cancelled and
    its lease asked to stop (the agent is told on its next heartbeat, and the lease ends, billed
    for what ran, when the agent reports the exit). Cancelling a cancelled job is harmless; a
    finished one is refused.

    keep_checkpoint: the job's checkpoint is not deleted with it but kept for its renter to
    download, CHECKPOINT_KEEP_AFTER_CANCEL_H hours after the job ended (jobs.checkpoints), and a
    running lease's agent is told to upload the checkpoint directory as it stops the job. Raises
    ValidationFailed `no_checkpoint_dir` for a job that declares no checkpoint_dir, and
    InvalidTransition for one cancelled earlier without keeping it (its checkpoint is gone)."""
    if keep_checkpoint and not job.checkpoint_dir:
        raise ValidationFailed(
            f"Job {job.pk} declares no checkpoint_dir: it has no checkpoint to keep.", code=CODE_NO_CHECKPOINT_DIR
        )
    with transaction.atomic():
        moved = _job_move(
            job_id=job.pk,
            from_statuses=[JS.PENDING, JS.SCHEDULED, JS.RUNNING],
            to=JS.CANCELLED,
            actor=actor,
            kind="job.cancelled",
            detail={"keep_checkpoint": True} if keep_checkpoint else None,
            keep_checkpoint=keep_checkpoint,
        )
        if moved:
            # The lease rows are locked before their start_sent_at is read: a heartbeat sending
            # the start order holds them (jobs.machine_leases), so either it has sent the order
            # and the agent is asked to stop (and the seconds it ran are billed), or it skips
            # this lease and it ends here, never started.
            for lease in Lease.objects.select_for_update().filter(job_id=job.pk, status__in=Lease.ACTIVE):
                if lease.status == Lease.Status.ASSIGNED and lease.start_sent_at is None:
                    lease_end(lease_id=lease.pk, reason=ER.CANCELLED, actor=actor)
                else:
                    lease_request_stop(
                        lease_id=lease.pk, reason=ER.CANCELLED, actor=actor, save_checkpoint=keep_checkpoint
                    )
    job.refresh_from_db()
    if not moved and job.status != JS.CANCELLED:
        raise InvalidTransition(f"Job {job.pk} is already {job.status} and cannot be cancelled.")
    if not moved and keep_checkpoint and not job.keep_checkpoint:
        raise InvalidTransition(
            f"Job {job.pk} was cancelled without keeping its checkpoint, which was deleted when it ended."
        )
    return job


def job_set_unplaced(*, reasons: dict[int, tuple[str, str]], now: datetime | None = None) -> None:
    """Record why pending jobs could not be placed: {job_id: (code, sentence)}.

    A reason is a note, not a state: each batch locks its still-pending jobs in id order and
    skips those another transaction holds (a matcher placing them, a renter cancelling one),
    so recording reasons never waits on a job row. Several matcher workers recording reasons
    for overlapping jobs while others write placements deadlocked on PostgreSQL when each
    UPDATE locked its rows as it met them; a skipped job keeps its last reason until the next
    cycle. One transaction per 1,000 jobs, whatever their reasons (a transaction per reason
    made a cycle's forty reasons forty commits)."""
    now = now or timezone.now()
    job_ids = sorted(reasons)
    for start in range(0, len(job_ids), 1000):
        with transaction.atomic():
            held = (
                Job.objects.filter(pk__any=job_ids[start : start + 1000], status=JS.PENDING)
                .order_by("pk")
                .select_for_update(skip_locked=True)
                .values_list("pk", flat=True)
            )
            by_reason: dict[tuple[str, str], list[int]] = {}
            for job_id in held:
                by_reason.setdefault(reasons[job_id], []).append(job_id)
            for (code, detail), ids in by_reason.items():
                Job.objects.filter(pk__any=ids).update(
                    unplaced_code=code, unplaced_detail=detail[:500], unplaced_checked_at=now
                )


# --- leases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    job_id: int
    machine_id: int
    gpu_ids: tuple[int, ...]
    price_per_gpu_hour: Decimal


def leases_assign(*, placements: Sequence[Placement], actor: str = "matcher", held: bool = False) -> dict[int, int]:
    """Create a lease for each placement and move its job pending → scheduled; returns
    {job id: lease id} of the leases written.

    Preconditions: the caller holds a transaction and row locks on the placements' jobs and
    GPUs (see marketplace.matching). Safety does not rest on the caller alone: a job no longer
    pending is skipped, and the partial unique index on LeaseGPU(gpu) WHERE active refuses a GPU
    already in an active lease (IntegrityError, which rolls the caller's transaction back).
    The GPUs are shown `leased` through providers.services.gpus_lease, the owner of GPU state,
    before their LeaseGPU rows are written (that module's lock order).

    `held`: the caller locked every placement's job (FOR UPDATE, where it read it pending) and
    GPUs in this transaction (the matcher's chunks), so neither is read or locked again here.
    The jobs' move still checks that each is pending.

    On PostgreSQL the leases, their GPUs, the jobs' moves and their `lease.assigned` events are
    one statement, whatever the number of placements (_leases_write_set); elsewhere bulk ORM
    writes (_leases_write_orm). Both write the same rows.
    """
    if not placements:
        return {}
    if not held:
        pending = _jobs_pending(job_ids=[p.job_id for p in placements])
        placements = [p for p in placements if p.job_id in pending]
        if not placements:
            return {}
    # GPU rows before the LeaseGPU rows: the lock order of providers.services.
    providers_services.gpus_lease(
        gpu_ids=[g for p in placements for g in p.gpu_ids],
        held_on={p.machine_id for p in placements} if held else None,
    )
    if connection.vendor == "postgresql":
        written = _leases_write_set(placements=placements, actor=actor)
    else:
        written = _leases_write_orm(placements=placements, actor=actor)
    # The machines' agents hear of their new leases at once (after commit: jobs.doorbell).
    doorbell.ring(p.machine_id for p in placements if p.job_id in written)
    return written


def _jobs_pending(*, job_ids: list[int]) -> set[int]:
    if connection.vendor == "postgresql":  # one array parameter rather than an IN list
        with connection.cursor() as cursor:
            table = connection.ops.quote_name(Job._meta.db_table)
            sql = f"SELECT id FROM {table} WHERE id = ANY(%s::bigint[]) AND status = %s"  # noqa: S608
            cursor.execute(sql, [int_array(job_ids), JS.PENDING])
            return {row[0] for row in cursor.fetchall()}
    pending: set[int] = set()
    for start in range(0, len(job_ids), 1000):
        pending.update(
            Job.objects.filter(pk__in=job_ids[start : start + 1000], status=JS.PENDING).values_list("pk", flat=True)
        )
    return pending


def _assigned_detail(p: Placement) -> dict[str, object]:
    """The `lease.assigned` event's detail."""
    return {"machine_id": p.machine_id, "gpu_ids": list(p.gpu_ids), "price_per_gpu_hour": str(p.price_per_gpu_hour)}


def _leases_write_orm(*, placements: Sequence[Placement], actor: str) -> dict[int, int]:
    """leases_assign's writes as bulk ORM statements (backends other than PostgreSQL)."""
    now = timezone.now()
    leases = Lease.objects.bulk_create(
        [
            Lease(
                job_id=p.job_id,
                machine_id=p.machine_id,
                gpu_count=len(p.gpu_ids),
                price_per_gpu_hour=p.price_per_gpu_hour,
                status=Lease.Status.ASSIGNED,
            )
            for p in placements
        ]
    )
    if any(lease.pk is None for lease in leases):  # backends without RETURNING on bulk insert
        raise RuntimeError("database did not return lease ids on bulk insert")
    LeaseGPU.objects.bulk_create(
        [
            LeaseGPU(lease=lease, gpu_id=g, active=True)
            for lease, p in zip(leases, placements, strict=True)
            for g in p.gpu_ids
        ]
    )
    lease_by_job = {lease.job_id: lease.pk for lease in leases}
    for start in range(0, len(placements), 1000):
        chunk = [p.job_id for p in placements[start : start + 1000]]
        Job.objects.filter(pk__in=chunk, status=JS.PENDING).update(
            status=JS.SCHEDULED,
            attempts=F("attempts") + 1,
            unplaced_code="",
            unplaced_detail="",
            updated_at=now,
        )
    Event.objects.bulk_create(
        [
            Event(
                job_id=p.job_id,
                lease_id=lease_by_job[p.job_id],
                kind="lease.assigned",
                actor=actor,
                from_status=JS.PENDING,
                to_status=JS.SCHEDULED,
                detail=_assigned_detail(p),
            )
            for p in placements
        ]
    )
    return lease_by_job


def _constant_columns(obj: models.Model, *, varying: Iterable[str]) -> tuple[list[str], list[object]]:
    """The quoted columns of obj's table other than its primary key and the `varying` fields,
    with the values an ORM insert of obj would write in them (defaults, auto_now_add): a new
    field of the model is written here without this module knowing it."""
    skip = set(varying)
    columns: list[str] = []
    values: list[object] = []
    for f in obj._meta.concrete_fields:
        if f.primary_key or f.attname in skip or f.name in skip:
            continue
        columns.append(connection.ops.quote_name(str(f.column)))
        values.append(f.get_db_prep_save(f.pre_save(obj, add=True), connection=connection))
    return columns, values


def _fk_checks_by_index(cursor: Any) -> None:
    """Make the foreign-key checks of the rows this transaction writes index scans, whatever
    the planner's statistics say.

    PostgreSQL checks each inserted lease GPU and event against jobs_lease (and every lease
    against jobs_job and providers_machine) at commit, with a plan it caches for the whole
    connection. Planned while jobs_lease looked empty (statistics taken on an empty table,
    autovacuum off or not yet run), that plan was a sequential scan, and every later commit
    scanned the growing table once per row: seen in benchmarks/matching.py, commits growing
    from 18 ms to 1.8 s per chunk of 500 (EXPLAIN through auto_explain: `Seq Scan on
    jobs_lease x` for `SELECT 1 FROM ONLY jobs_lease x WHERE id = $1 FOR KEY SHARE OF x`).
    DISCARD PLANS drops the cached plans so the checks are planned again at this commit, and
    with sequential scans disabled for the rest of this transaction (SET LOCAL) they are
    planned as primary-key index scans, which is what they should be at any size."""
    cursor.execute("SET LOCAL enable_seqscan = off; DISCARD PLANS")  # one round trip


def _leases_write_set(*, placements: Sequence[Placement], actor: str) -> dict[int, int]:
    """leases_assign's writes on PostgreSQL, in one statement: the placements travel as
    arrays (unnest), the jobs move with one UPDATE … WHERE id = ANY(the ids) (a join with the
    placements was planned as a merge join with every pending job), and the leases, their GPUs
    and the events are INSERT … SELECT in data-modifying CTEs, in the placements' order. A lease
    is written only for a job the UPDATE moved from pending."""
    now = timezone.now()
    qn = connection.ops.quote_name
    lease_cols, lease_vals = _constant_columns(
        Lease(status=Lease.Status.ASSIGNED), varying=("job", "machine", "gpu_count", "price_per_gpu_hour")
    )
    gpu_cols, gpu_vals = _constant_columns(LeaseGPU(active=True), varying=("lease", "gpu"))
    event_cols, event_vals = _constant_columns(
        Event(kind="lease.assigned", actor=actor, from_status=JS.PENDING, to_status=JS.SCHEDULED),
        varying=("job", "lease", "detail"),
    )

    def slots(values: list[object]) -> str:
        return "".join(", %s" for _ in values)

    sql = f"""
        WITH p AS (
            SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::int[], %s::numeric[])
                WITH ORDINALITY AS p(job_id, machine_id, gpu_count, price, ord)
            JOIN jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS d(detail, ord) USING (ord)
        ), moved AS (
            UPDATE {qn(Job._meta.db_table)} AS j
            SET status = %s, attempts = j.attempts + 1, unplaced_code = '', unplaced_detail = '', updated_at = %s
            WHERE j.id = ANY(%s::bigint[]) AND j.status = %s
            RETURNING j.id
        ), lease AS (
            INSERT INTO {qn(Lease._meta.db_table)}
                (job_id, machine_id, gpu_count, price_per_gpu_hour, {", ".join(lease_cols)})
            SELECT p.job_id, p.machine_id, p.gpu_count, p.price{slots(lease_vals)}
            FROM p JOIN moved ON moved.id = p.job_id ORDER BY p.ord
            RETURNING id, job_id
        ), lease_gpu AS (
            INSERT INTO {qn(LeaseGPU._meta.db_table)} (lease_id, gpu_id, {", ".join(gpu_cols)})
            SELECT lease.id, g.gpu_id{slots(gpu_vals)}
            FROM unnest(%s::bigint[], %s::bigint[]) WITH ORDINALITY AS g(job_id, gpu_id, ord)
            JOIN lease ON lease.job_id = g.job_id ORDER BY g.ord
        ), event AS (
            INSERT INTO {qn(Event._meta.db_table)} (job_id, lease_id, detail, {", ".join(event_cols)})
            SELECT p.job_id, lease.id, p.detail{slots(event_vals)}
            FROM p JOIN lease ON lease.job_id = p.job_id ORDER BY p.ord
        )
        SELECT job_id, id FROM lease
    """  # noqa: S608 (table and column names come from the models; every value is a parameter)
    job_ids = int_array(p.job_id for p in placements)
    params: list[Any] = [  # arrays as literals, one JSON array of the details (core.lookups.int_array)
        job_ids,
        int_array(p.machine_id for p in placements),
        int_array(len(p.gpu_ids) for p in placements),
        decimal_array(p.price_per_gpu_hour for p in placements),
        json.dumps([_assigned_detail(p) for p in placements]),
        JS.SCHEDULED,
        now,
        job_ids,
        JS.PENDING,
        *lease_vals,
        *gpu_vals,
        int_array(p.job_id for p in placements for _ in p.gpu_ids),
        int_array(g for p in placements for g in p.gpu_ids),
        *event_vals,
    ]
    with connection.cursor() as cursor:
        _fk_checks_by_index(cursor)
        cursor.execute(sql, params)
        return dict(cursor.fetchall())


def lease_mark_started(
    *, lease_id: int, actor: str, at: datetime | None = None, idempotency_key: str | None = None
) -> bool:
    """assigned → running, and its job scheduled → running. Repeating it is harmless (False)."""
    at = at or timezone.now()
    with transaction.atomic():
        updated = Lease.objects.filter(pk=lease_id, status=Lease.Status.ASSIGNED).update(
            status=Lease.Status.RUNNING, started_at=at
        )
        if not updated:
            return False
        lease = Lease.objects.get(pk=lease_id)
        _job_move(
            job_id=lease.job_id,
            from_statuses=[JS.SCHEDULED],
            to=JS.RUNNING,
            actor=actor,
            kind="lease.started",
            lease_id=lease_id,
        )
        if idempotency_key:
            Event.objects.filter(lease_id=lease_id, kind="lease.started", idempotency_key__isnull=True).update(
                idempotency_key=idempotency_key
            )
    return True


def lease_request_stop(*, lease_id: int, reason: str, actor: str, save_checkpoint: bool = False) -> bool:
    """Ask the machine's agent to stop an active lease (told on its next heartbeat). The lease
    ends when the agent reports the exit, with `reason` as its end reason. save_checkpoint: the
    job's renter keeps its checkpoint (job_cancel), so the agent uploads it as it stops the lease;
    the stop order's flag follows from the job (jobs.machine_leases), this notes it in the audit
    trail."""
    with transaction.atomic():
        updated = Lease.objects.filter(pk=lease_id, status__in=Lease.ACTIVE, stop_requested_at__isnull=True).update(
            stop_requested_at=timezone.now(), stop_reason=reason
        )
        if updated:
            lease = Lease.objects.get(pk=lease_id)
            # The stop order is in the machine's next heartbeat reply, not a steady repeat's.
            providers_services.machine_orders_changed(machine_id=lease.machine_id)
            doorbell.ring([lease.machine_id])
            event_record(
                job_id=lease.job_id,
                lease_id=lease_id,
                kind="lease.stop_requested",
                actor=actor,
                detail={"reason": reason, **({"save_checkpoint": True} if save_checkpoint else {})},
            )
    return bool(updated)


# GPU state after a lease ends, by why it ended.
_GPU_STATE_AFTER: dict[str, GPU.State] = {
    ER.PREEMPTED_BY_OWNER: GPU.State.OWNER_BUSY,
    ER.LOST: GPU.State.OFFLINE,
    ER.MACHINE_SUSPENDED: GPU.State.OFFLINE,
    ER.CREDENTIAL_REVOKED: GPU.State.OFFLINE,
}

# Reasons after which an interruptible job goes back to the queue.
_REQUEUE_IF_INTERRUPTIBLE = {ER.PREEMPTED_BY_OWNER, ER.LOST, ER.MACHINE_SUSPENDED, ER.CREDENTIAL_REVOKED}
# Reasons that say nothing about the job itself: retried while attempts remain.
_RETRY = {ER.FAILED_TO_START, ER.START_TIMEOUT}


def lease_end(
    *,
    lease_id: int,
    reason: str,
    actor: str,
    at: datetime | None = None,
    exit_code: int | None = None,
    detail: str = "",
    idempotency_key: str | None = None,
) -> bool:
    """End an active lease and move its job accordingly:

    - succeeded / failed (the job's own exit): the job succeeds or fails with the exit code;
    - preempted_by_owner, lost, machine_suspended, credential_revoked: an interruptible job goes
      back to pending, any other job fails with the reason;
    - failed_to_start, start_timeout: the job goes back to pending while it has attempts left
      (JOB_MAX_ATTEMPTS), then fails;
    - cancelled: the job was cancelled already;
    - max_duration: the job fails.

    If a stop was requested, the agent's report of the exit ends the lease with the requested
    reason. Ending an ended lease is harmless (returns False).
    """
    at = at or timezone.now()
    with transaction.atomic():
        lease = Lease.objects.filter(pk=lease_id).first()
        if lease is None or lease.status == Lease.Status.ENDED:
            return False
        if lease.started_at is not None and at < lease.started_at:
            # A lease cannot end before it started (e.g. a silent machine's last heartbeat came
            # before the started event): it ran for no time.
            at = lease.started_at
        if lease.stop_reason and reason in (ER.SUCCEEDED, ER.FAILED, ER.PREEMPTED_BY_OWNER):
            # The process ended because we asked; billing and the job follow our reason, except
            # that an owner reclaim that raced the stop is still the owner's.
            if reason != ER.PREEMPTED_BY_OWNER:
                reason = lease.stop_reason
        updated = Lease.objects.filter(pk=lease_id, status__in=Lease.ACTIVE).update(
            status=Lease.Status.ENDED,
            end_reason=reason,
            end_detail=detail[:500],
            exit_code=exit_code,
            ended_at=at,
        )
        if not updated:
            return False
        # The machine's next heartbeat reply stops the lease if its agent still lists it.
        providers_services.machine_orders_changed(machine_id=lease.machine_id)
        gpu_ids = list(LeaseGPU.objects.filter(lease_id=lease_id, active=True).values_list("gpu_id", flat=True))
        # GPU rows before the LeaseGPU rows: the lock order of providers.services.
        providers_services.gpus_release(gpu_ids=gpu_ids, state=_GPU_STATE_AFTER.get(reason, GPU.State.IDLE))
        LeaseGPU.objects.filter(lease_id=lease_id, active=True).update(active=False)
        event_record(
            job_id=lease.job_id,
            lease_id=lease_id,
            kind="lease.ended",
            actor=actor,
            from_status=lease.status,
            to_status=Lease.Status.ENDED,
            detail={"reason": reason, "exit_code": exit_code, "detail": detail[:500]},
            idempotency_key=idempotency_key,
        )
        _job_after_lease(lease=lease, reason=reason, exit_code=exit_code, detail=detail, actor=actor)
        lease_ended.send(sender=Lease, lease_id=lease_id, reason=reason, ended_at=at)
    return True


class _JobMoveCommon(TypedDict):
    job_id: int
    from_statuses: list[str]
    actor: str
    lease_id: int


def _job_after_lease(*, lease: Lease, reason: str, exit_code: int | None, detail: str, actor: str) -> None:
    job = Job.objects.get(pk=lease.job_id)
    live: list[str] = [JS.SCHEDULED, JS.RUNNING]
    common: _JobMoveCommon = {"job_id": job.pk, "from_statuses": live, "actor": actor, "lease_id": lease.pk}
    if reason == ER.SUCCEEDED:
        _job_move(**common, to=JS.SUCCEEDED, kind="job.succeeded", exit_code=exit_code)
    elif reason == ER.FAILED:
        _job_move(
            **common,
            to=JS.FAILED,
            kind="job.failed",
            exit_code=exit_code,
            failure_reason=detail or f"exited with code {exit_code}",
        )
    elif reason == ER.MAX_DURATION:
        _job_move(**common, to=JS.FAILED, kind="job.failed", failure_reason="ran past its max_duration_s")
    elif reason in _REQUEUE_IF_INTERRUPTIBLE and job.interruptible:
        _job_move(**common, to=JS.PENDING, kind="job.requeued", detail={"reason": reason})
    elif reason in _REQUEUE_IF_INTERRUPTIBLE:
        _job_move(
            **common,
            to=JS.FAILED,
            kind="job.failed",
            failure_reason=f"lease ended ({reason}) and the job is not interruptible",
        )
    elif reason in _RETRY and job.attempts < settings.GPGPU["JOB_MAX_ATTEMPTS"]:
        _job_move(**common, to=JS.PENDING, kind="job.requeued", detail={"reason": reason, "detail": detail[:500]})
    elif reason in _RETRY:
        _job_move(
            **common,
            to=JS.FAILED,
            kind="job.failed",
            failure_reason=f"could not be started after {job.attempts} attempts ({reason}: {detail[:200]})",
        )
    # CANCELLED: the job was moved by job_cancel already.


def lease_lost_reconcile(
    *,
    lease: Lease,
    type: str,
    exit_code: int | None,
    at: datetime | None,
    detail: str,
    actor: str,
    idempotency_key: str,
) -> None:
    """Record what the agent of a lease declared lost says of its workload's end (an `exited` or
    `preempted_by_owner` event that arrives once its machine is back), instead of refusing it.

    The lease stays ended as lost (its charge is what the marketplace knew), but when the
    workload exited 0 on its own (not stopped by the agent's fence, detail `fenced:`) and its job
    was re-queued by this loss and is still waiting, the job succeeds with that exit instead of
    running again. The caller holds the lease's row lock."""
    event_record(
        job_id=lease.job_id,
        lease_id=lease.pk,
        kind="lease.reported_after_loss",
        actor=actor,
        detail={
            "type": type,
            "exit_code": exit_code,
            "at": at.isoformat() if at is not None else None,
            "detail": detail[:500],
        },
        idempotency_key=idempotency_key,
    )
    finished = type == "exited" and exit_code == 0 and not detail.startswith("fenced:")
    if not finished or Lease.objects.filter(job_id=lease.job_id, pk__gt=lease.pk).exists():
        return
    _job_move(
        job_id=lease.job_id,
        from_statuses=[JS.PENDING],
        to=JS.SUCCEEDED,
        actor=actor,
        kind="job.succeeded",
        lease_id=lease.pk,
        detail={"reason": "exited 0 before its lost lease was reported"},
        exit_code=exit_code,
        unplaced_code="",
        unplaced_detail="",
    )


def leases_end_for_machine(
    *, machine_id: int, reason: str, actor: str, detail: str = "", at: datetime | None = None
) -> int:
    """End every active lease of a machine (it went silent, was suspended, or its credential was
    revoked). Returns how many.

    `at` is when the leases really ended: for a machine that went silent, its last heartbeat,
    so the silent stretch (a provider fault) is never billed."""
    count = 0
    for lease_id in (
        Lease.objects.filter(machine_id=machine_id, status__in=Lease.ACTIVE).order_by("pk").values_list("pk", flat=True)
    ):
        count += lease_end(lease_id=lease_id, reason=reason, actor=actor, detail=detail, at=at)
    return count


def renter_create(*, user: User, display_name: str) -> Renter:
    return Renter.objects.create(user=user, display_name=display_name)


# --- the jobs' output -----------------------------------------------------------------------

LOG_PRUNE_BATCH = 5000


def log_chunks_prune(*, now: datetime | None = None) -> int:
    """Delete the output (LogChunk rows) of jobs that finished more than
    settings.GPGPU["JOB_LOG_RETENTION_H"] hours before `now`; a job still pending, scheduled or
    running keeps all of it. Deletes in batches of LOG_PRUNE_BATCH, each its own statement, so a
    large backlog never holds one long transaction. Returns how many were deleted."""
    cutoff = (now or timezone.now()) - timedelta(hours=settings.GPGPU["JOB_LOG_RETENTION_H"])
    expired = LogChunk.objects.filter(job__status__in=Job.TERMINAL, job__finished_at__lt=cutoff)
    deleted = 0
    while True:
        ids = list(expired.order_by("pk").values_list("pk", flat=True)[:LOG_PRUNE_BATCH])
        if not ids:
            return deleted
        deleted += LogChunk.objects.filter(pk__in=ids).delete()[0]
