"""The ledger check against the chain (billing.ledger_check, `manage.py ledger_check`, the periodic
task): it passes on the normal states of a busy marketplace, where work is in flight, accounting for
each; it fails, with the difference, when the ledger and the chain disagree; it says so when it
could not read the chain; and its last result is stored for the console and /healthz."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from web3 import Web3

import billing.chain
from billing import services, tasks
from billing import settlement as engine
from billing.chain import ChainClient
from billing.chain.deployment import deployment_save
from billing.ledger_check import ledger_check_run
from billing.models import LedgerCheck, Settlement
from billing.reservations import reserve_run
from billing.selectors import ledger_check_latest
from billing.tests._escrow_env import ONE, charged_job, escrow_env
from billing.tests.support import funded_renter, new_job
from core.models import PeriodicTaskState
from jobs.models import Job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def env(tmp_path, settings, monkeypatch):  # type: ignore[no-untyped-def]
    """An escrow on the in-process chain that `manage.py ledger_check` and the task find as they
    would in production: its deployment file under VAR_DIR, the node from settings."""
    settings.VAR_DIR = tmp_path
    settings.CHAIN_CONFIRMATIONS = 1
    made = escrow_env(tmp_path)
    deployment_save(made.deployment, path=Path(tmp_path) / "chain" / f"deployment-{made.client.chain_id()}.json")
    monkeypatch.setattr(billing.chain, "chain_client_from_settings", lambda **kwargs: made.client)
    return made


def _check(env):  # type: ignore[no-untyped-def]
    return ledger_check_run(client=env.client, deployment=env.deployment)


def _charged(env, label):  # type: ignore[no-untyped-def]
    """A finished job (budget 2 tokens, reserved on chain) charged 1 token, not yet settled."""
    renter, account = funded_renter(env, label)
    payee = env.account(f"payee {label}")
    job, lease = charged_job(renter, provider_address=payee.address)
    env.sign_budget(account, job, 2 * ONE)
    assert reserve_run(client=env.client, deployment=env.deployment)["reserved"] == 1
    return renter, account, payee, job, lease


def _settled(env, label, *, release: bool = True):  # type: ignore[no-untyped-def]
    """The same, settled on chain, its unspent budget released by the ledger unless `release` is False."""
    renter, account, payee, job, lease = _charged(env, label)
    assert engine.settle_run(client=env.client, deployment=env.deployment, force=True)["confirmed"] == 1
    if release:
        services.budgets_release()
    return renter, account, payee, job, lease


def test_the_check_passes_while_a_settlement_is_mined_but_not_yet_confirmed(env):
    _renter, _account, payee, _job, _lease = _charged(env, "ann")
    services.budgets_release()
    slow = ChainClient(env.client.web3, operator_account=env.client.account, confirmations=3, receipt_timeout_s=0.2)
    engine.settle_run(client=slow, deployment=env.deployment, force=True)
    assert Settlement.objects.get().status == "submitted"
    assert int(env.escrow.functions.earnings(payee.address).call()) == 900_000  # paid on chain, not in the ledger

    check = _check(env)

    assert check.ok, check.as_dict()
    assert check.in_flight["settlements mined, not yet confirmed"] == 1
    assert check.in_flight["budgets released by the ledger, not yet on chain"] == 1


def test_the_check_at_a_deeper_block_counts_a_confirmed_settlement_above_it_as_not_done_yet(env):
    _settled(env, "ben")

    check = ledger_check_run(client=env.client, deployment=env.deployment, confirmations=2)

    assert check.ok, check.as_dict()
    assert check.block == env.client.block_number() - 1
    assert check.in_flight["settlements confirmed above the checked block"] == 1


def test_the_check_passes_with_deposits_the_watcher_has_not_read_and_budgets_not_yet_reserved(env):
    renter, account = funded_renter(env, "cat")
    job = new_job(renter)  # admitted: its budget is reserved in the ledger, not yet on chain
    env.sign_budget(account, job, 2 * ONE)
    env.deposit(account, 3 * ONE)  # the watcher has not read it yet

    check = _check(env)

    assert check.ok, check.as_dict()
    assert check.in_flight["escrow events not yet read by the watcher"] == 1
    assert check.in_flight["budgets admitted, not yet reserved on chain"] == 1


def test_the_check_passes_while_a_reservation_is_mined_but_not_yet_confirmed(env):
    renter, account = funded_renter(env, "dan")
    job = new_job(renter)
    env.sign_budget(account, job, 2 * ONE)
    slow = ChainClient(env.client.web3, operator_account=env.client.account, confirmations=3, receipt_timeout_s=0.2)
    reserve_run(client=slow, deployment=env.deployment)
    assert env.escrow.functions.job(job.pk).call()[2] == 2 * ONE  # reserved on chain, not in the ledger

    check = _check(env)

    assert check.ok, check.as_dict()
    assert check.in_flight["reservation batches mined, not yet confirmed"] == 1


def test_a_finished_job_awaiting_its_release_is_in_flight_until_the_release_task_ran_without_releasing_it(env):
    _renter, _account, _payee, job, _lease = _settled(env, "eve", release=False)
    # The release task last ran before the job was finished: it has not had its chance yet.
    before = Job.objects.get(pk=job.pk).finished_at - timedelta(minutes=1)
    PeriodicTaskState.objects.create(
        name="billing.tasks.release_budgets", last_started_at=before, last_finished_at=before, last_ok=True
    )
    assert _check(env).ok

    # It has run since (and failed, say): the budget is stuck, not in flight.
    now = timezone.now()
    PeriodicTaskState.objects.filter(name="billing.tasks.release_budgets").update(
        last_started_at=now, last_finished_at=now, last_ok=False
    )
    check = _check(env)

    assert not check.ok
    assert check.problems == [f"job {job.pk} is finished and finally metered but still has {ONE} reserved"]


def test_a_job_closed_on_chain_with_less_settled_than_the_ledger_says_is_a_difference(env):
    from billing.release import jobs_release_on_chain

    renter, _account, _payee, job, lease = _settled(env, "fox")
    # The ledger pays one micro more for the lease than the chain did: a settlement the chain never made.
    services.ledger_post(
        kind="settlement_submit",
        idempotency_key="drift-submit",
        legs=[
            services.Leg(services.renter_available(renter.pk), -1),
            services.Leg(services.in_settlement(lease.pk), 1),
        ],
    )
    services.ledger_post(
        kind="settlement_confirm",
        idempotency_key="drift-confirm",
        legs=[
            services.Leg(services.in_settlement(lease.pk), -1),
            services.Leg(services.provider_payable(lease.machine.provider_id), 1),
        ],
    )
    assert jobs_release_on_chain(client=env.client, deployment=env.deployment)["released"] == 1

    check = _check(env)

    assert not check.ok
    assert (
        f"job {job.pk} is closed on chain with 1000000 settled for its last lease, the ledger says 1000001 was "
        f"paid for lease {lease.pk}"
    ) in check.differences
    assert any(d.startswith(f"provider {lease.machine.provider_id} ") for d in check.differences), check.differences
    assert any(d.startswith(f"renter {renter.pk} ") for d in check.differences), check.differences


def test_the_periodic_check_stores_its_last_result_and_fails_the_run_on_a_difference(env):
    _renter, _account, _payee, _job, lease = _settled(env, "gil")

    assert tasks.check_ledger()["ok"] is True
    latest = ledger_check_latest()
    assert latest is not None and latest.ok and latest.chain_compared
    assert latest.block_number == env.client.block_number() and latest.block_hash.startswith("0x")
    assert PeriodicTaskState.objects.get(name="billing.tasks.check_ledger").last_ok is True

    services.ledger_post(
        kind="settlement_confirm",
        idempotency_key="corruption",
        legs=[
            services.Leg(services.provider_payable(lease.machine.provider_id), -1),
            services.Leg(services.PLATFORM_FEES, 1),
        ],
    )
    result = tasks.check_ledger()

    assert result["ok"] is False and any(d.startswith("fees: ") for d in result["differences"])
    latest = ledger_check_latest()
    assert latest is not None and not latest.ok and LedgerCheck.objects.count() == 2
    assert "fees: the escrow accrued 100000, the ledger expects 100001 (platform_fees 100001)" in latest.differences
    state = PeriodicTaskState.objects.get(name="billing.tasks.check_ledger")
    assert (state.last_ok, state.consecutive_failures) == (False, 1)
    assert "fees: the escrow accrued 100000" in state.last_error


def test_the_check_fails_with_exit_2_when_the_chain_cannot_be_read(env, monkeypatch, capsys):
    down = ChainClient(
        Web3(Web3.HTTPProvider("http://127.0.0.1:9", exception_retry_configuration=None)),
        operator_account=env.client.account,
    )
    monkeypatch.setattr(billing.chain, "chain_client_from_settings", lambda **kwargs: down)

    with pytest.raises(CommandError) as failed:
        call_command("ledger_check")

    assert failed.value.returncode == 2
    assert "Chain: NOT compared: the chain node is unreachable" in capsys.readouterr().out
    result = tasks.check_ledger()
    assert result["ok"] is False and result["node_unavailable"].startswith("the chain node is unreachable")
    latest = ledger_check_latest()
    assert latest is not None and not latest.ok and not latest.chain_compared


def test_the_command_prints_what_it_compared_and_what_was_in_flight(env, capsys):
    _settled(env, "hu")
    env.deposit(env.account("hu"), ONE)

    call_command("ledger_check")

    out = capsys.readouterr().out
    head = env.client.block_number()
    assert f"Chain: compared at block {head} (0x" in out and f"head {head}, 1 confirmation(s))" in out
    assert "1 provider groups, 1 renters, 1 jobs, fees." in out
    assert (
        "In flight (accounted for):\n  1 budgets released by the ledger, not yet on chain\n"
        "  1 escrow events not yet read by the watcher\n"
    ) in out
    assert out.rstrip().endswith("OK: every invariant holds and the ledger agrees with the chain.")


def test_the_json_output_is_one_object(env, capsys):
    import json

    call_command("ledger_check", "--json")
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["chain_compared"] is True and data["differences"] == []
