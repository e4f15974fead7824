"""The ledger check: the ledger's own invariants, and the ledger against the chain as of a
confirmed block (`manage.py ledger_check`, the periodic task billing.tasks.check_ledger). Each run
is stored as a LedgerCheck row; billing.selectors.ledger_check_latest() returns the newest.

The chain is read at one block, the newest with CHAIN_CONFIRMATIONS confirmations (head −
confirmations + 1, as far as the deposit watcher reads and as deep as a batch is confirmed), and
compared with what the ledger says the escrow should hold there:

- per provider (providers grouped with every payout address the escrow ever paid them at):
  the escrow's `earnings` against provider_payable;
- the platform's fees: `feesAccrued` against platform_fees;
- per renter (its linked wallets and the addresses that signed its budgets): the escrow's
  `availableBalance`, and the part held reserved for its jobs, against the ledger's available
  balance and what it holds for each job;
- per job with a budget: whether the escrow holds its budget (and for which renter), whether
  it is closed, the reservation left against what the ledger holds for the job (plus what the
  ledger released but the escrow has not closed yet), and the charge settled for its current
  (or, closed, its last) lease against what the ledger confirmed as paid for that lease.
  A job closed on chain more than REWIND_DEPTH_BLOCKS blocks ago that the ledger holds nothing
  for is final on both sides and is not read again (its renter's balance still counts it).

What is legitimately under way is accounted for explicitly, each counted under "in flight":
a settlement (or reservation batch, or release) mined at or below the block but not yet
confirmed in the ledger counts as done (what it paid read from its receipt's events, as
confirming it will); one confirmed in the ledger in a block above the checked one counts as not
done yet; escrow events the deposit watcher has not read up to the block count as posted (and
those it read above the block as not); a budget admitted but not yet reserved is in the renter's
available balance on chain; a finished job whose budget waits for the release task (it runs every
minute) is not a violation unless that task has run since without releasing it. Anything else
that differs is a difference: printed, stored, and the check fails (exit 1; the periodic task
counts as failed). A node that cannot be read (down, or keeping no state of that block) fails the
check too (exit 2): it proves nothing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Max, Sum
from django.utils import timezone
from eth_account import Account
from eth_utils import to_checksum_address

from billing import selectors, services
from billing.chain import ChainClient, ChainError, NodeUnavailable, Receipt
from billing.chain.deployment import Deployment, deployment_require
from billing.contract import ESCROW
from billing.deposits import CURSOR_NAME, EVENTS, chain_flags
from billing.models import (
    BudgetAuthorization,
    BudgetReservation,
    ChainCursor,
    ChainLog,
    LedgerAccount,
    LedgerCheck,
    LedgerEntry,
    OperatorTransaction,
    Posting,
    RenterWallet,
    Settlement,
    SettlementItem,
)
from billing.operator_tx import operator_tx_find
from billing.rewind import REWIND_DEPTH_BLOCKS
from jobs.models import Job, Lease

logger = logging.getLogger(__name__)

AK = LedgerAccount.Kind
EK = LedgerEntry.Kind
OS = OperatorTransaction.Status
BS = BudgetAuthorization.Status
RELEASE_TASK = "billing.tasks.release_budgets"
# How many LedgerCheck rows are kept (the periodic check stores one every 5 minutes: about a week).
CHECKS_KEPT = 2000
# A job closed on chain this long ago (by the clock, for releases recorded before block numbers
# were) and holding nothing in the ledger is not read again.
SETTLED_LONG_AGO = timedelta(days=1)


@dataclass
class LedgerCheckResult:
    """One check. `ok`: no violation, no difference, and the chain compared (or not configured).
    `problems`: the ledger's own broken invariants; `differences`: ledger against chain;
    `in_flight`: what was accounted for as under way, counted by kind; `error`: why the chain
    could not be compared; `note`: why it was not (no escrow deployed)."""

    confirmations: int
    problems: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)
    compared: dict[str, int] = field(default_factory=dict)
    chain_compared: bool = False
    block: int | None = None
    block_hash: str = ""
    head: int | None = None
    error: str = ""
    node_unavailable: bool = False
    note: str = ""
    entries: int = 0
    accounts: int = 0

    @property
    def ok(self) -> bool:
        return not (self.problems or self.differences or self.error)

    def flight(self, kind: str, count: int = 1) -> None:
        if count:
            self.in_flight[kind] = self.in_flight.get(kind, 0) + count

    def as_dict(self) -> dict[str, Any]:  # JSON values of several types
        data: dict[str, Any] = {
            "ok": self.ok,
            "chain_compared": self.chain_compared,
            "block": self.block,
            "block_hash": self.block_hash,
            "head": self.head,
            "confirmations": self.confirmations,
            "problems": self.problems,
            "differences": self.differences,
            "in_flight": self.in_flight,
            "compared": self.compared,
        }
        if self.error:
            data["error"] = self.error
        if self.node_unavailable:
            data["node_unavailable"] = self.error
        if self.note:
            data["note"] = self.note
        return data


def ledger_check_run(
    *,
    client: ChainClient | None = None,
    deployment: Deployment | None = None,
    confirmations: int | None = None,
    chain: bool = True,
    record: bool = True,
) -> LedgerCheckResult:
    """Check the ledger, and (unless `chain` is False) compare it with the chain as the module
    docstring says, on `client` (default: the node from settings, read as a throwaway account) at
    the newest block `confirmations` deep (default CHAIN_CONFIRMATIONS). Without a client, the
    chain is compared only when an escrow is deployed (ESCROW_ADDRESS, or a chain_deploy file
    under VAR_DIR); otherwise `note` says so. Stores a LedgerCheck row unless `record` is False
    (the newest CHECKS_KEPT are kept). Never raises for the chain: a node that cannot be read is
    reported in `error`."""
    depth = int(settings.CHAIN_CONFIRMATIONS) if confirmations is None else confirmations
    result = LedgerCheckResult(confirmations=max(1, depth))
    result.entries, result.accounts = LedgerEntry.objects.count(), LedgerAccount.objects.count()
    result.problems = selectors.ledger_violations(unreleased=False) + chain_flags()
    _unreleased_judge(result)
    if chain:
        if client is None and not _escrow_configured():
            result.note = "no escrow is deployed (ESCROW_ADDRESS or a chain_deploy file): the chain was not compared"
        else:
            try:
                if client is None:
                    from billing.chain import chain_client_from_settings

                    # The check only reads: it needs no operator key (a checking host may hold none).
                    client = chain_client_from_settings(account=Account.create())
                _compare(client, deployment or deployment_require(client), result)
                result.chain_compared = True
            except NodeUnavailable as error:
                result.error, result.node_unavailable = f"the chain node is unreachable: {error}", True
            except ChainError as error:
                result.error = f"the chain could not be read: {error}"
    if record:
        LedgerCheck.objects.create(
            ok=result.ok,
            chain_compared=result.chain_compared,
            block_number=result.block,
            block_hash=result.block_hash,
            differences=[*result.problems, *result.differences],
            in_flight=result.in_flight,
            error=result.error or result.note,
        )
        stale = LedgerCheck.objects.order_by("-checked_at", "-pk").values_list("pk", flat=True)[CHECKS_KEPT:]
        LedgerCheck.objects.filter(pk__in=list(stale)).delete()
    log = logger.info if result.ok else logger.error
    log(
        "ledger check at block %s: %s (%d problem(s), %d difference(s), in flight %s)%s",
        result.block,
        "ok" if result.ok else "NOT ok",
        len(result.problems),
        len(result.differences),
        result.in_flight,
        f": {result.error}" if result.error else "",
    )
    return result


def _escrow_configured() -> bool:
    if settings.ESCROW_ADDRESS:
        return True
    return any((Path(settings.VAR_DIR) / "chain").glob("deployment-*.json"))


# ----------------------------------------------------------------------------------- the ledger


def _unreleased_judge(result: LedgerCheckResult) -> None:
    """A finished, finally metered job still holding budget waits for the release task: in
    flight while that task has not run since the job became releasable (or is running now); a
    violation once it has, or when it never ran (nothing would release it)."""
    from core.models import PeriodicTaskState

    state = PeriodicTaskState.objects.filter(name=RELEASE_TASK).first()
    for job_id, balance in selectors.finished_jobs_unreleased():
        since = _releasable_since(job_id)
        waiting = state is not None and (
            state.last_started_at is None
            or since >= state.last_started_at
            or state.last_finished_at is None
            or state.last_finished_at < state.last_started_at
        )
        if waiting:
            result.flight("finished jobs awaiting their budget release")
        else:
            result.problems.append(f"job {job_id} is finished and finally metered but still has {balance} reserved")


def _releasable_since(job_id: int) -> datetime:
    job = Job.objects.only("finished_at", "updated_at").get(pk=job_id)
    charged = Lease.objects.filter(job_id=job_id).aggregate(last=Max("charge__updated_at"))["last"]
    return max(t for t in (job.finished_at or job.updated_at, charged) if t is not None)


# ----------------------------------------------------------------------------------- the chain


@dataclass
class _Adjust:
    """How the chain at the checked block differs from the ledger by what is in flight."""

    earnings: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by address
    fees: int = 0
    address: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # renters' available, by address
    job_paid: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # by job
    lease_paid: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # by lease
    activated: set[int] = field(default_factory=set)  # jobs reserved on chain, not yet in the ledger
    not_activated: set[int] = field(default_factory=set)  # reserved in the ledger above the block
    closed: set[int] = field(default_factory=set)  # released on chain, not yet recorded
    not_closed: set[int] = field(default_factory=set)  # release recorded above the block


def _compare(client: ChainClient, deployment: Deployment, result: LedgerCheckResult) -> None:
    head = client.block_number()
    block = max(0, head - result.confirmations + 1)
    result.head, result.block, result.block_hash = head, block, client.block_hash(block) or ""
    escrow = client.contract(ESCROW, deployment.escrow)
    try:
        fees_chain = int(client.call(escrow.functions.feesAccrued(), block=block))
    except NodeUnavailable:
        raise
    except ChainError as error:
        raise ChainError(f"the node keeps no state of block {block}: {error}") from None

    adjust = _Adjust()
    _settlements_in_flight(client, deployment, block, adjust, result)
    _reservations_in_flight(client, deployment, block, adjust, result)
    _releases_in_flight(client, block, adjust, result)
    _events_in_flight(client, escrow, deployment, block, adjust, result)

    fees_ledger = selectors.account_balance(kind=AK.PLATFORM_FEES)
    if fees_chain != fees_ledger + adjust.fees:
        result.differences.append(
            f"fees: the escrow accrued {fees_chain}, the ledger expects {fees_ledger + adjust.fees} "
            f"(platform_fees {fees_ledger}{_plus(adjust.fees, 'in flight')})"
        )
    _providers_compare(client, escrow, block, adjust, result)
    _renters_compare(client, escrow, block, adjust, result)


def _plus(amount: int, what: str) -> str:
    return f", {amount:+d} {what}" if amount else ""


def _mined(client: ChainClient, record: OperatorTransaction) -> Receipt | None:
    """The receipt of a pending or submitted batch's transaction, if the chain has it."""
    tx_hash = record.tx_hash
    if record.nonce is not None and record.calldata_hash and (not tx_hash or client.receipt(tx_hash) is None):
        tx_hash = (
            operator_tx_find(
                client=client,
                nonce=record.nonce,
                calldata_hash=record.calldata_hash,
                from_block=record.sent_from_block or 0,
            )
            or tx_hash
        )
    return client.receipt(tx_hash) if tx_hash else None


