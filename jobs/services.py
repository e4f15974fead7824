"""Writes for jobs and leases: the only place their status changes.

Every transition is a conditional UPDATE (`… WHERE status IN (<allowed>)`): whoever updates
first wins, and a racing worker's update matches no row and does nothing. Each successful
transition appends an Event to the audit trail in the same transaction.

A GPU's state is not written here: providers.services owns it. A lease's GPUs are shown
`leased` (gpus_lease) and given back (gpus_release) in the transaction that writes the lease,
in that module's lock order (machine, leases, then GPUs in primary-key order), so that a
heartbeat can neither undo an assignment nor deadlock with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TypedDict, cast

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from core import periodic
from core.timespans import exact_seconds
from gpgpu_agent import protocol as usage_protocol
from jobs.errors import Conflict, IdempotencyKeyReused, InvalidTransition, NotFound, ValidationFailed
from jobs.models import Event, Job, Lease, LeaseGPU, Renter, UsageReport
from providers import services as providers_services
from providers.models import GPU, Machine
from providers.services import usage_signing_chain_id

logger = logging.getLogger(__name__)

MAX_GPUS_PER_JOB = 16
MAX_DURATION_S = 30 * 24 * 3600
MAX_PRICE = Decimal("1000")

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
    event_record(
        job_id=job_id, lease_id=lease_id, kind=kind, actor=actor, from_status=current, to_status=to, detail=detail
    )
    return True


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
    if spec.kind == Job.Kind.PROCESS and not spec.command:
        problems["command"] = "a process job needs a command"
    if not all(isinstance(part, str) for part in spec.command):
        problems["command"] = "must be a list of strings"
    if spec.min_vram_mb < 0:
        problems["min_vram_mb"] = "must not be negative"
    if problems:
        field, message = next(iter(problems.items()))
        raise ValidationFailed(f"{field}: {message}", extra={"fields": {k: [v] for k, v in problems.items()}})


def _fingerprint(spec: JobSpec) -> str:
    data = {k: (str(v) if isinstance(v, Decimal) else v) for k, v in spec.__dict__.items()}
    data["command"] = list(spec.command)
    data["allowed_models"] = list(spec.allowed_models)
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
                region=spec.region,
                max_price_per_gpu_hour=spec.max_price_per_gpu_hour,
                expected_duration_s=spec.expected_duration_s,
                max_duration_s=spec.max_duration_s if spec.max_duration_s is not None else spec.expected_duration_s,
                interruptible=spec.interruptible,
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


def job_cancel(*, job: Job, actor: str) -> Job:
    """Cancel a job that has not finished. A pending job is cancelled at once; a scheduled or
    running one is cancelled and its lease asked to stop (the agent is told on its next
    heartbeat). Cancelling a cancelled job is harmless; a finished one is refused."""
    with transaction.atomic():
        moved = _job_move(
            job_id=job.pk,
            from_statuses=[JS.PENDING, JS.SCHEDULED, JS.RUNNING],
            to=JS.CANCELLED,
            actor=actor,
            kind="job.cancelled",
        )
        if moved:
            for lease in Lease.objects.filter(job_id=job.pk, status__in=Lease.ACTIVE):
                if lease.status == Lease.Status.ASSIGNED:
                    lease_end(lease_id=lease.pk, reason=ER.CANCELLED, actor=actor)
                else:
                    lease_request_stop(lease_id=lease.pk, reason=ER.CANCELLED, actor=actor)
    job.refresh_from_db()
    if not moved and job.status != JS.CANCELLED:
        raise InvalidTransition(f"Job {job.pk} is already {job.status} and cannot be cancelled.")
    return job


def job_set_unplaced(*, reasons: dict[int, tuple[str, str]], now: datetime | None = None) -> None:
    """Record why pending jobs could not be placed: {job_id: (code, sentence)}."""
    now = now or timezone.now()
    by_reason: dict[tuple[str, str], list[int]] = {}
    for job_id, reason in reasons.items():
        by_reason.setdefault(reason, []).append(job_id)
    for (code, detail), ids in by_reason.items():
        for start in range(0, len(ids), 1000):
            Job.objects.filter(pk__in=ids[start : start + 1000], status=JS.PENDING).update(
                unplaced_code=code, unplaced_detail=detail[:500], unplaced_checked_at=now
            )


# --- leases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    job_id: int
    machine_id: int
    gpu_ids: tuple[int, ...]
    price_per_gpu_hour: Decimal


def leases_assign(*, placements: Sequence[Placement], actor: str = "matcher") -> list[Lease]:
    """Create a lease for each placement and move its job pending → scheduled.

    Preconditions: the caller holds a transaction and row locks on the placements' jobs and
    GPUs (see marketplace.matching). Safety does not rest on the caller alone: a job no longer
    pending is skipped, and the partial unique index on LeaseGPU(gpu) WHERE active refuses a GPU
    already in an active lease (IntegrityError, which rolls the caller's transaction back).
    The GPUs are shown `leased` through providers.services.gpus_lease, the owner of GPU state.
    """
    if not placements:
        return []
    now = timezone.now()
    job_ids = [p.job_id for p in placements]
    pending = set(Job.objects.filter(pk__in=job_ids, status=JS.PENDING).values_list("pk", flat=True))
    placements = [p for p in placements if p.job_id in pending]
    gpu_ids = [g for p in placements for g in p.gpu_ids]
    # GPU rows before the LeaseGPU rows: the lock order of providers.services.
    providers_services.gpus_lease(gpu_ids=gpu_ids)
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
    lease_by_job = {lease.job_id: lease for lease in leases}
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
                lease_id=lease_by_job[p.job_id].pk,
                kind="lease.assigned",
                actor=actor,
                from_status=JS.PENDING,
                to_status=JS.SCHEDULED,
                detail={
                    "machine_id": p.machine_id,
                    "gpu_ids": list(p.gpu_ids),
                    "price_per_gpu_hour": str(p.price_per_gpu_hour),
                },
            )
            for p in placements
        ]
    )
    return leases


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


def lease_request_stop(*, lease_id: int, reason: str, actor: str) -> bool:
    """Ask the machine's agent to stop an active lease (told on its next heartbeat). The lease
    ends when the agent reports the exit, with `reason` as its end reason."""
    with transaction.atomic():
        updated = Lease.objects.filter(pk=lease_id, status__in=Lease.ACTIVE, stop_requested_at__isnull=True).update(
            stop_requested_at=timezone.now(), stop_reason=reason
        )
        if updated:
            lease = Lease.objects.get(pk=lease_id)
            event_record(
                job_id=lease.job_id,
                lease_id=lease_id,
                kind="lease.stop_requested",
                actor=actor,
                detail={"reason": reason},
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


# --- the leases of a machine, as providers asks for them (providers.leases) -------------------


def leases_end_of_refused_kinds(*, machine_id: int, kinds: frozenset[str]) -> None:
    """End the machine's assigned leases whose job kind it does not accept (placed before it
    stopped accepting that kind) as `failed_to_start`, so their jobs go back to the queue and
    the agent is never asked to start them. Running leases are the agent's to handle.
    For the heartbeat (providers.services.machine_heartbeat), with the machine row locked."""
    refused = (
        Lease.objects.filter(machine_id=machine_id, status=Lease.Status.ASSIGNED)
        .exclude(job__kind__in=kinds)
        .order_by("pk")
        .values_list("pk", "job__kind")
    )
    for lease_id, kind in refused:
        lease_end(
            lease_id=lease_id,
            reason=Lease.EndReason.FAILED_TO_START,
            actor="marketplace",
            detail=f"the machine no longer accepts {kind} jobs",
        )


def _by_gpu_index(lease_gpu: LeaseGPU) -> int:
    return lease_gpu.gpu.index


def leases_heartbeat_orders(
    *, machine_id: int, listed: set[int], kinds: frozenset[str]
) -> tuple[list[providers_services.LeaseStart], list[providers_services.LeaseStop]]:
    """The heartbeat reply's lease orders for a machine whose agent listed the leases `listed`:
    `start`, its assigned leases without a stop request that the agent did not list, of a kind in
    `kinds`; `stop`, the listed leases that are ended, have a stop request, or are not this
    machine's (reason `unknown_lease`)."""
    start: list[providers_services.LeaseStart] = []
    assigned = (
        Lease.objects.filter(machine_id=machine_id, status=Lease.Status.ASSIGNED, stop_requested_at__isnull=True)
        .exclude(pk__in=listed)
        .select_related("job")
        .prefetch_related("lease_gpus__gpu")
        .order_by("pk")
    )
    for lease in assigned:
        job = lease.job
        if job.kind not in kinds:
            # Renter code of a kind the owner does not allow is never sent (a lease placed while
            # this heartbeat ran; the next one ends it).
            continue
        start.append(
            providers_services.LeaseStart(
                lease_id=lease.pk,
                job_id=job.pk,
                kind=job.kind,
                image=job.image,
                command=list(job.command),
                env=dict(job.env),
                gpu_uuids=[lg.gpu.uuid for lg in sorted(lease.lease_gpus.all(), key=_by_gpu_index) if lg.active],
                max_duration_s=job.max_duration_s,
                price_per_gpu_hour=str(lease.price_per_gpu_hour),
            )
        )
    stop: list[providers_services.LeaseStop] = []
    if listed:
        known = {
            pk: (status, end_reason, stop_requested_at, stop_reason)
            for pk, status, end_reason, stop_requested_at, stop_reason in Lease.objects.filter(
                machine_id=machine_id, pk__in=listed
            ).values_list("pk", "status", "end_reason", "stop_requested_at", "stop_reason")
        }
        for lease_id in sorted(listed):
            if lease_id not in known:
                stop.append(
                    providers_services.LeaseStop(lease_id=lease_id, reason=providers_services.STOP_REASON_UNKNOWN_LEASE)
                )
                continue
            status, end_reason, stop_requested_at, stop_reason = known[lease_id]
            if status == Lease.Status.ENDED:
                stop.append(providers_services.LeaseStop(lease_id=lease_id, reason=end_reason))
            elif stop_requested_at is not None:
                stop.append(providers_services.LeaseStop(lease_id=lease_id, reason=stop_reason))
    return start, stop


