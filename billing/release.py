"""The on-chain half of releasing a finished job's budget.

The ledger releases a terminal job's unused budget (`services.job_budget_release`, beat task
`release_budgets`: job_reserved → renter_available). When the job's budget was activated on chain
(its BudgetAuthorization has `activated_at`), the escrow still holds the job's reservation; the
operator closes it with `escrow.releaseJob(jobId)`, which moves the reservation back to the
renter's available balance inside the escrow, so the two agree again. No token leaves the escrow
and the escrow emits only `JobReleased`, which the deposit watcher does not read: the ledger
already made the same movement, so nothing is credited twice.

A job is released on chain only once nothing more can be paid from it: it is terminal, every
lease is finally metered, the ledger holds nothing reserved for it, and no charge of it waits
unsettled or in a settlement (the escrow skips every item of a closed job, so releasing earlier
would leave a provider unpaid).

Idempotent: the contract's job state is read first; a job already closed (released by an earlier
run that died before recording it, or by the renter after the deadline) is only recorded; so is a
job such a transaction closed after the read, before this run's releaseJob was mined (which then
reverts). An unreachable node leaves the job for the next run. The caller holds the settlement lock
(`settlement.LOCK_NAME`), so the operator's transactions go out one at a time. Each job is one
item of the run (core.periodic.item): a job whose release fails is logged and skipped.

Guarded against the chain going back under it: `releaseJob` carries the job's last settlement
the ledger holds confirmed (its lease and cumulative charge; `_settled_expected`), and the escrow
reverts it (`GpgpuEscrow_SettlementBehind`) when its own state for the job is behind that. The run
checks just before sending that the chain still holds what the ledger rests on
(`billing.rewind.rewound_before_send`), but a rollback can come after that check and before the
transaction is mined (a transaction sent under a nonce
the rollback freed waits in the node's pool and is mined later, after the settlement it depended
on was undone): closed then, the job would skip the settlement sent again and its provider would
never be paid. A refused release is "waiting": the ledger undoes what the chain lost
(billing.rewind), the settlement goes out again, and a later run releases the job.

Exactly once through rollbacks: the hash of a releaseJob sent is recorded before it is waited
for. A later run follows that transaction rather than sending another: confirmed once deep
enough, waited for while the node holds it; only when the node no longer knows it (it left the
chain with a rollback, or was dropped) is the job's state read again and, if still open, one new
releaseJob sent. A recorded release keeps its block's number and hash (for a job found closed,
the head it was seen at): when that block leaves the chain, billing.rewind forgets the release
(`release_forget`) and the next run reads the job's state again.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db.models import Q
from django.utils import timezone

from billing.chain import ChainClient, ChainError, ContractReverted, NodeUnavailable, TransactionTimeout
from billing.chain.deployment import Deployment, deployment_require
from billing.contract import ESCROW
from billing.models import BudgetAuthorization, LedgerAccount, OperatorTransaction, SettlementItem
from billing.rewind import chain_rewind, rewound_before_send
from billing.services import job_leases_final
from core import periodic
from jobs.models import Job, Lease

logger = logging.getLogger(__name__)

AK = LedgerAccount.Kind
BEHIND = "GpgpuEscrow_SettlementBehind"
CLOSED = "GpgpuEscrow_JobClosed"


class ReleaseStalled(Exception):
    """A releaseJob sent was not mined within the receipt timeout: the run sends nothing more."""


def _holds(kind: str, owner_keys: list[str]) -> bool:
    return LedgerAccount.objects.filter(kind=kind, owner_key__in=owner_keys, balance__gt=0).exists()


def job_ready_for_chain_release(*, job_id: int) -> bool:
    """True when nothing more can be charged to or paid from the job: terminal, every lease
    finally metered, nothing left in job_reserved, nothing unsettled or in settlement."""
    job = Job.objects.filter(pk=job_id).only("status").first()
    if job is None or job.status not in Job.TERMINAL or not job_leases_final(job_id=job_id):
        return False
    if _holds(AK.JOB_RESERVED, [f"job:{job_id}"]):
        return False
    leases = [f"lease:{pk}" for pk in Lease.objects.filter(job_id=job_id).values_list("pk", flat=True)]
    return not (_holds(AK.LEASE_UNSETTLED, leases) or _holds(AK.IN_SETTLEMENT, leases))


def _record(auth: BudgetAuthorization, tx_hash: str, block_number: int, block_hash: str) -> None:
    BudgetAuthorization.objects.filter(pk=auth.pk, released_on_chain_at__isnull=True).update(
        released_on_chain_at=timezone.now(),
        release_tx_hash=tx_hash,
        release_block_number=block_number,
        release_block_hash=block_hash,
    )


def _record_seen(auth: BudgetAuthorization, client: ChainClient) -> None:
    """Record a release found on chain (the job closed already) at the head it was seen."""
    head = client.block_number()
    _record(auth, "", head, client.block_hash(head) or "")


def release_forget(*, auth: BudgetAuthorization, why: str) -> None:
    """Forget a recorded release whose block left the chain (billing.rewind found it): the next
    run reads the job's state again and sends releaseJob once more if the job is open again."""
    forgot = BudgetAuthorization.objects.filter(pk=auth.pk, released_on_chain_at__isnull=False).update(
        released_on_chain_at=None, release_tx_hash="", release_block_number=None, release_block_hash=""
    )
    if forgot:
        logger.warning("job %s: its release on chain is forgotten: %s", auth.job_id, why)