def _settlements_in_flight(
    client: ChainClient, deployment: Deployment, block: int, adjust: _Adjust, result: LedgerCheckResult
) -> None:
    from billing.settlement import SettlementUnresolved, settlement_items_carried, settlement_outcome, settlement_ref

    for settlement in Settlement.objects.filter(status__in=(OS.PENDING, OS.SUBMITTED)).order_by("pk"):
        receipt = _mined(client, settlement)
        if receipt is None or not receipt.succeeded or receipt.block_number > block:
            continue
        items = list(settlement_items_carried(settlement))
        try:
            outcome = settlement_outcome(
                settlement=settlement, items=items, client=client, deployment=deployment, receipt=receipt
            )
        except SettlementUnresolved as error:
            result.differences.append(str(error))
            continue
        for item in items:
            _paid(adjust, item, outcome.paid[item.pk], outcome.fee_bps, +1)
        result.flight("settlements mined, not yet confirmed")
    for settlement in Settlement.objects.filter(status=OS.CONFIRMED, block_number__gt=block).order_by("pk"):
        ref = settlement_ref(settlement)
        for item in settlement.items.order_by("pk"):
            key = services._settlement_key("settlement_confirm", ref, item.lease_id, settlement.rewinds)
            entry = LedgerEntry.objects.filter(idempotency_key=key).first()
            if entry is not None:
                paid = -sum(p.amount for p in entry.postings.all() if p.account.kind == AK.IN_SETTLEMENT)
                _paid(adjust, item, paid, settlement.fee_bps, -1)
        result.flight("settlements confirmed above the checked block")


