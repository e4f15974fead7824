"""Budgets are reserved in the escrow before their jobs run, on an in-process chain: the matcher
places only reserved jobs, a budget the escrow refuses cancels its job, a withdrawal the ledger
cannot cover cancels the renter's unreserved jobs, and a worker killed between sending and
recording leaves a batch the next run completes exactly once. Each test ends with the ledger
clean (ledger_check) and equal to the escrow."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.management import call_command

from billing import reservations
from billing.authorizations import EscrowDomain, budget_authorization_store
from billing.chain import NodeUnavailable
from billing.contract import budget_sign
from billing.deposits import chain_watch, wallet_link
from billing.errors import Conflict
from billing.models import BudgetAuthorization, BudgetReservation, ChainLog
from billing.reservations import reserve_run
from billing.selectors import job_budget, renter_available_micro
from billing.settlement import settle_run
from billing.tests._escrow_env import ONE, escrow_env
from jobs.models import Event, Job, Lease
from jobs.services import JobSpec
from marketplace.matching import match_cycle, matching_request_clear
from marketplace.submit import job_submit
from tests.factories import RenterFactory, machine_with_gpus

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def env(tmp_path, settings):  # type: ignore[no-untyped-def]
    settings.VAR_DIR = tmp_path
    # This node loses blocks and may mine no more: read as gone at once (billing.rewind.node_behind_wait).
    settings.CHAIN_BEHIND_GRACE_S = 0
    return escrow_env(tmp_path)


def _renter(env, label: str, deposit: int):  # type: ignore[no-untyped-def]
    renter = RenterFactory(funds=0)
    account = env.account(label)
    wallet_link(renter=renter, address=account.address)
    env.deposit(account, deposit)
    chain_watch(client=env.client, deployment=env.deployment)
    return renter, account


def _submit(renter, *, tokens: str) -> Job:  # type: ignore[no-untyped-def]
    """A job whose budget is exactly `tokens` (1 GPU at that price for one hour)."""
    spec = JobSpec(
        gpu_count=1,
        max_price_per_gpu_hour=Decimal(tokens),
        expected_duration_s=3600,
        kind=Job.Kind.PROCESS,
        command=["true"],
    )
    job, _ = job_submit(renter=renter, spec=spec)
    return job


def _sign(env, account, job: Job, amount: int | None = None) -> BudgetAuthorization:  # type: ignore[no-untyped-def]
    """The renter signs the job's budget (or `amount`) and stores it as PUT budget-authorization does."""
    amount = amount or job_budget(job_id=job.pk).reserved
    deadline = int(env.client.web3.eth.get_block("latest")["timestamp"]) + 30 * 86_400  # as offered
    signed = budget_sign(
        private_key=account.key,
        chain_id=env.client.chain_id(),
        escrow=env.deployment.escrow,
        job_id=job.pk,
        max_amount=amount,
        deadline=deadline,
    )
    stored, _ = budget_authorization_store(
        job=job,
        renter_address=account.address,
        max_amount=amount,
        deadline=deadline,
        signature="0x" + signed.signature.hex(),
        domain=EscrowDomain(chain_id=env.client.chain_id(), escrow=env.deployment.escrow),
    )
    return stored


def _events(job: Job) -> list[tuple[str, str]]:
    return [(e.kind, e.detail.get("reason", "")) for e in Event.objects.filter(job=job).order_by("pk")]


def _ledger_clean() -> None:
    call_command("ledger_check")  # raises CommandError (exit 1) on any violation or flagged event


