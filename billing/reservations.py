"""Reserving job budgets in the escrow before their jobs run (docs/billing.md "Reserving budgets").

The escrow pays a lease only out of its job's reservation, and a renter may withdraw whatever is
not reserved. So the marketplace places a job only once the escrow holds its budget: from then on
every second the job can be charged is locked where the renter's withdrawals cannot reach it, and
a job whose budget the escrow will not hold never runs.

A budget (BudgetAuthorization.status): signed → reserving → reserved, or → refused; back to
signed when its batch failed. A batch (BudgetReservation): pending → submitted → confirmed | failed.

1. gather (`reservation_gather`): signed budgets of jobs that may still run (or that ran before
   budgets were reserved ahead of the work and have charges to pay), oldest first, at most
   RESERVATION_BATCH_MAX. A renter whose on-chain balance is short only because the ledger has
   released a finished job's budget that the escrow has not released yet (billing.release runs
   every minute) waits for that release instead of being refused.
2. create (`reservation_create`): the BudgetReservation (pending) and its budgets signed →
   reserving, in one transaction (a conditional update, so a budget is in one batch at a time).
3. send (`reservation_send`): the operator's nonce, the keccak of the exact calldata and the head
   block are recorded and committed BEFORE `escrow.reserve(budgets)` is sent; then tx_hash →
   submitted. The node unreachable: the batch stays pending and the next run finds its
   transaction (nonce + calldata hash) or sends it again. A revert at estimation (paused escrow,
   operator without its role): failed, its budgets back to signed.
4. confirm (`reservation_confirm`): once CHAIN_CONFIRMATIONS deep, the receipt's own logs decide
   each budget: `BudgetReserved` → reserved (activated_at); `BudgetSkipped` → refused with the
   reason, the job cancelled (an event says why) and its ledger reservation released;
   `AlreadyKnown` → reserved when the escrow's job is this renter's (a batch sent twice).
5. every run first completes the batches left pending or submitted (a worker killed between
   sending and recording, the node down, a receipt not there in time): that is the reconciler,
   and each batch is completed exactly once (conditional updates on its status).

Runs hold the settlement lock (`billing.settlement.LOCK_NAME`), so the operator's transactions go
out one at a time; each pending batch a run completes is one item (core.periodic.item), so
one that fails unexpectedly is logged and skipped and the run goes on. `reservation_request_soon`
asks for a run right after a renter stores a signature.

When the deposit watcher sees a withdrawal the renter's available balance in the ledger cannot
cover, the money that backed its admitted-but-not-reserved jobs is gone: `unfunded_jobs_cancel`
cancels them, newest first, until the ledger balances.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Case, IntegerField, Q, Value, When
from django.utils import timezone
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3.contract.contract import ContractFunction
from web3.logs import DISCARD

from billing import metering, selectors, services
from billing.chain import ChainClient, ChainError, ContractReverted, NodeUnavailable, Receipt, TransactionTimeout
from billing.chain.deployment import Deployment, deployment_require
from billing.contract import BUDGET_SKIP_ALREADY_KNOWN, BUDGET_SKIP_REASONS, ESCROW
from billing.errors import ValidationFailed
from billing.models import BudgetAuthorization, BudgetReservation, LeaseCharge
from billing.operator_tx import operator_tx_find, operator_tx_in_mempool, operator_tx_replaced
from billing.rewind import chain_rewind, rewound_before_send
from billing.signals import budgets_reserved
from core import periodic, soon
from jobs.models import Job, Renter
from jobs.services import event_record, job_cancel

logger = logging.getLogger(__name__)

BS = BudgetAuthorization.Status
RS = BudgetReservation.Status
# A budget whose deadline is this close is not sent: it could expire before the block is built.
DEADLINE_MARGIN = timedelta(seconds=120)
# Budgets per `reserve` transaction (about 60k gas each: a signature check and two new slots).
RESERVATION_BATCH_MAX = 100
# A burst of signatures within this many seconds makes one batch (see reservation_request_soon).
# Short: every renter waits it before the job can run (issue 13's submit → running ≤ 2 s), and a
# burst that outlasts it makes a second batch at most while the first is on its way (core.soon).
COALESCE_S = 0.25
_QUEUED_KEY = "billing.reservations.run_queued"

# Test seam: called right after the node accepted the transaction and before its hash is
# recorded (a test makes it raise to simulate a worker killed at the worst moment).
after_send_hook: Callable[[BudgetReservation], None] | None = None

REFUSAL_REASONS = {
    "Expired": "its authorization's deadline had passed",
    "InvalidBudget": "its amount or job id does not fit the escrow",
    "InvalidSignature": "the signature is not the renter wallet's signature of this budget",
    "InsufficientBalance": "the renter's available balance in the escrow was below the budget",
}


def refusal_sentence(reason: str) -> str:
    """What the renter reads about a refused budget (job event, unplaced reason)."""
    return f"the escrow refused its budget: {reason}"


# ----------------------------------------------------------------------------------- trigger


def reservation_request_soon() -> None:
    """Ask for a reservation run within about COALESCE_S seconds, once the caller's transaction
    commits. A burst of requests dispatches one task (core.soon), and the beat entry
    `reserve-budgets` runs every few seconds anyway, so a request lost with the broker is only
    late."""

    def send() -> None:
        from billing.tasks import reserve_budgets

        reserve_budgets.apply_async(countdown=COALESCE_S, expires=60)

    soon.request_soon(key=_QUEUED_KEY, send=send, what="reservation")


def reservation_request_clear() -> None:
    """Called by the task as it starts: a signature stored from now on asks for another run."""
    soon.request_clear(key=_QUEUED_KEY, what="reservation")


# ----------------------------------------------------------------------------------- gather


@dataclass
class Gathered:
    authorizations: list[BudgetAuthorization]
    # Why other signed budgets wait, counted per reason.
    waiting: dict[str, int]


def _renters_awaiting_chain_release() -> set[str]:
    """Wallets with a budget the ledger released but the escrow still holds (billing.release
    closes it within a minute): until then the escrow's available balance lags the ledger's."""
    return set(
        BudgetAuthorization.objects.filter(
            activated_at__isnull=False, released_on_chain_at__isnull=True, job__status__in=Job.TERMINAL
        ).values_list("renter_address", flat=True)
    )


def reservation_gather(
    *, client: ChainClient, deployment: Deployment, limit: int = RESERVATION_BATCH_MAX, now: datetime | None = None
) -> Gathered:
    """The signed budgets the next batch should carry, oldest first. A budget about to expire is
    refused here (the escrow would skip it); a renter short on chain only until the escrow
    releases one of its finished jobs waits (`awaiting_chain_release`)."""
    now = now or timezone.now()
    gathered = Gathered(authorizations=[], waiting={})
    # Jobs that may still run, and finished ones with charges to pay (run before their budget was
    # reserved ahead of the work; a cancelled job that never ran needs no reservation).
    charged = LeaseCharge.objects.filter(cumulative_micro__gt=0).values("lease__job_id")
    signed = (
        BudgetAuthorization.objects.filter(status=BS.SIGNED)
        .filter(~Q(job__status__in=Job.TERMINAL) | Q(job_id__in=charged))
        .select_related("job")
        .order_by("pk")
    )
    lagging = _renters_awaiting_chain_release()
    escrow = client.contract(ESCROW, deployment.escrow)
    room: dict[str, int] = {}  # what the escrow's available balance still covers, per lagging wallet
    # Read first, then write (refusals): a few past the limit, for those that wait or are refused.
    for auth in list(signed[: limit * 4]):
        if len(gathered.authorizations) >= limit:
            break
        if auth.deadline <= now + DEADLINE_MARGIN:
            budget_refuse(auth=auth, reason="its authorization expired before it could be reserved")
            continue
        address = auth.renter_address.lower()
        if address in lagging:
            if address not in room:
                room[address] = int(client.call(escrow.functions.availableBalance(to_checksum_address(address))))
            if room[address] < int(auth.max_amount):
                gathered.waiting["awaiting_chain_release"] = gathered.waiting.get("awaiting_chain_release", 0) + 1
                continue
            room[address] -= int(auth.max_amount)
        gathered.authorizations.append(auth)
    return gathered


def reservation_create(*, authorizations: list[BudgetAuthorization]) -> BudgetReservation | None:
    """Record a pending batch and move its budgets signed → reserving, atomically. A budget that
    changed meanwhile (no longer signed) is left out; None when none is left."""
    if not authorizations:
        return None
    with transaction.atomic():
        batch = BudgetReservation.objects.create(status=RS.PENDING)
        taken = []
        for auth in authorizations:
            moved = BudgetAuthorization.objects.filter(pk=auth.pk, status=BS.SIGNED).update(
                status=BS.RESERVING, reservation=batch
            )
            if moved:
                taken.append(auth.job_id)
        if not taken:
            transaction.set_rollback(True)
            return None
        batch.job_ids = taken
        batch.save(update_fields=["job_ids", "updated_at"])
    return batch


# ----------------------------------------------------------------------------------- send


def _budgets(batch: BudgetReservation) -> list[tuple[int, str, int, int, bytes]]:
    """The batch's budgets still being reserved, in calldata order. All of them, except for a batch
    sent again after its block left the chain (billing.rewind): a budget it had got refused stays
    refused (its job was cancelled), and is not sent again."""
    by_job = {a.job_id: a for a in BudgetAuthorization.objects.filter(reservation=batch, status=BS.RESERVING)}
    return [
        (
            job_id,
            to_checksum_address(by_job[job_id].renter_address),
            int(by_job[job_id].max_amount),
            int(by_job[job_id].deadline.timestamp()),
            bytes(HexBytes(by_job[job_id].signature)),
        )
        for job_id in batch.job_ids
        if job_id in by_job
    ]


def reserve_call(client: ChainClient, deployment: Deployment, batch: BudgetReservation) -> ContractFunction:
    """The bound `escrow.reserve(budgets)` of a batch (its calldata is what `calldata_hash` hashes)."""
    return client.contract(ESCROW, deployment.escrow).functions.reserve(_budgets(batch))


def _calldata_hash(fn: ContractFunction) -> str:
    return "0x" + keccak(HexBytes(fn._encode_transaction_data())).hex()


def reservation_send(*, batch: BudgetReservation, client: ChainClient, deployment: Deployment) -> BudgetReservation:
    """Send a pending batch. Records nonce, calldata hash and head block first (committed), then
    the tx_hash (→ submitted). NodeUnavailable: stays pending (re-raised). A revert at estimation
    (nothing sent): failed, its budgets back to signed. The chain gone back under the run
    (billing.rewind.rewound_before_send): nothing sent, it stays pending."""
    if rewound_before_send(client=client, what=f"budget reservation {batch.pk}"):
        return batch
    fn = reserve_call(client, deployment, batch)
    nonce = client.next_nonce()  # the one the send uses (billing.settlement.settlement_send)
    BudgetReservation.objects.filter(pk=batch.pk, status=RS.PENDING).update(
        nonce=nonce,
        calldata_hash=_calldata_hash(fn),
        sent_from_block=client.block_number(),
        attempts=batch.attempts + 1,
        updated_at=timezone.now(),
    )
    batch.refresh_from_db()
    try:
        sent = client.transact(fn, nonce=nonce)
    except ContractReverted as reverted:
        _fail(batch, str(reverted))
        return batch
    except ChainError as error:
        BudgetReservation.objects.filter(pk=batch.pk).update(last_error=str(error)[:2000], updated_at=timezone.now())
        raise
    if after_send_hook is not None:
        after_send_hook(batch)
    BudgetReservation.objects.filter(pk=batch.pk, status=RS.PENDING).update(
        tx_hash=sent.hash, nonce=sent.nonce, status=RS.SUBMITTED, submitted_at=timezone.now(), last_error=""
    )
    batch.refresh_from_db()
    return batch


def _fail(batch: BudgetReservation, detail: str) -> None:
    """Mark failed (nothing was reserved by it) and put its budgets back to signed for the next batch."""
    with transaction.atomic():
        locked = BudgetReservation.objects.select_for_update().get(pk=batch.pk)
        if locked.status in (RS.CONFIRMED, RS.FAILED):
            return
        BudgetAuthorization.objects.filter(reservation=locked, status=BS.RESERVING).update(status=BS.SIGNED)
        locked.status, locked.last_error = RS.FAILED, detail[:2000]
        locked.save(update_fields=["status", "last_error", "updated_at"])
    batch.refresh_from_db()
    logger.error("budget reservation %s failed: %s", batch.pk, detail)


# ----------------------------------------------------------------------------------- confirm


def reservation_events(
    client: ChainClient, deployment: Deployment, receipt: Receipt
) -> tuple[set[int], dict[int, str]]:
    """(job ids reserved, {job id: skip reason name}) from the receipt's own escrow logs."""
    escrow = client.contract(ESCROW, deployment.escrow)
    ours = escrow.address.lower()
    reserved = {
        int(log["args"]["jobId"])
        for log in escrow.events.BudgetReserved().process_receipt(receipt.raw, errors=DISCARD)
        if str(log["address"]).lower() == ours
    }
    skipped = {
        int(log["args"]["jobId"]): BUDGET_SKIP_REASONS[int(log["args"]["reason"])]
        for log in escrow.events.BudgetSkipped().process_receipt(receipt.raw, errors=DISCARD)
        if str(log["address"]).lower() == ours
    }
    return reserved, skipped


