"""The settlement engine: gathers metered lease charges, sends them to the escrow in one `settle`
transaction per batch, confirms them in the ledger, and reconciles batches left stuck.

Lifecycle of a Settlement (docs/billing.md "Settlement"):

1. gather (`settlement_gather`): leases whose lease_unsettled balance is positive, whose job's
   budget the escrow has reserved (billing.reservations does that before the job runs, so a batch
   never carries budgets), whose earlier leases of the same job are all final and settled (the
   contract skips a lease older than the job's current one), and which has no charge in a batch
   not yet confirmed (see `settlement_gather`). At most one lease per job per batch,
   so items can be sorted by provider address (the contract credits consecutive items of one
   provider with one write) without breaking that order. Each run first sends the budgets waiting
   to be reserved (`reservations.reserve_run`), so a charge never waits a run for its reservation.
2. create (`settlement_create`): the Settlement (pending), its items and one
   `settlement_submit_record` per lease, in ONE database transaction.
3. send (`settlement_send`): the operator's next nonce, the keccak of the exact calldata and the
   head block are stored and committed BEFORE the transaction is sent; then tx_hash → submitted.
   The node unreachable: the settlement stays pending and the next run sends it again.
4. confirm (`settlement_confirm`): after CHAIN_CONFIRMATIONS, what the escrow actually paid per
   lease is read from the transaction's own receipt (`settlement_outcome`): its escrow events say
   which items were skipped (SettlementItemSkipped) or capped (ChargeCapped), and its `Settled`
   event the totals paid and taken as fees, which the per-item amounts and the fee rate must add
   up to. No historical state is read, so a pruned node, or one restored from saved state without
   its history, confirms a batch as well as an archive node. Only when the events do not add up
   (the chain had settled a lease further than the ledger knew) is the contract's per-job state
   before and after the block read; a node that keeps no such state leaves the batch submitted
   and the run reports it (SettlementUnresolved). Paid amounts are posted with
   `settlement_confirm_record` (fee as the contract computes it); whatever was not paid (capped,
   skipped, already paid) goes back with `settlement_revert_record`. An item skipped because the
   escrow knew no such job (its budget's reservation left the chain with a rollback just before
   the batch was mined) is marked `job_unknown`: the escrow recorded nothing of its cumulative
   charge, so it does not count as sent and the charge goes out again in a later batch, once the
   budget is reserved again (capped and already-paid items are recorded on chain: sending them
   again would pay nothing). The block's number and hash are recorded. A revert: failed with the
   decoded error and every item reverted.
5. reconcile (`settlements_reconcile`): pending/submitted batches older than SETTLEMENT_STUCK_S
   (or any, when forced) are completed from the chain: by tx_hash, or, when the worker died
   between sending and recording it, by finding the operator's transaction with the recorded
   nonce and calldata hash. Cumulative charges make re-sending safe: the contract pays only the
   increase, so nothing is paid twice.
6. rewind (`settlement_unconfirm`, driven by billing.rewind before every run sends anything): a
   confirmed batch whose block left the chain (a reorg, a node rolled back or restored from older
   state) has its confirmation's ledger entries compensated and goes back to pending; a submitted
   one whose transaction the node no longer knows goes back to pending. A pending batch is then
   found on chain by nonce and calldata hash (mined again), waited for (in the node's pool), or
   sent once more (without a `job_unknown` item whose charge a later batch took on meanwhile).

Settlement runs, reservation runs, releases on chain and the reconciler share one lock
(`LOCK_NAME`, taken by core.periodic for the tasks and by `settlement_retry`), held across
commits without an open database transaction, so each step commits before the next touches the
chain. Each pending batch a run completes is one item (core.periodic.item): one that fails
unexpectedly is logged and skipped, and the run goes on with the others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from django.conf import settings
from django.db import transaction
from django.db.models import Max, QuerySet
from django.utils import timezone
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.logs import DISCARD

from billing import reservations, services
from billing.chain import ChainClient, ChainError, ContractReverted, NodeUnavailable, Receipt, TransactionTimeout
from billing.chain.deployment import Deployment, deployment_require
from billing.contract import ESCROW, SKIP_UNKNOWN_JOB, settlement_items_encode
from billing.contract import SettlementItem as ChainItem
from billing.models import (
    BudgetAuthorization,
    LeaseCharge,
    LedgerAccount,
    Settlement,
    SettlementItem,
)
from billing.operator_tx import operator_tx_find, operator_tx_in_mempool, operator_tx_replaced
from billing.rewind import chain_rewind, rewound_before_send
from core import periodic
from core.locks import try_lock
from jobs.models import Lease

logger = logging.getLogger(__name__)

SS = Settlement.Status
AK = LedgerAccount.Kind
BS = BudgetAuthorization.Status
# The lock every run that sends the operator's transactions holds (billing.tasks.SETTLEMENT_LOCK).
LOCK_NAME = "billing.settlement"

# Test seam: called right after the node accepted the transaction and before its hash is
# recorded (a test makes it raise to simulate a worker killed at the worst moment).
after_send_hook: Callable[[Settlement], None] | None = None


def settlement_ref(settlement: Settlement) -> str:
    """The ledger's settlement_ref of a batch (its entries' keys contain it)."""
    return f"settlement:{settlement.pk}"


# ----------------------------------------------------------------------------------- gather


@dataclass
class Candidate:
    """One lease to settle: its new cumulative charge and the part not yet sent. `carries_budget`
    is always False now that budgets are reserved before the work (batches recorded before that
    may still carry one, and `_settle_call` still sends it)."""

    lease: Lease
    authorization: BudgetAuthorization
    provider_address: str
    cumulative: int
    delta: int
    carries_budget: bool


@dataclass
class Gathered:
    candidates: list[Candidate] = field(default_factory=list)
    # Why other leases with unsettled charges wait, counted per reason.
    waiting: dict[str, int] = field(default_factory=dict)

    def wait(self, reason: str) -> None:
        self.waiting[reason] = self.waiting.get(reason, 0) + 1


def lease_sent_micro(lease_id: int) -> int:
    """The highest cumulative charge of the lease in a batch not failed (0 if none), leaving out
    an item the escrow skipped for not knowing the job (`job_unknown`): it recorded nothing of it."""
    return (
        SettlementItem.objects.filter(lease_id=lease_id, job_unknown=False)
        .exclude(settlement__status=SS.FAILED)
        .aggregate(top=Max("cumulative_micro"))["top"]
        or 0
    )


def _balance(kind: str, lease_id: int) -> int:
    return (
        LedgerAccount.objects.filter(kind=kind, owner_key=f"lease:{lease_id}").values_list("balance", flat=True).first()
        or 0
    )


def _earlier_leases_done(lease: Lease) -> bool:
    for earlier in Lease.objects.filter(job_id=lease.job_id, pk__lt=lease.pk):
        charge = LeaseCharge.objects.filter(lease=earlier).first()
        if charge is None or not charge.final:
            return False
        if _balance(AK.LEASE_UNSETTLED, earlier.pk) > 0 or _balance(AK.IN_SETTLEMENT, earlier.pk) > 0:
            return False
    return True


def settlement_gather(*, limit: int | None = None) -> Gathered:
    """The leases the next batch should carry (at most `limit`, default SETTLEMENT_BATCH_MAX),
    sorted by provider address, and counts of why the others wait:
    awaiting_budget_authorization (never signed), awaiting_budget_reservation (signed, not yet
    reserved by the escrow), budget_authorization_refused, awaiting_payout_address,
    awaiting_earlier_lease, awaiting_earlier_batch, below_min_delta.

    A lease with a charge in a batch not yet confirmed (pending or submitted) waits for it
    (awaiting_earlier_batch): a later batch's cumulative charge would pay that part too should the
    escrow not record the earlier item (it skips an item whose job it does not know, as after a
    rollback took the job's reservation), and the ledger, which books each batch its own delta,
    would count it short and hold the earlier item's part unsettled for good."""
    limit = int(settings.SETTLEMENT_BATCH_MAX) if limit is None else limit
    min_delta = int(settings.SETTLEMENT_MIN_DELTA_MICRO)
    gathered = Gathered()
    jobs_taken: set[int] = set()
    in_flight = set(
        SettlementItem.objects.filter(settlement__status__in=(SS.PENDING, SS.SUBMITTED), job_unknown=False).values_list(
            "lease_id", flat=True
        )
    )
    accounts = (
        LedgerAccount.objects.filter(kind=AK.LEASE_UNSETTLED, balance__gt=0)
        .select_related("lease__machine__provider", "lease__charge", "lease__job")
        .order_by("lease_id")
    )
    for account in accounts.iterator():
        lease = cast(Lease, account.lease)  # a LEASE_UNSETTLED account always names its lease
        if len(gathered.candidates) >= limit:
            gathered.wait("batch_full")
            continue
        auth = BudgetAuthorization.objects.filter(job_id=lease.job_id).first()
        if auth is None:
            gathered.wait("awaiting_budget_authorization")
            continue
        if auth.status == BS.REFUSED:
            gathered.wait("budget_authorization_refused")
            continue
        if auth.status != BS.RESERVED:
            gathered.wait("awaiting_budget_reservation")
            continue
        payout = lease.machine.provider.payout_address
        if not payout:
            gathered.wait("awaiting_payout_address")
            continue
        if lease.job_id in jobs_taken or not _earlier_leases_done(lease):
            gathered.wait("awaiting_earlier_lease")
            continue
        if lease.pk in in_flight:
            gathered.wait("awaiting_earlier_batch")
            continue
        sent = lease_sent_micro(lease.pk)
        charge = getattr(lease, "charge", None)
        cumulative_now = charge.cumulative_micro if charge else 0
        delta = min(cumulative_now - sent, account.balance)
        if delta <= 0:
            continue
        if delta < min_delta and not (charge and charge.final):
            gathered.wait("below_min_delta")
            continue
        jobs_taken.add(lease.job_id)
        gathered.candidates.append(
            Candidate(
                lease=lease,
                authorization=auth,
                provider_address=to_checksum_address(payout),
                cumulative=sent + delta,
                delta=delta,
                carries_budget=False,
            )
        )
    gathered.candidates.sort(key=lambda c: (int(c.provider_address, 16), c.lease.pk))
    return gathered


def settlement_create(*, candidates: list[Candidate], fee_bps: int = 0) -> Settlement | None:
    """Record a pending batch of `candidates` and move their charges into settlement, atomically.
    None when there is nothing to settle."""
    if not candidates:
        return None
    with transaction.atomic():
        settlement = Settlement.objects.create(
            status=SS.PENDING,
            fee_bps=fee_bps,
            item_count=len(candidates),
            total_micro=sum(c.delta for c in candidates),
        )
        for c in candidates:
            SettlementItem.objects.create(
                settlement=settlement,
                lease=c.lease,
                job_id=c.lease.job_id,
                provider_address=c.provider_address.lower(),
                cumulative_micro=c.cumulative,
                delta_micro=c.delta,
                carries_budget=c.carries_budget,
            )
            services.settlement_submit_record(
                lease_id=c.lease.pk, amount=c.delta, settlement_ref=settlement_ref(settlement)
            )
    return settlement


# ----------------------------------------------------------------------------------- send


def settlement_items_carried(settlement: Settlement) -> QuerySet[SettlementItem]:
    """The items a batch not confirmed carries: every one, except an item the escrow skipped at an
    earlier confirmation for not knowing its job whose charge a later batch took on before the
    block left the chain (`job_unknown`, kept by settlement_unconfirm): it is not sent again."""
    return settlement.items.filter(job_unknown=False).order_by("pk")


def _settle_call(client: ChainClient, deployment: Deployment, settlement: Settlement) -> ContractFunction:
    escrow = client.contract(ESCROW, deployment.escrow)
    items = list(settlement_items_carried(settlement).select_related("job"))
    chain_items = [
        ChainItem(
            lease_id=i.lease_id, job_id=i.job_id, provider=i.provider_address, cumulative_charge=i.cumulative_micro
        )
        for i in items
    ]
    budgets = []
    for item in items:
        if not item.carries_budget:
            continue
        auth = BudgetAuthorization.objects.get(job_id=item.job_id)
        budgets.append(
            (
                item.job_id,
                to_checksum_address(auth.renter_address),
                int(auth.max_amount),
                int(auth.deadline.timestamp()),
                bytes(HexBytes(auth.signature)),
            )
        )
    return escrow.functions.settle(settlement_items_encode(chain_items), budgets)


def _calldata_hash(fn: ContractFunction) -> str:
    return "0x" + keccak(HexBytes(fn._encode_transaction_data())).hex()


def settlement_send(*, settlement: Settlement, client: ChainClient, deployment: Deployment) -> Settlement:
    """Send a pending batch. Records nonce, calldata hash and head block first (committed), then
    the tx_hash (→ submitted). NodeUnavailable: stays pending (re-raised). A revert at estimation
    (nothing sent): failed, charges back to unsettled, a refused budget marked. The chain gone
    back under the run (billing.rewind.rewound_before_send): nothing sent, it stays pending."""
    if rewound_before_send(client=client, what=f"settlement {settlement.pk}"):
        return settlement
    fn = _settle_call(client, deployment, settlement)
    # The nonce the send will use: the node's pending count alone lagged behind this client's
    # counter on a lagging node, the batch recorded a nonce it did not use, and a worker that died
    # before recording its hash left it unfound: sent a second time.
    nonce = client.next_nonce()
    Settlement.objects.filter(pk=settlement.pk).update(
        nonce=nonce,
        calldata_hash=_calldata_hash(fn),
        sent_from_block=client.block_number(),
        attempts=settlement.attempts + 1,
        updated_at=timezone.now(),
    )
    settlement.refresh_from_db()
    try:
        sent = client.transact(fn, nonce=nonce)
    except ContractReverted as reverted:
        _fail(settlement, reverted)
        return settlement
    except ChainError as error:
        Settlement.objects.filter(pk=settlement.pk).update(last_error=str(error)[:2000], updated_at=timezone.now())
        raise
    if after_send_hook is not None:
        after_send_hook(settlement)
    Settlement.objects.filter(pk=settlement.pk).update(
        tx_hash=sent.hash, nonce=sent.nonce, status=SS.SUBMITTED, submitted_at=timezone.now(), last_error=""
    )
    settlement.refresh_from_db()
    return settlement


def _fail(settlement: Settlement, reverted: ContractReverted | None, reason: str = "") -> None:
    """Mark failed and put every item's charge back to unsettled."""
    detail = reason or (str(reverted) if reverted else "failed")
    with transaction.atomic():
        locked = Settlement.objects.select_for_update().get(pk=settlement.pk)
        if locked.status in (SS.CONFIRMED, SS.FAILED):
            return
        for item in settlement_items_carried(locked):
            services.settlement_revert_record(
                lease_id=item.lease_id,
                amount=int(item.delta_micro),
                settlement_ref=settlement_ref(locked),
                generation=locked.rewinds,
            )
        locked.status, locked.last_error = SS.FAILED, detail[:2000]
        if reverted is not None and reverted.tx_hash:
            locked.tx_hash = reverted.tx_hash
        locked.save()
    settlement.refresh_from_db()
    logger.error("settlement %s failed: %s", settlement.pk, detail)


# ----------------------------------------------------------------------------------- confirm


class SettlementUnresolved(ChainError):
    """A mined batch whose receipt's events do not add up to what the ledger sent, on a node that
    keeps no state old enough to tell what it paid: it stays submitted, and the run reports it."""


@dataclass(frozen=True)
class Outcome:
    """What a mined `settle` transaction paid: per SettlementItem pk, and the fee rate applied.
    `source`: "logs" (the receipt's events) or "state" (the contract's state around the block).
    `job_unknown`: the items skipped because the escrow knew no such job when the batch was mined
    (its reservation left the chain with a rollback): their charge is to go out again."""

    paid: dict[int, int]
    fee_bps: int
    source: str
    job_unknown: frozenset[int] = frozenset()


def _escrow_events(escrow: Contract, receipt: Receipt, name: str) -> list[dict[str, Any]]:
    """The arguments of the escrow's `name` events in `receipt` (another contract's are ignored)."""
    ours = escrow.address.lower()
    return [
        dict(log["args"])
        for log in getattr(escrow.events, name)().process_receipt(receipt.raw, errors=DISCARD)
        if str(log["address"]).lower() == ours
    ]


def settlement_outcome(
    *,
    settlement: Settlement,
    items: list[SettlementItem],
    client: ChainClient,
    deployment: Deployment,
    receipt: Receipt,
) -> Outcome:
    """What the mined batch paid each of its `items`, from the receipt's own events: an item
    skipped (SettlementItemSkipped) was paid nothing, a capped one (ChargeCapped) its delta less
    what the escrow refused, any other its delta. Trusted when they add up to the `Settled`
    event's total and the fees at the batch's recorded rate (else at the rate the contract had in
    that block, or has now) add up to its fee total. Otherwise (the chain had settled a lease
    further than the ledger knew, so an item paid less, silently) it is read from the contract's
    per-job state before and after the block; a node that keeps no such state raises
    SettlementUnresolved. NodeUnavailable propagates."""
    escrow = client.contract(ESCROW, deployment.escrow)
    skips = {
        (int(a["jobId"]), int(a["leaseId"])): int(a["reason"])
        for a in _escrow_events(escrow, receipt, "SettlementItemSkipped")
    }
    skipped = set(skips)
    refused: dict[tuple[int, int], int] = {}
    for a in _escrow_events(escrow, receipt, "ChargeCapped"):
        key = (int(a["jobId"]), int(a["leaseId"]))
        refused[key] = refused.get(key, 0) + int(a["refused"])
    paid = {
        item.pk: 0
        if (item.job_id, item.lease_id) in skipped
        else max(0, int(item.delta_micro) - refused.get((item.job_id, item.lease_id), 0))
        for item in items
    }
    totals = _escrow_events(escrow, receipt, "Settled")
    if len(totals) == 1 and sum(paid.values()) == int(totals[0]["paid"]):
        fee_bps = _fee_bps_applied(
            settlement=settlement, escrow=escrow, client=client, receipt=receipt, paid=paid, fees=int(totals[0]["fees"])
        )
        if fee_bps is not None:
            unknown = frozenset(i.pk for i in items if skips.get((i.job_id, i.lease_id)) == SKIP_UNKNOWN_JOB)
            return Outcome(paid=paid, fee_bps=fee_bps, source="logs", job_unknown=unknown)
    try:
        return _outcome_from_state(items=items, escrow=escrow, client=client, block=receipt.block_number)
    except NodeUnavailable:
        raise
    except ChainError as error:
        raise SettlementUnresolved(
            f"settlement {settlement.pk}: the events of {receipt.tx_hash} do not add up to what was sent, and the "
            f"node cannot tell what it paid from the contract's state around block {receipt.block_number} ({error})"
        ) from None


def _fee_bps_applied(
    *, settlement: Settlement, escrow: Contract, client: ChainClient, receipt: Receipt, paid: dict[int, int], fees: int
) -> int | None:
    """The fee rate (bps) under which the per-item fees of `paid` add up to `fees`, as the contract
    rounds them: the batch's recorded rate, else the contract's in the batch's block, else now."""

    def matches(bps: int) -> bool:
        return sum(services.settlement_amounts(amount, bps)[1] for amount in paid.values()) == fees

    if matches(int(settlement.fee_bps)):
        return int(settlement.fee_bps)
    for block in (receipt.block_number, "latest"):
        try:
            bps = int(client.call(escrow.functions.feeBps(), block=block))
        except NodeUnavailable:
            raise
        except ChainError:
            continue  # the node keeps no state of that block
        if matches(bps):
            return bps
    return None


def _job_state(client: ChainClient, escrow: Contract, job_id: int, block: int) -> tuple[str, int, int, int]:
    """(renter, remaining, lease id, settled cumulative of that lease) of a job in `block`."""
    renter, _deadline, remaining, lease, settled, _closed = client.call(escrow.functions.job(job_id), block=block)
    return str(renter), int(remaining), int(lease), int(settled)


def _outcome_from_state(*, items: list[SettlementItem], escrow: Contract, client: ChainClient, block: int) -> Outcome:
    """What left each job's reservation in `block` (the contract's state before and after it):
    needs the state of block − 1, which a pruned or restored node may not keep.

    An item this transaction paid nothing for, whose lease the escrow had already settled to its
    cumulative charge out of a budget never capped (its reservation not drained), was paid by an
    earlier transaction of the same batch: one the marketplace sent and then lost track of (its
    record undone, its sender dead before recording it) before sending the batch again. It counts
    as paid: booked as unpaid, the charge was never sent again (its cumulative is settled) and the
    ledger owed the provider what the chain had paid, for good."""
    fee_bps = int(client.call(escrow.functions.feeBps(), block=block))
    paid: dict[int, int] = {}
    unknown: set[int] = set()
    for item in items:
        renter_before, before, _lease, _settled = _job_state(client, escrow, item.job_id, block - 1)
        renter_after, after, lease_after, settled_after = _job_state(client, escrow, item.job_id, block)
        if int(renter_after, 16) == 0:  # the escrow knew no such job, even after the batch: paid nothing
            unknown.add(item.pk)
            paid[item.pk] = 0
            continue
        if int(renter_before, 16) == 0:  # activated by this transaction
            auth = BudgetAuthorization.objects.filter(job_id=item.job_id).first()
            before = int(auth.max_amount) if auth else after
        paid[item.pk] = max(0, min(int(item.delta_micro), before - after))
        replayed = before == after and lease_after == item.lease_id and settled_after >= int(item.cumulative_micro)
        if paid[item.pk] == 0 and replayed and after > 0:
            paid[item.pk] = int(item.delta_micro)
    return Outcome(paid=paid, fee_bps=fee_bps, source="state", job_unknown=frozenset(unknown))


def settlement_confirm(
    *, settlement: Settlement, client: ChainClient, deployment: Deployment, receipt: Receipt
) -> Settlement:
    """Post a mined batch once CHAIN_CONFIRMATIONS deep: per lease, what the escrow paid
    (`settlement_outcome`) is confirmed with the contract's fee; what was not paid goes back to
    unsettled. Records the block's number and hash. Raises TransactionTimeout when not deep enough
    yet, SettlementUnresolved when what it paid cannot be told (it stays submitted)."""
    receipt = client.wait_confirmations(receipt)
    block = receipt.block_number
    items = list(settlement_items_carried(settlement))
    outcome = settlement_outcome(
        settlement=settlement, items=items, client=client, deployment=deployment, receipt=receipt
    )
    fee_bps = outcome.fee_bps
    ref = settlement_ref(settlement)
    with transaction.atomic():
        locked = Settlement.objects.select_for_update().get(pk=settlement.pk)
        if locked.status == SS.CONFIRMED:
            return locked
        now = timezone.now()
        notes = []
        for item in items:
            amount = outcome.paid[item.pk]
            if amount > 0:
                services.settlement_confirm_record(
                    lease_id=item.lease_id,
                    amount=amount,
                    fee_bps=fee_bps,
                    settlement_ref=ref,
                    tx_hash=receipt.tx_hash,
                    generation=locked.rewinds,
                )
            rest = int(item.delta_micro) - amount
            if rest > 0:
                services.settlement_revert_record(
                    lease_id=item.lease_id, amount=rest, settlement_ref=ref, generation=locked.rewinds
                )
                unknown = item.pk in outcome.job_unknown
                notes.append(
                    f"lease {item.lease_id}: {rest} not paid by the escrow"
                    + (" (it knew no such job: the charge goes out again)" if unknown else "")
                )
        SettlementItem.objects.filter(pk__in=outcome.job_unknown).update(job_unknown=True)
        # A batch recorded before budgets were reserved ahead of the work may have activated one.
        BudgetAuthorization.objects.filter(
            job_id__in=[i.job_id for i in items if i.carries_budget], activated_at__isnull=True
        ).update(activated_at=now, status=BS.RESERVED)
        locked.status, locked.confirmed_at, locked.block_number = SS.CONFIRMED, now, block
        locked.block_hash = receipt.block_hash
        locked.tx_hash, locked.fee_bps, locked.last_error = receipt.tx_hash, fee_bps, "; ".join(notes)[:2000]
        locked.save()
    if notes:
        logger.error("settlement %s: the escrow paid less than sent: %s", settlement.pk, "; ".join(notes))
    return locked


def _carried_on(item: SettlementItem) -> bool:
    """Whether a later batch not failed carries the item's lease (its charge moved on from unsettled)."""
    return (
        SettlementItem.objects.filter(lease_id=item.lease_id, settlement_id__gt=item.settlement_id)
        .exclude(settlement__status=SS.FAILED)
        .exists()
    )


def settlement_unconfirm(*, settlement: Settlement, why: str) -> Settlement:
    """Undo a confirmed batch whose block left the chain (billing.rewind found it): every ledger
    entry its confirmation posted for the items it sends again is compensated
    (services.settlement_unconfirm_record: the whole delta of each such lease is in settlement
    again), `rewinds` grows by one (its next confirmation
    posts entries under new keys) and it goes back to pending, keeping its nonce and calldata
    hash, so the next run finds its transaction if the chain mined it again, waits for it if the
    node holds it, and sends it once more otherwise. An item the escrow had skipped for not
    knowing its job (`job_unknown`: it paid nothing) is in settlement again only while its charge
    still waited unsettled; one a later batch has carried on is left as it is, and the batch goes
    out again without it (`settlement_items_carried`); a batch left with nothing to send stays
    confirmed, its block forgotten. Raises InsufficientBalance (nothing
    written) when the money moved on meanwhile (a withdrawal the ledger still shows). Returns it
    fresh."""
    ref = settlement_ref(settlement)
    with transaction.atomic():
        locked = Settlement.objects.select_for_update().get(pk=settlement.pk)
        if locked.status != SS.CONFIRMED:
            return locked
        undone = 0
        for item in locked.items.order_by("pk"):
            if item.job_unknown and _carried_on(item):
                continue  # paid nothing here; its charge is in a later batch: this one goes without it
            posted = services.settlement_unconfirm_record(
                lease_id=item.lease_id, settlement_ref=ref, generation=locked.rewinds, why=why
            )
            if item.job_unknown:
                if not posted:
                    # Left out of the confirmation undone (dropped at an earlier rewind): its charge
                    # waits unsettled for a later batch, and this one still goes without it.
                    continue
                # Skipped by this confirmation, its charge still unsettled: in this batch again.
                SettlementItem.objects.filter(pk=item.pk).update(job_unknown=False)
            undone += 1
        locked.rewinds, locked.last_error = locked.rewinds + 1, why[:2000]
        locked.block_number, locked.block_hash = None, ""
        if undone:
            locked.status, locked.confirmed_at = SS.PENDING, None
        locked.save()
    if undone:
        logger.warning("settlement %s is pending again: %s", settlement.pk, why)
    else:  # it paid nothing, and what it carried went out again in later batches: nothing to send
        logger.warning("settlement %s: %s; it paid nothing and stays confirmed", settlement.pk, why)
    return locked


def _complete(*, settlement: Settlement, client: ChainClient, deployment: Deployment, wait: bool) -> Settlement:
    """Drive a submitted batch to confirmed or failed from its receipt."""
    try:
        receipt = client.wait_receipt(settlement.tx_hash) if wait else client.receipt(settlement.tx_hash)
    except ContractReverted as reverted:
        _fail(settlement, reverted)
        return settlement
    if receipt is None:
        return settlement
    if not receipt.succeeded:
        _fail(settlement, None, f"transaction {receipt.tx_hash} reverted")
        return settlement
    return settlement_confirm(settlement=settlement, client=client, deployment=deployment, receipt=receipt)


# ----------------------------------------------------------------------------------- runs


def _due(now: datetime) -> bool:
    """A batch is due every SETTLEMENT_INTERVAL_S, or at once when a full batch is waiting."""
    last = Settlement.objects.order_by("-created_at").values_list("created_at", flat=True).first()
    if last is None or now - last >= timedelta(seconds=int(settings.SETTLEMENT_INTERVAL_S)):
        return True
    waiting = LedgerAccount.objects.filter(kind=AK.LEASE_UNSETTLED, balance__gt=0).count()
    return waiting >= int(settings.SETTLEMENT_BATCH_MAX)


# The run's counts, waiting reasons and node error: values of several types.
def settle_run(
    *, client: ChainClient, deployment: Deployment | None = None, force: bool = False, wait: bool = True
) -> dict[str, Any]:
    """One settlement run (the caller holds the lock LOCK_NAME): first reserve the budgets waiting
    for it (billing.reservations; its counts under `reservations`), then finish any pending batch
    (re-send it: catch-up after the node was down) and confirm any submitted one mined deep
    enough since (`_complete_if_deep`), then, when due (or `force`), gather, create,
    send and confirm a new one. NodeUnavailable leaves the batch pending and is reported, not
    raised; any other failure of one pending batch is logged and skipped (core.periodic.item),
    so it holds up neither the other pending batches nor the new one."""
    deployment = deployment or deployment_require(client)
    # The run's counts, waiting reasons and node error: values of several types.
    result: dict[str, Any] = {"sent": 0, "confirmed": 0, "failed": 0, "waiting": {}}
    reserved = reservations.reserve_run(client=client, deployment=deployment, wait=wait)
    if reserved.get("sent") or reserved.get("node_unavailable"):
        result["reservations"] = reserved
    if "rewound" in reserved:  # what the reservation run undid first (billing.rewind), settlements included
        result["rewound"] = reserved["rewound"]
    if "node_unavailable" in reserved:
        result["node_unavailable"] = reserved["node_unavailable"]
        return result
    try:
        for pending in Settlement.objects.filter(status=SS.PENDING).order_by("pk"):
            with _batch(pending):
                _resume(settlement=pending, client=client, deployment=deployment, result=result, wait=wait)
        for submitted in Settlement.objects.filter(status=SS.SUBMITTED).exclude(tx_hash="").order_by("pk"):
            with _batch(submitted):
                _complete_if_deep(settlement=submitted, client=client, deployment=deployment, result=result)
        if not (force or _due(timezone.now())):
            return result
        gathered = settlement_gather()
        result["waiting"] = gathered.waiting
        escrow = client.contract(ESCROW, deployment.escrow)
        settlement = settlement_create(
            candidates=gathered.candidates, fee_bps=int(client.call(escrow.functions.feeBps()))
        )
        if settlement is None:
            return result
        # The new batch is the run's last step: its failure fails the run (nothing is left to skip to).
        _send_and_complete(settlement=settlement, client=client, deployment=deployment, result=result, wait=wait)
    except NodeUnavailable as error:
        logger.warning("settlement: the chain node is unreachable (%s); pending batches wait", error)
        result["node_unavailable"] = str(error)
    return result


# The run's counts, waiting reasons and node error: values of several types.
def _complete_if_deep(
    *, settlement: Settlement, client: ChainClient, deployment: Deployment, result: dict[str, Any]
) -> None:
    """A submitted batch (its receipt did not come within an earlier run's wait) mined and
    CHAIN_CONFIRMATIONS deep now: confirmed (or failed, if it reverted) by this run, without
    waiting; else left for a later run or the reconciler. Its leases' later charges wait for it
    (`settlement_gather`), so this run does not leave that to the reconciler's
    SETTLEMENT_STUCK_S."""
    if client.confirmations(settlement.tx_hash) >= client.confirmations_required:
        _complete_counted(settlement=settlement, client=client, deployment=deployment, result=result)


# The run's counts, waiting reasons and node error: values of several types.
def _complete_counted(
    *, settlement: Settlement, client: ChainClient, deployment: Deployment, result: dict[str, Any]
) -> Settlement | None:
    """`_complete` a submitted batch without waiting, counted in `result`; None when it is not
    deep enough (or the chain went back meanwhile: the next run's rewind sees to it)."""
    try:
        completed = _complete(settlement=settlement, client=client, deployment=deployment, wait=False)
    except TransactionTimeout:
        return None
    if completed.status == SS.CONFIRMED:
        result["confirmed"] += 1
    elif completed.status == SS.FAILED:
        result["failed"] += 1
    return completed


def _batch(settlement: Settlement) -> contextlib.AbstractContextManager[periodic.Item]:
    """One batch as one item of the run: no transaction around it (each step commits before the
    chain is called), and an unreachable node ends the run instead of skipping the batch."""
    return periodic.item("settlement", settlement.pk, atomic=False, passthrough=(NodeUnavailable,))


# The run's counts, waiting reasons and node error: values of several types.
def _send_and_complete(
    *, settlement: Settlement, client: ChainClient, deployment: Deployment, result: dict[str, Any], wait: bool
) -> None:
    settlement = settlement_send(settlement=settlement, client=client, deployment=deployment)
    if settlement.status == SS.FAILED:
        result["failed"] += 1
        return
    if settlement.status == SS.PENDING:  # not sent: the chain went back under the run
        result["held_back"] = result.get("held_back", 0) + 1
        return
    result["sent"] += 1
    try:
        settlement = _complete(settlement=settlement, client=client, deployment=deployment, wait=wait)
    except TransactionTimeout as error:
        Settlement.objects.filter(pk=settlement.pk).update(last_error=str(error)[:2000])
        return
    if settlement.status == SS.CONFIRMED:
        result["confirmed"] += 1
    elif settlement.status == SS.FAILED:
        result["failed"] += 1


# The run's counts, waiting reasons and node error: values of several types.
def _resume(
    *, settlement: Settlement, client: ChainClient, deployment: Deployment, result: dict[str, Any], wait: bool
) -> None:
    """A pending batch (never recorded as sent): if its transaction is on chain, complete it from
    there; otherwise send it again."""
    found = _find_sent(settlement=settlement, client=client)
    if found is not None:
        Settlement.objects.filter(pk=settlement.pk).update(
            tx_hash=found, status=SS.SUBMITTED, submitted_at=settlement.submitted_at or timezone.now()
        )
        settlement.refresh_from_db()
        completed = _complete(settlement=settlement, client=client, deployment=deployment, wait=wait)
        if completed.status == SS.CONFIRMED:
            result["confirmed"] += 1
        return
    if settlement.nonce is not None and operator_tx_in_mempool(client=client, nonce=settlement.nonce):
        return  # sent and waiting in the node's pool: do not send it twice
    _send_and_complete(settlement=settlement, client=client, deployment=deployment, result=result, wait=wait)


def _find_sent(*, settlement: Settlement, client: ChainClient) -> str | None:
    """The hash of the operator's transaction with the settlement's recorded nonce and calldata,
    if one was mined (searched from `sent_from_block`); None when none was."""
    if settlement.nonce is None or not settlement.calldata_hash:
        return None
    return operator_tx_find(
        client=client,
        nonce=settlement.nonce,
        calldata_hash=settlement.calldata_hash,
        from_block=settlement.sent_from_block or 0,
    )


def settlements_reconcile(
    *, client: ChainClient, deployment: Deployment | None = None, older_than_s: int | None = None
) -> dict[str, object]:
    """First undo what the chain took back (billing.rewind; counts under `rewound`), then complete
    batches stuck pending or submitted for longer than `older_than_s` (default
    SETTLEMENT_STUCK_S): submitted ones from their receipt, pending ones by finding their
    transaction by nonce and calldata hash (or sending them again). Each charge ends confirmed or
    back in unsettled exactly once. A batch that fails otherwise is logged and skipped."""
    deployment = deployment or deployment_require(client)
    stuck_s = int(settings.SETTLEMENT_STUCK_S) if older_than_s is None else older_than_s
    cutoff = timezone.now() - timedelta(seconds=stuck_s)
    # The run's counts, waiting reasons and node error: values of several types.
    result: dict[str, Any] = {"sent": 0, "confirmed": 0, "failed": 0, "waiting": {}}
    try:
        rewound = chain_rewind(client=client)
        if rewound.changed or rewound.errors:
            result["rewound"] = rewound.as_dict()
        for settlement in Settlement.objects.filter(
            status__in=(SS.PENDING, SS.SUBMITTED), updated_at__lte=cutoff
        ).order_by("pk"):
            with _batch(settlement):
                _reconcile_one(settlement=settlement, client=client, deployment=deployment, result=result)
    except NodeUnavailable as error:
        result["node_unavailable"] = str(error)
    return {k: v for k, v in result.items() if k != "waiting"}


# The run's counts, waiting reasons and node error: values of several types.
def _reconcile_one(
    *, settlement: Settlement, client: ChainClient, deployment: Deployment, result: dict[str, Any]
) -> None:
    if settlement.status == SS.PENDING:
        _resume(settlement=settlement, client=client, deployment=deployment, result=result, wait=False)
        return
    completed = _complete_counted(settlement=settlement, client=client, deployment=deployment, result=result)
    if completed is None or completed.status in (SS.CONFIRMED, SS.FAILED):
        return
    if client.confirmations(settlement.tx_hash) == 0 and operator_tx_replaced(record=settlement, client=client):
        _fail(settlement, None, "the transaction was replaced and never mined")
        result["failed"] += 1


def settlement_retry(*, settlement: Settlement, client: ChainClient | None = None) -> Settlement:
    """Admin "retry": drive one batch now. Pending → found on chain or sent again; submitted →
    completed from its receipt; failed or confirmed → unchanged (a failed batch's charges are
    already back to unsettled and go out in the next batch). Holds the settlement lock; raises
    ValidationFailed (code settlement_busy) when a settlement run holds it."""
    from billing.chain import chain_client_from_settings
    from core.errors import ValidationFailed

    if settlement.status in (SS.CONFIRMED, SS.FAILED):
        return settlement
    client = client or chain_client_from_settings()
    with try_lock(LOCK_NAME) as acquired:
        if not acquired:
            raise ValidationFailed("A settlement run is in progress; try again shortly.", code="settlement_busy")
        deployment = deployment_require(client)
        # The run's counts, waiting reasons and node error: values of several types.
        result: dict[str, Any] = {"sent": 0, "confirmed": 0, "failed": 0, "waiting": {}}
        settlement.refresh_from_db()
        if settlement.status == SS.PENDING:
            _resume(settlement=settlement, client=client, deployment=deployment, result=result, wait=True)
        elif settlement.status == SS.SUBMITTED:
            with contextlib.suppress(TransactionTimeout):
                _complete(settlement=settlement, client=client, deployment=deployment, wait=True)
    settlement.refresh_from_db()
    return settlement
