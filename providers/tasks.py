"""Celery tasks of the fleet: thin, idempotent, each calling one service."""

from __future__ import annotations

from celery import shared_task

from marketplace.locks import try_lock
from providers import services, telemetry


@shared_task(ignore_result=True, time_limit=60)
def sweep_machine_liveness() -> int:
    """Machines silent past the grace period go offline and their leases end as lost."""
    with try_lock("sweep_machine_liveness") as acquired:
        if not acquired:
            return 0
        return services.machines_mark_silent_offline()


@shared_task(ignore_result=True, time_limit=600)
def rollup_telemetry() -> int:
    with try_lock("rollup_telemetry") as acquired:
        if not acquired:
            return 0
        return telemetry.telemetry_rollup()


@shared_task(ignore_result=True, time_limit=600)
def prune_telemetry() -> int:
    with try_lock("prune_telemetry") as acquired:
        if not acquired:
            return 0
        return telemetry.telemetry_prune()