def _paid(adjust: _Adjust, item: SettlementItem, paid: int, fee_bps: int, sign: int) -> None:
    if paid <= 0:
        return
    provider_part, fee = services.settlement_amounts(paid, fee_bps)
    adjust.earnings[item.provider_address.lower()] += sign * provider_part
    adjust.fees += sign * fee
    adjust.job_paid[item.job_id] += sign * paid
    adjust.lease_paid[item.lease_id] += sign * paid


def _reservations_in_flight(
    client: ChainClient, deployment: Deployment, block: int, adjust: _Adjust, result: LedgerCheckResult
) -> None:
    from billing.reservations import reservation_events

    for batch in BudgetReservation.objects.filter(status__in=(OS.PENDING, OS.SUBMITTED)).order_by("pk"):
        receipt = _mined(client, batch)
        if receipt is None or not receipt.succeeded or receipt.block_number > block:
            continue
        reserved, _skipped = reservation_events(client, deployment, receipt)
        adjust.activated |= reserved
        result.flight("reservation batches mined, not yet confirmed")
    for batch in BudgetReservation.objects.filter(status=OS.CONFIRMED, block_number__gt=block):
        adjust.not_activated |= set(
            BudgetAuthorization.objects.filter(reservation=batch, status=BS.RESERVED).values_list("job_id", flat=True)
        )
        result.flight("reservation batches confirmed above the checked block")