class MachineLeases:
    """jobs' side of providers.leases.MachineLeases, registered by jobs.apps."""

    def end_for_machine(
        self, *, machine_id: int, reason: str, actor: str, detail: str = "", at: datetime | None = None
    ) -> int:
        return leases_end_for_machine(machine_id=machine_id, reason=reason, actor=actor, detail=detail, at=at)

    def end_refused_kinds(self, *, machine_id: int, kinds: frozenset[str]) -> None:
        leases_end_of_refused_kinds(machine_id=machine_id, kinds=kinds)

    def active_count(self, *, machine_ids: Sequence[int]) -> int:
        return Lease.objects.filter(machine_id__in=machine_ids, status__in=Lease.ACTIVE).count()

    def active_gpu_ids(self, *, machine_id: int) -> set[int]:
        return set(LeaseGPU.objects.filter(active=True, gpu__machine_id=machine_id).values_list("gpu_id", flat=True))

    def gpu_in_active_lease(self) -> Exists:
        return Exists(LeaseGPU.objects.filter(gpu_id=OuterRef("pk"), active=True))

    def heartbeat_orders(
        self, *, machine_id: int, listed: set[int], kinds: frozenset[str]
    ) -> tuple[list[providers_services.LeaseStart], list[providers_services.LeaseStop]]:
        return leases_heartbeat_orders(machine_id=machine_id, listed=listed, kinds=kinds)


