"""The escrow's side of a finished job, on an in-process chain: the operator closes a released
budget on chain (releaseJob) once and only once nothing more can be paid from it, and the watcher
follows providers' and the treasury's withdrawals. After each step the escrow and the ledger agree."""

from __future__ import annotations

import time

import pytest
from django.core.management import call_command
from eth_account import Account
from web3 import Web3

from billing import release, services
from billing import settlement as engine
from billing.chain import ChainClient
from billing.deposits import chain_watch, wallet_link
from billing.models import BudgetAuthorization, ChainLog
from billing.release import jobs_release_on_chain
from billing.selectors import account_balance, provider_payable_micro, renter_available_micro
from billing.tests._escrow_env import ONE, charged_job, escrow_env
from billing.tests.support import rolled_back_after_rewind
from tests.factories import RenterFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def env(tmp_path, settings):  # type: ignore[no-untyped-def]
    settings.VAR_DIR = tmp_path
    # This node loses blocks and may mine no more: read as gone at once (billing.rewind.node_behind_wait).
    settings.CHAIN_BEHIND_GRACE_S = 0
    return escrow_env(tmp_path)


def _settled_job(env, label: str):  # type: ignore[no-untyped-def]
    """A renter with 10 tokens deposited and a finished job (budget 2 tokens, 1 token charged)
    whose charge is settled on chain: the escrow holds the job's other token reserved."""
    renter = RenterFactory(funds=0)
    account = env.account(label)
    wallet_link(renter=renter, address=account.address)
    env.deposit(account, 10 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)
    payee = env.account(f"{label} payee")
    job, lease = charged_job(renter, charge_s=3600, provider_address=payee.address)
    env.sign_budget(account, job, 2 * ONE)
    assert engine.settle_run(client=env.client, deployment=env.deployment, force=True)["confirmed"] == 1
    return renter, account, payee, job, lease


def _on_chain_available(env, account) -> int:  # type: ignore[no-untyped-def]
    return int(env.escrow.functions.availableBalance(account.address).call())


def test_a_released_budget_goes_back_to_the_renter_on_chain_once(env):
    renter, account, _payee, job, _lease = _settled_job(env, "hana")
    assert _on_chain_available(env, account) == 8 * ONE  # 2 reserved on chain by the first settlement

    assert services.budgets_release()["released"] == 1  # the ledger gives back the unspent token
    assert renter_available_micro(renter_id=renter.pk) == 9 * ONE

    result = jobs_release_on_chain(client=env.client, deployment=env.deployment)

    assert result["released"] == 1
    assert _on_chain_available(env, account) == 9 * ONE == renter_available_micro(renter_id=renter.pk)
    _renter, _deadline, remaining, _lease_id, _settled, closed = env.escrow.functions.job(job.pk).call()
    assert remaining == 0 and closed
    auth = BudgetAuthorization.objects.get(job=job)
    assert auth.released_on_chain_at is not None and auth.release_tx_hash.startswith("0x")

    # A second run sends nothing, and the watcher credits nothing for the release.
    head = env.client.block_number()
    again = jobs_release_on_chain(client=env.client, deployment=env.deployment)
    assert again["released"] == 0 and env.client.block_number() == head
    chain_watch(client=env.client, deployment=env.deployment)
    assert renter_available_micro(renter_id=renter.pk) == 9 * ONE
    call_command("ledger_check")


def test_a_settlement_the_chain_takes_back_during_a_run_is_not_released_over(env, monkeypatch):
    # The run's rewind finds the chain whole; then the node rolls back the block that settled
    # the job's charge. The release must not close the job on chain now: the escrow would never
    # pay the charge the ledger is about to put back to unsettled.
    renter = RenterFactory(funds=0)
    account = env.account("ines")
    wallet_link(renter=renter, address=account.address)
    env.deposit(account, 10 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)
    payee = env.account("ines payee")
    job, lease = charged_job(renter, charge_s=3600, provider_address=payee.address)
    env.sign_budget(account, job, 2 * ONE)
    tester = env.client.web3.provider.ethereum_tester
    before_settlement = tester.take_snapshot()
    assert engine.settle_run(client=env.client, deployment=env.deployment, force=True)["confirmed"] == 1
    assert services.budgets_release()["released"] == 1

    rolled_back_after_rewind(monkeypatch, release, lambda: tester.revert_to_snapshot(before_settlement))
    result = jobs_release_on_chain(client=env.client, deployment=env.deployment)

    assert result["released"] == 0 and result["waiting"] == 1
    *_rest, closed = env.escrow.functions.job(job.pk).call()
    assert not closed
    assert account_balance(kind="in_settlement", owner_key=f"lease:{lease.pk}") > 0  # to be paid again
    # Settled again, the job is released, and the escrow and the ledger agree.
    assert engine.settle_run(client=env.client, deployment=env.deployment, force=True)["confirmed"] == 1
    assert jobs_release_on_chain(client=env.client, deployment=env.deployment)["released"] == 1
    call_command("ledger_check")