def _releases_in_flight(client: ChainClient, block: int, adjust: _Adjust, result: LedgerCheckResult) -> None:
    sent = BudgetAuthorization.objects.filter(released_on_chain_at__isnull=True).exclude(release_tx_hash="")
    for auth in sent:
        receipt = client.receipt(auth.release_tx_hash)
        if receipt is not None and receipt.succeeded and receipt.block_number <= block:
            adjust.closed.add(auth.job_id)
            result.flight("releases mined, not yet recorded")
    above = BudgetAuthorization.objects.filter(released_on_chain_at__isnull=False, release_block_number__gt=block)
    for auth in above.exclude(release_tx_hash=""):
        adjust.not_closed.add(auth.job_id)
        result.flight("releases recorded above the checked block")


def _events_in_flight(
    client: ChainClient, escrow: Any, deployment: Deployment, block: int, adjust: _Adjust, result: LedgerCheckResult
) -> None:
    """Escrow money events the deposit watcher has not read up to `block` count as posted; those
    it read above `block` as not posted."""
    cursor = ChainCursor.objects.filter(name=CURSOR_NAME).first()
    read_to = cursor.last_block if cursor is not None else deployment.deployment_block - 1
    step = int(settings.CHAIN_LOG_RANGE)
    start = read_to + 1
    while start <= block:
        end = min(start + step - 1, block)
        for name in EVENTS:
            for event in client.get_logs(getattr(escrow.events, name), start, end):
                address = str(event.args.get("renter") or event.args.get("provider") or "").lower()
                _event(adjust, name, address, int(event.args.get("amount", 0)), +1)
                result.flight("escrow events not yet read by the watcher")
        start = end + 1
    for log in ChainLog.objects.filter(status=ChainLog.Status.CREDITED, block_number__gt=block):
        _event(adjust, log.event, log.address, int(log.args.get("amount", 0)), -1)
        result.flight("escrow events read above the checked block")


def _event(adjust: _Adjust, name: str, address: str, amount: int, sign: int) -> None:
    if name == "Deposited":
        adjust.address[address] += sign * amount
    elif name == "Withdrawn":
        adjust.address[address] -= sign * amount
    elif name == "EarningsWithdrawn":
        adjust.earnings[address] -= sign * amount
    elif name == "FeesWithdrawn":
        adjust.fees -= sign * amount