def reservation_confirm(
    *, batch: BudgetReservation, client: ChainClient, deployment: Deployment, receipt: Receipt
) -> BudgetReservation:
    """Settle each budget of a mined batch from the receipt's BudgetReserved / BudgetSkipped logs
    (the caller made sure it is CHAIN_CONFIRMATIONS deep). Idempotent: a confirmed batch is
    returned unchanged."""
    reserved, skipped = reservation_events(client, deployment, receipt)
    escrow = client.contract(ESCROW, deployment.escrow)
    now = timezone.now()
    with transaction.atomic():
        locked = BudgetReservation.objects.select_for_update().get(pk=batch.pk)
        if locked.status in (RS.CONFIRMED, RS.FAILED):
            return locked
        counts = {"reserved": 0, "refused": 0}
        newly_reserved: list[int] = []
        for auth in BudgetAuthorization.objects.filter(reservation=locked, status=BS.RESERVING).order_by("pk"):
            reason = skipped.get(auth.job_id)
            if reason == BUDGET_SKIP_REASONS[BUDGET_SKIP_ALREADY_KNOWN]:
                # The escrow knew the job already (the batch went out twice, or a settlement
                # activated it): reserved if the job's budget there is this renter's (a job's
                # renter never changes once set, so the latest state answers).
                renter = str(client.call(escrow.functions.job(auth.job_id))[0])
                reason = None if renter.lower() == auth.renter_address.lower() else "AlreadyKnown"
                if reason is None:
                    reserved.add(auth.job_id)
            if auth.job_id in reserved:
                BudgetAuthorization.objects.filter(pk=auth.pk, status=BS.RESERVING).update(
                    status=BS.RESERVED, activated_at=now
                )
                counts["reserved"] += 1
                newly_reserved.append(auth.job_id)
            elif reason is not None:
                budget_refuse(auth=auth, reason=REFUSAL_REASONS.get(reason, "the escrow holds another budget for it"))
                counts["refused"] += 1
            else:  # not in the receipt at all: not ours to decide; it goes out again
                logger.error("reservation %s: no event for job %s in %s", batch.pk, auth.job_id, receipt.tx_hash)
                BudgetAuthorization.objects.filter(pk=auth.pk, status=BS.RESERVING).update(status=BS.SIGNED)
        locked.status, locked.confirmed_at, locked.block_number = RS.CONFIRMED, now, receipt.block_number
        locked.block_hash, locked.tx_hash, locked.last_error = receipt.block_hash, receipt.tx_hash, ""
        # A batch confirmed again after a rewind keeps the refusals of its first confirmation.
        locked.reserved_count, locked.refused_count = counts["reserved"], locked.refused_count + counts["refused"]
        locked.save()
        if newly_reserved:
            # Their jobs may be placed now: the marketplace asks for a matching run on commit.
            budgets_reserved.send(sender=BudgetReservation, batch=locked, job_ids=newly_reserved)
    return locked


