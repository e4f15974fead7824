"""Celery tasks of jobs and leases: thin, idempotent, each calling one service."""

from __future__ import annotations

from celery import shared_task

from jobs import services
from marketplace.locks import try_lock


@shared_task(name="jobs.tasks.sweep_leases", ignore_result=True, time_limit=120)
def sweep_leases() -> dict[str, int]:
    """Leases stuck assigned time out, leases past their job's max duration are stopped (then
    ended if the agent does not stop them). Beat runs it every 15 s; a run that finds the
    previous one still holding the lock does nothing."""
    with try_lock("sweep_leases") as acquired:
        if not acquired:
            return {"skipped": 1}
        return services.leases_sweep().as_dict()
