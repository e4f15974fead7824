"""Billing: the double-entry ledger and per-second metering of leases (docs/billing.md).

Amounts are `int` in the token's smallest unit ("micro": the token has 6 decimals), stored in
BigIntegerField; never float.

- LedgerAccount: one balance of one owner (a renter, a job, a lease, a provider) or a singleton
  (platform fees, the escrow on chain). `balance` caches the sum of the account's postings and is
  updated in the same transaction as they are written (billing.services.ledger_post).
- LedgerEntry + Posting: one journal transaction and its legs. The legs of an entry sum to zero,
  and both tables are append-only (enforced here, in the services and, by triggers, in the
  database).
- LeaseCharge: what a lease has been charged so far (cumulative), recomputed by the meter.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from jobs.models import Job, Lease, Renter
from providers.models import Provider


class AppendOnlyViolation(Exception):
    """Something tried to change or delete a ledger entry or posting."""


class AppendOnlyQuerySet(models.QuerySet):
    """Bulk updates and deletes of append-only rows are refused."""

    def update(self, **kwargs: Any) -> int:  # QuerySet.update's signature
        raise AppendOnlyViolation(f"{self.model.__name__} rows are append-only; post a correcting entry instead.")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AppendOnlyViolation(f"{self.model.__name__} rows are append-only; post a correcting entry instead.")


class AppendOnlyModel(models.Model):
    """A model whose rows are written once: save() of an existing row and delete() raise."""

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:  # Model.save's signature
        if not self._state.adding:
            raise AppendOnlyViolation(f"{type(self).__name__} rows are append-only; post a correcting entry instead.")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:  # Model.delete's signature
        raise AppendOnlyViolation(f"{type(self).__name__} rows are append-only; post a correcting entry instead.")


class LedgerAccount(models.Model):
    class Kind(models.TextChoices):
        # A renter's money, free to reserve for jobs or withdraw.
        RENTER_AVAILABLE = "renter_available"
        # One job's budget, reserved at admission; charges draw from it, the rest is released.
        JOB_RESERVED = "job_reserved"
        # One lease's metered charges, not yet sent for settlement on chain.
        LEASE_UNSETTLED = "lease_unsettled"
        # One lease's charges in a settlement transaction not yet confirmed.
        IN_SETTLEMENT = "in_settlement"
        # A provider's earnings, withdrawable on chain.
        PROVIDER_PAYABLE = "provider_payable"
        # The platform's fees (singleton).
        PLATFORM_FEES = "platform_fees"
        # The counterparty of money entering or leaving the escrow (singleton). Its balance is
        # minus the token the escrow holds for us, so it is negative by convention.
        ESCROW_CHAIN = "escrow_chain"

    # Balances that may never be negative (every kind but the external counterparty).
    GUARDED = (
        Kind.RENTER_AVAILABLE,
        Kind.JOB_RESERVED,
        Kind.LEASE_UNSETTLED,
        Kind.IN_SETTLEMENT,
        Kind.PROVIDER_PAYABLE,
        Kind.PLATFORM_FEES,
    )

    kind = models.CharField(max_length=32, choices=Kind.choices)
    renter = models.ForeignKey(Renter, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_accounts")
    provider = models.ForeignKey(
        Provider, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_accounts"
    )
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_accounts")
    lease = models.ForeignKey(Lease, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_accounts")
    # "renter:3", "job:12", "lease:40", "provider:2", or "" for a singleton: unique with `kind`
    # (a unique constraint over the nullable foreign keys would treat NULLs as distinct).
    owner_key = models.CharField(max_length=64, blank=True)
    balance = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["pk"]
        constraints = [
            models.UniqueConstraint(fields=["kind", "owner_key"], name="ledger_account_unique_per_owner"),
            models.CheckConstraint(
                condition=models.Q(balance__gte=0) | models.Q(kind="escrow_chain"),
                name="ledger_account_guarded_balance_not_negative",
            ),
        ]
        # The accounts still holding money, by kind: what waits to be settled (lease_unsettled)
        # or released (job_reserved), read by the settlement engine, the release run, the ledger
        # check and the dashboard. A few thousand rows where the table holds every lease's and
        # job's account ever opened.
        indexes = [models.Index(fields=["kind"], condition=models.Q(balance__gt=0), name="ledger_account_open")]

    def __str__(self) -> str:
        return f"{self.kind} {self.owner_key}".strip()


class LedgerEntry(AppendOnlyModel):
    """One journal transaction: its postings sum to zero. `idempotency_key` makes a repeated
    movement (a retried task, a replayed chain event) post nothing the second time."""

    class Kind(models.TextChoices):
        DEPOSIT = "deposit"
        RENTER_WITHDRAWAL = "renter_withdrawal"
        RESERVE = "reserve"
        CHARGE = "charge"
        SETTLEMENT_SUBMIT = "settlement_submit"
        SETTLEMENT_CONFIRM = "settlement_confirm"
        SETTLEMENT_REVERT = "settlement_revert"
        PROVIDER_WITHDRAWAL = "provider_withdrawal"
        FEE_WITHDRAWAL = "fee_withdrawal"
        RELEASE = "release"
        # A chain movement whose block left the chain in a reorg, reversed (billing.deposits).
        CHAIN_REVERSAL = "chain_reversal"

    kind = models.CharField(max_length=32, choices=Kind.choices, db_index=True)
    idempotency_key = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_entries")
    lease = models.ForeignKey(Lease, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_entries")
    # The settlement batch this entry belongs to (its id in the settlement engine), if any.
    settlement_ref = models.CharField(max_length=64, blank=True)
    chain_tx_hash = models.CharField(max_length=66, blank=True)
    chain_log_index = models.PositiveIntegerField(null=True, blank=True)
    memo = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["pk"]
        verbose_name_plural = "ledger entries"

    def __str__(self) -> str:
        return f"{self.kind} {self.idempotency_key}"


class Posting(AppendOnlyModel):
    """One leg of an entry: `amount` is added to the account's balance (signed, never zero)."""

    entry = models.ForeignKey(LedgerEntry, on_delete=models.PROTECT, related_name="postings")
    account = models.ForeignKey(LedgerAccount, on_delete=models.PROTECT, related_name="postings")
    amount = models.BigIntegerField()

    class Meta:
        ordering = ["pk"]
        constraints = [
            models.UniqueConstraint(fields=["entry", "account"], name="posting_one_leg_per_account"),
            models.CheckConstraint(condition=~models.Q(amount=0), name="posting_amount_not_zero"),
        ]

    def __str__(self) -> str:
        return f"{self.amount:+d} to account {self.account_id}"