def reservation_unconfirm(*, batch: BudgetReservation, why: str) -> BudgetReservation:
    """Undo a confirmed batch whose block left the chain (billing.rewind found it): the escrow no
    longer holds the budgets it reserved, so they go back to reserving (activated_at cleared: the
    matcher places none of their jobs meanwhile, and their charges wait as
    awaiting_budget_reservation) and the batch to pending, keeping its nonce and calldata hash: the
    next run finds its transaction if the chain mined it again, waits for it if the node holds it,
    and sends it (with those budgets only) once more otherwise; a release recorded for one of them
    is forgotten with it. Refusals stand (their jobs were cancelled). A batch that reserved
    nothing stays confirmed, its block forgotten. The ledger is not touched: it reserved each
    job's budget at admission, and that has not changed."""
    with transaction.atomic():
        locked = BudgetReservation.objects.select_for_update().get(pk=batch.pk)
        if locked.status != RS.CONFIRMED:
            return locked
        # A release recorded for one of them went with it (every later block left the chain too):
        # forgotten, so the job is released again once the escrow holds its budget again.
        undone = BudgetAuthorization.objects.filter(reservation=locked, status=BS.RESERVED).update(
            status=BS.RESERVING,
            activated_at=None,
            released_on_chain_at=None,
            release_tx_hash="",
            release_block_number=None,
            release_block_hash="",
        )
        if undone:
            locked.status, locked.confirmed_at, locked.reserved_count = RS.PENDING, None, 0
        locked.rewinds, locked.last_error = locked.rewinds + 1, why[:2000]
        locked.block_number, locked.block_hash = None, ""
        locked.save()
    logger.warning("budget reservation %s: %s; %d budget(s) to reserve again", batch.pk, why, undone)
    return locked