# ----------------------------------------------------------------------------------- providers


def _providers_compare(
    client: ChainClient, escrow: Any, block: int, adjust: _Adjust, result: LedgerCheckResult
) -> None:
    """Providers and the addresses the escrow paid them at, grouped (a provider that changed its
    payout address has earnings at both; two providers may share one): per group, the escrow's
    earnings at its addresses against the ledger's payables plus what is in flight."""
    payable = dict(LedgerAccount.objects.filter(kind=AK.PROVIDER_PAYABLE).values_list("provider_id", "balance"))
    links: set[tuple[int, str]] = set(
        SettlementItem.objects.values_list("lease__machine__provider_id", "provider_address").distinct()
    )
    from providers.models import Provider

    for provider_id, address in Provider.objects.exclude(payout_address="").values_list("pk", "payout_address"):
        links.add((provider_id, address))
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for provider_id, address in links:
        parent[find(f"p{provider_id}")] = find(f"a{address.lower()}")
    for provider_id in payable:
        find(f"p{provider_id}")
    groups: dict[str, set[str]] = defaultdict(set)
    for node in list(parent):
        groups[find(node)].add(node)
    for members in groups.values():
        addresses = sorted(m[1:] for m in members if m.startswith("a"))
        providers = sorted(int(m[1:]) for m in members if m.startswith("p"))
        ledger = sum(payable.get(p, 0) for p in providers)
        if not addresses:
            if ledger:
                result.differences.append(
                    f"provider {', '.join(map(str, providers))}: the ledger owes {ledger} but the escrow never "
                    "paid it at any address"
                )
            continue
        chain = sum(int(client.call(escrow.functions.earnings(to_checksum_address(a)), block=block)) for a in addresses)
        flight = sum(adjust.earnings.get(a, 0) for a in addresses)
        result.compared["provider groups"] = result.compared.get("provider groups", 0) + 1
        if chain != ledger + flight:
            who = f"provider{'s' if len(providers) > 1 else ''} {', '.join(map(str, providers)) or '(none)'}"
            result.differences.append(
                f"{who} ({', '.join(addresses)}): the escrow holds earnings of {chain}, the ledger expects "
                f"{ledger + flight} (provider_payable {ledger}{_plus(flight, 'in flight')})"
            )


# ----------------------------------------------------------------------------------- renters and jobs


def _held(job_ids: list[int]) -> dict[int, int]:
    """What the ledger holds for each job: its reservation and its leases' unsettled and
    in-settlement charges."""
    held: dict[int, int] = defaultdict(int)
    for job_id, balance in LedgerAccount.objects.filter(kind=AK.JOB_RESERVED, job_id__in=job_ids).values_list(
        "job_id", "balance"
    ):
        held[job_id] += balance
    for job_id, balance in LedgerAccount.objects.filter(
        kind__in=(AK.LEASE_UNSETTLED, AK.IN_SETTLEMENT), lease__job_id__in=job_ids
    ).values_list("lease__job_id", "balance"):
        held[job_id] += balance
    return held


def _released(job_ids: list[int]) -> dict[int, int]:
    return {
        job_id: -total
        for job_id, total in Posting.objects.filter(
            entry__kind=EK.RELEASE, account__kind=AK.JOB_RESERVED, account__job_id__in=job_ids
        )
        .values_list("account__job_id")
        .annotate(total=Sum("amount"))
        .values_list("account__job_id", "total")
    }


def _lease_paid(lease_ids: list[int]) -> dict[int, int]:
    """What the ledger confirmed as paid on chain for each lease (confirmations less their
    reversals after a rewind)."""
    paid: dict[int, int] = defaultdict(int)
    rows = (
        Posting.objects.filter(account__kind=AK.IN_SETTLEMENT, account__lease_id__in=lease_ids)
        .filter(entry__kind__in=(EK.SETTLEMENT_CONFIRM, EK.CHAIN_REVERSAL))
        .values_list("account__lease_id")
        .annotate(total=Sum("amount"))
        .values_list("account__lease_id", "total")
    )
    for lease_id, total in rows:
        paid[lease_id] = -total
    return paid