def renter_create(*, user: User, display_name: str) -> Renter:
    return Renter.objects.create(user=user, display_name=display_name)


# --- agent reports: lease events and usage ------------------------------------------------------

AGENT_EVENT_TYPES = usage_protocol.EVENT_TYPES  # the agent's wire contract
# Agents' and the marketplace's clocks may disagree by this much.
AGENT_CLOCK_SKEW = timedelta(seconds=5)
# Ids beyond a bigint cannot exist (and some backends fail on them rather than match nothing).
_BIGINT_MAX = 2**63 - 1


def _agent_event_key(*, lease_id: int, event_id: str) -> str:
    """The Event.idempotency_key of an agent's event. Event ids are unique only per agent, so
    the key is scoped to the lease (hence to one machine); hashing keeps it within 128 chars."""
    return f"agent:{lease_id}:{hashlib.sha256(event_id.encode()).hexdigest()}"


def _clamp(at: datetime | None, *, lower: datetime, upper: datetime) -> datetime:
    if at is None:
        return upper
    return max(lower, min(at, upper))


def lease_event_ingest(
    *,
    machine: Machine,
    lease_id: int,
    event_id: str,
    type: str,
    at: datetime | None,
    exit_code: int | None = None,
    detail: str = "",
    log_tail: str | None = None,
) -> tuple[Lease, bool]:
    """Apply an agent's report about one of its machine's leases; returns (lease, duplicate).

    - `started` (assigned lease) → lease_mark_started;
    - `exited` (running lease) → lease_end with reason succeeded for exit code 0, else failed;
    - `preempted_by_owner` (assigned or running) → lease_end(preempted_by_owner);
    - `failed_to_start` (assigned) → lease_end(failed_to_start), which retries the job while it
      has attempts left.

    Idempotent by `event_id`: its key is stored on the audit Event the transition records, and a
    repeat returns duplicate=True and changes nothing. Raises NotFound for a lease that is not
    this machine's and InvalidTransition for an event the lease's state does not allow. The
    agent's `at` is clamped between the lease's previous transition and now. A non-None
    `log_tail` replaces the lease's stored tail.
    """
    if type not in AGENT_EVENT_TYPES:
        raise ValidationFailed(f"type: must be one of {', '.join(AGENT_EVENT_TYPES)}")
    if type == "exited" and exit_code is None:
        raise ValidationFailed("exit_code: required for an exited event")
    if not 0 < lease_id <= _BIGINT_MAX:
        raise NotFound(f"Lease {lease_id} is not a lease of this machine.")
    actor = f"machine:{machine.pk}"
    key = _agent_event_key(lease_id=lease_id, event_id=event_id)
    now = timezone.now()
    with transaction.atomic():
        # The row lock serialises events of one lease, so the duplicate check below is reliable.
        lease = Lease.objects.select_for_update().filter(pk=lease_id, machine_id=machine.pk).first()
        if lease is None:
            raise NotFound(f"Lease {lease_id} is not a lease of this machine.")
        if Event.objects.filter(idempotency_key=key).exists():
            return lease, True
        status = lease.status
        at = _clamp(at, lower=lease.started_at or lease.created_at, upper=now)
        allowed = {
            "started": [Lease.Status.ASSIGNED],
            "exited": [Lease.Status.RUNNING],
            "preempted_by_owner": [Lease.Status.ASSIGNED, Lease.Status.RUNNING],
            "failed_to_start": [Lease.Status.ASSIGNED],
        }[type]
        if status not in allowed:
            raise InvalidTransition(f"Lease {lease_id} is {status}; a '{type}' event needs it {' or '.join(allowed)}.")
        if type == "started":
            moved = lease_mark_started(lease_id=lease_id, actor=actor, at=at, idempotency_key=key)
            if moved and not Event.objects.filter(idempotency_key=key).exists():
                # The job did not move (so no lease.started event took the key): record one anyway,
                # so that a repeat of this event is recognised.
                event_record(
                    job_id=lease.job_id,
                    lease_id=lease_id,
                    kind="lease.started",
                    actor=actor,
                    from_status=status,
                    to_status=Lease.Status.RUNNING,
                    idempotency_key=key,
                )
        else:
            reason = {
                "exited": ER.SUCCEEDED if exit_code == 0 else ER.FAILED,
                "preempted_by_owner": ER.PREEMPTED_BY_OWNER,
                "failed_to_start": ER.FAILED_TO_START,
            }[type]
            moved = lease_end(
                lease_id=lease_id,
                reason=reason,
                actor=actor,
                at=at,
                exit_code=exit_code,
                detail=detail,
                idempotency_key=key,
            )
        if not moved:
            raise InvalidTransition(f"Lease {lease_id} changed state meanwhile; '{type}' no longer applies.")
        if log_tail is not None:
            Lease.objects.filter(pk=lease_id).update(log_tail=log_tail)
    lease.refresh_from_db()
    return lease, False