def test_a_signed_budget_is_reserved_from_the_receipt_and_only_then_the_job_is_placed(
    env, dispatched, matching_requested
):
    renter, account = _renter(env, "ada", 10 * ONE)
    machine_with_gpus(count=1)
    job = _submit(renter, tokens="2.00")
    auth = _sign(env, account, job)
    assert auth.status == "signed" and len(dispatched) == 1  # a run was asked for, after commit

    match_cycle()
    job.refresh_from_db()
    assert job.status == Job.Status.PENDING and job.unplaced_code == "budget_not_reserved"
    assert "being reserved on chain" in job.unplaced_detail
    matching_request_clear()  # the run the submission asked for has started
    matching_requested.clear()

    result = reserve_run(client=env.client, deployment=env.deployment)

    assert result == {"sent": 1, "reserved": 1, "refused": 0, "failed": 0, "waiting": {}}
    auth.refresh_from_db()
    batch = BudgetReservation.objects.get()
    assert auth.status == "reserved" and auth.activated_at is not None and auth.reservation == batch
    assert batch.status == "confirmed" and batch.job_ids == [job.pk] and batch.tx_hash.startswith("0x")
    renter_on_chain, _, remaining, _, _, closed = env.escrow.functions.job(job.pk).call()
    assert (renter_on_chain, remaining, closed) == (account.address, 2 * ONE, False)
    assert env.escrow.functions.availableBalance(account.address).call() == 8 * ONE
    assert len(matching_requested) == 1  # the job may be placed now: matched without waiting for beat
    match_cycle()
    assert Job.objects.get(pk=job.pk).status == Job.Status.SCHEDULED
    # A reserved budget is fixed; the next run has nothing to send.
    with pytest.raises(Conflict) as fixed:
        _sign(env, account, job, amount=3 * ONE)
    assert fixed.value.code == "authorization_active"
    assert reserve_run(client=env.client, deployment=env.deployment)["sent"] == 0
    _ledger_clean()
    assert env.disagreements({renter.pk: account.address}, {}) == []


def test_the_issue_withdraw_everything_then_a_new_job_is_refused_on_chain_and_cancelled(env):
    """Issue 8: the renter withdraws all its available balance on chain; the ledger, not having
    seen it yet, admits a new job. The escrow refuses its budget, the job is cancelled (never
    placed) and the watcher then posts the withdrawal: nothing is flagged."""
    renter, account = _renter(env, "bob", 1000 * ONE)
    machine_with_gpus(count=2)
    first = _submit(renter, tokens="50.01")
    _sign(env, account, first)
    reserve_run(client=env.client, deployment=env.deployment)
    env.send_as(account, env.escrow.functions.withdraw(949_990_000))
    assert renter_available_micro(renter_id=renter.pk) == 949_990_000  # the ledger has not seen it

    second = _submit(renter, tokens="100")
    _sign(env, account, second)
    result = reserve_run(client=env.client, deployment=env.deployment)
    match_cycle()

    assert result["refused"] == 1 and result["reserved"] == 0
    second.refresh_from_db()
    assert second.status == Job.Status.CANCELLED and not Lease.objects.filter(job=second).exists()
    reason = "the escrow refused its budget: the renter's available balance in the escrow was below the budget"
    assert _events(second)[-2:] == [("budget.refused", reason), ("job.cancelled", "")]
    assert BudgetAuthorization.objects.get(job=second).status == "refused"
    assert job_budget(job_id=second.pk).remaining == 0  # released in the ledger
    assert Job.objects.get(pk=first.pk).status == Job.Status.SCHEDULED  # its money was reserved

    assert chain_watch(client=env.client, deployment=env.deployment).flagged == 0
    assert renter_available_micro(renter_id=renter.pk) == 0
    _ledger_clean()
    assert env.disagreements({renter.pk: account.address}, {}) == []


def test_a_withdrawal_seen_first_cancels_the_unreserved_jobs_newest_first_and_no_more(env):
    renter, account = _renter(env, "cyd", 10 * ONE)
    reserved = _submit(renter, tokens="2")
    _sign(env, account, reserved)
    reserve_run(client=env.client, deployment=env.deployment)  # 8 left on chain and in the ledger
    oldest, older, newest = (_submit(renter, tokens=t) for t in ("3", "1", "1"))  # 3 left in the ledger
    _sign(env, account, older)  # signed, not yet sent: the escrow holds nothing for it
    env.send_as(account, env.escrow.functions.withdraw(5 * ONE))

    result = chain_watch(client=env.client, deployment=env.deployment)

    assert result.credited == 1 and result.flagged == 0
    statuses = {j.pk: Job.objects.get(pk=j.pk).status for j in (reserved, oldest, older, newest)}
    # 5 withdrawn, 3 free: newest (1) then older (1) cover it; the oldest and the reserved job stay.
    assert statuses == {
        reserved.pk: Job.Status.PENDING,
        oldest.pk: Job.Status.PENDING,
        older.pk: Job.Status.CANCELLED,
        newest.pk: Job.Status.CANCELLED,
    }
    why = _events(newest)[-2]
    assert why[0] == "budget.unfunded" and "withdrew 5.000000 tokens from the escrow" in why[1]
    assert renter_available_micro(renter_id=renter.pk) == 0
    # The cancelled job's signed budget is never sent.
    assert reserve_run(client=env.client, deployment=env.deployment)["sent"] == 0
    _ledger_clean()
    assert env.disagreements({renter.pk: account.address}, {}) == []


