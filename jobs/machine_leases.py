"""The leases of a machine, as providers asks for them: jobs' implementation of the port
providers.leases.MachineLeases, registered when the app registry is ready (jobs.apps). The
heartbeat's orders (leases to start and to stop), the leases a machine's job kinds now refuse,
and the counts the fleet's screens show."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime

from django.db import connection
from django.db.models import Exists, OuterRef
from django.utils import timezone

from jobs.checkpoints import checkpoint_order
from jobs.models import Lease, LeaseGPU
from jobs.services import (
    lease_end,
    leases_end_for_machine,
)
from providers import services as providers_services

logger = logging.getLogger(__name__)


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
    *, machine_id: int, listed: set[int], kinds: frozenset[str], may_have_assigned: bool = True
) -> tuple[list[providers_services.LeaseStart], list[providers_services.LeaseStop]]:
    """The heartbeat reply's lease orders for a machine whose agent listed the leases `listed`:
    `start`, its assigned leases without a stop request that the agent did not list, of a kind in
    `kinds`; `stop`, the listed leases that are ended, have a stop request, or are not this
    machine's (reason `unknown_lease`), flagged save_checkpoint when cancelled by a renter who
    keeps the job's checkpoint.

    may_have_assigned=False: the caller knows the machine has no assigned lease (it holds the
    machine's GPU rows, so no assignment can commit on them meanwhile, and found none in an active
    lease, or its lock's statement saw none): there is none to start and the query is skipped."""
    start: list[providers_services.LeaseStart] = []
    # Locked without waiting: a lease a cancel holds is left for the next heartbeat (the cancel
    # then ends it, never started); one sent here records start_sent_at before the lock is let go.
    assigned: Iterable[Lease] = (
        Lease.objects.filter(machine_id=machine_id, status=Lease.Status.ASSIGNED, stop_requested_at__isnull=True)
        .exclude(pk__in=listed)
        .select_for_update(skip_locked=True, of=("self",))
        .select_related("job")
        .prefetch_related("lease_gpus__gpu")
        .order_by("pk")
        if may_have_assigned
        else ()  # not Lease.objects.none(): iterating that compiles a query (0.2 ms)
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
                checkpoint_interval_s=job.checkpoint_interval_s,
                checkpoint=checkpoint_order(lease=lease),
            )
        )
    if start:
        Lease.objects.filter(pk__in=[order.lease_id for order in start], start_sent_at__isnull=True).update(
            start_sent_at=timezone.now()
        )
    stop: list[providers_services.LeaseStop] = []
    if listed:
        known = {
            pk: (status, end_reason, stop_requested_at, stop_reason, keep)
            for pk, status, end_reason, stop_requested_at, stop_reason, keep in Lease.objects.filter(
                machine_id=machine_id, pk__in=listed
            ).values_list("pk", "status", "end_reason", "stop_requested_at", "stop_reason", "job__keep_checkpoint")
        }
        for lease_id in sorted(listed):
            if lease_id not in known:
                stop.append(
                    providers_services.LeaseStop(lease_id=lease_id, reason=providers_services.STOP_REASON_UNKNOWN_LEASE)
                )
                continue
            status, end_reason, stop_requested_at, stop_reason, keep = known[lease_id]
            reason = end_reason if status == Lease.Status.ENDED else stop_reason if stop_requested_at else None
            if reason is not None:
                # A cancel that keeps the checkpoint: the agent uploads it as it stops the job.
                save = keep and reason == Lease.EndReason.CANCELLED
                stop.append(providers_services.LeaseStop(lease_id=lease_id, reason=reason, save_checkpoint=save))
    return start, stop


class MachineLeases:
    """jobs' side of providers.leases.MachineLeases, registered by jobs.apps."""

    def end_for_machine(
        self, *, machine_id: int, reason: str, actor: str, detail: str = "", at: datetime | None = None
    ) -> int:
        return leases_end_for_machine(machine_id=machine_id, reason=reason, actor=actor, detail=detail, at=at)

    def end_refused_kinds(self, *, machine_id: int, kinds: frozenset[str]) -> None:
        leases_end_of_refused_kinds(machine_id=machine_id, kinds=kinds)

    def assigned_exists_sql(self, *, machine_id_sql: str) -> tuple[str, list[object]]:
        qn = connection.ops.quote_name
        table = qn(Lease._meta.db_table)
        machine = qn(Lease._meta.get_field("machine").column)
        status = qn(Lease._meta.get_field("status").column)  # type: ignore[arg-type]
        # Only the model's own (quoted) names and the caller's expression go into the text.
        sql = f"EXISTS (SELECT 1 FROM {table} WHERE {table}.{machine} = {machine_id_sql} AND {table}.{status} = %s)"  # noqa: S608
        return sql, [Lease.Status.ASSIGNED.value]

    def active_count(self, *, machine_ids: Sequence[int]) -> int:
        return Lease.objects.filter(machine_id__in=machine_ids, status__in=Lease.ACTIVE).count()

    def machines_with_active_leases(self, *, machine_ids: Sequence[int]) -> set[int]:
        active = Lease.objects.filter(machine_id__in=machine_ids, status__in=Lease.ACTIVE)
        return set(active.values_list("machine_id", flat=True))

    def active_gpu_ids(self, *, machine_id: int) -> set[int]:
        return set(LeaseGPU.objects.filter(active=True, gpu__machine_id=machine_id).values_list("gpu_id", flat=True))

    def gpu_in_active_lease(self) -> Exists:
        return Exists(LeaseGPU.objects.filter(gpu_id=OuterRef("pk"), active=True))

    def starting_reported(self, *, machine_id: int, lease_ids: set[int]) -> None:
        # Written once per lease, the first time: the heartbeats that repeat it change nothing.
        # The heartbeat holds the machine's GPU rows; a lease being ended holds its row and waits
        # for them (lease, then GPUs): its row is skipped, not waited for (no deadlock), and the
        # next heartbeat reports it again if it still starts.
        free = Lease.objects.filter(
            machine_id=machine_id, pk__in=lease_ids, status=Lease.Status.ASSIGNED, start_reported_at__isnull=True
        ).select_for_update(skip_locked=True, of=("self",))
        if ids := list(free.values_list("pk", flat=True)):
            Lease.objects.filter(pk__in=ids).update(start_reported_at=timezone.now())

    def heartbeat_orders(
        self, *, machine_id: int, listed: set[int], kinds: frozenset[str], may_have_assigned: bool = True
    ) -> tuple[list[providers_services.LeaseStart], list[providers_services.LeaseStop]]:
        return leases_heartbeat_orders(
            machine_id=machine_id, listed=listed, kinds=kinds, may_have_assigned=may_have_assigned
        )
