"""Reads for the billing API: a renter's balance, deposits, charges and statements, and a
provider's earnings, all computed from the ledger (docs/billing.md). Nothing here writes.

Every amount is an int in micro. A renter's money is the sum of its renter_available account,
its jobs' job_reserved accounts and its leases' lease_unsettled / in_settlement accounts; what
has left that set for a provider (and the platform's fee) is "settled" (a confirmation undone
after its block left the chain counts no more: `SETTLED`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db.models import Count, Model, Q, QuerySet, Sum

from billing.models import LeaseCharge, LedgerAccount, LedgerEntry, Posting, Settlement, SettlementItem
from billing.selectors import JobBudget, job_budget
from jobs.models import Job, Lease

AK = LedgerAccount.Kind
EK = LedgerEntry.Kind


# A settlement's confirmation: its confirm entries, less their chain_reversal entries where the
# block that paid it left the chain (billing.rewind) and the batch was confirmed again.
SETTLED = Q(entry__kind=EK.SETTLEMENT_CONFIRM) | (Q(entry__kind=EK.CHAIN_REVERSAL) & ~Q(entry__settlement_ref=""))


def _sum(queryset: QuerySet[Model], field_name: str = "amount") -> int:
    return queryset.aggregate(total=Sum(field_name))["total"] or 0


# Keyed by the `key` field's values, of that field's type.
def _by(queryset: QuerySet[Model], key: str, field_name: str = "amount") -> dict[Any, int]:
    """Sums of `field_name` grouped by `key`."""
    return {
        group: total or 0
        for group, total in queryset.values_list(key).annotate(total=Sum(field_name)).values_list(key, "total")
    }


# --- renter ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenterBalance:
    """available: free to reserve or withdraw; reserved: budgets held for jobs, not yet charged;
    unsettled: charged by leases, not yet paid out on chain (in_settlement included);
    in_settlement: the part of `unsettled` inside a settlement transaction not yet confirmed;
    settled: paid out on chain to date; deposited / withdrawn: through the escrow to date."""

    available: int
    reserved: int
    unsettled: int
    in_settlement: int
    settled: int
    deposited: int
    withdrawn: int

    @property
    def total(self) -> int:
        """What the escrow holds for the renter: available + reserved + unsettled."""
        return self.available + self.reserved + self.unsettled


def renter_balance(*, renter_id: int) -> RenterBalance:
    available = _sum(LedgerAccount.objects.filter(kind=AK.RENTER_AVAILABLE, owner_key=f"renter:{renter_id}"), "balance")
    reserved = _sum(LedgerAccount.objects.filter(kind=AK.JOB_RESERVED, job__renter_id=renter_id), "balance")
    lease_accounts = LedgerAccount.objects.filter(lease__job__renter_id=renter_id)
    unsettled = _sum(lease_accounts.filter(kind__in=[AK.LEASE_UNSETTLED, AK.IN_SETTLEMENT]), "balance")
    in_settlement = _sum(lease_accounts.filter(kind=AK.IN_SETTLEMENT), "balance")
    settled = -_sum(
        Posting.objects.filter(SETTLED, account__kind=AK.IN_SETTLEMENT, account__lease__job__renter_id=renter_id)
    )
    chain_moves = renter_chain_movements(renter_id=renter_id)
    deposited = _sum(chain_moves.filter(amount__gt=0))
    withdrawn = -_sum(chain_moves.filter(amount__lt=0))
    return RenterBalance(
        available=available,
        reserved=reserved,
        unsettled=unsettled,
        in_settlement=in_settlement,
        settled=settled,
        deposited=deposited,
        withdrawn=withdrawn,
    )


def renter_chain_movements(*, renter_id: int) -> QuerySet[Posting]:
    """The postings to the renter's available balance whose entry crosses the escrow boundary
    (has a leg on escrow_chain): deposits (positive), withdrawals (negative) and any correction
    of them. Newest first, entry loaded."""
    return (
        Posting.objects.filter(
            account__kind=AK.RENTER_AVAILABLE,
            account__owner_key=f"renter:{renter_id}",
            entry__postings__account__kind=AK.ESCROW_CHAIN,
        )
        .select_related("entry")
        .order_by("-entry_id")
    )


def renter_charges(*, renter_id: int) -> QuerySet[LeaseCharge]:
    """The metered charges of the renter's leases, newest lease first, lease loaded."""
    return LeaseCharge.objects.filter(lease__job__renter_id=renter_id).select_related("lease").order_by("-lease_id")


