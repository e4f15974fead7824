"""The deposit watcher: reads the escrow's money events and posts them to the ledger, once each.

Events: Deposited / Withdrawn (renters), EarningsWithdrawn (providers' payout addresses),
FeesWithdrawn (the treasury). Each log becomes one ChainLog row, unique per (tx_hash, log_index),
so reading the same range twice posts nothing twice (the ledger keys are per event as well).

Blocks are read only once CHAIN_CONFIRMATIONS deep: up to head − CHAIN_CONFIRMATIONS + 1, in
ranges of at most CHAIN_LOG_RANGE blocks. The cursor (ChainCursor "escrow") keeps the last block
read and its hash, plus `recent_blocks`, the [number, hash] of the last RECENT_WINDOW ranges'
ends. Before reading, the stored hash is compared with the chain's: on a mismatch (a reorg) the
watcher walks the window back to the newest block still on the chain, reverses the ledger
movement of every log in the abandoned blocks (billing.services.chain_movement_reverse, keyed per
generation), marks them `rewound` and reads again from there. A log that comes back on the new
chain is posted again (chain_movement_restore).

Unknown addresses: a deposit (or withdrawal) from an address no renter linked is stored
`unmatched` and posted when `wallet_link` links that address.

A withdrawal the renter's available balance in the ledger cannot cover: the escrow let the money
go, so it was not reserved there, and the jobs it backed in the ledger are admitted jobs whose
budget the escrow had not reserved yet (none of them can have run: the matcher places only
reserved jobs). They are cancelled, newest first, until the ledger covers the withdrawal
(billing.reservations.unfunded_jobs_cancel), each with an event saying why. Only what even that
cannot cover is stored `flagged`, logged as an error and reported by `manage.py ledger_check`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, TypedDict

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models.functions import Lower

from billing import reservations, services
from billing.chain import ChainClient, ChainEvent
from billing.chain.deployment import Deployment, deployment_require
from billing.contract import ESCROW
from billing.errors import InsufficientBalance, InsufficientFunds, ValidationFailed
from billing.models import ChainCursor, ChainLog, LedgerEntry, RenterWallet, SettlementItem
from billing.rewind import node_behind_wait
from jobs.models import Renter
from providers.models import Provider

logger = logging.getLogger(__name__)

CURSOR_NAME = "escrow"
EVENTS = ("Deposited", "Withdrawn", "EarningsWithdrawn", "FeesWithdrawn")
# How many recent range ends the cursor remembers: a reorg deeper than this many ranges is
# rewound to the escrow's deployment block (everything is re-read).
RECENT_WINDOW = 64
ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
ES = ChainLog.Status


@dataclass
class WatchResult:
    """What one watcher run did."""

    from_block: int = 0
    to_block: int = -1
    logs: int = 0
    credited: int = 0
    unmatched: int = 0
    flagged: int = 0
    rewound: int = 0
    reorg: bool = False
    # EarningsWithdrawn logs of earlier runs, left unmatched then, posted now (_earnings_revisit).
    revisited: int = 0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def address_normalize(address: str) -> str:
    """`address` lowercased; ValidationFailed (code invalid_address) unless 0x + 40 hex digits."""
    if not isinstance(address, str) or not ADDRESS_RE.match(address.strip()):
        raise ValidationFailed("An address is 0x followed by 40 hex digits.", code="invalid_address")
    return address.strip().lower()


# ----------------------------------------------------------------------------------- wallet link


def wallet_link(*, renter: Renter, address: str) -> RenterWallet:
    """Link `address` to `renter` and post every event from it that was waiting `unmatched`, in
    chain order. Linking the same address to the same renter again changes nothing; an address
    linked to another renter raises ValidationFailed (code wallet_taken)."""
    normalized = address_normalize(address)
    with transaction.atomic():
        wallet = RenterWallet.objects.select_for_update().filter(address=normalized).first()
        if wallet is not None and wallet.renter_id != renter.pk:
            raise ValidationFailed("This address is linked to another account.", code="wallet_taken")
        if wallet is None:
            try:
                with transaction.atomic():
                    wallet = RenterWallet.objects.create(renter=renter, address=normalized)
            except IntegrityError:
                raise ValidationFailed("This address is linked to another account.", code="wallet_taken") from None
        waiting = ChainLog.objects.select_for_update().filter(
            address=normalized, status=ES.UNMATCHED, event__in=("Deposited", "Withdrawn")
        )
        for log in waiting.order_by("block_number", "log_index"):
            _post(log)
    return wallet


# ----------------------------------------------------------------------------------- posting


def _renter_for(address: str) -> Renter | None:
    wallet = RenterWallet.objects.select_related("renter").filter(address=address).first()
    return wallet.renter if wallet else None


def _provider_for(address: str, amount: int) -> Provider | None:
    """The provider whose earnings this address withdrew: one whose payout address it is, else one
    whose leases were settled to it before the provider changed its payout address (the escrow
    keeps those earnings at the address they were settled to); the first holding enough, if several
    qualify."""
    from billing.selectors import provider_payable_micro

    current = list(Provider.objects.filter(payout_address__iexact=address).order_by("pk"))
    earlier = Provider.objects.filter(machines__leases__settlement_items__provider_address__iexact=address)
    candidates = current + [p for p in earlier.exclude(pk__in=[p.pk for p in current]).distinct().order_by("pk")]
    for provider in candidates:
        if provider_payable_micro(provider_id=provider.pk) >= amount:
            return provider
    return candidates[0] if candidates else None


def _first_entry(log: ChainLog) -> LedgerEntry | None:
    """The entry the log was first posted as (keyed by the movement services per tx and index)."""
    return (
        LedgerEntry.objects.filter(chain_tx_hash=log.tx_hash, chain_log_index=log.log_index)
        .exclude(kind=LedgerEntry.Kind.CHAIN_REVERSAL)
        .exclude(idempotency_key__startswith="chain_restore:")
        .order_by("pk")
        .first()
    )


def _post(log: ChainLog, *, cancel_unfunded: bool = True) -> None:
    """Post one log's ledger movement and set its status (credited / unmatched / flagged). With
    `cancel_unfunded` False, a withdrawal the ledger cannot cover cancels no job (it is flagged,
    for chain_watch to try again once the rest of its range is posted)."""
    amount = int(log.args.get("amount", 0))
    if amount <= 0:
        log.status, log.detail = ES.FLAGGED, "event without a positive amount"
        log.save(update_fields=["status", "detail", "updated_at"])
        return
    original = _first_entry(log) if log.credits > 0 else None
    try:
        with transaction.atomic():
            if original is not None:
                # Came back after a reorg reversed it: post the original movement once more. The
                # reversal gave a withdrawal's money back to the renter, who may have spent it
                # since (a job admitted): as on its first posting, the jobs it no longer covers
                # are cancelled, or it is flagged; an uncaught refusal rolled back the whole range
                # and every later run met it again, crediting nobody's deposits from then on.
                if cancel_unfunded and log.event == "Withdrawn" and (renter := _renter_for(log.address)):
                    reservations.unfunded_jobs_cancel(
                        renter=renter,
                        needed=amount,
                        why=reservations.withdrawal_unfunded_reason(amount=amount, tx_hash=log.tx_hash),
                    )
                services.chain_movement_restore(entry=original, generation=log.credits)
                posted = True
            else:
                posted = _post_movement(log, amount, cancel_unfunded=cancel_unfunded)
    except (InsufficientFunds, InsufficientBalance) as error:
        log.status = ES.FLAGGED
        log.detail = (
            f"{log.event} of {amount} by {log.address} exceeds what the ledger holds free for it, even after "
            f"cancelling the renter's jobs the escrow had not reserved: {error}. The chain moved the money; "
            "the ledger did not. Resolve by hand (see docs/billing.md)."
        )[:2000]
        logger.error("chain/ledger gap: %s %s:%s: %s", log.event, log.tx_hash, log.log_index, log.detail)
        log.save(update_fields=["status", "detail", "updated_at"])
        return
    if posted:
        log.status, log.detail, log.credits = ES.CREDITED, "", log.credits + 1
    else:
        log.status = ES.UNMATCHED
        log.detail = f"no account is linked to {log.address}"
        if log.event in ("EarningsWithdrawn", "FeesWithdrawn"):
            logger.error("chain event %s from an unknown address %s (%s)", log.event, log.address, log.tx_hash)
    log.save(update_fields=["status", "detail", "credits", "updated_at"])


class _ChainKeys(TypedDict):
    tx_hash: str
    log_index: int


def _post_movement(log: ChainLog, amount: int, *, cancel_unfunded: bool = True) -> bool:
    """Post the movement through billing.services; False when no account matches the address."""
    keys: _ChainKeys = {"tx_hash": log.tx_hash, "log_index": log.log_index}
    if log.event == "Deposited":
        renter = _renter_for(log.address)
        if renter is None:
            return False
        services.deposit_record(renter=renter, amount=amount, **keys)
    elif log.event == "Withdrawn":
        renter = _renter_for(log.address)
        if renter is None:
            return False
        if cancel_unfunded:
            # The money backing admitted jobs the escrow never reserved is gone: cancel them first.
            reservations.unfunded_jobs_cancel(
                renter=renter,
                needed=amount,
                why=reservations.withdrawal_unfunded_reason(amount=amount, tx_hash=log.tx_hash),
            )
        services.renter_withdrawal_record(renter=renter, amount=amount, **keys)
    elif log.event == "EarningsWithdrawn":
        provider = _provider_for(log.address, amount)
        if provider is None:
            return False
        services.provider_withdrawal_record(provider=provider, amount=amount, **keys)
    elif log.event == "FeesWithdrawn":
        services.fee_withdrawal_record(amount=amount, **keys)
    else:  # pragma: no cover - only EVENTS are read
        return False
    return True


def _reverse(log: ChainLog) -> None:
    """Undo a log whose block left the chain and mark it rewound."""
    if log.status == ES.CREDITED:
        entry = _first_entry(log)
        if entry is not None:
            try:
                with transaction.atomic():
                    services.chain_movement_reverse(entry=entry, generation=log.credits)
            except (InsufficientFunds, InsufficientBalance) as error:
                log.status = ES.FLAGGED
                log.detail = f"its block left the chain but the money was already used: {error}"[:2000]
                logger.error("reorg: cannot reverse %s %s:%s: %s", log.event, log.tx_hash, log.log_index, error)
                log.save(update_fields=["status", "detail", "updated_at"])
                return
    log.status, log.detail = ES.REWOUND, f"block {log.block_number} ({log.block_hash}) left the chain"
    log.save(update_fields=["status", "detail", "updated_at"])


# ----------------------------------------------------------------------------------- the watcher


def _cursor(deployment: Deployment) -> ChainCursor:
    cursor, _ = ChainCursor.objects.get_or_create(
        name=CURSOR_NAME, defaults={"last_block": deployment.deployment_block - 1}
    )
    return ChainCursor.objects.select_for_update().get(pk=cursor.pk)


def _rewind(client: ChainClient, cursor: ChainCursor, deployment: Deployment, result: WatchResult) -> None:
    """The cursor's block is no longer on the chain: rewind to the newest remembered block that is."""
    fork = deployment.deployment_block - 1
    fork_hash = ""
    kept: list[list[Any]] = []  # the cursor's JSON [block number, block hash] pairs
    recent = [entry for entry in cursor.recent_blocks if entry[0] < cursor.last_block]
    for index in range(len(recent) - 1, -1, -1):
        number, block_hash = recent[index]
        if client.block_hash(number) == block_hash:
            fork, fork_hash = number, block_hash
            kept = recent[: index + 1]
            break
    logger.warning("chain reorg: block %s changed; rewinding the watcher to block %s", cursor.last_block, fork)
    result.reorg = True
    hashes: dict[int, str | None] = {}
    for log in ChainLog.objects.select_for_update().filter(block_number__gt=fork).exclude(status=ES.REWOUND):
        if log.block_number not in hashes:
            hashes[log.block_number] = client.block_hash(log.block_number)
        if hashes[log.block_number] == log.block_hash:
            continue  # still on the chain: re-reading it will find it already stored
        _reverse(log)
        result.rewound += 1
    cursor.last_block, cursor.last_block_hash, cursor.recent_blocks = fork, fork_hash, kept
    cursor.save()


