"""What the agents report of their leases, ingested: lease events (started, exited, preempted,
failed), signed usage reports and chunks of the jobs' output (docs/agent-api.md). Each report is
idempotent by its id, checked against the lease it names (this machine's, its period inside the
lease), and recorded with the lease's transition in one transaction through jobs.services."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from core.locks import lock_key
from core.timespans import exact_seconds
from gpgpu_agent import protocol as usage_protocol
from jobs.errors import Conflict, InvalidTransition, NotFound, ValidationFailed
from jobs.models import Event, Lease, LogChunk, UsageReport
from jobs.services import (
    ER,
    event_record,
    lease_end,
    lease_lost_reconcile,
    lease_mark_started,
)
from providers.models import Machine
from providers.services import usage_signing_chain_id

logger = logging.getLogger(__name__)


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
    agent's `at` is clamped between the lease's previous transition (for `started`, when its
    start was sent: a start cannot be backdated into billed time) and now. A non-None
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
        if status == Lease.Status.ENDED and lease.end_reason == ER.LOST and type in ("exited", "preempted_by_owner"):
            # The agent was cut off long enough for the lease to be declared lost, and now tells
            # how its workload ended: its truth is recorded, never refused, once (a workload ends
            # once; a second account would add audit rows and rewrite the output's tail at will).
            if Event.objects.filter(lease_id=lease_id, kind="lease.reported_after_loss").exists():
                raise InvalidTransition(
                    f"Lease {lease_id} ended as lost and its agent already reported how its workload ended."
                )
            lease_lost_reconcile(
                lease=lease, type=type, exit_code=exit_code, at=at, detail=detail, actor=actor, idempotency_key=key
            )
            if log_tail is not None:
                Lease.objects.filter(pk=lease_id).update(log_tail=log_tail)
            lease.refresh_from_db()
            return lease, False
        # A lease cannot have started before its agent was told to start it (a start is billed
        # from then): one never sent is counted from when its start is reported.
        lower = (lease.start_sent_at or now) if type == "started" else (lease.started_at or lease.created_at)
        at = _clamp(at, lower=lower, upper=now)
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
    if lease.end_reason == ER.LOST and lease.ended_at is not None:
        # A lost lease ends at its machine's last heartbeat, but its cut-off agent may have run
        # the workload up to its fence: that usage is accepted (and billed within the lease).
        lease_end_at = lease.ended_at + timedelta(seconds=settings.GPGPU["LEASE_FENCE_S"])
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


# --- the jobs' output ---------------------------------------------------------------------------

# The most UTF-8 bytes of text one chunk may carry (the agent ships 16 KiB of output per chunk).
MAX_LOG_CHUNK_BYTES = 64 * 1024
# Against a job's bound a chunk counts at least this many bytes, so the bound caps its rows too
# (JOB_LOG_MAX_BYTES / 256 at most).
LOG_CHUNK_MIN_CHARGE = 256
CODE_LOG_CHUNK_TOO_LARGE = "log_chunk_too_large"
# How long after a lease's end (and its job's) its output is still taken: an agent that lost the
# marketplace for less delivers its job's last lines. Not after: a machine wrote into finished
# jobs forever, and into pruned ones (JOB_LOG_RETENTION_H, an hour at least) from an empty bound.
LOG_LATE_S = 3600
CODE_LEASE_LOG_CLOSED = "lease_log_closed"


def log_truncation_notice(*, max_bytes: int) -> str:
    return f"\n[gpgpu: this job's output passed {max_bytes} bytes; the rest is not kept]\n"


def _job_output_lock(job_id: int) -> None:
    """Serialise the job's chunks until this transaction ends (on PostgreSQL; SQLite has one writer
    at a time). Without it, two leases of the job storing a chunk at once could commit the later
    id first: a renter who read it and passed it as the cursor (log_chunks_after) never saw the
    other."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock_key(f"jobs.output.{job_id}")])


@dataclass(frozen=True)
class LogChunkResult:
    """What became of a chunk: `chunk` is the stored row (None when the job's output was already
    cut off before it); `duplicate`: this seq was seen before; `stored`: its text is kept (False:
    it did not fit within JOB_LOG_MAX_BYTES, and a notice saying so is kept in its place, or the
    job's output had already been cut off)."""

    chunk: LogChunk | None
    duplicate: bool
    stored: bool