def _follow_sent(auth: BudgetAuthorization, client: ChainClient) -> str | None:
    """The outcome of the releaseJob an earlier run sent (release_tx_hash, not yet recorded as
    released): "released" once confirmed, "pending" while mined but not deep enough or waiting in
    the node's pool; None when it reverted or the node no longer knows it (the hash is forgotten
    and the caller reads the job's state, and sends again if it is still open)."""
    tx_hash = auth.release_tx_hash
    receipt = client.receipt(tx_hash)
    if receipt is not None and receipt.succeeded:
        if client.confirmations(tx_hash) < client.confirmations_required:
            return "pending"
        _record(auth, receipt.tx_hash, receipt.block_number, receipt.block_hash)
        return "released"
    if receipt is None and client.transaction_known(tx_hash):
        return "pending"
    why = "reverted" if receipt is not None else "is no longer known to the node"
    logger.warning("job %s: releaseJob %s %s; reading the job's state again", auth.job_id, tx_hash, why)
    if receipt is None:
        client.nonce_reset()  # its nonce is free again: the next send must not skip it
    BudgetAuthorization.objects.filter(pk=auth.pk, release_tx_hash=tx_hash, released_on_chain_at__isnull=True).update(
        release_tx_hash=""
    )
    return None


def _settled_expected(job_id: int) -> tuple[int, int]:
    """What the escrow holds settled for the job once every settlement the ledger holds confirmed
    is on chain: (lease id, cumulative charge) of its newest lease in them, (0, 0) when none. The
    escrow keeps, per job, the newest lease an item paid and that lease's highest cumulative charge."""
    confirmed = SettlementItem.objects.filter(
        job_id=job_id, settlement__status=OperatorTransaction.Status.CONFIRMED, job_unknown=False
    )
    newest = confirmed.order_by("-lease_id", "-cumulative_micro").values_list("lease_id", "cumulative_micro").first()
    return (0, 0) if newest is None else (int(newest[0]), int(newest[1]))


def _behind(auth: BudgetAuthorization, client: ChainClient, error: ContractReverted) -> str:
    """The escrow refused the release: it holds less settled for the job than the ledger (a
    settlement left the chain). The ledger undoes what the chain lost now; the job waits until its
    charges are settled again."""
    logger.warning("job %s: releaseJob refused, the escrow is behind the ledger (%s)", auth.job_id, error)
    BudgetAuthorization.objects.filter(pk=auth.pk, released_on_chain_at__isnull=True).update(release_tx_hash="")
    chain_rewind(client=client)
    return "waiting"


def _reservation_gone(auth: BudgetAuthorization, client: ChainClient) -> str:
    """The escrow knows no such job, though the ledger holds its budget reserved on chain
    (activated_at): the block that reserved it left the chain after this run's rewind. Nothing
    is recorded: the ledger undoes what the chain lost now (the budget goes back to reserving and
    its batch out again), and a later run releases the job once the escrow holds it again.
    Recorded released here, the escrow would keep the renter's money reserved for ever."""
    logger.warning("job %s: the escrow no longer holds its reserved budget; rewinding", auth.job_id)
    chain_rewind(client=client)
    return "waiting"