@dataclass(frozen=True)
class LeaseMoney:
    """A lease's money in micro: settled (paid on chain), of which `fee` went to the platform;
    unsettled (charged, not paid yet, in-flight settlements included)."""

    settled: int = 0
    fee: int = 0
    unsettled: int = 0

    @property
    def provider_share(self) -> int:
        return self.settled - self.fee


def lease_money(*, lease_ids: list[int]) -> dict[int, LeaseMoney]:
    """LeaseMoney for each of `lease_ids` (three grouped queries, whatever their number)."""
    settled = _by(
        Posting.objects.filter(SETTLED, account__kind=AK.IN_SETTLEMENT, account__lease_id__in=lease_ids),
        "account__lease_id",
    )
    fees = _by(
        Posting.objects.filter(SETTLED, account__kind=AK.PLATFORM_FEES, entry__lease_id__in=lease_ids),
        "entry__lease_id",
    )
    unsettled = _by(
        LedgerAccount.objects.filter(kind__in=[AK.LEASE_UNSETTLED, AK.IN_SETTLEMENT], lease_id__in=lease_ids),
        "lease_id",
        "balance",
    )
    return {
        lease_id: LeaseMoney(
            settled=-settled.get(lease_id, 0), fee=fees.get(lease_id, 0), unsettled=unsettled.get(lease_id, 0)
        )
        for lease_id in lease_ids
    }


@dataclass(frozen=True)
class StatementLease:
    lease: Lease
    billable_seconds: int
    charge: int
    final: bool
    capped: bool
    money: LeaseMoney


@dataclass(frozen=True)
class JobStatement:
    """Everything a job cost: its budget (reserved, charged, released, remaining) and each lease
    with its period, seconds, rate, charge, settled part and fee. `charged` equals the sum of the
    leases' charges and `reserved = charged + released + remaining`."""

    job: Job
    budget: JobBudget
    leases: list[StatementLease]
    settled: int
    fees: int
    unsettled: int


def job_statement(*, job: Job) -> JobStatement:
    leases = list(Lease.objects.filter(job=job).select_related("charge").order_by("pk"))
    money = lease_money(lease_ids=[lease.pk for lease in leases])
    rows = []
    for lease in leases:
        charge = getattr(lease, "charge", None)
        rows.append(
            StatementLease(
                lease=lease,
                billable_seconds=charge.billable_seconds if charge else 0,
                charge=charge.cumulative_micro if charge else 0,
                final=bool(charge and charge.final),
                capped=bool(charge and charge.capped),
                money=money[lease.pk],
            )
        )
    return JobStatement(
        job=job,
        budget=job_budget(job_id=job.pk),
        leases=rows,
        settled=sum(r.money.settled for r in rows),
        fees=sum(r.money.fee for r in rows),
        unsettled=sum(r.money.unsettled for r in rows),
    )


@dataclass(frozen=True)
class MonthMovement:
    kind: str
    count: int
    amount: int


@dataclass(frozen=True)
class MonthlyStatement:
    """The renter's available balance over one calendar month (UTC): its opening balance, the
    movements that changed it summed by kind (deposit +, renter_withdrawal −, reserve −,
    release +, …), and the closing balance = opening + Σ movements. `charged` is what the
    renter's leases were charged in the month (out of their jobs' budgets) and `settled` what
    of the renter's charges was paid on chain in the month."""

    month: str
    starts_at: datetime
    ends_at: datetime
    opening_balance: int
    closing_balance: int
    movements: list[MonthMovement] = field(default_factory=list)
    charged: int = 0
    settled: int = 0