@dataclass(frozen=True)
class UsageReportData:
    """One interval of a lease's usage, as the agent signed it. `payload` is the report as
    received, kept for billing's signature check."""

    report_id: str
    period_start: datetime
    period_end: datetime
    gpu_seconds: Decimal
    mean_utilization_pct: float | None = None
    peak_memory_mb: int | None = None
    signature: str = ""
    payload: dict[str, object] | None = None


def _usage_signature_verify(*, machine: Machine, lease_id: int, report: UsageReportData) -> str:
    """The address whose signature over exactly `report`'s fields was verified, or "" when the
    machine has no signing address (an older agent: the report is accepted and recorded as
    unsigned). Raises ValidationFailed `usage_signature_invalid` when the machine has a signing
    address and the report is unsigned, signed by another key, altered after signing, or has a
    value the signed struct cannot carry exactly (a fraction of a second, …)."""
    address = getattr(machine, "signing_address", "") or ""
    if not address:
        return ""
    code = usage_protocol.CODE_USAGE_SIGNATURE_INVALID
    if not report.signature:
        raise ValidationFailed(
            f"This machine signs its usage reports (signing address {address}), but this report has no signature.",
            code=code,
        )
    protocol = usage_protocol
    try:
        struct = protocol.UsageStruct.from_wire(
            lease_id=lease_id,
            report_id=report.report_id,
            period_start=report.period_start,
            period_end=report.period_end,
            gpu_seconds=report.gpu_seconds,
            mean_utilization_pct=report.mean_utilization_pct,
            peak_memory_mb=report.peak_memory_mb,
        )
    except protocol.UnsignableReport as exc:
        raise ValidationFailed(f"The report cannot be checked against its signature: {exc}", code=code) from None
    if not protocol.usage_signature_valid(struct, report.signature, address=address, chain_id=usage_signing_chain_id()):
        raise ValidationFailed(
            f"The signature is not this machine's key ({address}) signing exactly this report's fields "
            f"(EIP-712 UsageReport, chainId {usage_signing_chain_id()}).",
            code=code,
        )
    return address