def job_release_on_chain(*, auth: BudgetAuthorization, client: ChainClient, deployment: Deployment) -> str:
    """Close one job's budget in the escrow and record it on `auth`. Returns what happened:
    "released" (a releaseJob transaction confirmed), "already_closed" (found closed, recorded),
    "pending" (sent but not confirmed in time, or the node is unreachable: the next run follows
    the transaction sent), "waiting" (the escrow is behind the ledger: it holds less settled for
    the job, or no reservation for it at all, after a rollback).
    Raises ContractReverted for any other refusal (e.g. the operator lost its role)."""
    if auth.release_tx_hash:
        followed = _follow_sent(auth, client)
        if followed is not None:
            return followed
    escrow = client.contract(ESCROW, deployment.escrow)
    renter, _deadline, _remaining, _lease_id, _settled, closed = client.call(escrow.functions.job(auth.job_id))
    if closed:
        _record_seen(auth, client)
        return "already_closed"
    if int(str(renter), 16) == 0:
        return _reservation_gone(auth, client)
    if rewound_before_send(client=client, what=f"the release of job {auth.job_id}"):
        return "waiting"
    try:
        sent = client.transact(escrow.functions.releaseJob(auth.job_id, *_settled_expected(auth.job_id)))
    except ContractReverted as reverted:
        if reverted.name == CLOSED:  # closed between the read and the send
            _record_seen(auth, client)
            return "already_closed"
        if reverted.name == BEHIND:
            return _behind(auth, client, reverted)
        raise
    BudgetAuthorization.objects.filter(pk=auth.pk).update(release_tx_hash=sent.hash)
    try:
        receipt = client.wait_confirmations(client.wait_receipt(sent.hash))
    except ContractReverted as reverted:
        if reverted.name == BEHIND:  # mined after a rollback took a settlement away
            return _behind(auth, client, reverted)
        if reverted.name in (CLOSED, None) and client.call(escrow.functions.job(auth.job_id))[5]:
            # Closed by a transaction mined before this one: a releaseJob an earlier run sent and
            # died before recording (its hash unknown here, the job still open when this run read
            # it), or the renter's own past the deadline. The job is closed, as this one meant. (In
            # the same block as this one, the replay on the block before cannot name the revert.)
            _record_seen(auth, client)
            return "already_closed"
        raise
    except NodeUnavailable as error:
        logger.warning("releaseJob(%s) sent as %s, not confirmed yet: %s", auth.job_id, sent.hash, error)
        return "pending"
    except TransactionTimeout as error:
        # The chain is not mining the operator's transactions (stalled, or rolled back under this
        # one's nonce): sending more would only make each wait as long. The run stops here, the
        # next one follows this transaction, after billing.rewind has looked at the chain.
        logger.warning("releaseJob(%s) sent as %s, not confirmed yet: %s", auth.job_id, sent.hash, error)
        raise ReleaseStalled(str(error)) from error
    _record(auth, receipt.tx_hash, receipt.block_number, receipt.block_hash)
    return "released"


# The run's counts, waiting reasons and node error: values of several types.
def jobs_release_on_chain(
    *, client: ChainClient, deployment: Deployment | None = None, limit: int = 100
) -> dict[str, Any]:
    """Release on chain every job whose budget the escrow activated, that the ledger has released
    (or spent) and that can be paid nothing more (billing.tasks.release_jobs_on_chain runs it under
    the settlement lock), after undoing what the chain took back (billing.rewind; counts under
    `rewound`). Returns counts per outcome; an unreachable node stops the run and is
    reported as `node_unavailable` (the next run continues); a job refused by the chain is reported
    under `errors`, and one that fails otherwise is logged and skipped."""
    deployment = deployment or deployment_require(client)
    # The run's counts, waiting reasons and node error: values of several types.
    result: dict[str, Any] = {"released": 0, "already_closed": 0, "pending": 0, "waiting": 0}
    candidates = (
        BudgetAuthorization.objects.filter(activated_at__isnull=False, released_on_chain_at__isnull=True)
        .filter(Q(job__status__in=Job.TERMINAL))
        .order_by("pk")
    )
    try:
        rewound = chain_rewind(client=client)
        if rewound.changed or rewound.errors:
            result["rewound"] = rewound.as_dict()
        for auth in candidates[:limit]:
            # No transaction around the job: `releaseJob` is sent and waited for, then recorded.
            with periodic.item("job", auth.job_id, atomic=False, passthrough=(NodeUnavailable, ReleaseStalled)):
                _release_one(auth=auth, client=client, deployment=deployment, result=result)
    except NodeUnavailable as error:
        logger.warning("release on chain: the node is unreachable (%s); retrying next run", error)
        result["node_unavailable"] = str(error)
    except ReleaseStalled as error:
        result["pending"] += 1
        result["stalled"] = str(error)
    return result


# The run's counts, waiting reasons and node error: values of several types.
def _release_one(
    *, auth: BudgetAuthorization, client: ChainClient, deployment: Deployment, result: dict[str, Any]
) -> None:
    if not job_ready_for_chain_release(job_id=auth.job_id):
        result["waiting"] += 1
        return
    try:
        outcome = job_release_on_chain(auth=auth, client=client, deployment=deployment)
    except (NodeUnavailable, ReleaseStalled):
        raise
    except ChainError as error:
        logger.error("release on chain of job %s failed: %s", auth.job_id, error)
        result.setdefault("errors", []).append(f"job {auth.job_id}: {error}")
        return
    result[outcome] += 1


__all__ = ["job_ready_for_chain_release", "job_release_on_chain", "jobs_release_on_chain", "release_forget"]