def test_a_job_is_not_released_on_chain_before_the_ledger_released_it(env):
    _renter, account, _payee, job, _lease = _settled_job(env, "ivan")

    result = jobs_release_on_chain(client=env.client, deployment=env.deployment)

    assert result["waiting"] == 1 and result["released"] == 0
    assert _on_chain_available(env, account) == 8 * ONE
    assert not env.escrow.functions.job(job.pk).call()[5]  # still open: its charges could still be paid
    assert BudgetAuthorization.objects.get(job=job).released_on_chain_at is None


def test_a_job_the_renter_already_closed_is_only_recorded(env):
    renter, account, _payee, job, _lease = _settled_job(env, "jade")
    services.budgets_release()
    # Past the budget's deadline the renter may close the job itself.
    tester = env.client.web3.provider.ethereum_tester
    tester.time_travel(int(BudgetAuthorization.objects.get(job=job).deadline.timestamp()) + 60)
    env.send_as(account, env.escrow.functions.releaseJob(job.pk, 0, 0))
    head = env.client.block_number()

    result = jobs_release_on_chain(client=env.client, deployment=env.deployment)

    assert result["already_closed"] == 1 and env.client.block_number() == head
    auth = BudgetAuthorization.objects.get(job=job)
    assert auth.released_on_chain_at is not None and auth.release_tx_hash == ""
    assert _on_chain_available(env, account) == 9 * ONE == renter_available_micro(renter_id=renter.pk)


def test_an_unreachable_node_leaves_the_release_for_the_next_run(env):
    renter, account, _payee, job, _lease = _settled_job(env, "kofi")
    services.budgets_release()
    down = ChainClient(
        Web3(Web3.HTTPProvider("http://127.0.0.1:9", exception_retry_configuration=None)),
        operator_account=env.client.account,
    )

    result = jobs_release_on_chain(client=down, deployment=env.deployment)

    assert "node_unavailable" in result and result["released"] == 0
    assert BudgetAuthorization.objects.get(job=job).released_on_chain_at is None
    assert jobs_release_on_chain(client=env.client, deployment=env.deployment)["released"] == 1
    assert _on_chain_available(env, account) == renter_available_micro(renter_id=renter.pk) == 9 * ONE


def test_a_job_whose_release_fails_is_skipped_and_reported_and_the_others_are_released(env, monkeypatch):
    import billing.chain
    from billing import release, tasks
    from core.models import PeriodicTaskState

    settled = [_settled_job(env, label) for label in ("nora", "omar", "pia")]
    services.budgets_release()
    broken = settled[1][3]
    real_release = release.job_release_on_chain

    def job_release_on_chain(*, auth, **kwargs):  # type: ignore[no-untyped-def]
        if auth.job_id == broken.pk:
            raise RuntimeError("the database said no")
        return real_release(auth=auth, **kwargs)

    monkeypatch.setattr(release, "job_release_on_chain", job_release_on_chain)
    monkeypatch.setattr(billing.chain, "chain_client_from_settings", lambda: env.client)
    monkeypatch.setattr(release, "deployment_require", lambda client: env.deployment)

    result = tasks.release_jobs_on_chain()

    assert (result["released"], result["items_failed"]) == (2, 1)
    assert result["failed_items"] == [f"job {broken.pk}: RuntimeError: the database said no"]
    released = dict(BudgetAuthorization.objects.values_list("job_id", "released_on_chain_at"))
    assert [released[job.pk] is not None for _renter, _account, _payee, job, _lease in settled] == [True, False, True]
    assert not env.escrow.functions.job(broken.pk).call()[5]  # still open on chain
    state = PeriodicTaskState.objects.get(name="billing.tasks.release_jobs_on_chain")
    assert (state.last_ok, state.items_ok, state.items_failed, state.consecutive_failures) == (False, 2, 1, 1)

    monkeypatch.setattr(release, "job_release_on_chain", real_release)
    assert tasks.release_jobs_on_chain()["released"] == 1
    renter, account = settled[1][0], settled[1][1]
    assert _on_chain_available(env, account) == renter_available_micro(renter_id=renter.pk) == 9 * ONE
    state.refresh_from_db()
    assert (state.last_ok, state.consecutive_failures) == (True, 0)