def lease_log_ingest(
    *, machine: Machine, lease_id: int, seq: int, text: str, at: datetime, truncated: bool = False
) -> LogChunkResult:
    """Store one chunk of the output of one of the machine's leases, for its renter to follow.

    Idempotent by (lease, seq): a repeat answers duplicate=True and changes nothing. Raises
    NotFound for a lease that is not this machine's, ValidationFailed `log_chunk_too_large` for a
    text over MAX_LOG_CHUNK_BYTES, and Conflict `lease_log_closed` for a lease that never started
    on the machine (failed_to_start) or ended, or whose job finished, more than LOG_LATE_S ago
    (the last chunks of a lease may arrive after its end, not for ever). A job keeps at most
    settings.GPGPU["JOB_LOG_MAX_BYTES"] of text, each chunk counted as at least
    LOG_CHUNK_MIN_CHARGE bytes: the first chunk that would pass it is replaced by a notice saying
    so (truncated, stored=False), and later chunks of the job are answered stored=False and
    dropped, so the start of the output is kept and the agent is not made to retry. Only that
    notice cuts the job: a machine's chunk with the notice's text is output like any other. The
    `at` of the agent is clamped to now.

    The lease's row lock serialises its chunks, and a lock per job those of its leases (a late
    chunk of a lease that was lost, and its successor's): so the job's bound holds, and its
    chunks commit in the order of their ids, which the renter's cursor needs."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_LOG_CHUNK_BYTES:
        raise ValidationFailed(
            f"A log chunk carries at most {MAX_LOG_CHUNK_BYTES} bytes of text (UTF-8); this one has {size}.",
            code=CODE_LOG_CHUNK_TOO_LARGE,
        )
    if not 0 < lease_id <= _BIGINT_MAX:
        raise NotFound(f"Lease {lease_id} is not a lease of this machine.")
    max_bytes = int(settings.GPGPU["JOB_LOG_MAX_BYTES"])
    # The notice depends on the bound alone: found among the job's chunks, the job is cut off.
    notice = log_truncation_notice(max_bytes=max_bytes)
    with transaction.atomic():
        lease = (
            Lease.objects.select_for_update(of=("self",))  # the lease's row, not its job's
            .filter(pk=lease_id, machine_id=machine.pk)
            .annotate(job_finished_at=F("job__finished_at"))
            .first()
        )
        if lease is None:
            raise NotFound(f"Lease {lease_id} is not a lease of this machine.")
        existing = LogChunk.objects.filter(lease_id=lease.pk, seq=seq).first()
        if existing is not None:
            cut_here = existing.truncated and existing.text == notice
            return LogChunkResult(chunk=existing, duplicate=True, stored=not cut_here)
        now = timezone.now()
        if lease.end_reason == Lease.EndReason.FAILED_TO_START or any(
            end is not None and now - end > timedelta(seconds=LOG_LATE_S)
            for end in (lease.ended_at, lease.job_finished_at)
        ):
            raise Conflict(
                f"Lease {lease.pk} takes no more output: it never started, or it ended (or its job finished) more "
                f"than {LOG_LATE_S} s ago.",
                code=CODE_LEASE_LOG_CLOSED,
            )
        _job_output_lock(lease.job_id)
        if truncated and text == notice:
            # The job's cut is the marketplace's, never the machine's to declare: a chunk made to
            # look like the notice silenced every later lease of the job, on other machines too.
            truncated = False
        # The job's newest chunk: what it has used of its bound, and whether it was cut (the
        # notice is the last chunk a job stores). One index read, however long the output.
        newest = LogChunk.objects.filter(job_id=lease.job_id).only("truncated", "job_charged").order_by("-pk").first()
        if newest is not None and newest.truncated and newest.text == notice:
            return LogChunkResult(chunk=None, duplicate=False, stored=False)
        used = newest.job_charged if newest is not None else 0
        stored = used + max(size, LOG_CHUNK_MIN_CHARGE) <= max_bytes
        if not stored:
            text, size, truncated = notice, len(notice.encode("utf-8")), True
        chunk = LogChunk.objects.create(
            job_id=lease.job_id,
            lease=lease,
            seq=seq,
            text=text,
            size=size,
            job_charged=used + max(size, LOG_CHUNK_MIN_CHARGE),
            truncated=truncated,
            at=min(at, now),
        )
    return LogChunkResult(chunk=chunk, duplicate=False, stored=stored)