# Usage reports a lease may send: one per this many seconds of its job's max_duration_s on
# average, plus a few (the agent reports every 60 s by default, and once more when it ends).
USAGE_REPORT_MIN_SPACING_S = 10
USAGE_REPORTS_EXTRA = 10


def usage_reports_max(*, max_duration_s: int) -> int:
    """The most usage reports one lease of a job with this max_duration_s may store."""
    return USAGE_REPORTS_EXTRA + max_duration_s // USAGE_REPORT_MIN_SPACING_S


def usage_report_ingest(*, machine: Machine, lease_id: int, report: UsageReportData) -> tuple[UsageReport, bool]:
    """Store a usage report of one of the machine's leases; returns (report, created).

    A repeated `report_id` for the lease returns the stored report and False, whatever its
    content. Otherwise the period must be positive and lie within the lease (from its start to
    its end, or now, with AGENT_CLOCK_SKEW either side), and gpu_seconds may not exceed the
    period's length times the lease's GPUs (ValidationFailed `usage_period_outside_lease` /
    `usage_gpu_seconds_exceeded`). A period overlapping a report already accepted for the lease
    is refused (Conflict `usage_period_overlaps`), and a lease stores at most
    usage_reports_max(max_duration_s) reports (Conflict `usage_reports_limit`). Raises NotFound
    for a lease that is not this machine's.

    A machine with a signing address must sign every report (EIP-712, see
    _usage_signature_verify): otherwise ValidationFailed `usage_signature_invalid` and nothing
    is stored. The report records the verified signer in `verified_signer` ("" for an unsigned
    report of a machine without a signing address).
    """
    lease = (
        Lease.objects.select_related("job").filter(pk=lease_id, machine_id=machine.pk).first()
        if 0 < lease_id <= _BIGINT_MAX
        else None
    )
    if lease is None:
        raise NotFound(f"Lease {lease_id} is not a lease of this machine.")
    existing = UsageReport.objects.filter(lease_id=lease.pk, report_id=report.report_id).first()
    if existing is not None:
        return existing, False
    if report.period_end <= report.period_start:
        raise ValidationFailed(
            "period_end: must be after period_start", extra={"fields": {"period_end": ["must be after period_start"]}}
        )
    if lease.started_at is None:
        raise ValidationFailed(
            f"Lease {lease.pk} has not started, so it has no usage yet.", code="usage_period_outside_lease"
        )
    lease_end_at = lease.ended_at or timezone.now()
    if report.period_start < lease.started_at - AGENT_CLOCK_SKEW or report.period_end > lease_end_at + AGENT_CLOCK_SKEW:
        raise ValidationFailed(
            f"The period {report.period_start.isoformat()} to {report.period_end.isoformat()} is not within lease "
            f"{lease.pk} ({lease.started_at.isoformat()} to {lease_end_at.isoformat()}).",
            code="usage_period_outside_lease",
        )
    limit = exact_seconds(report.period_end - report.period_start) * lease.gpu_count
    if report.gpu_seconds > limit:
        raise ValidationFailed(
            f"gpu_seconds {report.gpu_seconds} exceeds the period's length times the lease's "
            f"{lease.gpu_count} GPU(s) ({limit}).",
            code="usage_gpu_seconds_exceeded",
        )
    signer = _usage_signature_verify(machine=machine, lease_id=lease.pk, report=report)
    try:
        with transaction.atomic():
            # The lease's row lock serialises its reports: two overlapping ones sent at once
            # cannot both pass the checks below.
            Lease.objects.select_for_update().filter(pk=lease.pk).values_list("pk", flat=True).get()
            if UsageReport.objects.filter(lease_id=lease.pk, report_id=report.report_id).exists():
                return UsageReport.objects.get(lease_id=lease.pk, report_id=report.report_id), False
            overlapping = (
                UsageReport.objects.filter(
                    lease_id=lease.pk, period_start__lt=report.period_end, period_end__gt=report.period_start
                )
                .order_by("period_start")
                .first()
            )
            if overlapping is not None:
                raise Conflict(
                    f"The period {report.period_start.isoformat()} to {report.period_end.isoformat()} overlaps "
                    f"report {overlapping.report_id!r} ({overlapping.period_start.isoformat()} to "
                    f"{overlapping.period_end.isoformat()}) already accepted for lease {lease.pk}.",
                    code="usage_period_overlaps",
                )
            limit_count = usage_reports_max(max_duration_s=lease.job.max_duration_s)
            if UsageReport.objects.filter(lease_id=lease.pk).count() >= limit_count:
                raise Conflict(
                    f"Lease {lease.pk} already has {limit_count} usage reports, the most a lease of at most "
                    f"{lease.job.max_duration_s} s may send (one per {USAGE_REPORT_MIN_SPACING_S} s on average).",
                    code="usage_reports_limit",
                )
            row = UsageReport.objects.create(
                lease=lease,
                report_id=report.report_id,
                period_start=report.period_start,
                period_end=report.period_end,
                gpu_seconds=report.gpu_seconds,
                mean_utilization_pct=report.mean_utilization_pct,
                peak_memory_mb=report.peak_memory_mb,
                signature=report.signature,
                payload=report.payload or {},
                verified_signer=signer,
            )
    except IntegrityError:
        # The same report, sent twice at once: the other request stored it.
        existing = UsageReport.objects.filter(lease_id=lease.pk, report_id=report.report_id).first()
        if existing is None:
            raise
        return existing, False
    return row, True


