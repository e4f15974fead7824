"""The deposit watcher on an in-process chain: each escrow event is posted once, unknown
depositors wait for their wallet link, and a reorg reverses what left the chain."""

from __future__ import annotations

import pytest

from billing.deposits import chain_watch, wallet_link
from billing.errors import ValidationFailed
from billing.models import ChainLog
from billing.selectors import renter_available_micro
from billing.tests._escrow_env import ONE, escrow_env
from tests.factories import RenterFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def env(tmp_path):  # type: ignore[no-untyped-def]
    return escrow_env(tmp_path)


def test_a_deposit_is_credited_once_even_when_the_same_blocks_are_read_twice(env):
    renter = RenterFactory(funds=0)
    alice = env.account("alice")
    wallet_link(renter=renter, address=alice.address)
    env.deposit(alice, 25 * ONE)

    first = chain_watch(client=env.client, deployment=env.deployment)
    assert first.credited == 1
    assert renter_available_micro(renter_id=renter.pk) == 25 * ONE

    # Rewind the cursor as a crashed run would leave it: the same logs are read again.
    ChainLog.objects.update()  # no-op: rows stay
    from billing.models import ChainCursor

    ChainCursor.objects.update(last_block=env.deployment.deployment_block - 1, last_block_hash="", recent_blocks=[])
    again = chain_watch(client=env.client, deployment=env.deployment)
    assert again.logs == 1 and again.credited == 0
    assert renter_available_micro(renter_id=renter.pk) == 25 * ONE
    assert env.disagreements({renter.pk: alice.address}, {}) == []


def test_a_deposit_from_an_unknown_address_is_credited_when_the_renter_links_it(env):
    renter = RenterFactory(funds=0)
    bob = env.account("bob")
    env.deposit(bob, 7 * ONE)

    result = chain_watch(client=env.client, deployment=env.deployment)
    assert result.unmatched == 1
    assert renter_available_micro(renter_id=renter.pk) == 0
    assert ChainLog.objects.get().status == "unmatched"

    wallet_link(renter=renter, address=bob.address.upper().replace("0X", "0x"))
    assert renter_available_micro(renter_id=renter.pk) == 7 * ONE
    assert ChainLog.objects.get().status == "credited"
    wallet_link(renter=renter, address=bob.address)  # linking again credits nothing more
    assert renter_available_micro(renter_id=renter.pk) == 7 * ONE


def test_an_address_cannot_be_linked_to_two_renters_or_be_malformed(env):
    first, second = RenterFactory(funds=0), RenterFactory(funds=0)
    wallet_link(renter=first, address="0x" + "ab" * 20)
    with pytest.raises(ValidationFailed) as taken:
        wallet_link(renter=second, address="0x" + "AB" * 20)
    assert taken.value.code == "wallet_taken"
    with pytest.raises(ValidationFailed) as malformed:
        wallet_link(renter=second, address="0x1234")
    assert malformed.value.code == "invalid_address"


def test_a_reorg_reverses_the_deposit_that_left_the_chain(env):
    renter = RenterFactory(funds=0)
    carol = env.account("carol")
    wallet_link(renter=renter, address=carol.address)
    env.deposit(carol, 10 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)
    tester = env.client.web3.provider.ethereum_tester
    snapshot = tester.take_snapshot()

    env.deposit(carol, 5 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)
    assert renter_available_micro(renter_id=renter.pk) == 15 * ONE

    # The second deposit's blocks are replaced by a longer chain without it.
    tester.revert_to_snapshot(snapshot)
    tester.mine_blocks(10)
    result = chain_watch(client=env.client, deployment=env.deployment)

    assert result.reorg and result.rewound == 1
    assert renter_available_micro(renter_id=renter.pk) == 10 * ONE
    assert sorted(ChainLog.objects.values_list("status", flat=True)) == ["credited", "rewound"]
    assert env.disagreements({renter.pk: carol.address}, {}) == []


def test_a_withdrawal_of_money_backing_unreserved_jobs_cancels_them_and_the_ledger_balances(env):
    from django.core.management import call_command

    from billing.selectors import job_budget
    from billing.services import job_budget_reserve
    from jobs.models import Event, Job
    from tests.factories import JobFactory

    renter = RenterFactory(funds=0)
    dave = env.account("dave")
    wallet_link(renter=renter, address=dave.address)
    env.deposit(dave, 3 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)
    job = JobFactory(renter=renter, max_price_per_gpu_hour="1.00", max_duration_s=7200)
    job_budget_reserve(job=job)  # admitted: 2 tokens reserved off chain; the escrow holds nothing for it
    env.send_as(dave, env.escrow.functions.withdraw(3 * ONE))

    result = chain_watch(client=env.client, deployment=env.deployment)

    assert result.credited == 1 and result.flagged == 0
    assert Job.objects.get(pk=job.pk).status == Job.Status.CANCELLED
    assert Event.objects.filter(job=job, kind="budget.unfunded").exists()
    assert job_budget(job_id=job.pk).released == 2 * ONE
    assert renter_available_micro(renter_id=renter.pk) == 0
    call_command("ledger_check")
    assert env.disagreements({renter.pk: dave.address}, {}) == []