def budget_refuse(*, auth: BudgetAuthorization, reason: str) -> None:
    """The escrow will not hold this (signed or reserving) budget: mark it refused with `reason`
    (a budget in another state is left alone), and cancel its job if it has not finished (an
    event says why), releasing the job's ledger reservation once its leases are finally metered.
    A job placed already (its reservation was taken back by a chain rollback, and the renter's
    withdrawal came first when it was sent again) has its lease asked to stop: nothing on chain
    backs it any more, so every further second would go unpaid. What ran waits as
    `budget_authorization_refused`. A finished job is left alone and the refusal logged."""
    sentence = refusal_sentence(reason)
    with transaction.atomic():
        moved = BudgetAuthorization.objects.filter(pk=auth.pk, status__in=(BS.SIGNED, BS.RESERVING)).update(
            status=BS.REFUSED, rejected_signature=auth.signature, rejected_reason=reason[:300]
        )
        if not moved:
            return
        job = Job.objects.get(pk=auth.job_id)
        if job.status in Job.TERMINAL:
            logger.error("job %s (%s): %s", job.pk, job.status, sentence)
            return
        if job.status != Job.Status.PENDING:
            logger.error("job %s (%s) runs unbacked and is stopped: %s", job.pk, job.status, sentence)
        event_record(job_id=job.pk, kind="budget.refused", actor="billing", detail={"reason": sentence})
        job_cancel(job=job, actor="billing")
        _release(job.pk)
    logger.warning("job %s cancelled: %s", auth.job_id, sentence)


