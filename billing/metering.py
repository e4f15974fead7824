"""The arithmetic of billing, with no database: units, budgets, per-second charges, the
usage-report cross-check and the settlement split. docs/billing.md states the same rules.

Every amount is an int in the token's smallest unit ("micro", 10^-6 token); prices are Decimal
per GPU-hour with at most 6 decimals, so price × 10^6 is an exact int. No float anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings

from core.timespans import Interval, merge, whole_seconds

SECONDS_PER_HOUR = 3600
BPS = 10_000


def micro_per_token() -> int:
    """10 ** BILLING_TOKEN_DECIMALS (1_000_000 for a 6-decimal stablecoin)."""
    return 10**settings.BILLING_TOKEN_DECIMALS


def price_micro(price_per_gpu_hour: Decimal) -> int:
    """A price per GPU-hour in micro per GPU-hour, exactly. Raises ValueError for a price with
    more decimals than the token has (it could not be paid exactly) or a negative one."""
    scaled = Decimal(price_per_gpu_hour) * micro_per_token()
    if scaled != scaled.to_integral_value() or scaled < 0:
        raise ValueError(f"price {price_per_gpu_hour} is not a non-negative multiple of one micro")
    return int(scaled)


def micro_to_decimal(amount: int) -> Decimal:
    """An amount in micro as a Decimal in tokens (for display: "12.500000")."""
    return (Decimal(amount) / micro_per_token()).quantize(Decimal(1).scaleb(-settings.BILLING_TOKEN_DECIMALS))


def job_budget_micro(*, max_price_per_gpu_hour: Decimal, gpu_count: int, max_duration_s: int) -> int:
    """What admission reserves for a job: its most expensive possible run, rounded UP to a
    whole micro so that the budget always covers the largest charge metering can produce:
    ceil(max_price_micro × gpu_count × max_duration_s / 3600)."""
    numerator = price_micro(max_price_per_gpu_hour) * gpu_count * max_duration_s
    return -(-numerator // SECONDS_PER_HOUR)


def charge_micro(*, price_micro_per_gpu_hour: int, gpu_count: int, billable_seconds: int) -> int:
    """A lease's cumulative charge for `billable_seconds`, rounded DOWN (the renter never pays
    for a fraction of a micro). Cumulative, so rounding never accumulates across meter runs:
    floor(price_micro × gpu_count × billable_seconds / 3600)."""
    return price_micro_per_gpu_hour * gpu_count * billable_seconds // SECONDS_PER_HOUR


def settlement_amounts(delta: int, fee_bps: int) -> tuple[int, int]:
    """(provider's part, platform fee) of one settled delta, exactly as GpgpuEscrow.settle
    computes them per item: fee = delta × fee_bps // 10_000 (rounded down), provider = the
    rest, so the two sum to `delta`."""
    if delta < 0:
        raise ValueError("a settled delta cannot be negative")
    if not 0 <= fee_bps <= BPS:
        raise ValueError("fee_bps must be between 0 and 10000")
    fee = delta * fee_bps // BPS
    return delta - fee, fee


def covered_seconds(intervals: Iterable[tuple[datetime, datetime]], *, start: datetime, end: datetime) -> int:
    """How many whole seconds of [start, end] the intervals cover, overlaps counted once."""
    clipped = (Interval(max(a, start), min(b, end)) for a, b in intervals if min(b, end) > max(a, start))
    return whole_seconds(sum((iv.end - iv.start for iv in merge(clipped)), timedelta(0)))


def billable_seconds(
    *,
    started_at: datetime,
    end: datetime,
    reported: Iterable[tuple[datetime, datetime]],
    slack_s: int,
    max_seconds: int | None = None,
) -> int:
    """Seconds of a lease to bill, from `started_at` to `end`:

        min(wall-clock seconds, seconds covered by the agent's usage reports + slack_s,
            max_seconds)

    so a machine that stopped reporting is not paid for the time it did not report, and a
    lease is never billed past its job's max_duration_s (`max_seconds`), whatever the agent
    did after it. The caller passes slack_s = 0 while the lease runs (a provisional figure that
    can only grow) and USAGE_SLACK_S once it has ended."""
    if max_seconds is not None:
        end = min(end, started_at + timedelta(seconds=max(0, max_seconds)))
    wall = whole_seconds(end - started_at)
    covered = covered_seconds(reported, start=started_at, end=end)
    return min(wall, covered + slack_s)
