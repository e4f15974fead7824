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

    def update(self, **kwargs: Any) -> int:
        raise AppendOnlyViolation(f"{self.model.__name__} rows are append-only; post a correcting entry instead.")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AppendOnlyViolation(f"{self.model.__name__} rows are append-only; post a correcting entry instead.")


class AppendOnlyModel(models.Model):
    """A model whose rows are written once: save() of an existing row and delete() raise."""

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnlyViolation(f"{type(self).__name__} rows are append-only; post a correcting entry instead.")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
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
