"""Property test: whatever sequence of deposits, admissions, metering, settlements, withdrawals
and releases happens, every entry sums to zero, no guarded balance goes negative, money is
conserved (the escrow mirror equals deposits minus withdrawals) and no job is charged past its
budget."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import selectors, services
from billing.errors import InsufficientBalance
from billing.models import LeaseCharge
from jobs.models import Job, Lease, UsageReport
from jobs.services import JobSpec, job_cancel, lease_end
from marketplace.submit import job_submit
from providers.models import Machine
from tests.depth import examples
from tests.factories import ProviderFactory, RenterFactory, machine_with_gpus, placed_lease

pytestmark = pytest.mark.django_db

ER = Lease.EndReason

op = st.one_of(
    st.tuples(st.just("deposit"), st.integers(0, 2), st.integers(1, 5_000_000)),
    st.tuples(st.just("withdraw"), st.integers(0, 2), st.integers(1, 5_000_000)),
    st.tuples(
        st.just("admit"),
        st.integers(0, 2),
        st.integers(1, 4),
        st.sampled_from(["0.10", "0.55", "1.000001", "2.50"]),
        st.integers(60, 7200),
    ),
    st.tuples(st.just("start"), st.integers(0, 20), st.sampled_from(["0.10", "0.333333", "1.00", "2.50"])),
    st.tuples(st.just("meter"), st.integers(0, 20), st.integers(1, 4000)),
    st.tuples(st.just("end"), st.integers(0, 20), st.sampled_from([ER.SUCCEEDED, ER.FAILED, ER.LOST])),
    st.tuples(st.just("cancel"), st.integers(0, 20)),
    st.tuples(st.just("settle"), st.integers(0, 20), st.integers(1, 100), st.booleans()),
    st.tuples(st.just("provider_withdraw"), st.integers(1, 3_000_000)),
    st.tuples(
        st.just("release"),
    ),
)


class Rollback(Exception):
    pass


@settings(
    max_examples=examples(quick=40, deep=200),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(op, max_size=30))
def test_random_money_movements_keep_the_ledger_consistent(db, ops):  # type: ignore[no-untyped-def]
    try:
        with transaction.atomic():
            _play(ops)
            raise Rollback
    except Rollback:
        pass


def _play(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    renters = [RenterFactory(funds=0) for _ in range(3)]
    machine = machine_with_gpus(count=4)
    provider = machine.provider
    ProviderFactory()
    t0 = timezone.now() - timedelta(days=2)
    clock = {"s": 0}
    jobs: list[Job] = []
    leases: list[Lease] = []
    deposited = withdrawn = 0
    seq = 0

    def now():  # type: ignore[no-untyped-def]
        return t0 + timedelta(seconds=clock["s"])

    for step in ops:
        seq += 1
        kind = step[0]
        try:
            if kind == "deposit":
                services.deposit_record(renter=renters[step[1]], amount=step[2], tx_hash=f"0x{seq}", log_index=0)
                deposited += step[2]
            elif kind == "withdraw":
                services.renter_withdrawal_record(
                    renter=renters[step[1]], amount=step[2], tx_hash=f"0x{seq}", log_index=1
                )
                withdrawn += step[2]
            elif kind == "admit":
                _, who, gpus, price, duration = step
                spec = JobSpec(
                    gpu_count=gpus,
                    max_price_per_gpu_hour=Decimal(price),
                    expected_duration_s=duration,
                    kind=Job.Kind.PROCESS,
                    command=["true"],
                )
                job, _ = job_submit(renter=renters[who], spec=spec)
                jobs.append(job)
            elif kind == "start" and jobs:
                job = jobs[step[1] % len(jobs)]
                job.refresh_from_db()
                free = machine.gpus.exclude(lease_gpus__active=True).count()
                if job.status == Job.Status.PENDING and free >= job.gpu_count:
                    price = min(Decimal(step[2]), job.max_price_per_gpu_hour)
                    leases.append(placed_lease(job=job, machine=machine, price=price, started=now()))
            elif kind == "meter":
                begin = now()
                clock["s"] += step[2]
                Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=now())
                for lease in Lease.objects.filter(pk__in=[x.pk for x in leases], status=Lease.Status.RUNNING):
                    UsageReport.objects.create(
                        lease=lease,
                        report_id=f"r{seq}",
                        period_start=max(begin, lease.started_at),
                        period_end=now(),
                        gpu_seconds=0,
                    )
                services.leases_meter(now=now())
            elif kind == "end" and leases:
                lease = leases[step[1] % len(leases)]
                lease_end(lease_id=lease.pk, reason=step[2], actor="test", exit_code=0, at=now())
            elif kind == "cancel" and jobs:
                job = jobs[step[1] % len(jobs)]
                job.refresh_from_db()
                if job.status not in Job.TERMINAL:
                    job_cancel(job=job, actor="test")
            elif kind == "settle" and leases:
                lease = leases[step[1] % len(leases)]
                owed = selectors.account_balance(kind="lease_unsettled", owner_key=f"lease:{lease.pk}")
                amount = owed * step[2] // 100
                if amount:
                    services.settlement_submit_record(lease_id=lease.pk, amount=amount, settlement_ref=f"s{seq}")
                    if step[3]:
                        services.settlement_confirm_record(
                            lease_id=lease.pk, amount=amount, fee_bps=1000, settlement_ref=f"s{seq}", tx_hash=f"0x{seq}"
                        )
                    else:
                        services.settlement_revert_record(lease_id=lease.pk, amount=amount, settlement_ref=f"s{seq}")
            elif kind == "provider_withdraw":
                services.provider_withdrawal_record(provider=provider, amount=step[1], tx_hash=f"0x{seq}", log_index=2)
                withdrawn += step[1]
            elif kind == "release":
                clock["s"] += 3600  # past every finalisation grace
                services.leases_meter(now=now())
                services.budgets_release()
        except InsufficientBalance:
            pass  # refused, and (checked below) nothing was written

        # A finished job keeps its budget until the release task runs: that is not a fault here.
        assert [v for v in selectors.ledger_violations() if "finally metered" not in v] == [], step
        # Money is conserved: the escrow mirror holds exactly what came in and did not leave.
        assert -selectors.account_balance(kind="escrow_chain") == deposited - withdrawn
        for job in jobs:
            charged = sum(LeaseCharge.objects.filter(lease__job=job).values_list("cumulative_micro", flat=True))
            assert charged <= services.job_budget_micro_for(job)

    # Once every lease is finally metered and the release task has run, every invariant holds.
    clock["s"] += 3600
    services.leases_meter(now=now())
    services.budgets_release()
    assert selectors.ledger_violations() == []
