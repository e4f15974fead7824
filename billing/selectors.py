"""Reads of billing: balances, a job's budget, whether the escrow holds it (the matcher's gate),
unsettled leases and the ledger's invariants."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from django.db import connection
from django.db.models import Count, DateTimeField, ExpressionWrapper, F, Q, QuerySet, Sum, Value
from django.utils import timezone

from billing.models import BudgetAuthorization, LeaseCharge, LedgerAccount, LedgerCheck, LedgerEntry, Posting
from jobs.models import Job, Lease

AK = LedgerAccount.Kind
EK = LedgerEntry.Kind


def account_balance(*, kind: str, owner_key: str = "") -> int:
    """An account's balance in micro (0 for an account never posted to)."""
    return LedgerAccount.objects.filter(kind=kind, owner_key=owner_key).values_list("balance", flat=True).first() or 0


def renter_available_micro(*, renter_id: int) -> int:
    return account_balance(kind=AK.RENTER_AVAILABLE, owner_key=f"renter:{renter_id}")


def provider_payable_micro(*, provider_id: int) -> int:
    return account_balance(kind=AK.PROVIDER_PAYABLE, owner_key=f"provider:{provider_id}")


@dataclass(frozen=True)
class JobBudget:
    """A job's money in micro: reserved at admission, charged by its leases, released at the end,
    and what is still reserved."""

    reserved: int
    charged: int
    released: int
    remaining: int


def job_budget(*, job_id: int) -> JobBudget:
    """The job's budget, from the postings to its job_reserved account."""
    rows = dict(
        Posting.objects.filter(account__kind=AK.JOB_RESERVED, account__owner_key=f"job:{job_id}")
        .values_list("entry__kind")
        .annotate(total=Sum("amount"))
        .values_list("entry__kind", "total")
    )
    reserved = rows.get(EK.RESERVE, 0)
    charged = -rows.get(EK.CHARGE, 0)
    released = -rows.get(EK.RELEASE, 0)
    return JobBudget(reserved=reserved, charged=charged, released=released, remaining=reserved - charged - released)


# The matcher's unplaced code for a job whose budget the escrow does not hold yet.
BUDGET_NOT_RESERVED = "budget_not_reserved"
BUDGET_DEADLINE_TOO_CLOSE = "budget_deadline_too_close"
# Past a budget's deadline the escrow lets its renter take back what the job's reservation still
# holds (GpgpuEscrow.releaseJob), and a later settlement of the job is skipped: its provider goes
# unpaid. So a job is placed only while its reserved budget's deadline is at least a whole run of
# the job (max_duration_s, after which the lease is stopped: jobs.sweeps) and this margin away,
# the time to stop the lease and settle it on chain, a node outage included.
SETTLE_MARGIN = timedelta(days=1)


def jobs_budget_unreserved(*, job_ids: Iterable[int], now: datetime | None = None) -> dict[int, tuple[str, str]]:
    """The placement gate: of the given jobs, those whose budget the escrow does not hold for a
    whole run from `now` (default: the current time), each with its unplaced reason: code
    budget_not_reserved (not reserved yet, or refused) or budget_deadline_too_close (reserved,
    but its deadline comes before a run of max_duration_s and SETTLE_MARGIN), and a sentence
    saying what happens next. A job absent from the answer is reserved on chain until after any
    lease placed now has ended and been settled, and may be placed: every second it runs is then
    covered by money its renter cannot withdraw. One query; a job id that is no job is left out."""
    ids = list(job_ids)
    now = now or timezone.now()
    status = BudgetAuthorization.Status
    jobs = Job.objects.filter(pk__any=ids).order_by()
    if connection.vendor == "postgresql":
        # The database leaves out the jobs the loop below would pass (reserved, the deadline far
        # enough): at a queue of 10,000 placeable jobs, reading each one's budget and judging it
        # here was a sixth of the matcher's read. Elsewhere every job comes back and is judged
        # below; the answer is the same.
        jobs = jobs.exclude(
            budget_authorization__status=status.RESERVED,
            budget_authorization__deadline__gte=ExpressionWrapper(
                Value(now + SETTLE_MARGIN) + F("max_duration_s") * Value(timedelta(seconds=1)),
                output_field=DateTimeField(),
            ),
        )
    states = {
        job_id: (state, reason, deadline, max_duration_s)
        for job_id, state, reason, deadline, max_duration_s in jobs.values_list(
            "pk",
            "budget_authorization__status",
            "budget_authorization__rejected_reason",
            "budget_authorization__deadline",
            "max_duration_s",
        )
    }
    waiting: dict[int, tuple[str, str]] = {}
    for job_id, (state, reason, deadline, max_duration_s) in states.items():
        if state == status.RESERVED:
            if deadline >= now + timedelta(seconds=max_duration_s) + SETTLE_MARGIN:
                continue
            waiting[job_id] = (
                BUDGET_DEADLINE_TOO_CLOSE,
                f"its budget's deadline ({deadline.isoformat()}) is closer than a whole run of the job "
                f"(max_duration_s {max_duration_s}) and {SETTLE_MARGIN.days} day to settle it; the escrow "
                "lets you take the budget back after the deadline, so the job is not placed: cancel it "
                "and submit it again with a budget signed as offered",
            )
            continue
        if state is None:
            sentence = (
                "sign the job's budget authorization (GET, then PUT with the signature, "
                f"/api/v1/jobs/{job_id}/budget-authorization/); it is placed once the escrow has reserved it"
            )
        elif state == status.REFUSED:
            sentence = f"the escrow refused its budget: {reason}"
        else:
            sentence = "its budget is being reserved on chain; it is placed once the escrow has reserved it"
        waiting[job_id] = (BUDGET_NOT_RESERVED, sentence)
    return waiting


