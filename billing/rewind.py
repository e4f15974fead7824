"""Undoing what the chain took back: the operator's own transactions after a reorg or a node that
came back with fewer blocks (rolled back, or restored from older saved state).

The deposit watcher rewinds deposits and withdrawals (billing.deposits). This module does the
same for what the operator sent: job activations (reservation batches), settlements, and job
closures (releases on chain). `chain_rewind` runs at the start of every run that sends the
operator's transactions (reservations, and so settlements, the reconciler, releases), under the
settlement lock, before anything is sent, and:

- waits for a node whose head is below the newest block a confirmed record rests on (or a
  submitted batch was sent from): it is behind, and the run stops (NodeBehind), for up to
  CHAIN_BEHIND_GRACE_S; after that the blocks above its head count as gone (node_behind_wait);
- finds every confirmed record whose block left the chain: its block is above the node's head,
  or the node's block at that number has another hash than the one recorded at confirmation.
  Records confirmed in the last REWIND_DEPTH_BLOCKS blocks are checked (one eth_getBlockByNumber
  per distinct block), those above the head always. A record confirmed before block hashes were
  recorded is checked by its receipt once, and its hash filled in;
- undoes each, newest block first (a later record may rest on an earlier one: a settlement on its
  job's activation): a settlement's confirmation is compensated in the ledger and the batch goes
  back to pending (billing.settlement.settlement_unconfirm; an item the escrow had skipped for not
  knowing its job, whose charge has gone out in a later batch, stays out of it, and a batch left
  with nothing to send stays confirmed); a reservation batch's budgets go back
  to reserving and the batch to pending (billing.reservations.reservation_unconfirm); a release
  is forgotten (billing.release.release_forget);
- finds every submitted batch whose transaction vanished: the node knows it no more (neither
  mined nor in its pool) while the operator's nonce it used is still unused on chain. It goes back
  to pending (no ledger entry was made for it yet);
- fills the nonce gaps below the operator's transactions that wait in the node's pool unmined
  (submitted batches, releases sent): one sent after a rollback under the stale nonce counter
  waits past the nonces the rollback freed, forever when nothing else is sent.

The chain can go back after that rewind and before the run sends: each send first asks
`rewound_before_send`, one block read (the newest block a confirmed record rests on, whose hash
commits to every block below it), and when the chain went back the run rewinds and sends nothing.

A pending batch is then completed by the usual path of its run, exactly once: its transaction is
found by the nonce and calldata hash recorded before it was sent (the chain mined it again), or
waited for (the node holds a transaction with that nonce), or else sent once more, its nonce,
calldata hash and head recorded again before the send. The contract refuses to pay a charge or
reserve a budget twice besides (cumulative charges, `AlreadyKnown`, `JobClosed`).

A settlement whose confirmation cannot be compensated yet (a provider withdrew the earnings the
ledger still shows; the watcher reverses that withdrawal when its block left the chain too) is
reported under "errors" and tried again by the next run; the run counts as failed meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache import caches
from django.db.models import Max, Q

from billing.chain import ChainClient, NodeBehind, NodeUnavailable
from billing.errors import InsufficientBalance, InsufficientFunds
from billing.models import BudgetAuthorization, BudgetReservation, OperatorTransaction, Settlement
from core import periodic
from core.locks import lock_check

logger = logging.getLogger(__name__)

# How far below the head confirmed records are checked for a changed block: deeper reorgs do not
# happen on the chains the escrow runs on; a node that lost more blocks than this has its head
# below the records' blocks, which is always checked.
REWIND_DEPTH_BLOCKS = 256

OS = OperatorTransaction.Status


@dataclass
class RewindResult:
    """What one pass undid: confirmed records whose block left the chain, by kind, and submitted
    batches whose transaction vanished; `errors`: what could not be undone yet."""

    settlements: int = 0
    reservations: int = 0
    releases: int = 0
    vanished: int = 0
    gaps_filled: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.settlements or self.reservations or self.releases or self.vanished or self.gaps_filled)

    def as_dict(self) -> dict[str, object]:
        counts: dict[str, object] = {key: value for key, value in self.__dict__.items() if key != "errors" and value}
        if self.errors:
            counts["errors"] = self.errors
        return counts


class _Chain:
    """The node's canonical block hashes, read once per number in a pass."""

    def __init__(self, client: ChainClient) -> None:
        self.client = client
        self.head = client.block_number()
        self._hashes: dict[int, str | None] = {}

    def hash(self, number: int) -> str | None:
        if number > self.head:
            return None
        if number not in self._hashes:
            self._hashes[number] = self.client.block_hash(number)
        return self._hashes[number]


