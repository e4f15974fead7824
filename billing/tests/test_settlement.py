"""Settlement on an in-process chain: the ledger and the escrow agree after every batch."""

from __future__ import annotations

import pytest

from billing import services
from billing import settlement as engine
from billing.models import BudgetAuthorization, LedgerAccount, Settlement, SettlementItem
from billing.selectors import ledger_violations, provider_payable_micro
from billing.statements import lease_money
from billing.tests._escrow_env import ONE, charged_job, escrow_env
from billing.tests.support import funded_renter

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def env(tmp_path, settings):  # type: ignore[no-untyped-def]
    settings.VAR_DIR = tmp_path
    return escrow_env(tmp_path)


def test_a_settled_batch_pays_the_provider_and_fee_exactly_as_the_ledger_says(env):
    renter, account = funded_renter(env, "erin")
    payee = env.account("payee 1")
    job, lease = charged_job(renter, charge_s=3600, provider_address=payee.address)
    env.sign_budget(account, job, 2 * ONE)

    result = engine.settle_run(client=env.client, deployment=env.deployment, force=True)

    assert result["confirmed"] == 1
    settlement = Settlement.objects.get()
    assert settlement.status == "confirmed" and settlement.total_micro == ONE and settlement.fee_bps == 1000
    provider_id = lease.machine.provider_id
    assert provider_payable_micro(provider_id=provider_id) == 900_000
    assert env.escrow.functions.earnings(payee.address).call() == 900_000
    assert env.escrow.functions.feesAccrued().call() == 100_000
    assert job.budget_authorization.__class__.objects.get(job=job).activated_at is not None
    assert env.disagreements({renter.pk: account.address}, {provider_id: payee.address}) == []


def test_a_replayed_batch_pays_nothing_twice(env):
    renter, account = funded_renter(env, "frank")
    payee = env.account("payee 2")
    job, lease = charged_job(renter, provider_address=payee.address)
    env.sign_budget(account, job, 2 * ONE)
    engine.settle_run(client=env.client, deployment=env.deployment, force=True)
    settlement = Settlement.objects.get()

    # Send the very same calldata again, as a worker retrying after a crash would.
    env.client.wait_receipt(env.client.transact(engine._settle_call(env.client, env.deployment, settlement)).hash)

    assert env.escrow.functions.earnings(payee.address).call() == 900_000
    assert env.disagreements({renter.pk: account.address}, {lease.machine.provider_id: payee.address}) == []


def test_jobs_without_a_budget_authorization_wait(env):
    renter, _account = funded_renter(env, "gina")
    _job, _ = charged_job(renter, provider_address=env.account("payee 3").address)

    result = engine.settle_run(client=env.client, deployment=env.deployment, force=True)

    assert result["waiting"] == {"awaiting_budget_authorization": 1}
    assert not Settlement.objects.exists()


def _confirmed_by_hand(settlement: Settlement, *, skipped: set[int], generation: int) -> None:
    """Book `settlement`'s confirmation as settlement_confirm does, without a chain: each item the
    escrow "skipped" (its job unknown) back to unsettled and flagged, the others paid whole."""
    ref = engine.settlement_ref(settlement)
    for item in engine.settlement_items_carried(settlement):
        if item.lease_id in skipped:
            services.settlement_revert_record(
                lease_id=item.lease_id, amount=item.delta_micro, settlement_ref=ref, generation=generation
            )
            SettlementItem.objects.filter(pk=item.pk).update(job_unknown=True)
        else:
            services.settlement_confirm_record(
                lease_id=item.lease_id,
                amount=item.delta_micro,
                fee_bps=1000,
                settlement_ref=ref,
                tx_hash="0x" + "ab" * 32,
                generation=generation,
            )
    Settlement.objects.filter(pk=settlement.pk).update(status="confirmed", block_number=7, block_hash="0x" + "cd" * 32)
    settlement.refresh_from_db()


