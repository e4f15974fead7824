"""Celery tasks of billing: thin, idempotent, each calling one service. The periodic ones run
under core.periodic (a lock per task, logging, a failure count per task)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from billing import services
from core.periodic import periodic_task

# The lock of every run that sends the operator's transactions (settlements, reservations, the
# reconciler, releases on chain), so they go out one at a time: billing.settlement.LOCK_NAME.
SETTLEMENT_LOCK = "billing.settlement"


def _chain_run(run: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Run `run(client)` on the chain client from settings and return its result. A chain error
    that ends the run before it could report one itself is reported under "error" (so
    core.periodic counts the run as failed and logs it at ERROR); an unreachable node also under
    "node_unavailable", as the runs report one they meet, so every chain task says the same
    thing for the same outage whichever step met it."""
    from billing.chain import ChainError, NodeUnavailable, chain_client_from_settings

    try:
        return run(chain_client_from_settings())
    except NodeUnavailable as error:
        return {"error": str(error), "node_unavailable": str(error)}
    except ChainError as error:
        return {"error": str(error)}


@periodic_task(name="billing.tasks.meter_leases", time_limit=300, soft_time_limit=240)
def meter_leases() -> dict[str, int]:
    """Meter running leases and finalise ended ones (beat: every BILLING_METER_INTERVAL_S), each
    lease in its own transaction. A run that finds the previous one still holding the lock does
    nothing; re-metering is idempotent."""
    return services.leases_meter()


@periodic_task(name="billing.tasks.release_budgets", time_limit=300, soft_time_limit=240)
def release_budgets() -> dict[str, int]:
    """Release the unused budget of finished jobs whose leases are all finally metered (beat:
    every minute), each job in its own transaction. Releasing is keyed per job, so a repeated run
    releases nothing twice."""
    return services.budgets_release()


@periodic_task(name="billing.tasks.watch_chain", time_limit=300, soft_time_limit=240)
def watch_chain() -> dict[str, object]:
    """Post the escrow's deposits and withdrawals to the ledger (beat: every CHAIN_WATCH_INTERVAL_S).
    Idempotent per event; an unreachable node is reported and retried by the next run."""
    from billing.deposits import chain_watch

    return _chain_run(lambda client: chain_watch(client=client).as_dict())


# Every run under the settlement lock that finds it held is run again a moment later (up to its
# *_LOCK_TRIES times; Celery holds the message until then: no worker sleeps) instead of waiting
# for the next beat. Their beats fire at common instants (reservations every 5 s, settlement
# every 15 s, releases and the reconciler every minute): a run that skipped instead could lose the
# race at every one of them, and charges would wait unsettled, and budgets unreleased, for as long
# as that lasted. A quiet run holds the lock for milliseconds.
# Reservation runs are short and frequent: fewer, quicker retries.
RESERVE_LOCK_TRIES = 3
RESERVE_LOCK_RETRY_S = 0.5
CHAIN_LOCK_TRIES = 9
CHAIN_LOCK_RETRY_S = 1.0


@periodic_task(
    name="billing.tasks.settle",
    lock=SETTLEMENT_LOCK,
    retry_locked=(CHAIN_LOCK_TRIES, CHAIN_LOCK_RETRY_S),
    time_limit=600,
    soft_time_limit=540,
)
def settle() -> dict[str, object]:
    """Send a settlement batch when due (every SETTLEMENT_INTERVAL_S, sooner when a batch is full)
    and finish pending ones, each batch on its own. Holds the settlement lock across commits."""
    from billing.settlement import settle_run

    return _chain_run(lambda client: settle_run(client=client))


@periodic_task(
    name="billing.tasks.reserve_budgets",
    lock=SETTLEMENT_LOCK,
    retry_locked=(RESERVE_LOCK_TRIES, RESERVE_LOCK_RETRY_S),
    time_limit=300,
    soft_time_limit=240,
)
def reserve_budgets() -> dict[str, object]:
    """Reserve signed job budgets in the escrow and complete reservation batches left pending or
    submitted, each batch on its own (beat: every 5 s; also dispatched, coalesced, right after a
    renter stores a signature). Shares the settlement lock. Each budget is reserved once
    (billing.reservations)."""
    from billing.reservations import reservation_request_clear, reserve_run

    reservation_request_clear()
    return _chain_run(lambda client: reserve_run(client=client))


@periodic_task(
    name="billing.tasks.reconcile_settlements",
    lock=SETTLEMENT_LOCK,
    retry_locked=(CHAIN_LOCK_TRIES, CHAIN_LOCK_RETRY_S),
    time_limit=600,
    soft_time_limit=540,
)
def reconcile_settlements() -> dict[str, object]:
    """Complete settlements stuck pending or submitted longer than SETTLEMENT_STUCK_S, each batch
    on its own."""
    from billing.settlement import settlements_reconcile

    return _chain_run(lambda client: settlements_reconcile(client=client))


@periodic_task(
    name="billing.tasks.release_jobs_on_chain",
    lock=SETTLEMENT_LOCK,
    retry_locked=(CHAIN_LOCK_TRIES, CHAIN_LOCK_RETRY_S),
    time_limit=600,
    soft_time_limit=540,
)
def release_jobs_on_chain() -> dict[str, object]:
    """Close in the escrow the budgets of finished jobs that the ledger released (beat: every
    minute), each job on its own. Shares the settlement lock, so the operator's transactions go out
    one at a time; a job already closed on chain is only recorded, so a repeated run sends nothing
    twice."""
    from billing.release import jobs_release_on_chain

    return _chain_run(lambda client: jobs_release_on_chain(client=client))


@periodic_task(name="billing.tasks.check_ledger", time_limit=600, soft_time_limit=540)
def check_ledger() -> dict[str, object]:
    """Check the ledger and compare it with the chain as of a confirmed block (billing.ledger_check;
    beat: every 5 minutes). Each run is stored (billing.models.LedgerCheck; the newest is
    billing.selectors.ledger_check_latest(), for the console and /healthz). A run that finds a
    violation or a difference, or cannot read the chain, reports ok False and counts as failed."""
    from billing.ledger_check import ledger_check_run

    result = ledger_check_run()
    found = [*result.problems, *result.differences]
    summary: dict[str, object] = {
        "ok": result.ok,
        "block": result.block,
        "differences": found[:5] + ([f"... and {len(found) - 5} more"] if len(found) > 5 else []),
        "in_flight": result.in_flight,
    }
    if result.node_unavailable:
        summary["node_unavailable"] = result.error
    elif result.error:
        summary["error"] = result.error
    return summary