def test_a_release_the_chain_does_not_mine_stops_the_run_and_the_next_run_finishes(env):
    """The chain stops mining the operator's transactions (stalled, or rolled back under the
    nonce of the one just sent): the run does not send the other jobs' releases one receipt
    timeout after another while it holds the settlement lock; the next run finishes them all."""
    settled = [_settled_job(env, label) for label in ("quin", "rhea", "sol")]
    services.budgets_release()
    tester = env.client.web3.provider.ethereum_tester
    client = env.client.for_account(env.client.account)
    client.receipt_timeout_s = 0.3
    tester.disable_auto_mine_transactions()
    try:
        started = time.monotonic()
        stalled = jobs_release_on_chain(client=client, deployment=env.deployment)
        took = time.monotonic() - started
    finally:
        tester.enable_auto_mine_transactions()

    assert (stalled["released"], stalled["pending"]) == (0, 1) and "stalled" in stalled
    assert took < 3  # one receipt timeout, not three
    sent = BudgetAuthorization.objects.exclude(release_tx_hash="").count()
    assert sent == 1 and not BudgetAuthorization.objects.filter(released_on_chain_at__isnull=False).exists()

    tester.mine_blocks(1)
    result = jobs_release_on_chain(client=env.client, deployment=env.deployment)

    assert result["released"] == 3
    for renter, account, _payee, _job, _lease in settled:
        assert _on_chain_available(env, account) == renter_available_micro(renter_id=renter.pk) == 9 * ONE
    call_command("ledger_check")


def test_a_release_mined_after_the_job_was_closed_is_recorded_closed_not_an_error(env, monkeypatch):
    """The job was open when the run read it, and closed by a transaction mined before the run's
    own releaseJob: the renter's, past the budget's deadline, or one an earlier run sent and died
    before recording. The run's release reverted (JobClosed) when mined, was reported as an error,
    and the job stayed unrecorded until a later run read its state again."""
    renter, account, _payee, job, _lease = _settled_job(env, "tara")
    services.budgets_release()
    tester = env.client.web3.provider.ethereum_tester
    tester.time_travel(int(BudgetAuthorization.objects.get(job=job).deadline.timestamp()) + 60)
    client = env.client.for_account(env.client.account)
    transact, wait_receipt = client.transact, client.wait_receipt

    def renter_first(fn, **options):  # type: ignore[no-untyped-def]
        env.client.for_account(account).transact(env.escrow.functions.releaseJob(job.pk, 0, 0))
        return transact(fn, **options)

    def mined_then_waited(tx_hash: str, **options: object):  # type: ignore[no-untyped-def]
        tester.mine_blocks(1)  # the renter's release, then the run's, in the order they were sent
        return wait_receipt(tx_hash, **options)

    monkeypatch.setattr(client, "transact", renter_first)
    monkeypatch.setattr(client, "wait_receipt", mined_then_waited)
    tester.disable_auto_mine_transactions()
    try:
        result = jobs_release_on_chain(client=client, deployment=env.deployment)
    finally:
        tester.enable_auto_mine_transactions()

    assert result["already_closed"] == 1 and "errors" not in result, result
    auth = BudgetAuthorization.objects.get(job=job)
    assert auth.released_on_chain_at is not None and auth.release_tx_hash == ""
    assert _on_chain_available(env, account) == 9 * ONE == renter_available_micro(renter_id=renter.pk)
    call_command("ledger_check")


def test_provider_and_fee_withdrawals_on_chain_are_posted_once_by_the_watcher(env):
    _renter, _account, payee, _job, lease = _settled_job(env, "lena")
    provider_id = lease.machine.provider_id
    assert provider_payable_micro(provider_id=provider_id) == 900_000
    assert account_balance(kind="platform_fees") == 100_000

    env.send_as(payee, env.escrow.functions.withdrawEarnings())
    env.client.wait_receipt(env.client.transact(env.escrow.functions.withdrawFees()).hash)  # operator = treasury
    first = chain_watch(client=env.client, deployment=env.deployment)
    services.budgets_release()
    second = chain_watch(client=env.client, deployment=env.deployment)

    assert first.credited == 2 and second.credited == 0
    assert provider_payable_micro(provider_id=provider_id) == 0
    assert account_balance(kind="platform_fees") == 0
    assert int(env.token.functions.balanceOf(payee.address).call()) == 900_000
    assert set(
        ChainLog.objects.filter(event__in=("EarningsWithdrawn", "FeesWithdrawn")).values_list("status", flat=True)
    ) == {"credited"}
    call_command("ledger_check")