def _store(event: ChainEvent) -> ChainLog | None:
    """The ChainLog of `event`, created if new or revived if it comes back after a reorg; None if
    it is already recorded on its current block (nothing to do)."""
    address_arg = event.args.get("renter") or event.args.get("provider") or event.args.get("treasury") or ""
    args = {key: (str(value) if isinstance(value, bytes | str) else int(value)) for key, value in event.args.items()}
    log = ChainLog.objects.select_for_update().filter(tx_hash=event.tx_hash, log_index=event.log_index).first()
    if log is None:
        return ChainLog.objects.create(
            tx_hash=event.tx_hash,
            log_index=event.log_index,
            block_number=event.block_number,
            block_hash=event.block_hash,
            event=event.name,
            args=args,
            address=str(address_arg).lower(),
            status=ES.UNMATCHED,
        )
    if log.status != ES.REWOUND:
        return None  # read twice: already posted (or waiting) once
    log.block_number, log.block_hash, log.event, log.args = event.block_number, event.block_hash, event.name, args
    log.address = str(address_arg).lower()
    log.save()
    return log


def _post_uncovered_withdrawals(posted: list[ChainLog]) -> None:
    """Withdrawals the ledger could not cover when their turn came, tried again once the rest of
    the range is posted, then with the renter's unreserved jobs cancelled (unfunded_jobs_cancel).

    The ledger follows the chain with a delay: a renter may withdraw, deposit again, and have a
    new job admitted and reserved in the escrow out of the new deposit, all before the watcher
    reads the withdrawal. In chain order the ledger then meets the withdrawal with the new job's
    budget held and the deposit not yet credited. Within one range nothing between the two is
    seen by anyone (the range commits at once), so the deposits of the range are credited first;
    a withdrawal flagged in an earlier range is tried again when its address deposits later."""
    retry = [log for log in posted if log.event == "Withdrawn" and log.status == ES.FLAGGED]
    depositors = {log.address for log in posted if log.event == "Deposited" and log.status == ES.CREDITED}
    if depositors:
        earlier = ChainLog.objects.filter(event="Withdrawn", status=ES.FLAGGED, address__in=depositors).exclude(
            pk__in=[log.pk for log in retry]
        )
        retry = [*earlier.order_by("block_number", "log_index"), *retry]
    for log in retry:
        _post(log, cancel_unfunded=False)
    for log in retry:
        if log.status == ES.FLAGGED:
            _post(log, cancel_unfunded=True)


