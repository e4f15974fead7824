"""Reads of jobs, leases and their audit trail, scoped to the renter who owns them.

A job or lease of another renter is reported as missing (NotFound), never as forbidden, so its
existence does not leak.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from django.db.models import Prefetch, Q, QuerySet

from jobs.errors import NotFound
from jobs.models import Event, Job, Lease, LogChunk, Renter
from providers.models import GPU


def _leases_with_gpus(queryset: QuerySet[Lease]) -> QuerySet[Lease]:
    return queryset.select_related("machine").prefetch_related(Prefetch("gpus", queryset=GPU.objects.order_by("index")))


def job_list_for_renter(*, renter: Renter, statuses: Sequence[str] = ()) -> QuerySet[Job]:
    """The renter's jobs, newest first; only those in `statuses` when given."""
    queryset = Job.objects.filter(renter=renter).select_related("checkpoint")
    if statuses:
        queryset = queryset.filter(status__in=list(statuses))
    return queryset.order_by("-created_at", "-pk")


def job_get_for_renter(*, renter: Renter, job_id: int) -> Job:
    """The renter's job; NotFound for a job that is not the renter's."""
    job = Job.objects.filter(renter=renter, pk=job_id).select_related("checkpoint").first()
    if job is None:
        raise NotFound(f"Job {job_id} not found.")
    return job


def job_current_lease(*, job: Job) -> Lease | None:
    """The job's active (assigned or running) lease, if any."""
    return _leases_with_gpus(Lease.objects.filter(job=job, status__in=Lease.ACTIVE)).order_by("-pk").first()


def lease_list_for_renter(*, renter: Renter, job: Job | None = None) -> QuerySet[Lease]:
    """The leases of the renter's jobs (of one job when given), newest first."""
    queryset = Lease.objects.filter(job__renter=renter)
    if job is not None:
        queryset = queryset.filter(job=job)
    return _leases_with_gpus(queryset).order_by("-created_at", "-pk")


def lease_get_for_renter(*, renter: Renter, lease_id: int) -> Lease:
    """A lease of one of the renter's jobs; NotFound otherwise."""
    lease = _leases_with_gpus(Lease.objects.filter(job__renter=renter, pk=lease_id)).first()
    if lease is None:
        raise NotFound(f"Lease {lease_id} not found.")
    return lease


def event_list_for_job(*, job: Job) -> QuerySet[Event]:
    """The job's audit trail, oldest first."""
    return Event.objects.filter(job=job).order_by("created_at", "pk")


def machine_has_new_orders(*, machine_id: int, since: datetime | None) -> bool:
    """Whether the machine's next heartbeat has an order for it that its last did not: a lease
    assigned to it after `since` (the last heartbeat's server time) and not yet handed over
    (jobs.machine_leases.leases_heartbeat_orders sends it and records start_sent_at), or an active
    lease asked to stop after `since`. Only what is new since then: one the heartbeat holds back
    (a kind the machine refuses) must not ring again and again. `since` None: anything. One
    query over the machine's leases."""
    start = Q(status=Lease.Status.ASSIGNED, start_sent_at__isnull=True, stop_requested_at__isnull=True)
    stop = Q(status__in=Lease.ACTIVE, stop_requested_at__isnull=False)
    if since is not None:
        start &= Q(created_at__gt=since)
        stop &= Q(stop_requested_at__gt=since)
    return Lease.objects.filter(start | stop, machine_id=machine_id).exists()


def log_chunks_after(*, job: Job, cursor: int, limit: int) -> list[LogChunk]:
    """The job's output after `cursor` (a LogChunk id; 0: from the start), oldest first, at most
    `limit` chunks. A job's chunks commit in the order of their ids (jobs.ingestion serialises
    them per job, across its leases), so a follower that passes the last id it got as the next
    cursor reads each chunk once."""
    return list(LogChunk.objects.filter(job=job, pk__gt=cursor).order_by("pk")[:limit])


def job_output_finished(*, job: Job) -> bool:
    """Whether the job's output is complete: the job is over and none of its leases is still
    assigned or running (a cancelled job's lease ends when its agent has stopped it and shipped
    its last output)."""
    if job.status not in Job.TERMINAL:
        return False
    return not Lease.objects.filter(job=job, status__in=Lease.ACTIVE).exists()