def test_a_skipped_item_left_out_at_one_rewind_stays_out_of_its_batch_at_the_next(env):
    """A batch of two leases confirms with the first skipped (its job's reservation gone with a
    rollback); a later batch carries that charge on; a rollback takes both blocks, and the first
    batch goes out again, and confirms, without the skipped item. The later batch then fails, its
    charge back to unsettled, and a second rollback takes the first batch's block again: the
    skipped item, no longer carried on by anything, must stay out of the batch (its charge waits
    unsettled for a new one). Put back, the batch would send it with nothing in settlement for it,
    and its next confirmation would fail for good on the ledger's balance."""
    renter, account = funded_renter(env, "zed")
    first_job, first = charged_job(renter)
    other_job, other = charged_job(renter)
    for job in (first_job, other_job):
        env.sign_budget(account, job, 2 * ONE)
    BudgetAuthorization.objects.update(status="reserved")
    batch = engine.settlement_create(candidates=engine.settlement_gather().candidates, fee_bps=1000)
    assert batch is not None and batch.items.count() == 2
    _confirmed_by_hand(batch, skipped={first.pk}, generation=0)
    later = engine.settlement_create(candidates=engine.settlement_gather().candidates, fee_bps=1000)
    assert later is not None and [i.lease_id for i in later.items.all()] == [first.pk]

    # The first rollback: the later batch (not confirmed yet) stays pending, the first batch goes
    # out again without the skipped item and confirms.
    assert engine.settlement_unconfirm(settlement=batch, why="a rollback").status == "pending"
    assert [i.lease_id for i in engine.settlement_items_carried(batch)] == [other.pk]
    _confirmed_by_hand(batch, skipped=set(), generation=1)
    engine._fail(later, None, "its nonce went to another transaction")
    assert lease_money(lease_ids=[first.pk])[first.pk].unsettled == ONE

    # The second rollback.
    again = engine.settlement_unconfirm(settlement=batch, why="another rollback")

    assert again.status == "pending" and again.rewinds == 2
    assert [i.lease_id for i in engine.settlement_items_carried(again)] == [other.pk]
    unsettled, in_settlement = LedgerAccount.Kind.LEASE_UNSETTLED, LedgerAccount.Kind.IN_SETTLEMENT
    assert (engine._balance(unsettled, first.pk), engine._balance(in_settlement, first.pk)) == (ONE, 0)
    assert (engine._balance(unsettled, other.pk), engine._balance(in_settlement, other.pk)) == (0, ONE)
    gathered = engine.settlement_gather()
    assert [(c.lease.pk, c.cumulative, c.delta) for c in gathered.candidates] == [(first.pk, ONE, ONE)]
    services.budgets_release()  # as the beat does: the finished jobs' unspent budgets
    assert ledger_violations() == []


def test_an_item_of_a_job_the_escrow_does_not_know_is_read_from_state_as_paid_nothing(env):
    """When a batch's events do not add up, what it paid is read from the escrow's state around its
    block. An item whose job the escrow knew neither before nor after was paid nothing (and is
    flagged to go out again); read as activated by the batch, it was booked as paid whole."""
    renter, account = funded_renter(env, "ula")
    payee = env.account("payee ula")
    job, _lease = charged_job(renter, provider_address=payee.address)
    env.sign_budget(account, job, 2 * ONE)
    BudgetAuthorization.objects.update(status="reserved")  # the ledger's view; the escrow never reserved it

    engine.settle_run(client=env.client, deployment=env.deployment, force=True)

    settlement = Settlement.objects.get()
    item = settlement.items.get()
    assert item.job_unknown and env.escrow.functions.earnings(payee.address).call() == 0
    outcome = engine._outcome_from_state(
        items=[item], escrow=env.escrow, client=env.client, block=int(settlement.block_number)
    )
    assert (outcome.paid, outcome.job_unknown) == ({item.pk: 0}, frozenset({item.pk}))