def _renters_compare(client: ChainClient, escrow: Any, block: int, adjust: _Adjust, result: LedgerCheckResult) -> None:
    auths = {a.job_id: a for a in BudgetAuthorization.objects.select_related("job")}
    addresses: dict[int, set[str]] = defaultdict(set)
    for renter_id, address in RenterWallet.objects.values_list("renter_id", "address"):
        addresses[renter_id].add(address.lower())
    for auth in auths.values():
        addresses[auth.job.renter_id].add(auth.renter_address.lower())
    held_jobs = set(
        LedgerAccount.objects.filter(kind=AK.JOB_RESERVED, balance__gt=0).values_list("job_id", flat=True)
    ) | set(
        LedgerAccount.objects.filter(kind__in=(AK.LEASE_UNSETTLED, AK.IN_SETTLEMENT), balance__gt=0).values_list(
            "lease__job_id", flat=True
        )
    )
    jobs_by_renter: dict[int, list[int]] = defaultdict(list)
    for job_id, renter_id in Job.objects.filter(pk__in=set(auths) | held_jobs).values_list("pk", "renter_id"):
        jobs_by_renter[renter_id].append(job_id)
    all_jobs = [j for jobs in jobs_by_renter.values() for j in jobs]
    held, released = _held(all_jobs), _released(all_jobs)
    leases: dict[int, list[int]] = defaultdict(list)
    for lease_id, job_id in Lease.objects.filter(job_id__in=all_jobs).values_list("pk", "job_id"):
        leases[job_id].append(lease_id)
    lease_paid = _lease_paid([lease for ids in leases.values() for lease in ids])
    available = dict(LedgerAccount.objects.filter(kind=AK.RENTER_AVAILABLE).values_list("renter_id", "balance"))
    for renter_id in sorted(addresses):
        jobs = sorted(jobs_by_renter.get(renter_id, []))
        chain_reserved = expected_reserved = 0
        for job_id in jobs:
            chain_part, expected_part = _job_compare(
                client, escrow, block, job_id, auths.get(job_id), held, released, leases, lease_paid, adjust, result
            )
            chain_reserved += chain_part
            expected_reserved += expected_part
        chain_available = sum(
            int(client.call(escrow.functions.availableBalance(to_checksum_address(a)), block=block))
            for a in sorted(addresses[renter_id])
        )
        flight = sum(adjust.address.get(a, 0) for a in addresses[renter_id]) - sum(
            adjust.job_paid.get(j, 0) for j in jobs
        )
        ledger_total = available.get(renter_id, 0) + sum(held.get(j, 0) for j in jobs)
        expected_available = ledger_total + flight - expected_reserved
        result.compared["renters"] = result.compared.get("renters", 0) + 1
        where = f"renter {renter_id} ({', '.join(sorted(addresses[renter_id]))})"
        ledger_available = available.get(renter_id, 0)
        if chain_available != expected_available:
            result.differences.append(
                f"{where}: the escrow holds {chain_available} available, the ledger expects {expected_available} "
                f"(available {ledger_available}, held for its jobs {ledger_total - ledger_available}, of which "
                f"the escrow should hold {expected_reserved} reserved{_plus(flight, 'in flight')})"
            )
        if chain_reserved != expected_reserved:
            result.differences.append(
                f"{where}: the escrow holds {chain_reserved} reserved for its jobs, "
                f"the ledger expects {expected_reserved}"
            )


