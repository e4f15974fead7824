"""The double-entry ledger: balanced, idempotent, never negative, append-only, checkable."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from billing import selectors, services
from billing.errors import IdempotencyConflict, InsufficientBalance, InsufficientFunds, UnbalancedEntry
from billing.models import AppendOnlyViolation, LedgerAccount, LedgerEntry, Posting
from billing.services import ESCROW_CHAIN, Leg, ledger_post, renter_available
from billing.tests._escrow_env import charged_job
from jobs.models import Job, Lease
from jobs.services import JobSpec, job_cancel
from marketplace.submit import job_submit
from tests.factories import ProviderFactory, RenterFactory

pytestmark = pytest.mark.django_db


def available(renter) -> int:  # type: ignore[no-untyped-def]
    return selectors.renter_available_micro(renter_id=renter.pk)


def counts() -> tuple[int, int]:
    return LedgerEntry.objects.count(), Posting.objects.count()


def test_deposit_credits_the_renter_and_the_escrow_goes_negative_by_convention():
    renter = RenterFactory(funds=0)

    services.deposit_record(renter=renter, amount=5_000_000, tx_hash="0xabc", log_index=3)

    assert available(renter) == 5_000_000
    assert selectors.account_balance(kind="escrow_chain") == -5_000_000
    assert selectors.ledger_violations() == []


def test_entry_that_does_not_sum_to_zero_is_refused_and_nothing_is_written():
    renter = RenterFactory(funds=0)
    before = counts()

    with pytest.raises(UnbalancedEntry):
        ledger_post(
            kind="deposit",
            idempotency_key="deposit:bad:0",
            legs=[Leg(ESCROW_CHAIN, -100), Leg(renter_available(renter.pk), 99)],
        )

    assert counts() == before and available(renter) == 0


def test_amounts_must_be_whole_micro():
    renter = RenterFactory(funds=0)
    with pytest.raises(UnbalancedEntry):
        ledger_post(
            kind="deposit",
            idempotency_key="deposit:float:0",
            legs=[Leg(ESCROW_CHAIN, -1.5), Leg(renter_available(renter.pk), 1.5)],  # type: ignore[arg-type]
        )


def test_a_replayed_deposit_is_credited_once():
    renter = RenterFactory(funds=0)

    first = services.deposit_record(renter=renter, amount=1_000, tx_hash="0xdead", log_index=0)
    again = services.deposit_record(renter=renter, amount=1_000, tx_hash="0xdead", log_index=0)

    assert again.pk == first.pk
    assert available(renter) == 1_000
    assert Posting.objects.filter(entry=first).count() == 2


def test_the_same_key_with_other_postings_is_refused():
    renter = RenterFactory(funds=0)
    services.deposit_record(renter=renter, amount=1_000, tx_hash="0xdead", log_index=0)

    with pytest.raises(IdempotencyConflict):
        services.deposit_record(renter=renter, amount=2_000, tx_hash="0xdead", log_index=0)

    assert available(renter) == 1_000


def test_withdrawing_more_than_available_is_refused_and_changes_nothing():
    renter = RenterFactory(funds=700)
    before = counts()

    with pytest.raises(InsufficientFunds) as refused:
        services.renter_withdrawal_record(renter=renter, amount=701, tx_hash="0xw", log_index=0)

    assert refused.value.status_code == 402
    assert counts() == before and available(renter) == 700


def test_a_provider_cannot_withdraw_more_than_it_earned():
    provider = ProviderFactory()
    with pytest.raises(InsufficientBalance):
        services.provider_withdrawal_record(provider=provider, amount=1, tx_hash="0xp", log_index=0)
    assert selectors.provider_payable_micro(provider_id=provider.pk) == 0


def test_database_refuses_a_negative_guarded_balance_even_without_the_service():
    renter = RenterFactory(funds=10)
    account = LedgerAccount.objects.get(kind="renter_available", renter=renter)
    with pytest.raises(DatabaseError), transaction.atomic():
        LedgerAccount.objects.filter(pk=account.pk).update(balance=-1)


def test_entries_and_postings_are_append_only():
    renter = RenterFactory(funds=0)
    entry = services.deposit_record(renter=renter, amount=1_000, tx_hash="0xa", log_index=0)
    posting = Posting.objects.filter(entry=entry).first()

    entry.memo = "changed"
    with pytest.raises(AppendOnlyViolation):
        entry.save()
    with pytest.raises(AppendOnlyViolation):
        posting.delete()
    with pytest.raises(AppendOnlyViolation):
        Posting.objects.filter(entry=entry).update(amount=5)
    with pytest.raises(AppendOnlyViolation):
        LedgerEntry.objects.filter(pk=entry.pk).delete()
    # Below the ORM, the database refuses too.
    with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE billing_posting SET amount = 5 WHERE id = %s", [posting.pk])

    assert available(renter) == 1_000
    assert sorted(Posting.objects.filter(entry=entry).values_list("amount", flat=True)) == [-1_000, 1_000]


def _charged_lease(charge_s: int = 3600) -> Lease:
    """A finished lease whose hour at 1.00/GPU-hour was metered (1_000_000 micro unsettled) and
    whose job's unused budget was released."""
    _, lease = charged_job(RenterFactory(), charge_s=charge_s)
    services.budgets_release()
    return lease


