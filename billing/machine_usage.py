"""A provider's machine, day by day (UTC): the GPU-hours it sat idle on offer, the GPU-hours it
was rented, and what its leases earned, from the ledger.

- Idle hours: providers.utilization.machine_idle_hours_by_day (the telemetry's `idle` samples).
- Rented hours: each lease's GPUs × the part of [started_at, ended_at or now) inside the day.
  One query for the leases overlapping the range; the split into days is done in Python over
  those leases (never over samples).
- Charged: the charge entries of the machine's leases posted that day (metered, before the
  platform's fee, settled or not). Earned: the provider's share of the settlements of the
  machine's leases confirmed that day (less any reversed by a reorg), as
  billing.statements.provider_earnings counts `earned`, but per machine: every charge and
  settlement entry names its lease, and a lease runs on one machine. One query.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.db.models import Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from billing.models import LedgerAccount, LedgerEntry, Posting
from billing.statements import SETTLED
from jobs.models import Lease
from providers.utilization import machine_idle_hours_by_day

DEFAULT_DAYS = 30
MAX_DAYS = 366
DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class MachineUsageDay:
    day: date
    idle_hours: float
    rented_hours: float
    charged: int
    earned: int


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def machine_usage_by_day(*, machine_id: int, days: int, now: datetime | None = None) -> list[MachineUsageDay]:
    """The machine's last `days` UTC days, today (up to now) last, one row each, zeros included.
    Amounts in micro. Four queries, whatever the number of days, leases or samples."""
    now = now or timezone.now()
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    since = _day_start(first)
    idle = machine_idle_hours_by_day(machine_id=machine_id, since=since, until=now, now=now)
    rented = _rented_hours_by_day(machine_id=machine_id, since=since, until=now)
    money = _money_by_day(machine_id=machine_id, since=since, until=now)
    rows = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        charged, earned = money.get(day, (0, 0))
        rows.append(
            MachineUsageDay(
                day=day,
                idle_hours=round(idle.get(day, 0.0), 4),
                rented_hours=round(rented.get(day, 0.0), 4),
                charged=charged,
                earned=earned,
            )
        )
    return rows


def _rented_hours_by_day(*, machine_id: int, since: datetime, until: datetime) -> dict[date, float]:
    leases = (
        Lease.objects.filter(machine_id=machine_id, started_at__isnull=False, started_at__lt=until)
        .filter(Q(ended_at__isnull=True) | Q(ended_at__gt=since))
        .values_list("started_at", "ended_at", "gpu_count")
    )
    seconds: dict[date, float] = {}
    for started_at, ended_at, gpu_count in leases:
        assert started_at is not None  # filtered on
        start = max(started_at, since)
        end = min(ended_at or until, until)
        while start < end:
            day = start.astimezone(UTC).date()
            day_end = min(_day_start(day) + DAY, end)
            seconds[day] = seconds.get(day, 0.0) + (day_end - start).total_seconds() * gpu_count
            start = day_end
    return {day: s / 3600 for day, s in seconds.items()}


def _money_by_day(*, machine_id: int, since: datetime, until: datetime) -> dict[date, tuple[int, int]]:
    charged = Q(entry__kind=LedgerEntry.Kind.CHARGE, account__kind=LedgerAccount.Kind.LEASE_UNSETTLED)
    earned = Q(account__kind=LedgerAccount.Kind.PROVIDER_PAYABLE) & SETTLED
    rows = (
        Posting.objects.filter(
            charged | earned,
            entry__lease__machine_id=machine_id,
            entry__created_at__gte=since,
            entry__created_at__lt=until,
        )
        .annotate(day=TruncDate("entry__created_at", tzinfo=UTC))
        .values("day")
        .annotate(charged=Sum("amount", filter=charged), earned=Sum("amount", filter=earned))
        .values_list("day", "charged", "earned")
        .order_by()
    )
    return {day: (int(c or 0), int(e or 0)) for day, c, e in rows}