def chain_watch(
    *, client: ChainClient, deployment: Deployment | None = None, max_blocks: int | None = None
) -> WatchResult:
    """Read the escrow's money events from the cursor to the confirmed head and post them.

    Idempotent and safe to stop at any point: each range's logs and the cursor move together in
    one transaction. Raises NodeUnavailable (and other ChainError) when the node cannot be read,
    and NodeBehind while its head is below the cursor (billing.rewind.node_behind_wait); nothing
    is lost, the next run continues from the cursor.
    """
    deployment = deployment or deployment_require(client)
    escrow = client.contract(ESCROW, deployment.escrow)
    confirmations = int(settings.CHAIN_CONFIRMATIONS)
    step = int(settings.CHAIN_LOG_RANGE)
    result = WatchResult()
    head = client.block_number()
    safe = head - confirmations + 1
    with transaction.atomic():
        cursor = _cursor(deployment)
        if cursor.last_block >= 0 and cursor.last_block_hash:
            # A node behind the cursor knows no hash for its block: waited for, not read as a reorg.
            node_behind_wait(head=head, needed=cursor.last_block, scope="watcher", what="the watcher's cursor")
            if client.block_hash(cursor.last_block) != cursor.last_block_hash:
                _rewind(client, cursor, deployment, result)
    result.from_block = cursor.last_block + 1
    limit = safe if max_blocks is None else min(safe, cursor.last_block + max_blocks)
    start = cursor.last_block + 1
    while start <= limit:
        end = min(start + step - 1, limit)
        end_hash = client.block_hash(end)
        events: list[ChainEvent] = []
        for name in EVENTS:
            events.extend(client.get_logs(getattr(escrow.events, name), start, end))
        if end_hash is None or client.block_hash(end) != end_hash:
            break  # the chain moved under the read: the next run checks for a reorg and re-reads
        events.sort(key=lambda e: (e.block_number, e.log_index))
        with transaction.atomic():
            cursor = ChainCursor.objects.select_for_update().get(pk=cursor.pk)
            if cursor.last_block != start - 1:
                break  # another watcher moved the cursor meanwhile
            posted: list[ChainLog] = []
            for event in events:
                log = _store(event)
                result.logs += 1
                if log is None:
                    continue
                _post(log, cancel_unfunded=False)
                posted.append(log)
            _post_uncovered_withdrawals(posted)
            for log in posted:
                if log.status == ES.CREDITED:
                    result.credited += 1
                elif log.status == ES.UNMATCHED:
                    result.unmatched += 1
                elif log.status == ES.FLAGGED:
                    result.flagged += 1
            cursor.last_block, cursor.last_block_hash = end, end_hash
            cursor.recent_blocks = [*cursor.recent_blocks, [end, end_hash]][-RECENT_WINDOW:]
            cursor.save()
        result.to_block = end
        start = end + 1
    with transaction.atomic():
        ChainCursor.objects.select_for_update().get(pk=cursor.pk)  # one watcher at a time, as above
        result.revisited = _earnings_revisit()
    return result