# --- sweeps ---------------------------------------------------------------------------------

# A lease still running this long after its stop was requested is ended without the agent: it
# hears the request at its next heartbeat (10 s) and stops the workload within its grace (≤ 8 s).
STOP_GRACE_S = 30


@dataclass(frozen=True)
class LeaseSweepResult:
    start_timeouts: int
    stops_requested: int
    ended_after_stop: int

    def as_dict(self) -> dict[str, int]:
        return {
            "start_timeouts": self.start_timeouts,
            "stops_requested": self.stops_requested,
            "ended_after_stop": self.ended_after_stop,
        }


def leases_sweep(*, now: datetime | None = None) -> LeaseSweepResult:
    """Move leases that the agent left stuck:

    - assigned for longer than LEASE_START_TIMEOUT_S: ended with `start_timeout` (the job is
      retried while it has attempts left);
    - running past their job's max_duration_s: asked to stop with reason `max_duration`;
    - still running STOP_GRACE_S after a stop request (whatever its reason): ended with the
      requested reason, as of the request (as of its maximum for max_duration), so that an
      unresponsive agent neither holds the lease nor is paid for the time it ignored the stop.

    Every move goes through lease_end / lease_request_stop, so a concurrent agent report wins or
    loses cleanly and running the sweep twice is harmless. Each lease moves in its own transaction
    (core.periodic.item): one that fails is logged and skipped, and the others' moves stand.
    """
    now = now or timezone.now()
    timeout_s = settings.GPGPU["LEASE_START_TIMEOUT_S"]
    start_timeouts = 0
    for lease_id in (
        Lease.objects.filter(status=Lease.Status.ASSIGNED, created_at__lt=now - timedelta(seconds=timeout_s))
        .order_by("pk")
        .values_list("pk", flat=True)
    ):
        with periodic.item("lease", lease_id):
            start_timeouts += lease_end(
                lease_id=lease_id,
                reason=ER.START_TIMEOUT,
                actor="sweeper",
                detail=f"the agent did not start it within {timeout_s} seconds",
            )

    ended_after_stop = 0
    for lease_id, stop_reason, stop_requested_at, started_at, max_duration_s in (
        Lease.objects.filter(status=Lease.Status.RUNNING, stop_requested_at__lt=now - timedelta(seconds=STOP_GRACE_S))
        .order_by("pk")
        .values_list("pk", "stop_reason", "stop_requested_at", "started_at", "job__max_duration_s")
    ):
        # The agent did not answer: the lease ends when it should have, not when the sweep
        # noticed. Past the maximum nothing is billed; after a stop request (cancel, budget
        # spent, suspension) nothing after the request is.
        end_at = stop_requested_at
        if (stop_reason or ER.MAX_DURATION) == ER.MAX_DURATION and started_at is not None:
            # cast: the filter on stop_requested_at excludes NULL.
            end_at = min(cast(datetime, stop_requested_at), started_at + timedelta(seconds=max_duration_s))
        with periodic.item("lease", lease_id):
            ended_after_stop += lease_end(
                lease_id=lease_id,
                reason=stop_reason or ER.MAX_DURATION,
                actor="sweeper",
                at=end_at,
                detail=f"still running {STOP_GRACE_S} seconds after the stop request; ended as of the request",
            )

    # Durations differ per job, so the deadline is compared here rather than in SQL (portable
    # across PostgreSQL and SQLite); only running leases without a stop request are read.
    stops_requested = 0
    for lease_id, started_at, max_duration_s in (
        Lease.objects.filter(status=Lease.Status.RUNNING, stop_requested_at__isnull=True, started_at__isnull=False)
        .order_by("pk")
        .values_list("pk", "started_at", "job__max_duration_s")
    ):
        if cast(datetime, started_at) + timedelta(seconds=max_duration_s) < now:  # the filter excludes NULL
            with periodic.item("lease", lease_id):
                stops_requested += lease_request_stop(lease_id=lease_id, reason=ER.MAX_DURATION, actor="sweeper")
    return LeaseSweepResult(
        start_timeouts=start_timeouts, stops_requested=stops_requested, ended_after_stop=ended_after_stop
    )