def leases_unsettled(*, limit: int = 1000) -> QuerySet[LedgerAccount]:
    """lease_unsettled accounts holding money (what the settlement engine should send on chain),
    oldest lease first, with the lease, its machine and its charge loaded."""
    return (
        LedgerAccount.objects.filter(kind=AK.LEASE_UNSETTLED, balance__gt=0)
        .select_related("lease__machine", "lease__charge")
        .order_by("lease_id")[:limit]
    )


def ledger_violations(*, unreleased: bool = True) -> list[str]:
    """Every broken invariant of the ledger, as sentences (empty when all hold):

    - every entry's postings sum to zero, and every entry has postings;
    - every account's cached balance equals the sum of its postings;
    - no guarded account (every kind but escrow_chain) is below zero;
    - all accounts together sum to zero (money is conserved);
    - a terminal job whose leases are all finally metered has nothing left reserved (left out with
      `unreleased` False: billing.ledger_check judges those, as in flight or stuck);
    - no lease's charge exceeds its job's reservation.
    """
    problems: list[str] = []
    for entry_id, key, total in (
        LedgerEntry.objects.annotate(total=Sum("postings__amount"), legs=Count("postings"))
        .filter(Q(legs=0) | ~Q(total=0))
        .values_list("pk", "idempotency_key", "total")
    ):
        problems.append(f"entry {entry_id} ({key}) sums to {total or 0}, not zero (or has no postings)")

    sums = dict(
        Posting.objects.values_list("account_id").annotate(total=Sum("amount")).values_list("account_id", "total")
    )
    grand_total = 0
    for account in LedgerAccount.objects.order_by("pk"):
        expected = sums.get(account.pk, 0)
        grand_total += account.balance
        if account.balance != expected:
            problems.append(
                f"account {account.pk} ({account}) caches balance {account.balance} but its postings sum to {expected}"
            )
        if account.kind in LedgerAccount.GUARDED and account.balance < 0:
            problems.append(f"account {account.pk} ({account}) is negative: {account.balance}")
    if grand_total != 0:
        problems.append(f"all balances together sum to {grand_total}, not zero")

    if unreleased:
        for job_id, balance in finished_jobs_unreleased():
            problems.append(f"job {job_id} is finished and finally metered but still has {balance} reserved")

    for job_id, charged in (
        LeaseCharge.objects.values_list("lease__job_id")
        .annotate(total=Sum("cumulative_micro"))
        .values_list("lease__job_id", "total")
    ):
        reserved = job_budget(job_id=job_id).reserved
        if charged > reserved:
            problems.append(f"job {job_id}'s leases were charged {charged}, past its budget of {reserved}")
    return problems


def finished_jobs_unreleased() -> list[tuple[int, int]]:
    """(job id, micro still reserved) of each terminal job whose leases are all finally metered
    and whose budget the ledger has not released yet (billing.tasks.release_budgets does, every
    minute)."""
    found = []
    for account in LedgerAccount.objects.filter(kind=AK.JOB_RESERVED, balance__gt=0, job__status__in=Job.TERMINAL):
        # cast: the filter on job__status excludes accounts without a job.
        leases = Lease.objects.filter(job_id=cast(int, account.job_id)).select_related("charge")
        if all(lease.status == Lease.Status.ENDED and _final(lease) for lease in leases):
            found.append((cast(int, account.job_id), account.balance))
    return found


def ledger_check_latest() -> LedgerCheck | None:
    """The newest ledger check (billing.ledger_check: the periodic task billing.tasks.check_ledger
    or `manage.py ledger_check`): whether the ledger and the chain agreed, as of which block, and
    what differed. None before the first check. For the console and /healthz."""
    return LedgerCheck.objects.order_by("-checked_at", "-pk").first()


def _final(lease: Lease) -> bool:
    charge = getattr(lease, "charge", None)
    return charge is not None and charge.final
