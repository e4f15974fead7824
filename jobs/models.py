"""Renters' jobs, the leases that run them on providers' GPUs, and their audit trail.

Job lifecycle (every move goes through jobs.services with a conditional UPDATE):

    pending ──► scheduled ──► running ──► succeeded | failed
       ▲  │         │            │
       │  └► cancelled ◄─────────┘  (cancel from pending, scheduled or running)
       └──────── scheduled/running, when an interruptible job's lease is preempted or lost,
                 or a lease fails to start (up to JOB_MAX_ATTEMPTS)

Lease lifecycle:  assigned ──► running ──► ended
                      └────────────────────► ended   (failed to start, lost, cancelled)
                  and a running lease may first be asked to stop (stop_requested_at set).
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from providers.models import GPU, PRICE_DECIMALS, PRICE_MAX_DIGITS, JobKind, Machine


class Renter(models.Model):
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="renter")
    display_name = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.display_name


class Job(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        SCHEDULED = "scheduled"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    Kind = JobKind

    renter = models.ForeignKey(Renter, on_delete=models.PROTECT, related_name="jobs")
    name = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.CONTAINER)
    image = models.CharField(max_length=500, blank=True)
    command = models.JSONField(default=list)
    env = models.JSONField(default=dict, blank=True)
    gpu_count = models.PositiveSmallIntegerField(validators=[MinValueValidator(1)])
    min_vram_mb = models.PositiveIntegerField(default=0)
    # Empty: any model.
    allowed_models = models.JSONField(default=list, blank=True)
    region = models.CharField(max_length=64, blank=True)
    max_price_per_gpu_hour = models.DecimalField(
        max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_DECIMALS, validators=[MinValueValidator(Decimal("0"))]
    )
    expected_duration_s = models.PositiveIntegerField()
    max_duration_s = models.PositiveIntegerField()
    interruptible = models.BooleanField(default=True)
    # The renter's promise: the job saves its progress at least this often, so an interrupted run
    # loses at most this much work. Null: an interruption loses everything (jobs.services'
    # MIN_CHECKPOINT_INTERVAL_S..MAX_CHECKPOINT_INTERVAL_S).
    checkpoint_interval_s = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(60), MaxValueValidator(24 * 3600)]
    )
    # A directory of the job's view (under /work) that follows the job: uploaded when a lease is
    # stopped under it, restored before its next lease starts (jobs.checkpoints). "": none.
    checkpoint_dir = models.CharField(max_length=200, blank=True)
    # Its renter cancelled it asking to keep its checkpoint: its lease's agent uploads the directory
    # as it stops, and the checkpoint outlives the job for CHECKPOINT_KEEP_AFTER_CANCEL_H hours, for
    # the renter to download (jobs.checkpoints).
    keep_checkpoint = models.BooleanField(default=False)

    # Indexed by job_status_created (status first), not by an index of its own: each move of a
    # job wrote to two more indexes.
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    # Why the matcher could not place it (a stable code and a sentence), while pending.
    unplaced_code = models.CharField(max_length=64, blank=True)
    unplaced_detail = models.CharField(max_length=500, blank=True)
    unplaced_checked_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    exit_code = models.IntegerField(null=True, blank=True)
    failure_reason = models.CharField(max_length=500, blank=True)
    # NULL, not "", when absent: the unique constraint applies only to jobs that sent a key.
    idempotency_key = models.CharField(max_length=128, null=True, blank=True)  # noqa: DJ001
    # Hash of the create request, so a reused idempotency key with another body is refused.
    request_fingerprint = models.CharField(max_length=64, blank=True)

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["renter", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="job_unique_idempotency_key_per_renter",
            ),
            models.CheckConstraint(
                condition=models.Q(max_duration_s__gte=models.F("expected_duration_s")),
                name="job_max_duration_covers_expected",
            ),
        ]
        indexes = [models.Index(fields=["status", "created_at"], name="job_status_created")]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.status})"


class Lease(models.Model):
    class Status(models.TextChoices):
        ASSIGNED = "assigned"
        RUNNING = "running"
        ENDED = "ended"

    ACTIVE = (Status.ASSIGNED, Status.RUNNING)

    class EndReason(models.TextChoices):
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        PREEMPTED_BY_OWNER = "preempted_by_owner"
        LOST = "lost"
        FAILED_TO_START = "failed_to_start"
        START_TIMEOUT = "start_timeout"
        CANCELLED = "cancelled"
        MAX_DURATION = "max_duration"
        MACHINE_SUSPENDED = "machine_suspended"
        CREDENTIAL_REVOKED = "credential_revoked"

    job = models.ForeignKey(Job, on_delete=models.PROTECT, related_name="leases")
    # No index of its own: lease_machine_status (machine first) serves its lookups.
    machine = models.ForeignKey(Machine, on_delete=models.PROTECT, related_name="leases", db_index=False)
    gpus = models.ManyToManyField(GPU, through="LeaseGPU", related_name="leases")
    gpu_count = models.PositiveSmallIntegerField()
    price_per_gpu_hour = models.DecimalField(max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_DECIMALS)
    # Indexed by lease_status (Meta): db_index would add a second, pattern-matching index that no
    # query uses, written with every lease.
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ASSIGNED)
    end_reason = models.CharField(max_length=32, choices=EndReason.choices, blank=True)
    end_detail = models.CharField(max_length=500, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # When a heartbeat reply first told the agent to start it: before that, the agent cannot be
    # running it, so a cancel may end it at once; after, the cancel asks the agent to stop it.
    start_sent_at = models.DateTimeField(null=True, blank=True)
    # When a heartbeat first listed it as `starting` (the agent pulling its image): the start
    # timeout then waits up to LEASE_START_MAX_S (jobs.sweeps).
    start_reported_at = models.DateTimeField(null=True, blank=True)
    # Set when the marketplace wants the agent to stop it (cancel, max duration, suspension).
    stop_requested_at = models.DateTimeField(null=True, blank=True)
    stop_reason = models.CharField(max_length=32, choices=EndReason.choices, blank=True)
    # The tail of the job's output, as last sent by the agent.
    log_tail = models.TextField(blank=True)
    # Pre-signed checkpoint uploads handed to its machine (jobs.checkpoints.checkpoint_upload_begin):
    # each may leave an object of up to CHECKPOINT_MAX_BYTES in the store until the hourly sweep.
    checkpoint_uploads = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["machine", "status"], name="lease_machine_status"),
            # The dashboard's placements and ends in a range, and the preemption losses.
            models.Index(fields=["created_at"], name="lease_created_at"),
            # Of ended leases only: every range of ended_at leaves out the leases still running,
            # and a new lease writes no entry.
            models.Index(fields=["ended_at"], name="lease_ended", condition=models.Q(ended_at__isnull=False)),
            # The sweeps' leases by status across machines.
            models.Index(fields=["status"], name="lease_status"),
        ]

    def __str__(self) -> str:
        return f"lease {self.pk} ({self.status})"


class LeaseGPU(models.Model):
    """One GPU of a lease. `active` is true while the lease is assigned or running; the partial
    unique index makes it impossible, whatever a racing worker does, for one GPU to be in two
    active leases."""

    # No index of its own: the unique (lease, gpu) serves its lookups.
    lease = models.ForeignKey(Lease, on_delete=models.CASCADE, related_name="lease_gpus", db_index=False)
    gpu = models.ForeignKey(GPU, on_delete=models.PROTECT, related_name="lease_gpus")
    active = models.BooleanField(default=True)

    class Meta:
        verbose_name = "lease GPU"
        verbose_name_plural = "lease GPUs"
        constraints = [
            models.UniqueConstraint(fields=["gpu"], condition=models.Q(active=True), name="gpu_in_one_active_lease"),
            models.UniqueConstraint(fields=["lease", "gpu"], name="leasegpu_unique"),
        ]

    def __str__(self) -> str:
        return f"GPU {self.gpu_id} in lease {self.lease_id}"


class Event(models.Model):
    """The audit trail of jobs and leases: every transition, who caused it and why."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    lease = models.ForeignKey(Lease, null=True, blank=True, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=64)
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16, blank=True)
    actor = models.CharField(max_length=64, blank=True)  # "renter:3", "machine:7", "matcher", "operator:1"
    detail = models.JSONField(default=dict, blank=True)
    # For events an agent sends: its event id, so a repeated send is recorded once. Unique where
    # present (event_unique_idempotency_key): the events the marketplace writes itself, most of
    # them, have none and write no entry.
    idempotency_key = models.CharField(max_length=128, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="event_unique_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} (job {self.job_id})"


class UsageReport(models.Model):
    """What an agent reported a lease used over one interval. Stored as received here; the
    billing app verifies the signature and meters it."""

    lease = models.ForeignKey(Lease, on_delete=models.PROTECT, related_name="usage_reports")
    report_id = models.CharField(max_length=128)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    gpu_seconds = models.DecimalField(max_digits=16, decimal_places=3)
    mean_utilization_pct = models.FloatField(null=True, blank=True)
    peak_memory_mb = models.PositiveIntegerField(null=True, blank=True)
    payload = models.JSONField(default=dict)
    signature = models.CharField(max_length=200, blank=True)
    # The address whose EIP-712 signature over this report the marketplace verified; "" for an
    # unsigned report of a machine without a signing key.
    verified_signer = models.CharField(max_length=42, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["period_start", "id"]
        constraints = [
            models.UniqueConstraint(fields=["lease", "report_id"], name="usage_unique_report_per_lease"),
            models.CheckConstraint(
                condition=models.Q(period_end__gt=models.F("period_start")), name="usage_period_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"usage {self.report_id} of lease {self.lease_id}"


class LogChunk(models.Model):
    """A piece of a running job's output, as its lease's agent shipped it (scrubbed of the
    machine's secrets), for its renter to follow (GET /api/v1/jobs/{id}/logs/). `seq` counts a
    lease's chunks from 0: a repeat is stored once. Their id is the renter's cursor. A job keeps
    at most JOB_LOG_MAX_BYTES of them, for JOB_LOG_RETENTION_H hours after it finished."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="log_chunks")
    lease = models.ForeignKey(Lease, on_delete=models.CASCADE, related_name="log_chunks")
    seq = models.PositiveIntegerField()
    text = models.TextField()
    # The text's length in UTF-8 bytes, against the job's bound.
    size = models.PositiveIntegerField()
    # What the job's chunks up to this one count against its bound (each its size, at least
    # jobs.ingestion.LOG_CHUNK_MIN_CHARGE): the job's newest chunk says what the job has used.
    job_charged = models.BigIntegerField(default=0)
    # The agent stopped shipping this lease's output here (its cap), or the marketplace stopped
    # storing this job's (JOB_LOG_MAX_BYTES): this chunk says so.
    truncated = models.BooleanField(default=False)
    # When the agent read it, by its clock.
    at = models.DateTimeField()
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["lease", "seq"], name="logchunk_unique_seq_per_lease")]
        indexes = [models.Index(fields=["job", "id"], name="logchunk_job_id")]

    def __str__(self) -> str:
        return f"log chunk {self.seq} of lease {self.lease_id}"


class Checkpoint(models.Model):
    """The newest checkpoint of a job (its checkpoint_dir as a tar archive), as the agent of one
    of its leases uploaded it; restored before the job's next lease starts. One per job: a newer
    upload replaces it. Its file lives in the `checkpoints` storage under `storage_key` and is
    deleted with the row when the job ends, or CHECKPOINT_KEEP_AFTER_CANCEL_H hours after a cancel
    that keeps it (jobs.checkpoints)."""

    job = models.OneToOneField(Job, on_delete=models.CASCADE, related_name="checkpoint")
    lease = models.ForeignKey(Lease, on_delete=models.CASCADE, related_name="checkpoints")
    storage_key = models.CharField(max_length=200, unique=True)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"checkpoint of job {self.job_id} (lease {self.lease_id})"
