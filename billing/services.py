"""Writes of billing: the ledger's one posting function, the named money movements built on
it, job admission and release, and metering of leases. docs/billing.md states the rules.

Other apps and the settlement/deposit code move money ONLY through these functions; none
writes LedgerEntry, Posting or LedgerAccount.balance itself.

Locking: `accounts_lock` is the one place ledger accounts are locked (SELECT … FOR UPDATE,
ordered by pk, so two postings never deadlock); `ledger_post` calls it. Metering locks the
lease's LeaseCharge row first, then the accounts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import BigIntegerField, Case, F, Q, Value, When
from django.utils import timezone

from billing import metering
from billing.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    InsufficientFunds,
    UnbalancedEntry,
    ValidationFailed,
)
from billing.models import LeaseCharge, LedgerAccount, LedgerEntry, Posting
from core import periodic
from jobs.models import Job, Lease, Renter, UsageReport
from jobs.services import lease_request_stop
from providers.models import Provider

logger = logging.getLogger(__name__)

AK = LedgerAccount.Kind
EK = LedgerEntry.Kind

# The largest amount one movement may carry: well past any real budget (uint96 on chain).
MAX_AMOUNT = 2**63 - 1


# --- accounts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRef:
    """Names one ledger account: its kind and its owner (none for the singletons)."""

    kind: str
    renter_id: int | None = None
    provider_id: int | None = None
    job_id: int | None = None
    lease_id: int | None = None

    @property
    def owner_key(self) -> str:
        for name, value in (
            ("renter", self.renter_id),
            ("provider", self.provider_id),
            ("job", self.job_id),
            ("lease", self.lease_id),
        ):
            if value is not None:
                return f"{name}:{value}"
        return ""


_OWNER_OF_KIND: dict[str, str | None] = {
    AK.RENTER_AVAILABLE: "renter_id",
    AK.JOB_RESERVED: "job_id",
    AK.LEASE_UNSETTLED: "lease_id",
    AK.IN_SETTLEMENT: "lease_id",
    AK.PROVIDER_PAYABLE: "provider_id",
    AK.PLATFORM_FEES: None,
    AK.ESCROW_CHAIN: None,
}


def renter_available(renter_id: int) -> AccountRef:
    return AccountRef(AK.RENTER_AVAILABLE, renter_id=renter_id)


def job_reserved(job_id: int) -> AccountRef:
    return AccountRef(AK.JOB_RESERVED, job_id=job_id)


def lease_unsettled(lease_id: int) -> AccountRef:
    return AccountRef(AK.LEASE_UNSETTLED, lease_id=lease_id)


def in_settlement(lease_id: int) -> AccountRef:
    return AccountRef(AK.IN_SETTLEMENT, lease_id=lease_id)


def provider_payable(provider_id: int) -> AccountRef:
    return AccountRef(AK.PROVIDER_PAYABLE, provider_id=provider_id)


PLATFORM_FEES = AccountRef(AK.PLATFORM_FEES)
ESCROW_CHAIN = AccountRef(AK.ESCROW_CHAIN)


def _check_ref(ref: AccountRef) -> None:
    owner = _OWNER_OF_KIND.get(ref.kind, "?")
    given = [n for n in ("renter_id", "provider_id", "job_id", "lease_id") if getattr(ref, n) is not None]
    if owner == "?" or given != ([owner] if owner else []):
        raise ValueError(f"account {ref} does not name the owner its kind needs ({owner or 'none'})")


def accounts_get_or_create(*, refs: Iterable[AccountRef]) -> dict[AccountRef, int]:
    """The pks of the accounts `refs` name, each created (balance 0) the first time: one query
    when they all exist, three when some are new, however many there are. Nothing is locked."""
    wanted = {(ref.kind, ref.owner_key): ref for ref in refs}
    for ref in wanted.values():
        _check_ref(ref)
    if not wanted:
        return {}

    def lookup(keys: Iterable[tuple[str, str]]) -> dict[AccountRef, int]:
        match = Q()
        for kind, owner_key in keys:
            match |= Q(kind=kind, owner_key=owner_key)
        rows = LedgerAccount.objects.filter(match).values_list("pk", "kind", "owner_key")
        return {wanted[(kind, owner_key)]: pk for pk, kind, owner_key in rows}

    found = lookup(wanted)
    if missing := [ref for ref in wanted.values() if ref not in found]:
        # ON CONFLICT DO NOTHING: an account a concurrent posting created meanwhile is kept, and
        # read back with the ones made here.
        LedgerAccount.objects.bulk_create(
            [
                LedgerAccount(
                    kind=ref.kind,
                    owner_key=ref.owner_key,
                    renter_id=ref.renter_id,
                    provider_id=ref.provider_id,
                    job_id=ref.job_id,
                    lease_id=ref.lease_id,
                )
                for ref in missing
            ],
            ignore_conflicts=True,
        )
        found |= lookup((ref.kind, ref.owner_key) for ref in missing)
    return found


def accounts_lock(*, account_ids: Iterable[int]) -> dict[int, LedgerAccount]:
    """Lock the accounts (SELECT … FOR UPDATE, in pk order so that two postings touching the
    same accounts never deadlock) and return them fresh, by pk. The caller holds a transaction;
    the locks last until it ends."""
    ids = sorted(set(account_ids))
    return {a.pk: a for a in LedgerAccount.objects.select_for_update().filter(pk__in=ids).order_by("pk")}


# --- the one posting function -----------------------------------------------------------------


@dataclass(frozen=True)
class Leg:
    """One posting to be written: `amount` (signed micro) added to the account `ref` names."""

    ref: AccountRef
    amount: int


def _merge(legs: Sequence[Leg]) -> dict[AccountRef, int]:
    merged: dict[AccountRef, int] = {}
    for leg in legs:
        if isinstance(leg.amount, bool) or not isinstance(leg.amount, int):
            raise UnbalancedEntry(f"posting amounts are int micro, not {type(leg.amount).__name__}")
        if abs(leg.amount) > MAX_AMOUNT:
            raise ValidationFailed(f"amount {leg.amount} is out of range")
        merged[leg.ref] = merged.get(leg.ref, 0) + leg.amount
    return {ref: amount for ref, amount in merged.items() if amount != 0}


def ledger_post(
    *,
    kind: str,
    idempotency_key: str,
    legs: Sequence[Leg],
    job_id: int | None = None,
    lease_id: int | None = None,
    settlement_ref: str = "",
    chain_tx_hash: str = "",
    chain_log_index: int | None = None,
    memo: str = "",
) -> tuple[LedgerEntry, bool]:
    """Write one entry and its postings and update the accounts' cached balances, atomically.

    Returns (entry, created). Contract:
    - legs are merged per account; the merged amounts must be int, not all zero, and sum to
      zero, else UnbalancedEntry and nothing is written;
    - a key already used returns that entry and (False), posting nothing, when its kind and
      postings are the same; otherwise IdempotencyConflict;
    - a posting that would take a guarded account (every kind but escrow_chain) below zero
      raises InsufficientBalance (InsufficientFunds for a renter's available balance) and
      nothing is written.
    """
    if kind not in EK.values:
        raise ValueError(f"unknown entry kind {kind!r}")
    if not idempotency_key or len(idempotency_key) > 200:
        raise ValueError("an entry needs an idempotency key of 1 to 200 characters")
    merged = _merge(legs)
    if not merged:
        raise UnbalancedEntry("an entry needs at least one non-zero posting")
    total = sum(merged.values())
    if total != 0:
        raise UnbalancedEntry(f"the postings of {idempotency_key!r} sum to {total}, not zero")

    with transaction.atomic():
        ids = accounts_get_or_create(refs=merged)
        locked = accounts_lock(account_ids=ids.values())
        # Checked after the locks: a concurrent post of the same key has committed by now.
        existing = LedgerEntry.objects.filter(idempotency_key=idempotency_key).first()
        wanted = {ids[ref]: amount for ref, amount in merged.items()}
        if existing is not None:
            have = dict(Posting.objects.filter(entry=existing).values_list("account_id", "amount"))
            if existing.kind != kind or have != wanted:
                raise IdempotencyConflict(
                    f"The idempotency key {idempotency_key!r} was already used for a different {existing.kind} entry."
                )
            return existing, False
        for ref, amount in merged.items():
            account = locked[ids[ref]]
            after = account.balance + amount
            if ref.kind in LedgerAccount.GUARDED and after < 0:
                error = InsufficientFunds if ref.kind == AK.RENTER_AVAILABLE else InsufficientBalance
                raise error(
                    f"{account} holds {metering.micro_to_decimal(account.balance)}; "
                    f"{metering.micro_to_decimal(-amount)} cannot be taken from it.",
                    extra={"needed": -amount, "available": account.balance},
                )
        entry = LedgerEntry.objects.create(
            kind=kind,
            idempotency_key=idempotency_key,
            job_id=job_id,
            lease_id=lease_id,
            settlement_ref=settlement_ref,
            chain_tx_hash=chain_tx_hash,
            chain_log_index=chain_log_index,
            memo=memo[:500],
        )
        Posting.objects.bulk_create(
            [Posting(entry=entry, account_id=pk, amount=amount) for pk, amount in wanted.items()]
        )
        # One statement for every account's balance.
        LedgerAccount.objects.filter(pk__in=wanted).update(
            balance=F("balance")
            + Case(*(When(pk=pk, then=Value(amount)) for pk, amount in wanted.items()), output_field=BigIntegerField()),
            updated_at=timezone.now(),
        )
    return entry, True


def _positive(amount: int, name: str = "amount") -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_AMOUNT:
        raise ValidationFailed(f"{name}: must be a positive whole number of micro (got {amount!r})")


# --- money in and out of the escrow -----------------------------------------------------------


def deposit_record(*, renter: Renter, amount: int, tx_hash: str, log_index: int, memo: str = "") -> LedgerEntry:
    """A renter's deposit seen on chain (escrow_chain → renter_available). Idempotent per
    (tx_hash, log_index): a replayed event posts nothing."""
    _positive(amount)
    entry, _ = ledger_post(
        kind=EK.DEPOSIT,
        idempotency_key=f"deposit:{tx_hash}:{log_index}",
        legs=[Leg(ESCROW_CHAIN, -amount), Leg(renter_available(renter.pk), amount)],
        chain_tx_hash=tx_hash,
        chain_log_index=log_index,
        memo=memo,
    )
    return entry


def renter_withdrawal_record(*, renter: Renter, amount: int, tx_hash: str, log_index: int) -> LedgerEntry:
    """A renter's withdrawal from the escrow (renter_available → escrow_chain). Raises
    InsufficientFunds when the renter's available balance does not cover it."""
    _positive(amount)
    entry, _ = ledger_post(
        kind=EK.RENTER_WITHDRAWAL,
        idempotency_key=f"renter_withdrawal:{tx_hash}:{log_index}",
        legs=[Leg(renter_available(renter.pk), -amount), Leg(ESCROW_CHAIN, amount)],
        chain_tx_hash=tx_hash,
        chain_log_index=log_index,
    )
    return entry


def provider_withdrawal_record(*, provider: Provider, amount: int, tx_hash: str, log_index: int) -> LedgerEntry:
    """A provider's withdrawal of earnings (provider_payable → escrow_chain)."""
    _positive(amount)
    entry, _ = ledger_post(
        kind=EK.PROVIDER_WITHDRAWAL,
        idempotency_key=f"provider_withdrawal:{tx_hash}:{log_index}",
        legs=[Leg(provider_payable(provider.pk), -amount), Leg(ESCROW_CHAIN, amount)],
        chain_tx_hash=tx_hash,
        chain_log_index=log_index,
    )
    return entry


def fee_withdrawal_record(*, amount: int, tx_hash: str, log_index: int) -> LedgerEntry:
    """The treasury's withdrawal of platform fees (platform_fees → escrow_chain)."""
    _positive(amount)
    entry, _ = ledger_post(
        kind=EK.FEE_WITHDRAWAL,
        idempotency_key=f"fee_withdrawal:{tx_hash}:{log_index}",
        legs=[Leg(PLATFORM_FEES, -amount), Leg(ESCROW_CHAIN, amount)],
        chain_tx_hash=tx_hash,
        chain_log_index=log_index,
    )
    return entry


# --- job admission and release ----------------------------------------------------------------


def job_budget_micro_for(job: Job) -> int:
    return metering.job_budget_micro(
        max_price_per_gpu_hour=job.max_price_per_gpu_hour, gpu_count=job.gpu_count, max_duration_s=job.max_duration_s
    )


def job_budget_reserve(*, job: Job) -> LedgerEntry:
    """Reserve the job's budget (renter_available → job_reserved), key "reserve:<job>".

    Called by marketplace.submit.job_submit in the transaction that creates the job, so a refusal
    creates no job.
    Raises InsufficientFunds (HTTP 402, code insufficient_funds) with a sentence stating what
    the job needs and what the renter has available."""
    budget = job_budget_micro_for(job)
    try:
        entry, _ = ledger_post(
            kind=EK.RESERVE,
            idempotency_key=f"reserve:{job.pk}",
            legs=[Leg(renter_available(job.renter_id), -budget), Leg(job_reserved(job.pk), budget)],
            job_id=job.pk,
            memo=f"{job.gpu_count} GPU(s) × {job.max_duration_s} s at most {job.max_price_per_gpu_hour}/GPU-hour",
        )
    except InsufficientFunds as exc:
        available = exc.extra.get("available", 0)
        raise InsufficientFunds(
            f"This job needs a budget of {metering.micro_to_decimal(budget)} (at most "
            f"{job.max_price_per_gpu_hour} per GPU-hour × {job.gpu_count} GPU(s) × {job.max_duration_s} s) "
            f"but only {metering.micro_to_decimal(available)} is available; deposit more or ask for less.",
            extra={
                "needed": str(metering.micro_to_decimal(budget)),
                "available": str(metering.micro_to_decimal(available)),
            },
        ) from None
    return entry


def _lease_is_final(lease: Lease) -> bool:
    charge = getattr(lease, "charge", None)
    return lease.status == Lease.Status.ENDED and charge is not None and charge.final


def job_leases_final(*, job_id: int) -> bool:
    """True when every lease of the job has ended and its charge is final."""
    leases = Lease.objects.filter(job_id=job_id).select_related("charge")
    return all(_lease_is_final(lease) for lease in leases)


def job_budget_release(*, job_id: int) -> LedgerEntry | None:
    """Give back what a finished job's budget did not spend (job_reserved → renter_available),
    key "release:<job>". Only for a terminal job whose leases are all finally metered (else
    ValidationFailed code release_too_early), so no charge can follow. Returns the entry, or
    None when nothing was left to release. Running it twice releases once."""
    with transaction.atomic():
        job = Job.objects.filter(pk=job_id).first()
        if job is None:
            raise ValidationFailed(f"Job {job_id} does not exist.", code="not_found")
        if job.status not in Job.TERMINAL or not job_leases_final(job_id=job_id):
            raise ValidationFailed(
                f"Job {job_id} is {job.status} or has leases not finally metered; its budget stays reserved.",
                code="release_too_early",
            )
        existing = LedgerEntry.objects.filter(idempotency_key=f"release:{job_id}").first()
        if existing is not None:
            return existing
        reserved = job_reserved(job_id)
        account_id = accounts_get_or_create(refs=[reserved])[reserved]
        remaining = accounts_lock(account_ids=[account_id])[account_id].balance
        if remaining == 0:
            return None
        entry, _ = ledger_post(
            kind=EK.RELEASE,
            idempotency_key=f"release:{job_id}",
            legs=[Leg(job_reserved(job_id), -remaining), Leg(renter_available(job.renter_id), remaining)],
            job_id=job_id,
            memo=f"unused budget of {job.status} job",
        )
    return entry


def budgets_release(*, limit: int = 1000) -> dict[str, int]:
    """Release the unused budget of every terminal job with money still reserved and all its
    leases finally metered (billing.tasks.release_budgets runs it), each job in its own
    transaction: one job's failure is logged and skipped (core.periodic.item). Returns
    counts."""
    released = waiting = 0
    job_ids = list(
        LedgerAccount.objects.filter(kind=AK.JOB_RESERVED, balance__gt=0, job__status__in=Job.TERMINAL)
        .order_by("pk")
        .values_list("job_id", flat=True)[:limit]
    )
    for job_id in job_ids:
        with periodic.item("job", job_id):
            if not job_leases_final(job_id=job_id):
                waiting += 1
                continue
            if job_budget_release(job_id=job_id) is not None:
                released += 1
    return {"released": released, "waiting_for_metering": waiting}


# --- settlement (called by the settlement engine) -----------------------------------------------


def settlement_amounts(delta: int, fee_bps: int) -> tuple[int, int]:
    """(provider's part, platform fee) of one settled delta, as the escrow contract computes them."""
    return metering.settlement_amounts(delta, fee_bps)


def _lease_of(lease_id: int) -> Lease:
    lease = Lease.objects.select_related("machine").filter(pk=lease_id).first()
    if lease is None:
        raise ValidationFailed(f"Lease {lease_id} does not exist.", code="not_found")
    return lease


def settlement_submit_record(*, lease_id: int, amount: int, settlement_ref: str) -> LedgerEntry:
    """`amount` of a lease's unsettled charges goes into a settlement transaction
    (lease_unsettled → in_settlement), key "settlement_submit:<ref>:<lease>"."""
    _positive(amount)
    lease = _lease_of(lease_id)
    entry, _ = ledger_post(
        kind=EK.SETTLEMENT_SUBMIT,
        idempotency_key=f"settlement_submit:{settlement_ref}:{lease_id}",
        legs=[Leg(lease_unsettled(lease_id), -amount), Leg(in_settlement(lease_id), amount)],
        job_id=lease.job_id,
        lease_id=lease_id,
        settlement_ref=settlement_ref,
    )
    return entry


def _settlement_key(kind: str, settlement_ref: str, lease_id: int, generation: int) -> str:
    """The key of a settlement's confirm or revert entry for a lease. `generation`: how many times
    the batch's confirmation was undone before (billing.rewind), so a batch confirmed again after
    its block left the chain posts fresh entries; generation 0 keeps the original key."""
    key = f"{kind}:{settlement_ref}:{lease_id}"
    return f"{key}:{generation}" if generation else key


def settlement_confirm_record(
    *,
    lease_id: int,
    amount: int,
    fee_bps: int,
    settlement_ref: str,
    tx_hash: str,
    log_index: int | None = None,
    generation: int = 0,
) -> LedgerEntry:
    """The escrow paid `amount` for the lease: in_settlement → provider_payable (amount − fee)
    + platform_fees (fee = amount × fee_bps // 10_000, as the contract rounds), key
    "settlement_confirm:<ref>:<lease>" (":<generation>" appended after a rewind). `fee_bps` is the
    fee the contract applied."""
    _positive(amount)
    lease = _lease_of(lease_id)
    provider_part, fee = metering.settlement_amounts(amount, fee_bps)
    entry, _ = ledger_post(
        kind=EK.SETTLEMENT_CONFIRM,
        idempotency_key=_settlement_key("settlement_confirm", settlement_ref, lease_id, generation),
        legs=[
            Leg(in_settlement(lease_id), -amount),
            Leg(provider_payable(lease.machine.provider_id), provider_part),
            Leg(PLATFORM_FEES, fee),
        ],
        job_id=lease.job_id,
        lease_id=lease_id,
        settlement_ref=settlement_ref,
        chain_tx_hash=tx_hash,
        chain_log_index=log_index,
        memo=f"fee {fee_bps} bps",
    )
    return entry


def settlement_revert_record(*, lease_id: int, amount: int, settlement_ref: str, generation: int = 0) -> LedgerEntry:
    """A settlement transaction failed (or paid less): `amount` goes back to the lease's
    unsettled charges (in_settlement → lease_unsettled), key "settlement_revert:<ref>:<lease>"
    (":<generation>" appended after a rewind)."""
    _positive(amount)
    lease = _lease_of(lease_id)
    entry, _ = ledger_post(
        kind=EK.SETTLEMENT_REVERT,
        idempotency_key=_settlement_key("settlement_revert", settlement_ref, lease_id, generation),
        legs=[Leg(in_settlement(lease_id), -amount), Leg(lease_unsettled(lease_id), amount)],
        job_id=lease.job_id,
        lease_id=lease_id,
        settlement_ref=settlement_ref,
    )
    return entry


def settlement_unconfirm_record(*, lease_id: int, settlement_ref: str, generation: int, why: str) -> list[LedgerEntry]:
    """Undo what confirming a settlement (generation `generation`) posted for a lease, because
    the block that paid it left the chain (billing.rewind): the confirm entry is reversed by a
    chain_reversal entry (provider_payable and platform_fees → in_settlement), key
    "chain_reversal:<confirm key>", and the part the escrow did not pay, which went back to
    lease_unsettled, goes into the settlement again (a settlement_submit entry, key
    "settlement_resubmit:<ref>:<lease>:<generation>"). The lease's whole delta is then in
    settlement again, as before the confirmation; nothing is edited. Idempotent per key. Raises
    InsufficientBalance when the money was moved on meanwhile (a provider withdrew the earnings
    the ledger still shows): nothing is written, and the caller tries again later (the deposit
    watcher reverses that withdrawal too when its block left the chain). The caller holds a
    transaction."""
    posted = []
    confirm = LedgerEntry.objects.filter(
        idempotency_key=_settlement_key("settlement_confirm", settlement_ref, lease_id, generation)
    ).first()
    if confirm is not None:
        entry, _ = ledger_post(
            kind=EK.CHAIN_REVERSAL,
            idempotency_key=f"chain_reversal:{confirm.idempotency_key}",
            legs=_entry_legs(confirm, -1),
            job_id=confirm.job_id,
            lease_id=lease_id,
            settlement_ref=settlement_ref,
            chain_tx_hash=confirm.chain_tx_hash,
            memo=f"reverses entry {confirm.pk}: {why}",
        )
        posted.append(entry)
    revert = LedgerEntry.objects.filter(
        idempotency_key=_settlement_key("settlement_revert", settlement_ref, lease_id, generation)
    ).first()
    if revert is not None:
        entry, _ = ledger_post(
            kind=EK.SETTLEMENT_SUBMIT,
            idempotency_key=f"settlement_resubmit:{settlement_ref}:{lease_id}:{generation}",
            legs=_entry_legs(revert, -1),
            job_id=revert.job_id,
            lease_id=lease_id,
            settlement_ref=settlement_ref,
            memo=f"reverses entry {revert.pk}: {why}",
        )
        posted.append(entry)
    return posted


# --- metering ---------------------------------------------------------------------------------


def usage_slack_s() -> int:
    return int(settings.USAGE_SLACK_S)


def _lease_charge_locked(lease_id: int) -> LeaseCharge:
    """The lease's LeaseCharge row, created if missing, locked (the one place it is locked)."""
    LeaseCharge.objects.get_or_create(lease_id=lease_id)
    return LeaseCharge.objects.select_for_update().get(lease_id=lease_id)


def lease_meter(*, lease_id: int, now: datetime | None = None) -> LeaseCharge | None:
    """Bring a lease's charge up to date and post the increase (job_reserved → lease_unsettled,
    key "charge:<lease>:<cumulative_micro>"). Returns its LeaseCharge, or None for a lease
    that is still only assigned.

    Rules (docs/billing.md, "Metering"):
    - a lease that never started is never billed (final at 0 once ended);
    - a running lease is billed provisionally up to min(now, its machine's last heartbeat),
      for the seconds its usage reports cover (no slack), so the figure never overshoots what
      the final one can be;
    - an ended lease is billed up to its ended_at for min(wall seconds, reported seconds +
      USAGE_SLACK_S); it becomes final BILLING_FINALIZE_GRACE_S after ended_at, leaving late
      usage reports time to arrive;
    - cumulative_micro never decreases, and never exceeds what the job's reservation can pay:
      past that it is capped (`capped`), and a running lease is asked to stop.
    """
    now = now or timezone.now()
    with transaction.atomic():
        lease = Lease.objects.select_related("machine", "job").filter(pk=lease_id).first()
        if lease is None or lease.status == Lease.Status.ASSIGNED:
            return None
        charge = _lease_charge_locked(lease_id)
        if charge.final:
            return charge
        ended = lease.status == Lease.Status.ENDED
        if lease.started_at is None:
            charge.final = ended
            charge.save(update_fields=["final", "updated_at"])
            return charge

        if ended:
            end = lease.ended_at or now
            slack = usage_slack_s()
        else:
            heard = lease.machine.last_heartbeat_at or lease.started_at
            end = min(now, heard)
            slack = 0
        reports = UsageReport.objects.filter(lease_id=lease_id).values_list("period_start", "period_end")
        seconds = metering.billable_seconds(
            started_at=lease.started_at,
            end=end,
            reported=reports,
            slack_s=slack,
            max_seconds=lease.job.max_duration_s,
        )
        uncapped = metering.charge_micro(
            price_micro_per_gpu_hour=metering.price_micro(lease.price_per_gpu_hour),
            gpu_count=lease.gpu_count,
            billable_seconds=seconds,
        )
        if uncapped < charge.cumulative_micro:
            logger.warning(
                "lease %s: metered %s micro, below the %s already charged; keeping the charge",
                lease_id,
                uncapped,
                charge.cumulative_micro,
            )

        reserved_ref = job_reserved(lease.job_id)
        ids = accounts_get_or_create(refs=[reserved_ref, lease_unsettled(lease_id)])
        locked = accounts_lock(account_ids=ids.values())
        ceiling = charge.cumulative_micro + locked[ids[reserved_ref]].balance
        cumulative = max(charge.cumulative_micro, min(uncapped, ceiling))
        capped = uncapped > ceiling
        delta = cumulative - charge.cumulative_micro
        if delta > 0:
            ledger_post(
                kind=EK.CHARGE,
                idempotency_key=f"charge:{lease_id}:{cumulative}",
                legs=[Leg(reserved_ref, -delta), Leg(lease_unsettled(lease_id), delta)],
                job_id=lease.job_id,
                lease_id=lease_id,
                memo=f"{seconds} billable s",
            )
        charge.billable_seconds = max(charge.billable_seconds, seconds)
        charge.cumulative_micro = cumulative
        charge.uncapped_micro = max(charge.uncapped_micro, uncapped)
        charge.capped = charge.capped or capped
        charge.final = ended and now >= end + timedelta(seconds=settings.BILLING_FINALIZE_GRACE_S)
        charge.save()
        if capped and not ended and lease.stop_requested_at is None:
            logger.warning("lease %s: job %s's budget is spent; asking the agent to stop", lease_id, lease.job_id)
            lease_request_stop(lease_id=lease_id, reason=Lease.EndReason.MAX_DURATION, actor="billing")
    return charge


def leases_meter(*, now: datetime | None = None, limit: int = 5000) -> dict[str, int]:
    """Meter every running lease and every ended lease whose charge is not final yet (the
    beat task billing.tasks.meter_leases runs it), each lease in its own transaction, so no row
    lock outlives its lease and one lease's failure is logged and skipped, not the others'
    charges (core.periodic.item). Returns counts."""
    now = now or timezone.now()
    lease_ids = list(
        Lease.objects.filter(
            Q(status=Lease.Status.RUNNING)
            | (Q(status=Lease.Status.ENDED) & (Q(charge__isnull=True) | Q(charge__final=False)))
        )
        .order_by("pk")
        .values_list("pk", flat=True)[:limit]
    )
    metered = finalised = failed = 0
    for lease_id in lease_ids:
        with periodic.item("lease", lease_id) as it:
            charge = lease_meter(lease_id=lease_id, now=now)
        if not it.ok:
            failed += 1
            continue
        metered += 1
        finalised += bool(charge is not None and charge.final)
    return {"metered": metered, "finalised": finalised, "failed": failed}


# --- chain reorgs (called by the deposit watcher, billing/deposits.py) ---------------------------


def _entry_legs(entry: LedgerEntry, sign: int) -> list[Leg]:
    legs = []
    for posting in Posting.objects.filter(entry=entry).select_related("account"):
        account = posting.account
        ref = AccountRef(
            kind=account.kind,
            renter_id=account.renter_id,
            provider_id=account.provider_id,
            job_id=account.job_id,
            lease_id=account.lease_id,
        )
        legs.append(Leg(ref, sign * posting.amount))
    return legs


def chain_movement_reverse(*, entry: LedgerEntry, generation: int) -> LedgerEntry:
    """Undo a chain movement (deposit, withdrawal) whose block left the chain in a reorg: the
    negation of `entry`'s postings, kind chain_reversal, key "chain_reversal:<key>:<generation>"
    (`generation`: how many times the event had been credited, so each rewind reverses once).
    Raises InsufficientBalance/InsufficientFunds when the money was already used (a deposit
    reserved for a job): nothing is written and the watcher flags the event."""
    if entry.kind not in (EK.DEPOSIT, EK.RENTER_WITHDRAWAL, EK.PROVIDER_WITHDRAWAL, EK.FEE_WITHDRAWAL):
        raise ValidationFailed(f"entry {entry.pk} ({entry.kind}) is no chain movement")
    reversed_entry, _ = ledger_post(
        kind=EK.CHAIN_REVERSAL,
        idempotency_key=f"chain_reversal:{entry.idempotency_key}:{generation}",
        legs=_entry_legs(entry, -1),
        chain_tx_hash=entry.chain_tx_hash,
        chain_log_index=entry.chain_log_index,
        memo=f"reorg: reverses entry {entry.pk}",
    )
    return reversed_entry


def chain_movement_restore(*, entry: LedgerEntry, generation: int) -> LedgerEntry:
    """Post a reversed chain movement again, when its event came back on the new chain: the
    postings of `entry` once more, same kind, key "chain_restore:<key>:<generation>"."""
    restored, _ = ledger_post(
        kind=entry.kind,
        idempotency_key=f"chain_restore:{entry.idempotency_key}:{generation}",
        legs=_entry_legs(entry, 1),
        chain_tx_hash=entry.chain_tx_hash,
        chain_log_index=entry.chain_log_index,
        memo=f"re-included after a reorg: entry {entry.pk} again",
    )
    return restored