def _release(job_id: int) -> None:
    try:
        services.job_budget_release(job_id=job_id)
    except ValidationFailed:  # a lease not finally metered yet: billing.tasks.release_budgets does it later
        logger.info("job %s: its budget is released once its leases are finally metered", job_id)


# ----------------------------------------------------------------------------------- runs


def _complete(
    *, batch: BudgetReservation, client: ChainClient, deployment: Deployment, wait: bool
) -> BudgetReservation:
    """Drive a submitted batch to confirmed or failed from its receipt; unchanged while its
    transaction is not mined (or not deep enough) yet."""
    try:
        receipt = client.wait_receipt(batch.tx_hash) if wait else client.receipt(batch.tx_hash)
    except ContractReverted as reverted:
        _fail(batch, str(reverted))
        return batch
    except TransactionTimeout:
        receipt = None
    if receipt is None:
        if operator_tx_replaced(record=batch, client=client):
            _fail(batch, "the transaction was replaced and never mined")
        return batch
    if not receipt.succeeded:
        _fail(batch, f"transaction {receipt.tx_hash} reverted")
        return batch
    if wait:
        try:
            receipt = client.wait_confirmations(receipt)
        except TransactionTimeout:
            return batch
    elif client.confirmations(receipt.tx_hash) < client.confirmations_required:
        return batch
    return reservation_confirm(batch=batch, client=client, deployment=deployment, receipt=receipt)


