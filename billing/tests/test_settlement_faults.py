"""Settlement faults: the node unreachable, the worker killed between sending and recording, a
receipt that comes after the run's wait. Each test ends with the ledger and the escrow in
agreement, every charge paid exactly once."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from web3 import Web3

from billing import settlement as engine
from billing.chain import ChainClient, NodeUnavailable
from billing.models import Settlement, SettlementItem
from billing.reservations import reserve_run
from billing.tests._escrow_env import ONE, ProviderFactory, charged_job, escrow_env
from billing.tests.support import funded_renter, new_job, ran_half_hour_until
from tests.factories import placed_lease

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def env(tmp_path, settings):  # type: ignore[no-untyped-def]
    settings.VAR_DIR = tmp_path
    return escrow_env(tmp_path)


def _setup(env, label):  # type: ignore[no-untyped-def]
    renter, account = funded_renter(env, label)
    payee = env.account(f"payee {label}")
    job, lease = charged_job(renter, provider_address=payee.address)
    env.sign_budget(account, job, 2 * ONE)
    # The escrow reserves the budget before the faults below (as it does before any lease runs).
    assert reserve_run(client=env.client, deployment=env.deployment)["reserved"] == 1
    return {renter.pk: account.address}, {lease.machine.provider_id: payee.address}, payee


def test_node_down_leaves_the_charges_waiting_and_the_next_run_catches_up(env):
    renters, providers, payee = _setup(env, "hal")
    down = ChainClient(
        Web3(Web3.HTTPProvider("http://127.0.0.1:9", exception_retry_configuration=None)),
        operator_account=env.client.account,
        receipt_timeout_s=1,
    )
    result = engine.settle_run(client=down, deployment=env.deployment, force=True)
    assert "node_unavailable" in result and not Settlement.objects.exists()

    # The node answers but drops the send: the batch stays pending with its nonce recorded.
    real_transact = env.client.transact

    def unreachable(fn, **kwargs):  # type: ignore[no-untyped-def]
        raise NodeUnavailable("connection refused")

    env.client.transact = unreachable  # type: ignore[method-assign]
    result = engine.settle_run(client=env.client, deployment=env.deployment, force=True)
    settlement = Settlement.objects.get()
    assert "node_unavailable" in result and settlement.status == "pending" and settlement.nonce is not None
    assert env.escrow.functions.earnings(payee.address).call() == 0

    env.client.transact = real_transact  # type: ignore[method-assign]
    engine.settle_run(client=env.client, deployment=env.deployment)
    settlement.refresh_from_db()
    assert settlement.status == "confirmed" and Settlement.objects.count() == 1
    assert env.escrow.functions.earnings(payee.address).call() == 900_000
    assert env.disagreements(renters, providers) == []


def _settle_killed_after_sending(env, monkeypatch) -> Settlement:  # type: ignore[no-untyped-def]
    """Run a settlement whose worker dies right after sending its batch, before recording the
    transaction: the batch is left pending with no hash (its transaction did go through)."""

    class Killed(Exception):
        pass

    def die(settlement):  # type: ignore[no-untyped-def]
        raise Killed

    monkeypatch.setattr(engine, "after_send_hook", die)
    with pytest.raises(Killed):
        engine.settle_run(client=env.client, deployment=env.deployment, force=True)
    monkeypatch.setattr(engine, "after_send_hook", None)
    settlement = Settlement.objects.get()
    assert settlement.status == "pending" and settlement.tx_hash == ""
    return settlement


def test_worker_killed_after_sending_is_completed_once_by_the_reconciler(env, monkeypatch):
    renters, providers, payee = _setup(env, "ivy")
    settlement = _settle_killed_after_sending(env, monkeypatch)
    assert env.escrow.functions.earnings(payee.address).call() == 900_000  # it did go through

    result = engine.settlements_reconcile(client=env.client, deployment=env.deployment, older_than_s=0)
    settlement.refresh_from_db()
    assert result["confirmed"] == 1 and settlement.status == "confirmed" and settlement.tx_hash
    assert settlement.attempts == 1  # found on chain, not sent again
    engine.settlements_reconcile(client=env.client, deployment=env.deployment, older_than_s=0)
    assert env.escrow.functions.earnings(payee.address).call() == 900_000
    assert env.disagreements(renters, providers) == []


def test_a_batch_sent_through_a_node_whose_pending_count_lags_is_found_not_sent_again(env, monkeypatch):
    """The batch recorded the node's pending count as its nonce, but a node that has not seen the
    operator's last transaction yet (one of several behind a load balancer) counts one short, and
    the send used the client's own counter: the worker dying before it recorded the hash left the
    batch unfound under the nonce it recorded, and it was sent again (the escrow paying nothing
    the second time, the ledger booking the charge unpaid)."""
    renters, providers, payee = _setup(env, "lag")  # the reservation went out: the counter is past it
    eth = env.client.web3.eth
    counted = eth.get_transaction_count

    def lagging(address, block="latest"):  # type: ignore[no-untyped-def]
        real = counted(address, block)
        return real - 1 if block == "pending" else real

    monkeypatch.setattr(eth, "get_transaction_count", lagging)
    settlement = _settle_killed_after_sending(env, monkeypatch)
    monkeypatch.setattr(eth, "get_transaction_count", counted)

    result = engine.settlements_reconcile(client=env.client, deployment=env.deployment, older_than_s=0)

    settlement.refresh_from_db()
    assert result["confirmed"] == 1 and settlement.status == "confirmed"
    assert settlement.attempts == 1  # found on chain, not sent again
    assert env.escrow.functions.earnings(payee.address).call() == 900_000
    assert env.disagreements(renters, providers) == []


def test_a_batch_mined_below_the_head_it_recorded_is_found_not_sent_again(env, monkeypatch):
    """After the chain went back (a reorg, a node restored from older state), blocks are numbered
    again from below the head a batch recorded before sending: its transaction, mined again, sits
    below that head. The reconciler finds it there instead of sending the batch a second time
    (which the escrow would skip, leaving the ledger short of what it paid)."""
    renters, providers, payee = _setup(env, "kit")
    settlement = _settle_killed_after_sending(env, monkeypatch)
    # The head it recorded is now above the block its transaction is in.
    Settlement.objects.filter(pk=settlement.pk).update(sent_from_block=env.client.block_number() + 5)

    result = engine.settlements_reconcile(client=env.client, deployment=env.deployment, older_than_s=0)

    settlement.refresh_from_db()
    assert result["confirmed"] == 1 and settlement.status == "confirmed" and settlement.tx_hash
    assert settlement.attempts == 1  # found on chain, not sent again
    assert env.escrow.functions.earnings(payee.address).call() == 900_000
    assert env.disagreements(renters, providers) == []


def test_a_batch_that_fails_to_resume_is_skipped_and_reported_and_the_others_settle(env, monkeypatch):
    import billing.chain
    from billing import tasks
    from core.models import PeriodicTaskState

    renters, providers, payees, batches = {}, {}, [], []
    fee_bps = int(env.client.call(env.escrow.functions.feeBps()))
    for label in ("una", "vic", "wes"):
        its_renters, its_providers, payee = _setup(env, label)
        renters.update(its_renters)
        providers.update(its_providers)
        payees.append(payee)
        # Recorded, never sent (as after a crash before sending): the next run sends it.
        batches.append(engine.settlement_create(candidates=engine.settlement_gather().candidates, fee_bps=fee_bps))
    broken = batches[1]
    real_resume = engine._resume

    def resume(*, settlement, **kwargs):  # type: ignore[no-untyped-def]
        if settlement.pk == broken.pk:
            raise RuntimeError("the database said no")
        return real_resume(settlement=settlement, **kwargs)

    monkeypatch.setattr(engine, "_resume", resume)
    monkeypatch.setattr(billing.chain, "chain_client_from_settings", lambda: env.client)
    monkeypatch.setattr(engine, "deployment_require", lambda client: env.deployment)

    result = tasks.settle()

    assert (result["sent"], result["confirmed"], result["items_failed"]) == (2, 2, 1)
    assert result["failed_items"] == [f"settlement {broken.pk}: RuntimeError: the database said no"]
    statuses = dict(Settlement.objects.values_list("pk", "status"))
    assert [statuses[batch.pk] for batch in batches] == ["confirmed", "pending", "confirmed"]
    assert [env.escrow.functions.earnings(payee.address).call() for payee in payees] == [900_000, 0, 900_000]
    state = PeriodicTaskState.objects.get(name="billing.tasks.settle")
    assert (state.last_ok, state.items_ok, state.items_failed, state.consecutive_failures) == (False, 2, 1, 1)

    monkeypatch.setattr(engine, "_resume", real_resume)
    assert tasks.settle()["confirmed"] == 1
    assert env.escrow.functions.earnings(payees[1].address).call() == 900_000
    assert env.disagreements(renters, providers) == []
    state.refresh_from_db()
    assert (state.last_ok, state.consecutive_failures) == (True, 0)


def test_a_batch_whose_receipt_came_late_is_confirmed_by_the_next_run_before_its_lease_settles_on(env):
    """The chain mines nothing for a while: the run's wait for its batch's receipt ends, and the
    batch stays submitted. The lease's next half hour waits for it (`awaiting_earlier_batch`: a
    second batch's cumulative charge would pay the first part too, were the first not recorded);
    once the block is mined, the next settlement run confirms the first batch itself (not the
    reconciler, SETTLEMENT_STUCK_S later) and sends the second: each half hour paid once."""
    renter, account = funded_renter(env, "yan")
    payee = env.account("payee yan")
    job = new_job(renter)
    env.sign_budget(account, job, 2 * ONE)
    assert reserve_run(client=env.client, deployment=env.deployment)["reserved"] == 1
    t0 = timezone.now() - timedelta(hours=2)
    lease = placed_lease(job=job, provider=ProviderFactory(payout_address=payee.address), price="1.00", started=t0)
    tester = env.client.web3.provider.ethereum_tester
    slow = ChainClient(
        env.client.web3, operator_account=env.client.account, receipt_timeout_s=0.2, poll_interval_s=0.01
    )

    ran_half_hour_until(lease, t0, 1800)
    tester.disable_auto_mine_transactions()
    try:
        first = engine.settle_run(client=slow, deployment=env.deployment, force=True)
        assert (first["sent"], first["confirmed"]) == (1, 0)
        assert Settlement.objects.get().status == "submitted"
        ran_half_hour_until(lease, t0, 3600)
        waiting = engine.settle_run(client=slow, deployment=env.deployment, force=True)
        assert waiting["waiting"] == {"awaiting_earlier_batch": 1} and Settlement.objects.count() == 1
        tester.mine_blocks(1)
    finally:
        tester.enable_auto_mine_transactions()

    caught_up = engine.settle_run(client=slow, deployment=env.deployment, force=True)

    assert (caught_up["confirmed"], caught_up["sent"]) == (2, 1)
    assert list(Settlement.objects.order_by("pk").values_list("status", flat=True)) == ["confirmed", "confirmed"]
    assert [i.delta_micro for i in SettlementItem.objects.order_by("settlement_id")] == [500_000, 500_000]
    assert env.escrow.functions.earnings(payee.address).call() == 900_000
    assert env.disagreements({renter.pk: account.address}, {lease.machine.provider_id: payee.address}) == []