def month_bounds(year: int, month: int) -> tuple[datetime, datetime]:
    """[start, end) of the month in UTC. December 9999 ends at the largest datetime there is
    (its next month, year 10000, does not exist), which no entry can be created at."""
    start = datetime(year, month, 1, tzinfo=UTC)
    if (year, month) == (datetime.max.year, 12):
        return start, datetime.max.replace(tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def monthly_statement(*, renter_id: int, year: int, month: int) -> MonthlyStatement:
    start, end = month_bounds(year, month)
    available = Posting.objects.filter(account__kind=AK.RENTER_AVAILABLE, account__owner_key=f"renter:{renter_id}")
    opening = _sum(available.filter(entry__created_at__lt=start))
    in_month = available.filter(entry__created_at__gte=start, entry__created_at__lt=end)
    movements = [
        MonthMovement(kind=kind, count=count, amount=total or 0)
        for kind, count, total in in_month.values_list("entry__kind")
        .annotate(n=Count("pk"), total=Sum("amount"))
        .values_list("entry__kind", "n", "total")
        .order_by("entry__kind")
    ]
    charged = -_sum(
        Posting.objects.filter(
            entry__kind=EK.CHARGE,
            account__kind=AK.JOB_RESERVED,
            account__job__renter_id=renter_id,
            entry__created_at__gte=start,
            entry__created_at__lt=end,
        )
    )
    settled = -_sum(
        Posting.objects.filter(
            SETTLED,
            account__kind=AK.IN_SETTLEMENT,
            account__lease__job__renter_id=renter_id,
            entry__created_at__gte=start,
            entry__created_at__lt=end,
        )
    )
    return MonthlyStatement(
        month=f"{year:04d}-{month:02d}",
        starts_at=start,
        ends_at=end,
        opening_balance=opening,
        closing_balance=opening + sum(m.amount for m in movements),
        movements=movements,
        charged=charged,
        settled=settled,
    )


def renter_settlements(*, renter_id: int) -> QuerySet[Settlement]:
    """Settlements that carried at least one of the renter's leases, newest first."""
    touched = SettlementItem.objects.filter(job__renter_id=renter_id).values("settlement_id")
    return Settlement.objects.filter(pk__in=touched).order_by("-pk")


def settlement_share(*, settlement_ids: list[int], renter_id: int) -> dict[int, tuple[int, int]]:
    """(how many items, how much delta in micro) each settlement carried for the renter's leases."""
    rows = (
        Settlement.objects.filter(pk__in=settlement_ids, items__job__renter_id=renter_id)
        .values_list("pk")
        .annotate(n=Count("items"), total=Sum("items__delta_micro"))
        .values_list("pk", "n", "total")
    )
    return {pk: (n or 0, total or 0) for pk, n, total in rows}


# --- provider -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderEarnings:
    """earned: the provider's share of confirmed settlements to date; payable: earned but not yet
    withdrawn (what the escrow should let it withdraw); withdrawn: taken out of the escrow to
    date; pending: charges of leases on its machines not yet settled, gross of the fee."""

    earned: int
    payable: int
    withdrawn: int
    pending: int


def fee_bps_last_settled() -> int | None:
    """The fee (basis points) the escrow took in the latest confirmed settlement, as read from
    the chain when it confirmed; None before the first."""
    return (
        Settlement.objects.filter(status=Settlement.Status.CONFIRMED)
        .order_by("-confirmed_at", "-pk")
        .values_list("fee_bps", flat=True)
        .first()
    )


def provider_earnings(*, provider_id: int) -> ProviderEarnings:
    payable_postings = Posting.objects.filter(
        account__kind=AK.PROVIDER_PAYABLE, account__owner_key=f"provider:{provider_id}"
    )
    earned = _sum(payable_postings.filter(SETTLED))
    withdrawn = -_sum(payable_postings.filter(entry__kind=EK.PROVIDER_WITHDRAWAL))
    payable = _sum(
        LedgerAccount.objects.filter(kind=AK.PROVIDER_PAYABLE, owner_key=f"provider:{provider_id}"), "balance"
    )
    pending = _sum(
        LedgerAccount.objects.filter(
            kind__in=[AK.LEASE_UNSETTLED, AK.IN_SETTLEMENT], lease__machine__provider_id=provider_id
        ),
        "balance",
    )
    return ProviderEarnings(earned=earned, payable=payable, withdrawn=withdrawn, pending=pending)