def _resume(*, batch: BudgetReservation, client: ChainClient, deployment: Deployment, wait: bool) -> BudgetReservation:
    """A batch left pending (never recorded as sent) or submitted (not confirmed yet)."""
    if batch.status == RS.SUBMITTED:
        return _complete(batch=batch, client=client, deployment=deployment, wait=False)
    if batch.nonce is not None and batch.calldata_hash:
        found = operator_tx_find(
            client=client, nonce=batch.nonce, calldata_hash=batch.calldata_hash, from_block=batch.sent_from_block or 0
        )
        if found is not None:
            BudgetReservation.objects.filter(pk=batch.pk, status=RS.PENDING).update(
                tx_hash=found, status=RS.SUBMITTED, submitted_at=timezone.now()
            )
            batch.refresh_from_db()
            return _complete(batch=batch, client=client, deployment=deployment, wait=wait)
        if operator_tx_in_mempool(client=client, nonce=batch.nonce):
            return batch  # sent and waiting in the node's pool: do not send it twice
    return _send_and_complete(batch=batch, client=client, deployment=deployment, wait=wait)


def _send_and_complete(
    *, batch: BudgetReservation, client: ChainClient, deployment: Deployment, wait: bool
) -> BudgetReservation:
    batch = reservation_send(batch=batch, client=client, deployment=deployment)
    if batch.status != RS.SUBMITTED:
        return batch
    return _complete(batch=batch, client=client, deployment=deployment, wait=wait)


# The run's counts, waiting reasons and node error: values of several types.
def reserve_run(
    *, client: ChainClient, deployment: Deployment | None = None, limit: int = RESERVATION_BATCH_MAX, wait: bool = True
) -> dict[str, Any]:
    """One reservation run (the caller holds the settlement lock): first undo what the chain took
    back (billing.rewind: settlements, reservation batches and releases whose block left the
    chain; its counts under `rewound`), then complete the batches left pending or submitted, then
    gather, create, send and confirm a new one. NodeUnavailable
    leaves the batches for the next run and is reported as `node_unavailable`, not raised; any
    other failure of one pending batch is logged and skipped (core.periodic.item).
    Returns counts: batches sent, budgets reserved and refused, batches failed, and why other
    signed budgets wait."""
    deployment = deployment or deployment_require(client)
    # The run's counts, waiting reasons and node error: values of several types.
    result: dict[str, Any] = {"sent": 0, "reserved": 0, "refused": 0, "failed": 0, "waiting": {}}

    def count(batch: BudgetReservation, sent_before: int) -> None:
        result["sent"] += batch.attempts > sent_before
        if batch.status == RS.CONFIRMED:
            result["reserved"] += batch.reserved_count
            result["refused"] += batch.refused_count
        elif batch.status == RS.FAILED:
            result["failed"] += 1

    try:
        rewound = chain_rewind(client=client)
        if rewound.changed or rewound.errors:
            result["rewound"] = rewound.as_dict()
        for batch in BudgetReservation.objects.filter(status__in=(RS.PENDING, RS.SUBMITTED)).order_by("pk"):
            before = batch.attempts
            with _batch(batch):
                count(_resume(batch=batch, client=client, deployment=deployment, wait=wait), before)
        gathered = reservation_gather(client=client, deployment=deployment, limit=limit)
        result["waiting"] = gathered.waiting
        created = reservation_create(authorizations=gathered.authorizations)
        if created is not None:
            # The new batch is the run's last step: its failure fails the run (nothing is left to skip to).
            count(_send_and_complete(batch=created, client=client, deployment=deployment, wait=wait), 0)
    except NodeUnavailable as error:
        logger.warning("reservations: the chain node is unreachable (%s); budgets wait", error)
        result["node_unavailable"] = str(error)
    return result


