"""Per-second metering of leases: what a renter is charged, and what a provider can be paid."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.conf import settings
from django.utils import timezone

from billing import metering, services
from billing.models import LeaseCharge, LedgerEntry
from billing.tests.support import at, heartbeat, report, report_every_minute, reserved, start, submit, unsettled
from jobs.models import Lease
from jobs.services import lease_end
from tests.factories import placed_lease

pytestmark = pytest.mark.django_db

ER = Lease.EndReason


# --- the arithmetic --------------------------------------------------------------------------


def test_prices_convert_exactly_to_micro_per_gpu_hour():
    assert metering.price_micro(Decimal("0.40")) == 400_000
    assert metering.price_micro(Decimal("1.234567")) == 1_234_567
    with pytest.raises(ValueError):
        metering.price_micro(Decimal("0.0000001"))


def test_budget_is_rounded_up_and_charge_rounded_down():
    # 0.80/GPU-hour × 2 GPUs × 3601 s = 1_600_444.44… micro
    assert metering.job_budget_micro(max_price_per_gpu_hour=Decimal("0.80"), gpu_count=2, max_duration_s=3601) == (
        1_600_445
    )
    assert metering.charge_micro(price_micro_per_gpu_hour=800_000, gpu_count=2, billable_seconds=3601) == 1_600_444


def test_settlement_split_rounds_the_fee_down_like_the_contract():
    assert metering.settlement_amounts(1_001, 1_000) == (901, 100)
    assert metering.settlement_amounts(9, 1_000) == (9, 0)
    assert metering.settlement_amounts(10, 1_000) == (9, 1)


def test_overlapping_usage_reports_count_once():
    intervals = [(at(0), at(60)), (at(30), at(90)), (at(200), at(260))]
    assert metering.covered_seconds(intervals, start=at(0), end=at(240)) == 90 + 40


# --- metering leases -------------------------------------------------------------------------


def test_running_lease_is_billed_per_second_for_the_time_its_agent_reported():
    job = submit(gpus=2)
    lease = start(job, price="0.40")
    report_every_minute(lease, 600)
    heartbeat(lease, at(650))

    charge = services.lease_meter(lease_id=lease.pk, now=at(700))

    # 600 reported seconds × 2 GPUs × 0.40/GPU-hour = 133_333.33… micro, rounded down.
    assert charge.billable_seconds == 600
    assert charge.cumulative_micro == 133_333
    assert unsettled(lease) == 133_333
    assert reserved(job) == services.job_budget_micro_for(job) - 133_333
    assert not charge.final


def test_cumulative_charges_do_not_accumulate_rounding():
    job = submit(gpus=2)
    lease = start(job, price="0.40")
    for second in range(1, 11):
        report(lease, second - 1, second)
        heartbeat(lease, at(second))
        services.lease_meter(lease_id=lease.pk, now=at(second))

    # 10 s at 800_000 micro per hour is 2_222.2 micro: billed 2_222, not 10 × 222.
    assert unsettled(lease) == 2_222
    assert LedgerEntry.objects.filter(kind="charge", lease=lease).count() == 10


def test_preempted_lease_is_billed_to_the_reclaim_moment_only():
    job = submit()
    lease = start(job, price="0.40")
    report_every_minute(lease, 300)
    heartbeat(lease, at(400))
    lease_end(lease_id=lease.pk, reason=ER.PREEMPTED_BY_OWNER, actor="machine", at=at(330))

    charge = services.lease_meter(lease_id=lease.pk, now=at(1000))

    assert charge.billable_seconds == 330
    assert charge.cumulative_micro == 400_000 * 330 // 3600 == 36_666
    assert charge.final


def test_lost_lease_is_billed_to_the_last_heartbeat_even_if_metered_while_silent():
    job = submit()
    lease = start(job, price="0.40")
    report_every_minute(lease, 420)
    heartbeat(lease, at(400))
    # Metered while the machine is silent but not yet declared lost: no more than up to its last beat.
    assert services.lease_meter(lease_id=lease.pk, now=at(470)).billable_seconds == 400

    from jobs.services import leases_end_for_machine

    leases_end_for_machine(machine_id=lease.machine_id, reason=ER.LOST, actor="sweeper", at=at(400))
    charge = services.lease_meter(lease_id=lease.pk, now=at(1000))

    assert charge.final and charge.billable_seconds == 400
    assert unsettled(lease) == 400_000 * 400 // 3600


def test_lease_that_never_started_is_never_billed():
    job = submit()
    lease = placed_lease(job=job)
    assert services.lease_meter(lease_id=lease.pk) is None  # assigned: nothing to meter yet
    lease_end(lease_id=lease.pk, reason=ER.FAILED_TO_START, actor="machine")

    charge = services.lease_meter(lease_id=lease.pk)

    assert charge.final and charge.cumulative_micro == 0
    assert not LedgerEntry.objects.filter(kind="charge").exists()
    assert reserved(job) == services.job_budget_micro_for(job)


def test_time_the_agent_did_not_report_is_not_billed_beyond_the_slack():
    job = submit()
    lease = start(job, price="0.40")
    report_every_minute(lease, 600)  # then the agent stopped reporting, though the lease ran an hour
    lease_end(lease_id=lease.pk, reason=ER.SUCCEEDED, actor="machine", exit_code=0, at=at(3600))

    charge = services.lease_meter(lease_id=lease.pk, now=at(4000))

    assert settings.USAGE_SLACK_S == 90
    assert charge.billable_seconds == 600 + 90
    assert charge.cumulative_micro == 400_000 * 690 // 3600


def test_ended_lease_waits_for_late_usage_reports_before_its_charge_is_final():
    job = submit()
    lease = start(job, price="0.40")
    report_every_minute(lease, 540)
    lease_end(lease_id=lease.pk, reason=ER.SUCCEEDED, actor="machine", exit_code=0, at=at(1200))

    early = services.lease_meter(lease_id=lease.pk, now=at(1210))
    assert not early.final and early.billable_seconds == 540 + 90
    report_every_minute(lease, 1200, from_s=540)  # the spooled reports arrive
    late = services.lease_meter(lease_id=lease.pk, now=at(1200 + settings.BILLING_FINALIZE_GRACE_S))

    assert late.final and late.billable_seconds == 1200
    assert unsettled(lease) == 400_000 * 1200 // 3600


def test_charge_is_capped_at_the_job_budget_and_the_lease_asked_to_stop():
    job = submit(max_price="1.00", max_duration_s=600)  # budget: 1_000_000 × 600 / 3600 → 166_667
    first = start(job, price="1.00")
    report_every_minute(first, 420)
    lease_end(lease_id=first.pk, reason=ER.PREEMPTED_BY_OWNER, actor="machine", at=at(420))
    services.lease_meter(lease_id=first.pk, now=at(420 + settings.BILLING_FINALIZE_GRACE_S))
    # The job runs again elsewhere: its second lease may only spend what the first left.
    second = start(job, price="1.00", started=1000)
    report_every_minute(second, 1420, from_s=1000)
    heartbeat(second, at(1420))

    charge = services.lease_meter(lease_id=second.pk, now=at(1420))

    assert services.job_budget_micro_for(job) == 166_667
    assert unsettled(first) == 1_000_000 * 420 // 3600 == 116_666
    assert charge.capped and charge.uncapped_micro == 116_666
    assert charge.cumulative_micro == 166_667 - 116_666 == unsettled(second)
    assert reserved(job) == 0
    second.refresh_from_db()
    assert second.stop_requested_at is not None and second.stop_reason == ER.MAX_DURATION


def test_a_lease_is_never_billed_past_its_jobs_max_duration_whatever_its_agent_reports():
    # An agent that ignored the stop ran the lease 138 s and reported all of it; the job's
    # maximum was 60 s.
    job = submit(max_price="1.00", max_duration_s=60)
    lease = start(job, price="1.00")
    report(lease, 0, 60)
    report(lease, 60, 120)
    report(lease, 120, 138)
    heartbeat(lease, at(138))

    running = services.lease_meter(lease_id=lease.pk, now=at(138))
    lease_end(lease_id=lease.pk, reason=ER.SUCCEEDED, actor="machine", exit_code=0, at=at(138))
    final = services.lease_meter(lease_id=lease.pk, now=at(138 + settings.BILLING_FINALIZE_GRACE_S))

    assert running.billable_seconds == 60
    assert final.final and final.billable_seconds == 60
    assert final.cumulative_micro == 1_000_000 * 60 // 3600 == unsettled(lease)


def test_metering_again_posts_nothing_new():
    job = submit()
    lease = start(job, price="0.40")
    report_every_minute(lease, 600)
    lease_end(lease_id=lease.pk, reason=ER.SUCCEEDED, actor="machine", exit_code=0, at=at(600))

    first = services.lease_meter(lease_id=lease.pk, now=at(1000))
    services.lease_meter(lease_id=lease.pk, now=at(1000))
    result = services.leases_meter(now=at(2000))

    assert first.final
    assert result == {"metered": 0, "finalised": 0, "failed": 0}
    assert LedgerEntry.objects.filter(kind="charge", lease=lease).count() == 1
    assert LeaseCharge.objects.get(lease=lease).cumulative_micro == unsettled(lease) == 66_666


def test_meter_task_meters_running_leases_and_finalises_ended_ones():
    from billing.tasks import meter_leases

    running = start(submit(), price="0.40", started=-600)
    report(running, -600, -1)
    heartbeat(running, timezone.now())
    failed = placed_lease(job=submit())
    lease_end(lease_id=failed.pk, reason=ER.FAILED_TO_START, actor="machine")

    result = meter_leases()

    assert result["metered"] == 2 and result["finalised"] == 1
    assert unsettled(running) > 0