def _left_chain(chain: _Chain, record: OperatorTransaction) -> bool:
    """Whether a confirmed batch's block is no longer on the chain. A batch confirmed before block
    hashes were recorded is judged by its receipt (and its hash filled in when it still holds)."""
    number = record.block_number
    if number is None:
        return False
    if record.block_hash:
        return chain.hash(number) != record.block_hash
    receipt = chain.client.receipt(record.tx_hash) if record.tx_hash else None
    if receipt is None or receipt.block_number != number or receipt.block_hash != chain.hash(number):
        return True
    model = Settlement if isinstance(record, Settlement) else BudgetReservation
    model.objects.filter(pk=record.pk, block_hash="").update(block_hash=receipt.block_hash)
    return False


def _why(number: int | None, chain: _Chain) -> str:
    return f"its block {number} left the chain (the node's head is now {chain.head})"


def _behind_for(scope: str) -> float:
    """Seconds since the runs of `scope` first found the node behind (kept in the coordination
    cache, shared by the workers), starting the count now when they had not; 0 when the cache
    cannot be read (the wait then never ends while it is down)."""
    cache, key, now = caches["coordination"], f"billing.node_behind.{scope}", time.time()
    try:
        since = cache.get(key)
        if since is None:
            cache.set(key, now, timeout=None)
            return 0.0
    except Exception:  # the cache's own errors (Redis down)
        logger.warning("could not read how long the node has been behind", exc_info=True)
        return 0.0
    return now - float(since)


def _behind_forget(scope: str) -> None:
    """The runs of `scope` found the node caught up: the next wait counts from zero."""
    cache, key = caches["coordination"], f"billing.node_behind.{scope}"
    try:
        if cache.get(key) is not None:
            cache.delete(key)
    except Exception:  # the cache's own errors: not a reason to stop a healthy run
        logger.warning("could not clear how long the node was behind", exc_info=True)


def node_behind_wait(*, head: int, needed: int, scope: str, what: str) -> bool:
    """Raise NodeBehind while the node's `head` is below block `needed`, which `what` rests on,
    for up to CHAIN_BEHIND_GRACE_S from the first run that saw it so (`scope`: whose runs, kept
    in the coordination cache); after that, return: the caller reads the blocks above the head as
    gone (a node restored from older state, which may mine nothing more). A head at or above it
    forgets the wait.

    A node one block behind (one of several behind a load balancer) answers no hash for the blocks
    above its head, and was read at once as a chain that went back: the settlements confirmed
    there were undone and sent again, the contract paid nothing the second time (the charge was
    paid), and the ledger booked the charge as unpaid for good; the deposit watcher reversed the
    withdrawals there and gave the money back to spend.

    Returns True when it let a node still behind through (the grace is over), False when the node
    is not behind. The cache unreachable: a node behind is waited for, one that is not passes."""
    if head >= needed:
        _behind_forget(scope)
        return False
    grace = int(settings.CHAIN_BEHIND_GRACE_S)
    waited = _behind_for(scope)
    if waited >= grace:
        logger.warning(
            "the node's head %s has been below block %s (%s) for %.0f s: reading the blocks above it as gone",
            head,
            needed,
            what,
            waited,
        )
        return True
    raise NodeBehind(
        f"the node's head {head} is below block {needed}, which {what} rests on: it is behind; waiting up to "
        f"CHAIN_BEHIND_GRACE_S ({grace} s) for it before reading those blocks as gone"
    )


