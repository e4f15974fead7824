"""What billing's tests share: a job submitted, a lease started or run and metered, a funded
renter on chain, the anvil requirement. Support, not a test module: test modules import from here,
never from each other."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from billing import selectors, services
from billing.chain.anvil import anvil_binary
from billing.deposits import chain_watch, wallet_link
from billing.tests._escrow_env import ONE
from jobs.models import Job, Lease, UsageReport
from jobs.services import JobSpec, lease_end
from marketplace.submit import job_submit
from providers.models import Machine
from tests.factories import RenterFactory, placed_lease

T0 = timezone.now().replace(microsecond=0) - timedelta(days=1)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def submit(*, gpus: int = 1, max_price: str = "1.00", max_duration_s: int = 7200) -> Job:
    spec = JobSpec(
        gpu_count=gpus,
        max_price_per_gpu_hour=Decimal(max_price),
        expected_duration_s=max_duration_s,
        max_duration_s=max_duration_s,
        kind=Job.Kind.PROCESS,
        command=["true"],
    )
    job, _ = job_submit(renter=RenterFactory(), spec=spec)
    return job


def start(job: Job, *, price: str = "0.40", started: int = 0) -> Lease:
    """`job` leased on a fresh machine, started `started` seconds after T0, when its machine last
    heartbeat."""
    lease = placed_lease(job=job, price=price, started=at(started))
    heartbeat(lease, at(started))
    return lease


def heartbeat(lease: Lease, when: datetime) -> None:
    Machine.objects.filter(pk=lease.machine_id).update(last_heartbeat_at=when)


def report(lease: Lease, start_s: int, end_s: int) -> None:
    """The agent's usage report for [start_s, end_s] after T0."""
    UsageReport.objects.create(
        lease=lease,
        report_id=f"r-{start_s}-{end_s}",
        period_start=at(start_s),
        period_end=at(end_s),
        gpu_seconds=Decimal(end_s - start_s) * lease.gpu_count,
    )


def report_every_minute(lease: Lease, until_s: int, from_s: int = 0) -> None:
    for s in range(from_s, until_s, 60):
        report(lease, s, min(s + 60, until_s))


def unsettled(lease: Lease) -> int:
    return selectors.account_balance(kind="lease_unsettled", owner_key=f"lease:{lease.pk}")


def reserved(job: Job) -> int:
    return selectors.account_balance(kind="job_reserved", owner_key=f"job:{job.pk}")


def new_job(renter: Any, *, max_duration_s: int = 7200, price: str = "1.00") -> Job:
    spec = JobSpec(
        gpu_count=1,
        max_price_per_gpu_hour=Decimal(price),
        expected_duration_s=max_duration_s,
        kind=Job.Kind.PROCESS,
        command=["true"],
    )
    job, _ = job_submit(renter=renter, spec=spec)
    return job


def run_lease(
    job: Job,
    *,
    seconds: int,
    reason: str = Lease.EndReason.SUCCEEDED,
    price: str = "1.00",
    t0: datetime | None = None,
    provider: Any = None,
) -> Lease:
    """A lease of `job` that ran `seconds` (covered by one usage report), ended and was finally metered."""
    t0 = t0 or timezone.now() - timedelta(days=1)
    lease = placed_lease(job=job, gpus=1, provider=provider, price=price, started=t0)
    end = t0 + timedelta(seconds=seconds)
    UsageReport.objects.create(lease=lease, report_id="all", period_start=t0, period_end=end, gpu_seconds=1)
    lease_end(lease_id=lease.pk, reason=reason, actor="test", exit_code=0, at=end)
    services.lease_meter(lease_id=lease.pk, now=end + timedelta(hours=1))
    return Lease.objects.get(pk=lease.pk)


def ran_half_hour_until(lease: Lease, t0: datetime, seconds: int) -> None:
    """A running lease started at `t0` reports the half hour up to `seconds` after it, and is metered."""
    UsageReport.objects.create(
        lease=lease,
        report_id=f"until {seconds}",
        period_start=t0 + timedelta(seconds=seconds - 1800),
        period_end=t0 + timedelta(seconds=seconds),
        gpu_seconds=1,
    )
    services.lease_meter(lease_id=lease.pk)


def funded_renter(env, label: str, amount: int = 10 * ONE):  # type: ignore[no-untyped-def]
    renter = RenterFactory(funds=0)
    account = env.account(label)
    wallet_link(renter=renter, address=account.address)
    env.deposit(account, amount)
    chain_watch(client=env.client, deployment=env.deployment)
    return renter, account


def require_anvil() -> None:
    """Skip without anvil locally; fail in CI, where the anvil half must run."""
    if anvil_binary() is None:
        message = "anvil binary missing (run `npm ci`): the anvil backend was not tested"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def available(renter) -> int:  # type: ignore[no-untyped-def]
    return selectors.renter_available_micro(renter_id=renter.pk)


def submit_job(renter) -> Job:  # type: ignore[no-untyped-def]
    spec = JobSpec(
        gpu_count=1,
        max_price_per_gpu_hour=Decimal("1.00"),
        expected_duration_s=3600,
        kind=Job.Kind.PROCESS,
        command=["true"],
    )
    job, _ = job_submit(renter=renter, spec=spec)
    return job


def rolled_back_after_rewind(monkeypatch: pytest.MonkeyPatch, module: Any, roll_back: Callable[[], None]) -> None:
    """The chain goes back under the next run of `module` (billing.release, billing.reservations)
    the moment after the run's own rewind found it whole: `module.chain_rewind`'s next call runs,
    then `roll_back()`; later calls are the real rewind."""
    rewind = module.chain_rewind

    def rewind_then_roll_back(*, client: Any) -> Any:
        found = rewind(client=client)
        monkeypatch.setattr(module, "chain_rewind", rewind)
        roll_back()
        return found

    monkeypatch.setattr(module, "chain_rewind", rewind_then_roll_back)


def rolled_back_after_check(monkeypatch: pytest.MonkeyPatch, module: Any, roll_back: Callable[[], None]) -> None:
    """The chain goes back under the next send of `module` (billing.settlement,
    billing.reservations, billing.release) the moment after the run checked that it still holds
    what the ledger rests on: `module.rewound_before_send`'s next call runs, then `roll_back()`;
    later calls are the real check."""
    checked = module.rewound_before_send

    def checked_then_roll_back(*, client: Any, what: str) -> bool:
        went_back = checked(client=client, what=what)
        monkeypatch.setattr(module, "rewound_before_send", checked)
        roll_back()
        return went_back

    monkeypatch.setattr(module, "rewound_before_send", checked_then_roll_back)
