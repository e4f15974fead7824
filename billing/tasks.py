"""Celery tasks of billing: thin, idempotent, each calling one service under a sweeper lock."""

from __future__ import annotations

from celery import shared_task

from billing import services
from marketplace.locks import try_lock


@shared_task(name="billing.tasks.meter_leases", ignore_result=True, time_limit=300, soft_time_limit=240)
def meter_leases() -> dict[str, int]:
    """Meter running leases and finalise ended ones (beat: every BILLING_METER_INTERVAL_S). A run
    that finds the previous one still holding the lock does nothing; re-metering is idempotent."""
    with try_lock("billing.meter_leases") as acquired:
        if not acquired:
            return {"skipped": 1}
        return services.leases_meter()


@shared_task(name="billing.tasks.release_budgets", ignore_result=True, time_limit=300, soft_time_limit=240)
def release_budgets() -> dict[str, int]:
    """Release the unused budget of finished jobs whose leases are all finally metered (beat:
    every minute). Releasing is keyed per job, so a repeated run releases nothing twice."""
    with try_lock("billing.release_budgets") as acquired:
        if not acquired:
            return {"skipped": 1}
        return services.budgets_release()