def test_one_renters_refused_budget_does_not_hold_up_another_renters(env):
    short, short_account = _renter(env, "dee", 2 * ONE)
    fine, fine_account = _renter(env, "eve", 2 * ONE)
    env.send_as(short_account, env.escrow.functions.withdraw(2 * ONE))  # not seen by the ledger yet
    doomed, ok = _submit(short, tokens="1"), _submit(fine, tokens="1")
    _sign(env, short_account, doomed)
    _sign(env, fine_account, ok)

    result = reserve_run(client=env.client, deployment=env.deployment)

    assert (result["sent"], result["reserved"], result["refused"]) == (1, 1, 1)
    assert BudgetAuthorization.objects.get(job=ok).status == "reserved"
    assert Job.objects.get(pk=doomed.pk).status == Job.Status.CANCELLED
    chain_watch(client=env.client, deployment=env.deployment)
    _ledger_clean()
    assert env.disagreements({short.pk: short_account.address, fine.pk: fine_account.address}, {}) == []


def test_a_budget_about_to_expire_is_refused_before_it_is_sent(env):
    renter, account = _renter(env, "fay", 3 * ONE)
    job = _submit(renter, tokens="1")
    auth = _sign(env, account, job)
    BudgetAuthorization.objects.filter(pk=auth.pk).update(deadline=auth.created_at)

    result = reserve_run(client=env.client, deployment=env.deployment)

    assert result["sent"] == 0 and not BudgetReservation.objects.exists()
    assert Job.objects.get(pk=job.pk).status == Job.Status.CANCELLED
    assert "expired before it could be reserved" in _events(job)[-2][1]
    _ledger_clean()


def test_a_worker_killed_between_sending_and_recording_is_completed_once_by_the_next_run(env, monkeypatch):
    renter, account = _renter(env, "gus", 3 * ONE)
    job = _submit(renter, tokens="1")
    _sign(env, account, job)

    class Killed(Exception):
        pass

    def die(batch):  # type: ignore[no-untyped-def]
        raise Killed

    monkeypatch.setattr(reservations, "after_send_hook", die)
    with pytest.raises(Killed):
        reserve_run(client=env.client, deployment=env.deployment)
    monkeypatch.setattr(reservations, "after_send_hook", None)
    batch = BudgetReservation.objects.get()
    assert batch.status == "pending" and batch.tx_hash == "" and batch.nonce is not None
    assert env.escrow.functions.job(job.pk).call()[2] == ONE  # it did go through

    result = reserve_run(client=env.client, deployment=env.deployment)

    batch.refresh_from_db()
    assert result["reserved"] == 1 and batch.status == "confirmed" and batch.tx_hash
    assert batch.attempts == 1  # found on chain by nonce and calldata hash, not sent again
    assert BudgetAuthorization.objects.get(job=job).status == "reserved"
    assert reserve_run(client=env.client, deployment=env.deployment) == {
        "sent": 0,
        "reserved": 0,
        "refused": 0,
        "failed": 0,
        "waiting": {},
    }
    assert env.escrow.functions.availableBalance(account.address).call() == 2 * ONE
    _ledger_clean()