def test_a_withdrawal_of_money_a_job_that_already_ran_holds_is_flagged_not_crashing(env):
    """Only a job admitted before budgets were reserved ahead of the work can have run without
    the escrow holding its budget; the watcher cannot cancel it, so the withdrawal is flagged."""
    from billing.deposits import chain_flags
    from billing.tests._escrow_env import charged_job

    renter = RenterFactory(funds=0)
    erin = env.account("erin")
    wallet_link(renter=renter, address=erin.address)
    env.deposit(erin, 3 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)
    charged_job(renter)  # reserves 2 tokens off chain and ran; nothing is reserved on chain
    env.send_as(erin, env.escrow.functions.withdraw(3 * ONE))

    result = chain_watch(client=env.client, deployment=env.deployment)
    assert result.flagged == 1
    flags = chain_flags()
    assert len(flags) == 1 and "Withdrawn" in flags[0] and "even after cancelling" in flags[0]


def test_a_withdrawal_read_with_a_later_deposit_of_the_same_range_cancels_nothing(env):
    """The ledger follows the chain late: the renter withdrew everything and deposited again
    before the watcher read either, and a job was admitted meanwhile. Read in chain order the
    withdrawal finds the job's budget held; the range's deposit covers it, so no job is cancelled."""
    from billing.services import job_budget_reserve
    from jobs.models import Job
    from tests.factories import JobFactory

    renter = RenterFactory(funds=0)
    fay = env.account("fay")
    wallet_link(renter=renter, address=fay.address)
    env.deposit(fay, 3 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)
    env.send_as(fay, env.escrow.functions.withdraw(3 * ONE))
    env.deposit(fay, 5 * ONE)
    job = JobFactory(renter=renter, max_price_per_gpu_hour="1.00", max_duration_s=7200)
    job_budget_reserve(job=job)  # admitted on the 3 tokens the ledger still shows: 1 left free

    result = chain_watch(client=env.client, deployment=env.deployment)

    assert result.credited == 2 and result.flagged == 0
    assert Job.objects.get(pk=job.pk).status == Job.Status.PENDING
    assert renter_available_micro(renter_id=renter.pk) == 3 * ONE  # 1 + 5 - 3; 2 still held by the job


def test_a_flagged_withdrawal_is_posted_once_its_address_deposits_again(env):
    from billing.deposits import chain_flags
    from billing.tests._escrow_env import charged_job

    renter = RenterFactory(funds=0)
    gus = env.account("gus")
    wallet_link(renter=renter, address=gus.address)
    env.deposit(gus, 3 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)
    charged_job(renter)  # 2 tokens held off chain by a job that ran; the escrow holds none of it
    env.send_as(gus, env.escrow.functions.withdraw(3 * ONE))
    assert chain_watch(client=env.client, deployment=env.deployment).flagged == 1

    env.deposit(gus, 4 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)

    assert chain_flags() == []
    assert ChainLog.objects.get(event="Withdrawn").status == ChainLog.Status.CREDITED
    assert renter_available_micro(renter_id=renter.pk) == 2 * ONE  # 1 + 4 - 3


def test_a_withdrawal_that_comes_back_after_its_reversal_was_spent_does_not_stop_the_watcher(env):
    """A reorg took a withdrawal's block away (the renter's money given back in the ledger), the
    renter spent it on a job, and the chain mined the withdrawal again: posting it anew raised and
    rolled back the whole range, in every later run, so nobody's deposits were credited again."""
    from billing.services import job_budget_reserve
    from jobs.models import Job
    from tests.factories import JobFactory

    renter, other = RenterFactory(funds=0), RenterFactory(funds=0)
    fay, gus = env.account("fay"), env.account("gus")
    wallet_link(renter=renter, address=fay.address)
    wallet_link(renter=other, address=gus.address)
    env.deposit(fay, 10 * ONE)
    chain_watch(client=env.client, deployment=env.deployment)
    tester = env.client.web3.provider.ethereum_tester
    snapshot = tester.take_snapshot()
    w3 = env.client.web3
    signed = fay.sign_transaction(
        env.escrow.functions.withdraw(4 * ONE).build_transaction(
            {
                "from": fay.address,
                "nonce": w3.eth.get_transaction_count(fay.address),
                "gas": 300_000,
                "maxFeePerGas": 10**11,
                "maxPriorityFeePerGas": 10**9,
                "chainId": w3.eth.chain_id,
            }
        )
    )

    def withdraw() -> None:
        w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))

    withdraw()
    chain_watch(client=env.client, deployment=env.deployment)
    assert renter_available_micro(renter_id=renter.pk) == 6 * ONE

    tester.revert_to_snapshot(snapshot)  # the withdrawal's block leaves the chain
    tester.mine_blocks(3)
    assert chain_watch(client=env.client, deployment=env.deployment).rewound == 1
    assert renter_available_micro(renter_id=renter.pk) == 10 * ONE
    job = JobFactory(renter=renter, max_price_per_gpu_hour="1.00", max_duration_s=8 * 3600)
    job_budget_reserve(job=job)  # 8 of the 10 the ledger shows, not reserved in the escrow
    withdraw()  # the same transaction, mined again
    assert ChainLog.objects.filter(event="Withdrawn", status="rewound").count() == 1
    env.deposit(gus, 3 * ONE)

    result = chain_watch(client=env.client, deployment=env.deployment)

    assert ChainLog.objects.get(event="Withdrawn").status == "credited"
    assert Job.objects.get(pk=job.pk).status == Job.Status.CANCELLED
    assert renter_available_micro(renter_id=renter.pk) == 6 * ONE
    assert renter_available_micro(renter_id=other.pk) == 3 * ONE  # the watcher goes on
    assert result.flagged == 0
    assert env.disagreements({renter.pk: fay.address, other.pk: gus.address}, {}) == []
