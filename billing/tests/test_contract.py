"""The escrow contract through web3, on the in-process EVM and on a real anvil node (`chain` fixture)."""

from __future__ import annotations

import pytest
from eth_account import Account

from billing.contract import (
    BUDGET_SKIP_ALREADY_KNOWN,
    BUDGET_SKIP_EXPIRED,
    BUDGET_SKIP_INSUFFICIENT_BALANCE,
    BUDGET_SKIP_INVALID_BUDGET,
    BUDGET_SKIP_INVALID_SIGNATURE,
    MAX_UINT96,
    SKIP_JOB_CLOSED,
    SKIP_STALE_LEASE,
    SKIP_UNKNOWN_JOB,
    BudgetAuthorization,
    SettlementItem,
    revert_decode,
    settlement_items_encode,
)
from billing.tests.conftest import INITIAL_FEE_BPS, ONE_TOKEN, Chain


def item(job_id: int, provider: str, cumulative: int, lease_id: int = 1) -> SettlementItem:
    return SettlementItem(lease_id=lease_id, job_id=job_id, provider=provider, cumulative_charge=cumulative)


def fee_of(amount: int, bps: int = INITIAL_FEE_BPS) -> int:
    return amount * bps // 10_000


def job_state(chain: Chain, job_id: int) -> dict[str, object]:
    renter, deadline, remaining, lease_id, settled, closed = chain.escrow.functions.job(job_id).call()
    return {
        "renter": renter,
        "deadline": deadline,
        "remaining": remaining,
        "lease_id": lease_id,
        "settled": settled,
        "closed": closed,
    }


def earnings(chain: Chain, provider: str) -> int:
    return chain.escrow.functions.earnings(provider).call()


def available(chain: Chain, renter: str) -> int:
    return chain.escrow.functions.availableBalance(renter).call()


def assert_escrow_holds_what_it_owes(chain: Chain, job_ids: list[int]) -> None:
    """The conservation invariant, over every account and job the test touched."""
    owed = sum(available(chain, r.address) for r in chain.renters)
    owed += sum(job_state(chain, j)["remaining"] for j in job_ids)  # type: ignore[misc]
    owed += sum(earnings(chain, p.address) for p in chain.providers)
    owed += chain.escrow.functions.feesAccrued().call()
    assert chain.token_balance(chain.escrow.address) == owed


@pytest.fixture
def funded_job(chain: Chain) -> tuple[int, BudgetAuthorization]:
    """Renter 0 has deposited 100 tokens and signed a 40-token budget for a fresh job (not yet activated)."""
    chain.fund_renter(chain.renters[0], 100 * ONE_TOKEN)
    job_id = chain.new_job_id()
    return job_id, chain.budget(chain.renters[0], job_id, 40 * ONE_TOKEN)


# ---------------------------------------------------------------------------- roles