def _job_compare(
    client: ChainClient,
    escrow: Any,
    block: int,
    job_id: int,
    auth: BudgetAuthorization | None,
    held: dict[int, int],
    released: dict[int, int],
    leases: dict[int, list[int]],
    lease_paid: dict[int, int],
    adjust: _Adjust,
    result: LedgerCheckResult,
) -> tuple[int, int]:
    """Compare one job; returns (the escrow's reservation left, the ledger's expectation of it)."""
    active = auth is not None and auth.status == BS.RESERVED and auth.activated_at is not None
    if job_id in adjust.not_activated:
        active = False
    elif auth is not None and auth.status == BS.RESERVING and job_id in adjust.activated:
        active = True
    closed_expected: bool | None = False
    if auth is not None and auth.released_on_chain_at is not None:
        closed_expected = True
        if job_id in adjust.not_closed:
            closed_expected = False
        elif auth.release_block_number is not None and auth.release_block_number > block:
            closed_expected = None  # seen closed at a later head: closed at the block or not
    elif job_id in adjust.closed:
        closed_expected = True
    job_held, job_released = held.get(job_id, 0), released.get(job_id, 0)
    if active and closed_expected and not job_held and _final_long_ago(auth, block):
        return 0, 0  # closed long ago, nothing held: final on both sides
    renter, _deadline, remaining, lease_id, settled, closed = client.call(escrow.functions.job(job_id), block=block)
    remaining, lease_id, settled = int(remaining), int(lease_id), int(settled)
    result.compared["jobs"] = result.compared.get("jobs", 0) + 1
    on_chain = int(str(renter), 16) != 0
    if not active:
        if on_chain:
            result.differences.append(
                f"job {job_id}: the escrow holds a budget for it ({remaining} left, renter {str(renter).lower()}) "
                f"but the ledger has none reserved there ({_auth_state(auth)})"
            )
            return remaining, 0
        if auth is not None and auth.status in (BS.SIGNED, BS.RESERVING):
            result.flight("budgets admitted, not yet reserved on chain")
        return 0, 0
    if not on_chain:
        result.differences.append(
            f"job {job_id}: the ledger has its budget reserved on chain ({_auth_state(auth)}) but the escrow "
            f"holds none for it at block {block}"
        )
        return 0, 0
    assert auth is not None  # active implies an authorization
    if str(renter).lower() != auth.renter_address.lower():
        result.differences.append(
            f"job {job_id}: the escrow holds its budget for {str(renter).lower()}, the ledger for {auth.renter_address}"
        )
    if closed_expected is not None and bool(closed) != closed_expected:
        result.differences.append(
            f"job {job_id}: "
            + (
                f"closed on chain, but the ledger has not released it there (it holds {job_held} for it)"
                if closed
                else f"the ledger recorded it released on chain, but the escrow still holds {remaining} for it"
            )
        )
    job_leases = sorted(leases.get(job_id, []))
    paid = {lease: lease_paid.get(lease, 0) + adjust.lease_paid.get(lease, 0) for lease in job_leases}
    if closed:
        if job_held:
            result.differences.append(
                f"job {job_id} is closed on chain, but the ledger still holds {job_held} for it "
                "(charges the escrow will never pay)"
            )
        last = max((lease for lease in job_leases if paid[lease] > 0), default=None)
        if last is not None and settled != paid[last]:
            result.differences.append(
                f"job {job_id} is closed on chain with {settled} settled for its last lease, the ledger says "
                f"{paid[last]} was paid for lease {last}"
            )
        return 0, 0
    if job_released:
        result.flight("budgets released by the ledger, not yet on chain")
    expected = job_held + job_released - adjust.job_paid.get(job_id, 0)
    if remaining != expected:
        result.differences.append(
            f"job {job_id}: the escrow holds {remaining} of its budget, the ledger expects {expected} "
            f"(held {job_held}{_plus(job_released, 'released by the ledger, not yet on chain')}"
            f"{_plus(-adjust.job_paid.get(job_id, 0), 'paid by settlements in flight')})"
        )
    expected_settled = paid.get(lease_id, 0) if lease_id else 0
    others = sum(amount for lease, amount in paid.items() if lease > lease_id)
    if settled != expected_settled or others:
        result.differences.append(
            f"job {job_id}: the escrow settled {settled} for lease {lease_id}, the ledger says "
            f"{expected_settled} was paid for it" + (f" and {others} for later leases" if others else "")
        )
    return remaining, expected


def _auth_state(auth: BudgetAuthorization | None) -> str:
    if auth is None:
        return "no budget authorization"
    return f"budget authorization {auth.status}" + (
        f", reservation batch {auth.reservation_id}" if auth.reservation_id else ""
    )


def _final_long_ago(auth: BudgetAuthorization | None, block: int) -> bool:
    if auth is None or auth.released_on_chain_at is None:
        return False
    if auth.release_block_number is not None:
        return auth.release_block_number < block - REWIND_DEPTH_BLOCKS
    return auth.released_on_chain_at < timezone.now() - SETTLED_LONG_AGO


__all__ = ["LedgerCheckResult", "ledger_check_run"]