def _earnings_revisit() -> int:
    """Post the EarningsWithdrawn logs left unmatched by earlier runs whose payee is known now (a
    provider's earlier payout address was matched only from 9adc42c on, and a log stored before
    stayed unmatched, the ledger owing the provider what the chain had paid); the others stay
    unmatched, without a new error in the log each run. Returns how many were posted.

    Which payees are known is asked once for all the waiting logs' addresses (two queries), so a
    run costs the same however many withdrawals by strangers wait: each one cost a payee lookup of
    two or three queries in every run, for good."""
    waiting = ChainLog.objects.filter(status=ES.UNMATCHED, event="EarningsWithdrawn")
    addresses = {a.lower() for a in waiting.values_list("address", flat=True).distinct()}
    if not addresses:
        return 0
    known = set(
        Provider.objects.annotate(a=Lower("payout_address")).filter(a__in=addresses).values_list("a", flat=True)
    ) | set(
        SettlementItem.objects.annotate(a=Lower("provider_address"))
        .filter(a__in=addresses)
        .values_list("a", flat=True)
        .distinct()
    )
    if not known:
        return 0
    waiting = waiting.annotate(a=Lower("address")).filter(a__in=known).select_for_update(of=("self",))
    posted = 0
    for log in waiting.order_by("block_number", "log_index"):
        if _provider_for(log.address, int(log.args.get("amount", 0))) is None:
            continue
        _post(log)
        posted += log.status == ES.CREDITED
    return posted


def chain_flags() -> list[str]:
    """Chain events the ledger could not follow (flagged), and money withdrawn from the escrow by
    unknown payees, as sentences for `manage.py ledger_check` (empty when there are none)."""
    problems = []
    for log in ChainLog.objects.filter(status=ES.FLAGGED).order_by("block_number", "log_index"):
        problems.append(f"chain event {log.event} {log.tx_hash}:{log.log_index} is flagged: {log.detail}")
    for log in ChainLog.objects.filter(status=ES.UNMATCHED, event__in=("EarningsWithdrawn", "FeesWithdrawn")).order_by(
        "block_number", "log_index"
    ):
        problems.append(f"chain event {log.event} {log.tx_hash}:{log.log_index} by unknown payee {log.address}")
    return problems


__all__ = ["WatchResult", "address_normalize", "chain_flags", "chain_watch", "wallet_link"]