def test_the_node_down_leaves_the_batch_pending_and_the_next_run_catches_up(env):
    renter, account = _renter(env, "hal", 3 * ONE)
    job = _submit(renter, tokens="1")
    _sign(env, account, job)
    real_transact = env.client.transact

    def unreachable(fn, **kwargs):  # type: ignore[no-untyped-def]
        raise NodeUnavailable("connection refused")

    env.client.transact = unreachable  # type: ignore[method-assign]
    result = reserve_run(client=env.client, deployment=env.deployment)
    assert "node_unavailable" in result and BudgetReservation.objects.get().status == "pending"
    assert BudgetAuthorization.objects.get(job=job).status == "reserving"

    env.client.transact = real_transact  # type: ignore[method-assign]
    result = reserve_run(client=env.client, deployment=env.deployment)

    assert result["reserved"] == 1 and BudgetReservation.objects.get().status == "confirmed"
    assert BudgetReservation.objects.get().attempts == 2
    assert BudgetAuthorization.objects.get(job=job).status == "reserved"


def test_a_reverted_batch_puts_its_budgets_back_for_the_next_one(env):
    renter, account = _renter(env, "ivy", 3 * ONE)
    job = _submit(renter, tokens="1")
    _sign(env, account, job)
    pauser = env.client  # the operator is admin and pauser of the test escrow
    pauser.wait_receipt(pauser.transact(env.escrow.functions.pause()).hash)

    result = reserve_run(client=env.client, deployment=env.deployment)

    assert result["failed"] == 1 and "EnforcedPause" in BudgetReservation.objects.get().last_error
    assert BudgetAuthorization.objects.get(job=job).status == "signed"
    pauser.wait_receipt(pauser.transact(env.escrow.functions.unpause()).hash)
    assert reserve_run(client=env.client, deployment=env.deployment)["reserved"] == 1


def test_a_settlement_run_reserves_waiting_budgets_first_and_never_carries_one(env):
    from billing import services
    from billing.tests._escrow_env import charged_job

    renter, account = _renter(env, "joy", 10 * ONE)
    payee = env.account("joy payee")
    job, lease = charged_job(renter, provider_address=payee.address)
    env.sign_budget(account, job, 2 * ONE)

    result = settle_run(client=env.client, deployment=env.deployment, force=True)

    assert result["reservations"]["reserved"] == 1 and result["confirmed"] == 1
    assert not lease.settlement_items.filter(carries_budget=True).exists()
    services.budgets_release()
    _ledger_clean()
    assert env.disagreements({renter.pk: account.address}, {lease.machine.provider_id: payee.address}) == []


def test_a_burst_of_signatures_asks_for_one_run(env, dispatched):
    renter, account = _renter(env, "kim", 10 * ONE)
    jobs = [_submit(renter, tokens="1") for _ in range(3)]

    for job in jobs:
        _sign(env, account, job)
    assert len(dispatched) == 1 and dispatched[0]["countdown"] == reservations.COALESCE_S

    reservations.reservation_request_clear()  # what the task does as it starts
    _sign(env, account, _submit(renter, tokens="1"))
    assert len(dispatched) == 2
    result = reserve_run(client=env.client, deployment=env.deployment)
    assert result["sent"] == 1 and result["reserved"] == 4  # one batch
    assert BudgetReservation.objects.get().job_ids == [j.pk for j in Job.objects.order_by("pk")]


def test_the_renters_chain_balance_lagging_a_ledger_release_makes_a_budget_wait_not_fail(env):
    from billing import services
    from billing.release import jobs_release_on_chain
    from billing.tests._escrow_env import charged_job

    renter, account = _renter(env, "lou", 3 * ONE)
    payee = env.account("lou payee")
    done, _lease = charged_job(renter, charge_s=3600, provider_address=payee.address)  # budget 2, charged 1
    env.sign_budget(account, done, 2 * ONE)
    settle_run(client=env.client, deployment=env.deployment, force=True)
    services.budgets_release()  # the ledger frees 1 token; the escrow still holds it for `done`
    assert renter_available_micro(renter_id=renter.pk) == 2 * ONE
    nxt = _submit(renter, tokens="2")
    _sign(env, account, nxt)

    waiting = reserve_run(client=env.client, deployment=env.deployment)
    assert waiting["waiting"] == {"awaiting_chain_release": 1} and waiting["sent"] == 0
    assert BudgetAuthorization.objects.get(job=nxt).status == "signed"

    jobs_release_on_chain(client=env.client, deployment=env.deployment)
    assert reserve_run(client=env.client, deployment=env.deployment)["reserved"] == 1
    assert not ChainLog.objects.filter(status="flagged").exists()
    _ledger_clean()
    assert env.disagreements({renter.pk: account.address}, {_lease.machine.provider_id: payee.address}) == []