def test_earnings_withdrawn_from_an_earlier_payout_address_are_the_providers(env):
    """The escrow keeps earnings at the address they were settled to: a provider that changed its
    payout address afterwards withdraws them from the old one (it stayed unmatched, the ledger
    owing the provider money the chain had paid, and ledger_check failing from then on)."""
    _renter, _account, payee, _job, lease = _settled_job(env, "milo")
    provider = lease.machine.provider
    provider.payout_address = Account.create().address
    provider.save(update_fields=["payout_address"])
    env.send_as(payee, env.escrow.functions.withdrawEarnings())

    result = chain_watch(client=env.client, deployment=env.deployment)

    assert (result.credited, result.unmatched) == (1, 0)
    assert provider_payable_micro(provider_id=provider.pk) == 0
    assert ChainLog.objects.get(event="EarningsWithdrawn").status == "credited"
    services.budgets_release()
    call_command("ledger_check")


def test_an_earnings_withdrawal_left_unmatched_by_an_earlier_run_is_posted_once_its_payee_is_known(env, monkeypatch):
    """A log stored unmatched by a watcher that matched the current payout address only (as
    before 9adc42c, which the first run here stands in for) is posted by the next run, once; a
    log whose payee is still unknown stays unmatched."""
    from billing import deposits
    from providers.models import Provider

    _renter, _account, payee, _job, lease = _settled_job(env, "nora")
    provider = lease.machine.provider
    provider.payout_address = Account.create().address
    provider.save(update_fields=["payout_address"])
    env.send_as(payee, env.escrow.functions.withdrawEarnings())
    with monkeypatch.context() as before_the_fix:
        before_the_fix.setattr(
            deposits,
            "_provider_for",
            lambda address, amount: Provider.objects.filter(payout_address__iexact=address).first(),
        )
        chain_watch(client=env.client, deployment=env.deployment)
    log = ChainLog.objects.get(event="EarningsWithdrawn")
    assert log.status == "unmatched" and provider_payable_micro(provider_id=provider.pk) > 0
    stranger = ChainLog.objects.create(
        event="EarningsWithdrawn",
        address=Account.create().address.lower(),
        args={"amount": 5},
        tx_hash="0x" + "ee" * 32,
        log_index=0,
        block_number=log.block_number,
        block_hash=log.block_hash,
        status="unmatched",
    )

    first = chain_watch(client=env.client, deployment=env.deployment)
    second = chain_watch(client=env.client, deployment=env.deployment)

    assert (first.revisited, second.revisited) == (1, 0)
    assert ChainLog.objects.get(pk=log.pk).status == "credited"
    assert ChainLog.objects.get(pk=stranger.pk).status == "unmatched"
    assert provider_payable_micro(provider_id=provider.pk) == 0


def test_withdrawals_by_strangers_cost_a_watcher_run_the_same_however_many_wait():
    """Each run looks again at the EarningsWithdrawn logs left unmatched; a stranger's withdrawals
    (no provider's payee, now or earlier) used to cost a payee lookup each, in every run, for good."""
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext

    from billing import deposits

    def stranger_log(n: int) -> ChainLog:
        return ChainLog.objects.create(
            event="EarningsWithdrawn",
            address=Account.create().address.lower(),
            args={"amount": 5},
            tx_hash="0x" + f"{n:064x}",
            log_index=0,
            block_number=n,
            block_hash="0x" + "ab" * 32,
            status="unmatched",
        )

    def queries_of_a_run() -> int:
        with transaction.atomic(), CaptureQueriesContext(connection) as run:
            assert deposits._earnings_revisit() == 0
        return len(run.captured_queries)

    stranger_log(1)
    one = queries_of_a_run()
    for n in range(2, 42):
        stranger_log(n)

    assert queries_of_a_run() == one <= 3
    assert set(ChainLog.objects.values_list("status", flat=True)) == {"unmatched"}
