"""Settlement on an in-process chain: the ledger and the escrow agree after every batch."""

from __future__ import annotations

import pytest

from billing import settlement as engine
from billing.models import Settlement
from billing.selectors import provider_payable_micro
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