def test_a_reservation_the_chain_takes_back_under_a_release_run_is_reserved_again_and_released(env, monkeypatch):
    # A cancelled job's budget was reserved in the escrow; the ledger has given it back. The
    # release run's rewind finds the chain whole, then the node rolls back the block that
    # reserved the budget: the escrow knows no such job now. The run must not record the job as
    # released (nothing to free): the batch goes out again, the escrow holds the budget again,
    # and only a release frees it. Recorded released, the escrow would keep the renter's money
    # reserved for ever while the ledger counts it available.
    from billing import release, services
    from billing.release import jobs_release_on_chain
    from billing.tests.support import rolled_back_after_rewind
    from jobs.services import job_cancel

    renter, account = _renter(env, "max", 10 * ONE)
    job = _submit(renter, tokens="2")
    _sign(env, account, job)
    tester = env.client.web3.provider.ethereum_tester
    before_reservation = tester.take_snapshot()
    assert reserve_run(client=env.client, deployment=env.deployment)["reserved"] == 1
    job_cancel(job=job, actor="renter")
    assert services.budgets_release()["released"] == 1
    assert renter_available_micro(renter_id=renter.pk) == 10 * ONE

    rolled_back_after_rewind(monkeypatch, release, lambda: tester.revert_to_snapshot(before_reservation))
    result = jobs_release_on_chain(client=env.client, deployment=env.deployment)

    assert result["waiting"] == 1 and result["released"] == result["already_closed"] == 0
    assert BudgetAuthorization.objects.get(job=job).released_on_chain_at is None
    # The rewind put the budget back to reserving; the batch goes out again and the escrow holds
    # the budget again (the renter signed it, the job's cancellation does not undo that) ...
    assert BudgetAuthorization.objects.get(job=job).status == "reserving"
    assert reserve_run(client=env.client, deployment=env.deployment)["reserved"] == 1
    assert int(env.escrow.functions.availableBalance(account.address).call()) == 8 * ONE
    # ... until the next release run frees it: the escrow and the ledger agree.
    assert jobs_release_on_chain(client=env.client, deployment=env.deployment)["released"] == 1
    assert int(env.escrow.functions.availableBalance(account.address).call()) == 10 * ONE
    assert renter_available_micro(renter_id=renter.pk) == 10 * ONE
    call_command("ledger_check")


def test_a_running_job_whose_budget_the_escrow_refuses_when_sent_again_is_stopped():
    """A chain rollback takes a reservation back (reservation_unconfirm: reserving again) while its
    job runs; if the renter's withdrawal is mined before the budget is sent again, the escrow
    skips it. Nothing on chain backs the job then: it was left running, every further second
    unpaid."""
    from jobs.services import lease_mark_started
    from tests.factories import BudgetAuthorizationFactory, JobFactory, placed_lease

    job = JobFactory(budget_reserved=False)
    auth = BudgetAuthorizationFactory(job=job, status="reserving", activated_at=None)
    lease = placed_lease(job=job)
    Lease.objects.filter(pk=lease.pk).update(start_sent_at=lease.created_at)
    assert lease_mark_started(lease_id=lease.pk, actor="test")

    reservations.budget_refuse(auth=auth, reason="InsufficientBalance")

    lease.refresh_from_db()
    assert lease.stop_requested_at is not None and lease.stop_reason == "cancelled"
    assert Job.objects.get(pk=job.pk).status == Job.Status.CANCELLED
    assert Event.objects.filter(job=job, kind="budget.refused").exists()
    assert BudgetAuthorization.objects.get(pk=auth.pk).status == "refused"