def test_settlement_pays_the_provider_and_the_fee_as_the_contract_rounds():
    lease = _charged_lease()
    provider_id = lease.machine.provider_id
    assert selectors.account_balance(kind="lease_unsettled", owner_key=f"lease:{lease.pk}") == 1_000_000

    services.settlement_submit_record(lease_id=lease.pk, amount=1_000_000, settlement_ref="s1")
    services.settlement_confirm_record(
        lease_id=lease.pk, amount=999_999, fee_bps=1_000, settlement_ref="s1", tx_hash="0xs"
    )
    services.settlement_revert_record(lease_id=lease.pk, amount=1, settlement_ref="s1")

    # 999_999 × 10 % = 99_999.9 → fee 99_999, provider 900_000.
    assert selectors.provider_payable_micro(provider_id=provider_id) == 900_000
    assert selectors.account_balance(kind="platform_fees") == 99_999
    assert selectors.account_balance(kind="lease_unsettled", owner_key=f"lease:{lease.pk}") == 1
    assert selectors.account_balance(kind="in_settlement", owner_key=f"lease:{lease.pk}") == 0
    assert selectors.ledger_violations() == []


def test_cannot_settle_more_than_was_charged():
    lease = _charged_lease()
    with pytest.raises(InsufficientBalance):
        services.settlement_submit_record(lease_id=lease.pk, amount=1_000_001, settlement_ref="s1")


# --- ledger_check ---------------------------------------------------------------------------


def test_ledger_check_passes_on_a_consistent_ledger(capsys):
    _charged_lease()
    call_command("ledger_check")
    assert "OK" in capsys.readouterr().out


def test_ledger_check_catches_a_corrupted_balance(capsys):
    renter = RenterFactory(funds=5_000)
    account = LedgerAccount.objects.get(kind="renter_available", renter=renter)
    LedgerAccount.objects.filter(pk=account.pk).update(balance=6_000)

    with pytest.raises(CommandError) as failed:
        call_command("ledger_check")

    assert failed.value.returncode == 1
    out = capsys.readouterr().out
    assert "caches balance 6000 but its postings sum to 5000" in out
    assert "sum to 1000, not zero" in out


def test_ledger_check_reports_a_finished_job_whose_budget_was_not_released(capsys):
    job, _ = job_submit(
        renter=RenterFactory(),
        spec=JobSpec(
            gpu_count=1,
            max_price_per_gpu_hour=Decimal("1.00"),
            expected_duration_s=60,
            kind=Job.Kind.PROCESS,
            command=["true"],
        ),
    )
    job_cancel(job=job, actor="test")

    with pytest.raises(CommandError):
        call_command("ledger_check")
    assert f"job {job.pk} is finished and finally metered but still has 16667 reserved" in capsys.readouterr().out

    services.budgets_release()
    call_command("ledger_check")


def test_a_posting_takes_the_same_few_statements_however_many_accounts_it_touches(django_assert_num_queries):
    """Accounts are found, created and their balances moved a statement at a time for all of
    them, not one per leg: a settlement of a busy lease costs what a deposit does."""
    renters = [RenterFactory(funds=0) for _ in range(4)]
    services.deposit_record(renter=renters[0], amount=1, tx_hash="0xwarm", log_index=0)  # escrow_chain exists

    def post(key: str, receivers: list) -> None:  # type: ignore[type-arg]
        legs = [Leg(ESCROW_CHAIN, -len(receivers))] + [Leg(renter_available(r.pk), 1) for r in receivers]
        ledger_post(kind="deposit", idempotency_key=key, legs=legs)

    with CaptureQueriesContext(connection) as one_new:
        post("one-new", renters[1:2])
    with django_assert_num_queries(len(one_new)):
        post("two-new", renters[2:4])
    with CaptureQueriesContext(connection) as existing:
        post("one-existing", renters[1:2])
    with django_assert_num_queries(len(existing)):
        post("three-existing", renters[1:4])
    assert len(existing) < len(one_new)
    assert [available(r) for r in renters] == [1, 3, 2, 2]
    assert selectors.ledger_violations() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite's test database refuses, not waits, a second writer"
)
def test_postings_racing_to_open_the_same_new_accounts_all_land_on_one_account_each():
    """Four deposits for a renter whose account does not exist yet, at the same instant: each
    creates it (the others wait for the first insert), none fails, and the balance holds all four."""
    renter = RenterFactory(funds=0)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def deposit(n: int) -> None:
        try:
            barrier.wait(10)
            services.deposit_record(renter=renter, amount=10 + n, tx_hash=f"0xrace{n}", log_index=0)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=deposit, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert LedgerAccount.objects.filter(kind="renter_available", renter=renter).count() == 1
    assert available(renter) == 10 + 11 + 12 + 13
    assert selectors.ledger_violations() == []