def _batch(batch: BudgetReservation) -> AbstractContextManager[periodic.Item]:
    """One batch as one item of the run: no transaction around it (each step commits before the
    chain is called), and an unreachable node ends the run instead of skipping the batch."""
    return periodic.item("reservation batch", batch.pk, atomic=False, passthrough=(NodeUnavailable,))


# ----------------------------------------------------------------------------------- withdrawals


def unfunded_jobs_cancel(*, renter: Renter, needed: int, why: str) -> list[int]:
    """Cancel the renter's pending jobs whose budget the escrow does not hold, newest first (those
    whose reservation is in flight last: it may yet succeed), each with a `budget.unfunded` event
    saying `why`, and release their ledger reservations, until the renter's available balance in
    the ledger covers `needed` or none is left. Jobs whose budget is reserved on chain are never
    touched: the escrow did not let that money go. Returns the cancelled job ids. The caller holds
    a transaction (the deposit watcher's), so a withdrawal that still cannot be covered rolls the
    cancellations back with it."""
    available = selectors.renter_available_micro(renter_id=renter.pk)
    if available >= needed:
        return []
    on_chain = BudgetAuthorization.objects.filter(job__renter=renter, status=BS.RESERVED).values("job_id")
    in_flight = BudgetAuthorization.objects.filter(job__renter=renter, status=BS.RESERVING).values("job_id")
    candidates = (
        Job.objects.filter(renter=renter, status=Job.Status.PENDING)
        .exclude(pk__in=on_chain)
        .annotate(in_flight=Case(When(pk__in=in_flight, then=Value(1)), default=Value(0), output_field=IntegerField()))
        .order_by("in_flight", "-created_at", "-pk")
    )
    cancelled: list[int] = []
    for job in candidates:
        if available >= needed:
            break
        event_record(job_id=job.pk, kind="budget.unfunded", actor="billing", detail={"reason": why})
        job_cancel(job=job, actor="billing")
        _release(job.pk)
        cancelled.append(job.pk)
        available = selectors.renter_available_micro(renter_id=renter.pk)
    if cancelled:
        logger.warning("renter %s: cancelled unfunded jobs %s: %s", renter.pk, cancelled, why)
    return cancelled


def withdrawal_unfunded_reason(*, amount: int, tx_hash: str) -> str:
    return (
        f"the renter withdrew {metering.micro_to_decimal(amount)} tokens from the escrow (transaction {tx_hash}) "
        "before this job's budget was reserved there: the money that backed it is gone"
    )


__all__ = [
    "COALESCE_S",
    "budget_refuse",
    "refusal_sentence",
    "reservation_confirm",
    "reservation_create",
    "reservation_gather",
    "reservation_request_clear",
    "reservation_request_soon",
    "reservation_send",
    "reservation_unconfirm",
    "reserve_call",
    "reserve_run",
    "unfunded_jobs_cancel",
    "withdrawal_unfunded_reason",
]