class LeaseCharge(models.Model):
    """What a lease has been charged so far. `cumulative_micro` only grows; each increase is one
    charge entry keyed "charge:<lease>:<cumulative_micro>". `uncapped_micro` is what the metering
    rule gave before the job's budget capped it (`capped`). `final`: the lease ended and its
    charge will not change again."""

    lease = models.OneToOneField(Lease, on_delete=models.PROTECT, related_name="charge")
    billable_seconds = models.PositiveBigIntegerField(default=0)
    cumulative_micro = models.PositiveBigIntegerField(default=0)
    uncapped_micro = models.PositiveBigIntegerField(default=0)
    capped = models.BooleanField(default=False)
    final = models.BooleanField(default=False, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["pk"]

    def __str__(self) -> str:
        return f"charge of lease {self.lease_id}: {self.cumulative_micro}{' (final)' if self.final else ''}"


# --- the chain side: wallets, budget authorizations, settlement batches, the event watcher ------


class RenterWallet(models.Model):
    """A renter's on-chain address: deposits come from it and it signs job budgets. `address`
    is stored lowercase ("0x" + 40 hex digits) and belongs to one renter only."""

    renter = models.ForeignKey(Renter, on_delete=models.PROTECT, related_name="wallets")
    address = models.CharField(max_length=42, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["pk"]

    def __str__(self) -> str:
        return f"{self.address} (renter {self.renter_id})"


class BudgetAuthorization(models.Model):
    """The renter's EIP-712 signature of a job's budget (billing.contract.budget_typed_data), and
    where that budget stands on chain (billing.reservations, docs/billing.md "Reserving budgets"):

        signed ──► reserving ──► reserved   (BudgetReserved in the batch's receipt)
          ▲            │    └──► refused    (BudgetSkipped: the job is cancelled, its budget released)
          └────────────┘  (the batch failed or was replaced: sent again in the next batch)

    The matcher places a job only once its budget is `reserved`: the escrow then holds it where
    the renter's withdrawals cannot reach. `activated_at` is when the escrow reserved it."""

    class Status(models.TextChoices):
        # Stored; not yet in a reservation batch.
        SIGNED = "signed"
        # In a reservation batch (`reservation`) not yet confirmed; it cannot change meanwhile.
        RESERVING = "reserving"
        # The escrow reserved max_amount for the job (activated_at); fixed from now on.
        RESERVED = "reserved"
        # The escrow skipped it (rejected_reason); the job was cancelled.
        REFUSED = "refused"

    job = models.OneToOneField(Job, on_delete=models.PROTECT, related_name="budget_authorization")
    renter_address = models.CharField(max_length=42)
    max_amount = models.BigIntegerField()
    deadline = models.DateTimeField()
    signature = models.CharField(max_length=132)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.SIGNED, db_index=True)
    # The reservation batch it is (or last was) sent in.
    reservation = models.ForeignKey(
        "BudgetReservation", null=True, blank=True, on_delete=models.PROTECT, related_name="authorizations"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    activated_at = models.DateTimeField(null=True, blank=True)
    # Set when the escrow refused this very signature (expired, forged, renter short of funds on
    # chain), with the reason the renter is shown.
    rejected_signature = models.CharField(max_length=132, blank=True)
    rejected_reason = models.CharField(max_length=300, blank=True)
    # Set by billing.release once the escrow closed the job (releaseJob: its unspent reservation
    # went back to the renter's available balance on chain); the tx hash is empty when the job was
    # found closed already (released earlier by a run that died before recording it, or by the renter).
    # While a releaseJob sent is not confirmed yet, release_tx_hash holds it and released_on_chain_at
    # is empty.
    released_on_chain_at = models.DateTimeField(null=True, blank=True)
    release_tx_hash = models.CharField(max_length=66, blank=True)
    # The block the release was confirmed in (or, when it was found closed, the head block it was
    # seen closed at) and its hash: when that block leaves the chain (a reorg, a node rolled back),
    # billing.rewind forgets the release and the next run looks again.
    release_block_number = models.PositiveBigIntegerField(null=True, blank=True, db_index=True)
    release_block_hash = models.CharField(max_length=66, blank=True)

    class Meta:
        ordering = ["pk"]

    def __str__(self) -> str:
        return f"budget of job {self.job_id}: {self.max_amount} by {self.renter_address}"


class OperatorTransaction(models.Model):
    """What the operator's batched transactions (reservations, settlements) record to be completed
    exactly once: `nonce` and `calldata_hash` (the keccak of the exact calldata) and the chain's
    head (`sent_from_block`, where a search for the transaction starts) are committed BEFORE the
    transaction is sent, so a worker that dies between sending and recording `tx_hash` leaves
    enough for the next run to find it.

    pending → submitted → confirmed, or → failed. A confirmed batch whose block (`block_number`,
    `block_hash`) left the chain, or a submitted one whose transaction the node no longer knows,
    goes back to pending (billing.rewind) and is sent again; `rewinds` counts how often its
    confirmation was undone, and keys the ledger entries of each new confirmation."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SUBMITTED = "submitted"
        CONFIRMED = "confirmed"
        FAILED = "failed"

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    submitted_at = models.DateTimeField(null=True, blank=True)
    confirmed_at = models.DateTimeField(null=True, blank=True)
    tx_hash = models.CharField(max_length=66, blank=True, db_index=True)
    nonce = models.PositiveBigIntegerField(null=True, blank=True)
    calldata_hash = models.CharField(max_length=66, blank=True)
    sent_from_block = models.PositiveBigIntegerField(null=True, blank=True)
    # Indexed: the newest confirmed one is read before every send (billing.rewind.chain_went_back).
    block_number = models.PositiveBigIntegerField(null=True, blank=True, db_index=True)
    block_hash = models.CharField(max_length=66, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    rewinds = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)

    class Meta:
        abstract = True


class BudgetReservation(OperatorTransaction):
    """One `reserve` transaction: a batch of signed budgets the escrow is asked to reserve before
    their jobs run (billing.reservations). Failed: its authorizations go back to signed."""

    # The jobs it carries, in calldata order (the authorizations point back to it).
    job_ids = models.JSONField(default=list)
    reserved_count = models.PositiveIntegerField(default=0)
    refused_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["pk"]

    def __str__(self) -> str:
        return f"reservation {self.pk} ({self.status})"


class Settlement(OperatorTransaction):
    """One batch of lease charges sent to the escrow in one `settle` transaction. Failed: the
    ledger puts the charges back."""

    fee_bps = models.PositiveIntegerField(default=0)
    item_count = models.PositiveIntegerField(default=0)
    total_micro = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["pk"]

    def __str__(self) -> str:
        return f"settlement {self.pk} ({self.status})"


class SettlementItem(models.Model):
    """One lease in a settlement: its cumulative charge as sent and the part new in this batch."""

    settlement = models.ForeignKey(Settlement, on_delete=models.PROTECT, related_name="items")
    lease = models.ForeignKey(Lease, on_delete=models.PROTECT, related_name="settlement_items")
    job = models.ForeignKey(Job, on_delete=models.PROTECT, related_name="settlement_items")
    provider_address = models.CharField(max_length=42)
    cumulative_micro = models.BigIntegerField()
    delta_micro = models.BigIntegerField()
    carries_budget = models.BooleanField(default=False)
    # Set when the batch confirmed with this item skipped because the escrow knew no such job (its
    # budget's reservation left the chain with a rollback before the batch was mined): the escrow
    # recorded nothing of its cumulative, so the next batch carries the charge again.
    job_unknown = models.BooleanField(default=False)

    class Meta:
        ordering = ["pk"]
        constraints = [
            models.UniqueConstraint(fields=["settlement", "lease"], name="settlement_item_one_per_lease"),
        ]

    def __str__(self) -> str:
        return f"lease {self.lease_id} +{self.delta_micro} in settlement {self.settlement_id}"


class ChainCursor(models.Model):
    """How far a chain watcher has read: the last block processed and its hash, plus
    `recent_blocks`, a window of [number, hash] of recently processed blocks (newest last), from
    which a reorg is rewound to the newest block still on the chain."""

    name = models.CharField(max_length=64, unique=True)
    last_block = models.BigIntegerField(default=-1)
    last_block_hash = models.CharField(max_length=66, blank=True)
    recent_blocks = models.JSONField(default=list, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name} at block {self.last_block}"


class ChainLog(models.Model):
    """One escrow event read by the watcher, once per (tx_hash, log_index).

    credited: its ledger movement is posted; unmatched: a deposit from an address no renter has
    linked (credited when it is linked); rewound: its block left the chain in a reorg and its
    movement was reversed; flagged: it could not be posted as is (a renter withdrawing money the
    ledger holds reserved), see `detail`. `credits` counts how often it was posted, so a log
    that comes back after a reorg gets fresh idempotency keys."""

    class Status(models.TextChoices):
        CREDITED = "credited"
        UNMATCHED = "unmatched"
        REWOUND = "rewound"
        FLAGGED = "flagged"

    tx_hash = models.CharField(max_length=66)
    log_index = models.PositiveIntegerField()
    block_number = models.BigIntegerField(db_index=True)
    block_hash = models.CharField(max_length=66)
    event = models.CharField(max_length=64)
    args = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=Status.choices, db_index=True)
    # The account the event is about (depositor, withdrawer), lowercase, for matching on link.
    address = models.CharField(max_length=42, blank=True, db_index=True)
    credits = models.PositiveIntegerField(default=0)
    detail = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["block_number", "log_index"]
        constraints = [
            models.UniqueConstraint(fields=["tx_hash", "log_index"], name="chain_log_unique_event"),
        ]

    def __str__(self) -> str:
        return f"{self.event} {self.tx_hash}:{self.log_index} ({self.status})"


class LedgerCheck(models.Model):
    """One run of the ledger check (billing.ledger_check: `manage.py ledger_check` and the periodic
    task billing.tasks.check_ledger): the ledger's own invariants and, when an escrow is deployed,
    the ledger against the chain as of a confirmed block. `differences` lists what disagrees, as
    sentences; `in_flight` what was accounted for as legitimately under way (by kind: counts);
    `error` says why the chain could not be compared (then `ok` is False). The newest row is
    billing.selectors.ledger_check_latest()."""

    checked_at = models.DateTimeField(auto_now_add=True, db_index=True)
    ok = models.BooleanField()
    chain_compared = models.BooleanField(default=False)
    block_number = models.PositiveBigIntegerField(null=True, blank=True)
    block_hash = models.CharField(max_length=66, blank=True)
    differences = models.JSONField(default=list, blank=True)
    in_flight = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-checked_at", "-pk"]

    def __str__(self) -> str:
        at = f" at block {self.block_number}" if self.block_number is not None else ""
        return f"ledger check {self.pk}{at}: {'ok' if self.ok else 'NOT ok'}"