def chain_rewind(*, client: ChainClient) -> RewindResult:
    """Undo the operator's confirmed records whose block left the chain and put back to pending
    the submitted batches whose transaction vanished (module docstring). The caller holds the
    settlement lock. Each record is one item (core.periodic.item): one that fails unexpectedly is
    logged and skipped. Raises NodeUnavailable, and NodeBehind while the node's head is below the
    newest block a confirmed record rests on or a submitted batch was sent from (node_behind_wait)."""
    chain = _Chain(client)
    newest = _newest_record()
    sent_from = [
        model.objects.filter(status=OS.SUBMITTED).aggregate(block=Max("sent_from_block"))["block"] or 0
        for model in (Settlement, BudgetReservation)
    ]
    needed = max([newest[0] if newest else 0, *sent_from])
    past_grace = node_behind_wait(
        head=chain.head, needed=needed, scope="operator", what="the operator's newest transaction"
    )
    result = RewindResult()
    low = max(0, chain.head - REWIND_DEPTH_BLOCKS)
    recent = Q(block_number__gte=low)
    # (block, order within a block, item kind, item id, record)
    undo: list[tuple[int, int, str, int, object]] = []
    for settlement in Settlement.objects.filter(recent, status=OS.CONFIRMED):
        if _left_chain(chain, settlement):
            undo.append((settlement.block_number or 0, 1, "settlement", settlement.pk, settlement))
    for batch in BudgetReservation.objects.filter(recent, status=OS.CONFIRMED):
        if _left_chain(chain, batch):
            undo.append((batch.block_number or 0, 0, "reservation batch", batch.pk, batch))
    for auth in BudgetAuthorization.objects.filter(
        released_on_chain_at__isnull=False, release_block_number__gte=low
    ).exclude(release_block_hash=""):
        if chain.hash(auth.release_block_number or 0) != auth.release_block_hash:
            undo.append((auth.release_block_number or 0, 2, "release of job", auth.job_id, auth))
    # Newest block first; in one block, what rests on the rest first (release, settlement, reservation).
    undo.sort(key=lambda entry: (entry[0], entry[1]), reverse=True)
    for _number, _order, kind, item_id, record in undo:
        with periodic.item(kind, item_id, atomic=False, passthrough=(NodeUnavailable,)):
            _undo(record, chain, result)
    _vanished(client, result, head=chain.head, past_grace=past_grace)
    _gaps(client, result)
    if result.changed:
        client.nonce_reset()  # the operator's transactions that left the chain freed their nonces
        logger.warning("chain rewind: %s", result.as_dict())
    return result


def _newest_record() -> tuple[int, str] | None:
    """(block number, block hash) of the newest block a confirmed record of the operator rests on:
    a settlement, a reservation batch, a release. None when there is none."""
    found = [
        model.objects.filter(status=OS.CONFIRMED, block_number__isnull=False)
        .exclude(block_hash="")
        .order_by("-block_number")
        .values_list("block_number", "block_hash")
        .first()
        for model in (Settlement, BudgetReservation)
    ]
    found.append(
        BudgetAuthorization.objects.filter(released_on_chain_at__isnull=False, release_block_number__isnull=False)
        .exclude(release_block_hash="")
        .order_by("-release_block_number")
        .values_list("release_block_number", "release_block_hash")
        .first()
    )
    return max(((int(number or 0), block_hash) for number, block_hash in filter(None, found)), default=None)


def chain_went_back(*, client: ChainClient) -> bool:
    """Whether the chain no longer holds the newest block a confirmed record of the operator rests
    on. A block's hash commits to every block below it, so one read answers for every record.
    Asked just before each transaction the operator sends (a settlement, a reservation batch, a
    release), after the run's own `chain_rewind`: a rollback in between would otherwise let the
    transaction be mined on the shorter chain, where a settlement pays, under the cumulative
    charges, the part of a lease that a batch the chain lost had paid (the ledger, which holds
    that batch confirmed still, would count the payment short, and the lost batch sent again would
    pay nothing), and a release closes a job whose settlement the chain lost (its charge never
    paid). The caller then rewinds and sends nothing this run. Raises NodeUnavailable."""
    newest = _newest_record()
    if newest is None:
        return False
    number, block_hash = newest
    return client.block_hash(number) != block_hash


