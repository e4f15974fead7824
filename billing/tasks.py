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


@shared_task(name="billing.tasks.watch_chain", ignore_result=True, time_limit=300, soft_time_limit=240)
def watch_chain() -> dict[str, object]:
    """Post the escrow's deposits and withdrawals to the ledger (beat: every CHAIN_WATCH_INTERVAL_S).
    Idempotent per event; an unreachable node is reported and retried by the next run."""
    from billing.chain import ChainError, chain_client_from_settings
    from billing.deposits import chain_watch

    with try_lock("billing.watch_chain") as acquired:
        if not acquired:
            return {"skipped": 1}
        try:
            return chain_watch(client=chain_client_from_settings()).as_dict()
        except ChainError as error:
            return {"error": str(error)}


@shared_task(name="billing.tasks.settle", ignore_result=True, time_limit=600, soft_time_limit=540)
def settle() -> dict[str, object]:
    """Send a settlement batch when due (every SETTLEMENT_INTERVAL_S, sooner when a batch is full)
    and finish pending ones. Holds the settlement lock across commits (billing.settlement)."""
    from billing.chain import ChainError, chain_client_from_settings
    from billing.settlement import settle_run, settlement_lock

    with settlement_lock() as acquired:
        if not acquired:
            return {"skipped": 1}
        try:
            return settle_run(client=chain_client_from_settings())
        except ChainError as error:
            return {"error": str(error)}


@shared_task(name="billing.tasks.reserve_budgets", ignore_result=True, time_limit=300, soft_time_limit=240)
def reserve_budgets() -> dict[str, object]:
    """Reserve signed job budgets in the escrow and complete reservation batches left pending or
    submitted (beat: every 5 s; also dispatched, coalesced, right after a renter
    stores a signature). Shares the settlement lock, waiting for it a little: a quiet settlement
    run holds it for milliseconds. Each budget is reserved once (billing.reservations)."""
    import time

    from billing.chain import ChainError, chain_client_from_settings
    from billing.reservations import reservation_request_clear, reserve_run
    from billing.settlement import settlement_lock

    reservation_request_clear()
    for attempt in range(RESERVE_LOCK_TRIES):
        with settlement_lock() as acquired:
            if acquired:
                try:
                    return reserve_run(client=chain_client_from_settings())
                except ChainError as error:
                    return {"error": str(error)}
        if attempt + 1 < RESERVE_LOCK_TRIES:
            time.sleep(RESERVE_LOCK_WAIT_S)
    return {"skipped": 1}


RESERVE_LOCK_TRIES = 4
RESERVE_LOCK_WAIT_S = 0.5


@shared_task(name="billing.tasks.reconcile_settlements", ignore_result=True, time_limit=600, soft_time_limit=540)
def reconcile_settlements() -> dict[str, object]:
    """Complete settlements stuck pending or submitted longer than SETTLEMENT_STUCK_S."""
    from billing.chain import ChainError, chain_client_from_settings
    from billing.settlement import settlement_lock, settlements_reconcile

    with settlement_lock() as acquired:
        if not acquired:
            return {"skipped": 1}
        try:
            return settlements_reconcile(client=chain_client_from_settings())
        except ChainError as error:
            return {"error": str(error)}


@shared_task(name="billing.tasks.release_jobs_on_chain", ignore_result=True, time_limit=600, soft_time_limit=540)
def release_jobs_on_chain() -> dict[str, object]:
    """Close in the escrow the budgets of finished jobs that the ledger released (beat: every
    minute). Shares the settlement lock, so the operator's transactions go out one at a time; a
    job already closed on chain is only recorded, so a repeated run sends nothing twice."""
    import time

    from billing.chain import ChainError, chain_client_from_settings
    from billing.release import jobs_release_on_chain
    from billing.settlement import settlement_lock

    # Beat fires this and `settle` (every 15 s) at the same instants, and a quiet settle run holds
    # the lock for milliseconds: wait for it a little instead of skipping every time.
    for attempt in range(RELEASE_LOCK_TRIES):
        with settlement_lock() as acquired:
            if acquired:
                try:
                    return jobs_release_on_chain(client=chain_client_from_settings())
                except ChainError as error:
                    return {"error": str(error)}
        if attempt + 1 < RELEASE_LOCK_TRIES:
            time.sleep(RELEASE_LOCK_WAIT_S)
    return {"skipped": 1}


RELEASE_LOCK_TRIES = 10
RELEASE_LOCK_WAIT_S = 1.0