def test_non_operator_cannot_settle(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    call = chain.settle_call([item(job_id, chain.providers[0].address, ONE_TOKEN)], [budget])

    for stranger in (chain.outsider, chain.renters[0], chain.admin):
        assert chain.revert_of(call, stranger).name == "AccessControlUnauthorizedAccount"
    assert job_state(chain, job_id)["renter"] == "0x0000000000000000000000000000000000000000"
    assert available(chain, chain.renters[0].address) == 100 * ONE_TOKEN


def test_admin_grants_and_revokes_the_operator_role(chain: Chain) -> None:
    operator_role = chain.escrow.functions.OPERATOR_ROLE().call()
    empty_batch = chain.settle_call([])
    assert chain.revert_of(empty_batch, chain.outsider).name == "AccessControlUnauthorizedAccount"

    chain.send(chain.escrow.functions.grantRole(operator_role, chain.outsider.address), chain.admin)
    chain.send(empty_batch, chain.outsider)

    chain.send(chain.escrow.functions.revokeRole(operator_role, chain.outsider.address), chain.admin)
    assert chain.revert_of(empty_batch, chain.outsider).name == "AccessControlUnauthorizedAccount"


def test_only_the_admin_grants_roles_and_sets_the_fee(chain: Chain) -> None:
    operator_role = chain.escrow.functions.OPERATOR_ROLE().call()
    grant = chain.escrow.functions.grantRole(operator_role, chain.outsider.address)
    assert chain.revert_of(grant, chain.operator).name == "AccessControlUnauthorizedAccount"
    assert chain.revert_of(chain.escrow.functions.setFee(0), chain.operator).name == "AccessControlUnauthorizedAccount"
    set_treasury = chain.escrow.functions.setTreasury(chain.outsider.address)
    assert chain.revert_of(set_treasury, chain.outsider).name == "AccessControlUnauthorizedAccount"
    assert chain.escrow.functions.feeBps().call() == INITIAL_FEE_BPS


# ---------------------------------------------------------------------------- deposits and withdrawals


def test_renter_deposits_and_withdraws_unreserved_balance(chain: Chain) -> None:
    renter = chain.renters[1]
    chain.fund_renter(renter, 50 * ONE_TOKEN)
    assert available(chain, renter.address) == 50 * ONE_TOKEN
    assert chain.token_balance(renter.address) == 0

    receipt = chain.send(chain.escrow.functions.withdraw(20 * ONE_TOKEN), renter)

    assert chain.token_balance(renter.address) == 20 * ONE_TOKEN
    assert available(chain, renter.address) == 30 * ONE_TOKEN
    [event] = chain.events(receipt, "Withdrawn")
    assert event["args"]["amount"] == 20 * ONE_TOKEN
    assert_escrow_holds_what_it_owes(chain, [])


def test_reserved_funds_cannot_be_withdrawn(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    renter = chain.renters[0]
    chain.settle([], [budget])
    assert available(chain, renter.address) == 60 * ONE_TOKEN

    error = chain.revert_of(chain.escrow.functions.withdraw(60 * ONE_TOKEN + 1), renter)

    assert error.name == "GpgpuEscrow_InsufficientBalance"
    assert error.args[1:] == (60 * ONE_TOKEN, 60 * ONE_TOKEN + 1)
    chain.send(chain.escrow.functions.withdraw(60 * ONE_TOKEN), renter)
    assert chain.token_balance(renter.address) == 60 * ONE_TOKEN
    assert job_state(chain, job_id)["remaining"] == 40 * ONE_TOKEN
    assert_escrow_holds_what_it_owes(chain, [job_id])


def test_zero_deposit_and_zero_withdrawal_are_refused(chain: Chain) -> None:
    renter = chain.renters[0]
    assert chain.revert_of(chain.escrow.functions.deposit(0), renter).name == "GpgpuEscrow_ZeroAmount"
    assert chain.revert_of(chain.escrow.functions.withdraw(0), renter).name == "GpgpuEscrow_ZeroAmount"


def test_deposit_without_allowance_reverts_with_the_token_error(chain: Chain) -> None:
    renter = chain.renters[2]
    chain.send(chain.token.functions.mint(renter.address, ONE_TOKEN), renter)

    error = chain.revert_of(chain.escrow.functions.deposit(ONE_TOKEN), renter)

    assert error.name == "ERC20InsufficientAllowance"
    assert available(chain, renter.address) == 0


# ---------------------------------------------------------------------------- budgets


def test_first_settlement_reserves_the_signed_budget(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    provider = chain.providers[0].address

    receipt = chain.settle([item(job_id, provider, 3 * ONE_TOKEN)], [budget])

    [reserved] = chain.events(receipt, "BudgetReserved")
    assert reserved["args"]["maxAmount"] == 40 * ONE_TOKEN
    state = job_state(chain, job_id)
    assert state["renter"] == chain.renters[0].address
    assert state["remaining"] == 37 * ONE_TOKEN
    assert available(chain, chain.renters[0].address) == 60 * ONE_TOKEN
    assert earnings(chain, provider) == 3 * ONE_TOKEN - fee_of(3 * ONE_TOKEN)
    assert_escrow_holds_what_it_owes(chain, [job_id])


def skips(chain: Chain, receipt: object) -> list[tuple[int, str, int]]:
    """(jobId, renter, reason) of every BudgetSkipped in the receipt, in order."""
    return [
        (e["args"]["jobId"], e["args"]["renter"], e["args"]["reason"]) for e in chain.events(receipt, "BudgetSkipped")
    ]


def test_reserve_moves_the_budget_out_of_reach_before_any_work(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    job_id, budget = funded_job
    renter = chain.renters[0]

    receipt = chain.reserve([budget])

    [reserved] = chain.events(receipt, "BudgetReserved")
    assert (reserved["args"]["jobId"], reserved["args"]["renter"]) == (job_id, renter.address)
    assert reserved["args"]["maxAmount"] == 40 * ONE_TOKEN
    assert reserved["args"]["deadline"] == budget.deadline
    assert skips(chain, receipt) == [] and chain.events(receipt, "Settled") == []
    assert job_state(chain, job_id)["remaining"] == 40 * ONE_TOKEN
    assert available(chain, renter.address) == 60 * ONE_TOKEN
    error = chain.revert_of(chain.escrow.functions.withdraw(60 * ONE_TOKEN + 1), renter)
    assert error.name == "GpgpuEscrow_InsufficientBalance"
    # A lease settled later is paid from the reservation, with no budget in its batch.
    chain.settle([item(job_id, chain.providers[0].address, 40 * ONE_TOKEN)])
    assert earnings(chain, chain.providers[0].address) == 40 * ONE_TOKEN - fee_of(40 * ONE_TOKEN)
    assert_escrow_holds_what_it_owes(chain, [job_id])


def test_only_the_operator_reserves_never_while_paused_and_never_nothing(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    job_id, budget = funded_job
    call = chain.reserve_call([budget])

    for stranger in (chain.outsider, chain.renters[0], chain.admin):
        assert chain.revert_of(call, stranger).name == "AccessControlUnauthorizedAccount"
    assert chain.revert_of(chain.reserve_call([]), chain.operator).name == "GpgpuEscrow_NoBudgets"
    chain.send(chain.escrow.functions.pause(), chain.pauser)
    assert chain.revert_of(call, chain.operator).name == "EnforcedPause"
    chain.send(chain.escrow.functions.unpause(), chain.pauser)
    chain.send(call, chain.operator)
    assert job_state(chain, job_id)["remaining"] == 40 * ONE_TOKEN


def test_budget_signed_by_someone_else_is_skipped_and_the_batch_goes_on(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    job_id, _ = funded_job
    impostor = Account.from_key(b"\x01" * 32)
    forged = chain.budget(impostor, job_id, 40 * ONE_TOKEN)
    claims_renter = BudgetAuthorization(
        job_id=job_id,
        renter=chain.renters[0].address,
        max_amount=forged.max_amount,
        deadline=forged.deadline,
        signature=forged.signature,
    )
    honest = chain.renters[1]
    chain.fund_renter(honest, 5 * ONE_TOKEN)
    other_job = chain.new_job_id()

    receipt = chain.reserve([claims_renter, chain.budget(honest, other_job, 5 * ONE_TOKEN)])

    assert skips(chain, receipt) == [(job_id, chain.renters[0].address, BUDGET_SKIP_INVALID_SIGNATURE)]
    [reserved] = chain.events(receipt, "BudgetReserved")
    assert reserved["args"]["jobId"] == other_job
    assert job_state(chain, job_id)["renter"] == "0x0000000000000000000000000000000000000000"
    assert available(chain, chain.renters[0].address) == 100 * ONE_TOKEN
    assert available(chain, honest.address) == 0
    assert_escrow_holds_what_it_owes(chain, [job_id, other_job])


def test_budget_with_a_raised_amount_is_skipped(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    tampered = BudgetAuthorization(
        job_id=job_id,
        renter=budget.renter,
        max_amount=budget.max_amount * 2,
        deadline=budget.deadline,
        signature=budget.signature,
    )
    garbage = BudgetAuthorization(
        job_id=job_id, renter=budget.renter, max_amount=1, deadline=budget.deadline, signature=b"\x00" * 65
    )

    for bad in (tampered, garbage):
        assert skips(chain, chain.reserve([bad])) == [(job_id, budget.renter, BUDGET_SKIP_INVALID_SIGNATURE)]
        assert skips(chain, chain.settle([], [bad])) == [(job_id, budget.renter, BUDGET_SKIP_INVALID_SIGNATURE)]
    assert job_state(chain, job_id)["remaining"] == 0
    assert available(chain, budget.renter) == 100 * ONE_TOKEN


def test_expired_budget_is_skipped(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, _ = funded_job
    expired = chain.budget(chain.renters[0], job_id, 40 * ONE_TOKEN, deadline=chain.now() - 1)

    receipt = chain.reserve([expired])

    assert skips(chain, receipt) == [(job_id, chain.renters[0].address, BUDGET_SKIP_EXPIRED)]
    assert chain.events(receipt, "BudgetReserved") == []
    assert available(chain, chain.renters[0].address) == 100 * ONE_TOKEN


def test_malformed_budgets_are_skipped(chain: Chain) -> None:
    renter = chain.renters[2]
    chain.fund_renter(renter, ONE_TOKEN)
    zero, huge = chain.new_job_id(), chain.new_job_id()

    receipt = chain.reserve([chain.budget(renter, zero, 0), chain.budget(renter, huge, MAX_UINT96 + 1)])

    assert skips(chain, receipt) == [
        (zero, renter.address, BUDGET_SKIP_INVALID_BUDGET),
        (huge, renter.address, BUDGET_SKIP_INVALID_BUDGET),
    ]
    assert available(chain, renter.address) == ONE_TOKEN


def test_budget_above_available_balance_is_skipped_and_others_are_reserved(chain: Chain) -> None:
    renter, other = chain.renters[1], chain.renters[2]
    chain.fund_renter(renter, 10 * ONE_TOKEN)
    chain.fund_renter(other, 3 * ONE_TOKEN)
    too_big, first, second, others = (chain.new_job_id() for _ in range(4))

    receipt = chain.reserve(
        [
            chain.budget(renter, too_big, 11 * ONE_TOKEN),
            chain.budget(renter, first, 6 * ONE_TOKEN),
            # Together with `first` more than the renter has: the first in the batch wins.
            chain.budget(renter, second, 6 * ONE_TOKEN),
            chain.budget(other, others, 3 * ONE_TOKEN),
        ]
    )

    assert skips(chain, receipt) == [
        (too_big, renter.address, BUDGET_SKIP_INSUFFICIENT_BALANCE),
        (second, renter.address, BUDGET_SKIP_INSUFFICIENT_BALANCE),
    ]
    assert [e["args"]["jobId"] for e in chain.events(receipt, "BudgetReserved")] == [first, others]
    assert available(chain, renter.address) == 4 * ONE_TOKEN
    assert available(chain, other.address) == 0
    assert_escrow_holds_what_it_owes(chain, [too_big, first, second, others])


def test_charge_above_budget_is_capped_at_the_budget(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    provider = chain.providers[0].address

    receipt = chain.settle([item(job_id, provider, 55 * ONE_TOKEN)], [budget])

    [capped] = chain.events(receipt, "ChargeCapped")
    assert capped["args"]["refused"] == 15 * ONE_TOKEN
    assert earnings(chain, provider) == 40 * ONE_TOKEN - fee_of(40 * ONE_TOKEN)
    assert job_state(chain, job_id)["remaining"] == 0

    chain.settle([item(job_id, provider, 70 * ONE_TOKEN), item(job_id, provider, 5 * ONE_TOKEN, lease_id=2)])

    assert earnings(chain, provider) == 40 * ONE_TOKEN - fee_of(40 * ONE_TOKEN)
    assert available(chain, chain.renters[0].address) == 60 * ONE_TOKEN
    assert_escrow_holds_what_it_owes(chain, [job_id])


def test_second_job_cannot_spend_the_first_jobs_reservation(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    first_job, first_budget = funded_job
    second_job = chain.new_job_id()
    second_budget = chain.budget(chain.renters[0], second_job, 10 * ONE_TOKEN)
    provider = chain.providers[1].address

    chain.settle([item(second_job, provider, 30 * ONE_TOKEN)], [first_budget, second_budget])

    assert job_state(chain, first_job)["remaining"] == 40 * ONE_TOKEN
    assert job_state(chain, second_job)["remaining"] == 0
    assert earnings(chain, provider) == 10 * ONE_TOKEN - fee_of(10 * ONE_TOKEN)
    assert_escrow_holds_what_it_owes(chain, [first_job, second_job])


def test_replayed_budget_does_not_reserve_twice(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    chain.reserve([budget])

    replays = [chain.reserve([budget]), chain.settle([], [budget])]

    for receipt in replays:
        assert chain.events(receipt, "BudgetReserved") == []
        assert skips(chain, receipt) == [(job_id, budget.renter, BUDGET_SKIP_ALREADY_KNOWN)]
    assert available(chain, chain.renters[0].address) == 60 * ONE_TOKEN
    assert job_state(chain, job_id)["remaining"] == 40 * ONE_TOKEN


def test_items_for_unknown_jobs_are_skipped_and_the_rest_is_paid(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    job_id, budget = funded_job
    provider = chain.providers[0].address
    unknown_job = 9_999

    receipt = chain.settle(
        [item(unknown_job, provider, 7 * ONE_TOKEN), item(job_id, provider, 2 * ONE_TOKEN)], [budget]
    )

    [skipped] = chain.events(receipt, "SettlementItemSkipped")
    assert (skipped["args"]["jobId"], skipped["args"]["reason"]) == (unknown_job, SKIP_UNKNOWN_JOB)
    assert earnings(chain, provider) == 2 * ONE_TOKEN - fee_of(2 * ONE_TOKEN)


def test_release_returns_the_unspent_reservation_and_closes_the_job(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    job_id, budget = funded_job
    provider = chain.providers[0].address
    chain.settle([item(job_id, provider, 15 * ONE_TOKEN)], [budget])

    receipt = chain.send(chain.escrow.functions.releaseJob(job_id, 0, 0), chain.operator)

    [released] = chain.events(receipt, "JobReleased")
    assert released["args"]["refunded"] == 25 * ONE_TOKEN
    assert available(chain, chain.renters[0].address) == 85 * ONE_TOKEN
    assert job_state(chain, job_id)["closed"] is True

    later = chain.settle([item(job_id, provider, 20 * ONE_TOKEN)])
    [skipped] = chain.events(later, "SettlementItemSkipped")
    assert skipped["args"]["reason"] == SKIP_JOB_CLOSED
    assert earnings(chain, provider) == 15 * ONE_TOKEN - fee_of(15 * ONE_TOKEN)
    error = chain.revert_of(chain.escrow.functions.releaseJob(job_id, 0, 0), chain.operator)
    assert error.name == "GpgpuEscrow_JobClosed"
    assert_escrow_holds_what_it_owes(chain, [job_id])


def test_a_release_expecting_more_settled_than_the_escrow_holds_reverts_and_leaves_the_job_open(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    job_id, budget = funded_job
    chain.settle([item(job_id, chain.providers[0].address, 15 * ONE_TOKEN, lease_id=3)], [budget])

    # The caller holds more settled than the escrow: a later lease, or more of the same one.
    for expected in [(4, 0), (3, 15 * ONE_TOKEN + 1)]:
        error = chain.revert_of(chain.escrow.functions.releaseJob(job_id, *expected), chain.operator)
        assert (error.name, error.args) == ("GpgpuEscrow_SettlementBehind", (job_id, 3, 15 * ONE_TOKEN))
        assert job_state(chain, job_id)["closed"] is False and job_state(chain, job_id)["remaining"] == 25 * ONE_TOKEN

    # Exactly what it holds (or less: an older lease) closes the job.
    chain.send(chain.escrow.functions.releaseJob(job_id, 3, 15 * ONE_TOKEN), chain.operator)
    assert job_state(chain, job_id)["closed"] is True
    assert available(chain, chain.renters[0].address) == 85 * ONE_TOKEN


def test_renter_may_release_only_after_the_deadline(chain: Chain) -> None:
    renter = chain.renters[1]
    chain.fund_renter(renter, 10 * ONE_TOKEN)
    job_id = chain.new_job_id()
    chain.settle([], [chain.budget(renter, job_id, 10 * ONE_TOKEN, deadline=chain.now() + 600)])
    release = chain.escrow.functions.releaseJob(job_id, 0, 0)

    assert chain.revert_of(release, renter).name == "GpgpuEscrow_ReleaseNotAllowed"
    chain.advance_time(601)
    assert chain.revert_of(release, chain.outsider).name == "GpgpuEscrow_ReleaseNotAllowed"
    chain.send(release, renter)

    assert available(chain, renter.address) == 10 * ONE_TOKEN
    assert (
        chain.revert_of(chain.escrow.functions.releaseJob(12_345, 0, 0), chain.operator).name
        == "GpgpuEscrow_UnknownJob"
    )


# ---------------------------------------------------------------------------- cumulative settlement


def test_replaying_a_batch_pays_nothing_twice(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    provider = chain.providers[0].address
    batch = [item(job_id, provider, 4 * ONE_TOKEN)]
    chain.settle(batch, [budget])
    paid_once = earnings(chain, provider)

    receipt = chain.settle(batch, [budget])

    assert earnings(chain, provider) == paid_once
    [settled] = chain.events(receipt, "Settled")
    assert settled["args"]["paid"] == 0
    assert job_state(chain, job_id)["remaining"] == 36 * ONE_TOKEN


def test_increasing_cumulative_charge_pays_only_the_difference(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    job_id, budget = funded_job
    provider = chain.providers[0].address
    chain.settle([item(job_id, provider, 4 * ONE_TOKEN)], [budget])

    receipt = chain.settle([item(job_id, provider, 9 * ONE_TOKEN)])

    [settled] = chain.events(receipt, "Settled")
    assert settled["args"]["paid"] == 5 * ONE_TOKEN
    assert job_state(chain, job_id)["remaining"] == 31 * ONE_TOKEN
    assert earnings(chain, provider) == 9 * ONE_TOKEN - fee_of(4 * ONE_TOKEN) - fee_of(5 * ONE_TOKEN)


def test_lower_cumulative_charge_pays_nothing(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    provider = chain.providers[0].address
    chain.settle([item(job_id, provider, 9 * ONE_TOKEN)], [budget])

    chain.settle([item(job_id, provider, 3 * ONE_TOKEN)])
    chain.settle([item(job_id, provider, 10 * ONE_TOKEN)])

    # Only the increase over the highest settled charge was paid: 9, then 1.
    assert job_state(chain, job_id)["remaining"] == 30 * ONE_TOKEN


def test_next_lease_is_paid_from_zero_and_a_stale_lease_is_skipped(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    job_id, budget = funded_job
    first, second = chain.providers[0].address, chain.providers[1].address
    chain.settle([item(job_id, first, 6 * ONE_TOKEN, lease_id=1)], [budget])

    chain.settle([item(job_id, second, 2 * ONE_TOKEN, lease_id=2)])
    receipt = chain.settle([item(job_id, first, 8 * ONE_TOKEN, lease_id=1)])

    [skipped] = chain.events(receipt, "SettlementItemSkipped")
    assert skipped["args"]["reason"] == SKIP_STALE_LEASE
    assert earnings(chain, second) == 2 * ONE_TOKEN - fee_of(2 * ONE_TOKEN)
    assert earnings(chain, first) == 6 * ONE_TOKEN - fee_of(6 * ONE_TOKEN)
    assert job_state(chain, job_id)["remaining"] == 32 * ONE_TOKEN


def test_consecutive_items_of_one_provider_are_credited_once(chain: Chain) -> None:
    renter = chain.renters[0]
    chain.fund_renter(renter, 100 * ONE_TOKEN)
    jobs = [chain.new_job_id() for _ in range(3)]
    budgets = [chain.budget(renter, j, 10 * ONE_TOKEN) for j in jobs]
    provider, other = chain.providers[0].address, chain.providers[1].address

    receipt = chain.settle(
        [item(jobs[0], provider, ONE_TOKEN), item(jobs[1], provider, ONE_TOKEN), item(jobs[2], other, ONE_TOKEN)],
        budgets,
    )

    credits = [(e["args"]["provider"], e["args"]["amount"]) for e in chain.events(receipt, "EarningsCredited")]
    net = ONE_TOKEN - fee_of(ONE_TOKEN)
    assert credits == [(provider, 2 * net), (other, net)]
    assert_escrow_holds_what_it_owes(chain, jobs)


def test_malformed_item_words_revert_the_batch(chain: Chain) -> None:
    words = settlement_items_encode([item(1, chain.providers[0].address, 1)])[:1]

    error = chain.revert_of(chain.escrow.functions.settle(words, []), chain.operator)

    assert error.name == "GpgpuEscrow_MalformedItems"


# ---------------------------------------------------------------------------- fees


def test_fee_above_the_cap_is_refused(chain: Chain) -> None:
    cap = chain.escrow.functions.MAX_FEE_BPS().call()

    error = chain.revert_of(chain.escrow.functions.setFee(cap + 1), chain.admin)

    assert error.name == "GpgpuEscrow_FeeTooHigh"
    assert error.args == (cap + 1, cap)
    chain.send(chain.escrow.functions.setFee(cap), chain.admin)
    assert chain.escrow.functions.feeBps().call() == cap


def test_fee_rounds_down_and_fee_plus_payout_equals_the_charge(
    chain: Chain, funded_job: tuple[int, BudgetAuthorization]
) -> None:
    job_id, budget = funded_job
    provider = chain.providers[2].address
    chain.send(chain.escrow.functions.setFee(333), chain.admin)

    chain.settle([item(job_id, provider, 1_001)], [budget])
    chain.settle([item(job_id, provider, 1_030)])

    # 1001 * 3.33 % = 33.33 -> 33; 29 * 3.33 % = 0.97 -> 0.
    assert chain.escrow.functions.feesAccrued().call() == 33
    assert earnings(chain, provider) == 1_030 - 33
    assert job_state(chain, job_id)["remaining"] == 40 * ONE_TOKEN - 1_030
    assert_escrow_holds_what_it_owes(chain, [job_id])


def test_treasury_alone_withdraws_the_fees(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    chain.settle([item(job_id, chain.providers[0].address, 20 * ONE_TOKEN)], [budget])
    fees = fee_of(20 * ONE_TOKEN)

    assert chain.revert_of(chain.escrow.functions.withdrawFees(), chain.admin).name == "GpgpuEscrow_NotTreasury"
    chain.send(chain.escrow.functions.withdrawFees(), chain.treasury)

    assert chain.token_balance(chain.treasury.address) == fees
    assert chain.escrow.functions.feesAccrued().call() == 0
    error = chain.revert_of(chain.escrow.functions.withdrawFees(), chain.treasury)
    assert error.name == "GpgpuEscrow_NothingToWithdraw"
    assert_escrow_holds_what_it_owes(chain, [job_id])


# ---------------------------------------------------------------------------- pause


def test_pause_blocks_deposits_and_settlements(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    renter = chain.renters[0]
    assert chain.revert_of(chain.escrow.functions.pause(), chain.operator).name == "AccessControlUnauthorizedAccount"
    chain.send(chain.escrow.functions.pause(), chain.pauser)
    chain.send(chain.token.functions.mint(renter.address, ONE_TOKEN), renter)
    chain.send(chain.token.functions.approve(chain.escrow.address, ONE_TOKEN), renter)
    settle = chain.settle_call([item(job_id, chain.providers[0].address, ONE_TOKEN)], [budget])

    assert chain.revert_of(settle, chain.operator).name == "EnforcedPause"
    assert chain.revert_of(chain.escrow.functions.deposit(ONE_TOKEN), renter).name == "EnforcedPause"

    chain.send(chain.escrow.functions.unpause(), chain.admin)
    chain.send(settle, chain.operator)
    assert earnings(chain, chain.providers[0].address) == ONE_TOKEN - fee_of(ONE_TOKEN)


def test_withdrawals_stay_open_while_paused(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    renter, provider = chain.renters[0], chain.providers[0]
    chain.settle([item(job_id, provider.address, 10 * ONE_TOKEN)], [budget])
    chain.send(chain.escrow.functions.pause(), chain.pauser)

    chain.send(chain.escrow.functions.withdrawEarnings(), provider)
    chain.send(chain.escrow.functions.withdraw(60 * ONE_TOKEN), renter)
    chain.send(chain.escrow.functions.withdrawFees(), chain.treasury)
    chain.send(chain.escrow.functions.releaseJob(job_id, 0, 0), chain.operator)

    assert chain.token_balance(provider.address) == 10 * ONE_TOKEN - fee_of(10 * ONE_TOKEN)
    assert chain.token_balance(renter.address) == 60 * ONE_TOKEN
    assert available(chain, renter.address) == 30 * ONE_TOKEN
    assert_escrow_holds_what_it_owes(chain, [job_id])


# ---------------------------------------------------------------------------- earnings


def test_provider_withdraws_earnings_once(chain: Chain, funded_job: tuple[int, BudgetAuthorization]) -> None:
    job_id, budget = funded_job
    provider = chain.providers[3]
    chain.settle([item(job_id, provider.address, 12 * ONE_TOKEN)], [budget])
    owed = 12 * ONE_TOKEN - fee_of(12 * ONE_TOKEN)

    receipt = chain.send(chain.escrow.functions.withdrawEarnings(), provider)

    [event] = chain.events(receipt, "EarningsWithdrawn")
    assert event["args"]["amount"] == owed
    assert chain.token_balance(provider.address) == owed
    assert earnings(chain, provider.address) == 0
    error = chain.revert_of(chain.escrow.functions.withdrawEarnings(), provider)
    assert error.name == "GpgpuEscrow_NothingToWithdraw"
    assert chain.token_balance(provider.address) == owed
    assert_escrow_holds_what_it_owes(chain, [job_id])


# ---------------------------------------------------------------------------- encoding and decoding (no chain)


def test_item_fields_out_of_range_are_refused_before_sending() -> None:
    provider = "0x" + "11" * 20
    for bad in (
        SettlementItem(lease_id=2**64, job_id=1, provider=provider, cumulative_charge=1),
        SettlementItem(lease_id=1, job_id=2**192, provider=provider, cumulative_charge=1),
        SettlementItem(lease_id=1, job_id=1, provider=provider, cumulative_charge=2**96),
    ):
        with pytest.raises(ValueError, match="out of range"):
            settlement_items_encode([bad])


def test_revert_decoder_names_errors_from_hex_and_ignores_unknown_selectors() -> None:
    data = "0x" + bytes.fromhex("d93c0665").hex()  # Pausable's EnforcedPause()
    decoded = revert_decode(data)
    assert decoded is not None and decoded.name == "EnforcedPause"
    assert revert_decode("0xdeadbeef") is None
    assert revert_decode(b"") is None