def rewound_before_send(*, client: ChainClient, what: str) -> bool:
    """Just before the operator sends `what`: when the chain went back since the run's rewind
    (`chain_went_back`), undo it now (`chain_rewind`) and return True: the caller sends nothing
    this run, and the next one sends what the chain lost first, in order.

    First, LockLost when the run's database session ended under it (core.locks.lock_check): the
    settlement lock went with the session, another run may hold it and send the same batch."""
    from billing.settlement import LOCK_NAME

    lock_check(LOCK_NAME)
    if not chain_went_back(client=client):
        return False
    logger.warning("the chain went back under the run; %s is not sent now", what)
    chain_rewind(client=client)
    return True


def _undo(record: object, chain: _Chain, result: RewindResult) -> None:
    from billing.release import release_forget
    from billing.reservations import reservation_unconfirm
    from billing.settlement import settlement_unconfirm

    if isinstance(record, Settlement):
        why = _why(record.block_number, chain)
        try:
            settlement_unconfirm(settlement=record, why=why)
        except (InsufficientBalance, InsufficientFunds) as error:
            message = f"settlement {record.pk}: {why}, but its confirmation cannot be undone yet: {error}"
            logger.error("%s", message)
            result.errors.append(message)
            return
        result.settlements += 1
    elif isinstance(record, BudgetReservation):
        reservation_unconfirm(batch=record, why=_why(record.block_number, chain))
        result.reservations += 1
    elif isinstance(record, BudgetAuthorization):
        release_forget(auth=record, why=_why(record.release_block_number, chain))
        result.releases += 1


def _vanished(client: ChainClient, result: RewindResult, *, head: int, past_grace: bool) -> None:
    """Submitted batches whose transaction the node no longer knows while its nonce is unused on
    chain (it left with a rollback, or was dropped): back to pending, sent again by their run.
    A node with no block after the one the batch was sent from (`head`) is waited for as a node
    behind (node_behind_wait, CHAIN_BEHIND_GRACE_S), unless it has been behind past the grace
    already: one of several behind a load balancer may never have heard of the transaction the
    others are mining, and the batch was sent a second time."""
    mined: int | None = None
    unsure: bool | None = None  # whether records the node may not have heard of yet wait (None: none met)
    for model in (BudgetReservation, Settlement):
        for record in model.objects.filter(status=OS.SUBMITTED).exclude(tx_hash="").order_by("pk"):
            if record.nonce is None or client.transaction_known(record.tx_hash):
                continue
            if not past_grace and head <= (record.sent_from_block or 0):
                if unsure is None:  # as a node behind: waited for, up to the grace, then read as gone
                    unsure = _behind_for("vanished") < int(settings.CHAIN_BEHIND_GRACE_S)
                if unsure:
                    continue
            if mined is None:
                mined = client.transaction_count("latest")
            if mined > record.nonce:
                continue  # its nonce went to another transaction: the batch's run handles a replacement
            moved = model.objects.filter(pk=record.pk, status=OS.SUBMITTED).update(
                status=OS.PENDING,
                last_error=f"transaction {record.tx_hash} vanished: the node no longer knows it",
            )
            if moved:
                logger.warning("%s: transaction %s vanished; it goes out again", record, record.tx_hash)
                result.vanished += moved
    if unsure is None:
        _behind_forget("vanished")  # none waits: the next wait counts from zero


def _gaps(client: ChainClient, result: RewindResult) -> None:
    """Fill the nonce gaps below the operator's sent and unmined transactions (submitted batches,
    releases sent and not recorded): one sent after a rollback, under a nonce counter the rollback
    made stale, waits in the node's pool past the freed nonces and, when nothing else goes out,
    is never mined (ChainClient.nonce_gaps_fill)."""
    hashes = [
        *Settlement.objects.filter(status=OS.SUBMITTED).exclude(tx_hash="").values_list("tx_hash", flat=True),
        *BudgetReservation.objects.filter(status=OS.SUBMITTED).exclude(tx_hash="").values_list("tx_hash", flat=True),
        *BudgetAuthorization.objects.filter(released_on_chain_at__isnull=True)
        .exclude(release_tx_hash="")
        .values_list("release_tx_hash", flat=True),
    ]
    if hashes:
        result.gaps_filled += len(client.nonce_gaps_fill(hashes))


__all__ = ["REWIND_DEPTH_BLOCKS", "RewindResult", "chain_rewind", "node_behind_wait"]
