"""Random sequences of escrow operations keep the money conserved and every job within its budget.

Runs on the in-process EVM only (speed). A small Python model of the rules predicts each outcome;
after every settlement and release, and at the end, the contract's state must match the model, the
escrow's token balance must equal what it owes, and no job may have paid more than its budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.contract import BUDGET_SKIP_INSUFFICIENT_BALANCE, SettlementItem
from billing.tests.conftest import Chain, _snapshot
from tests.depth import examples

AMOUNT = st.integers(min_value=1, max_value=50_000)
RENTER = st.integers(min_value=0, max_value=2)
PROVIDER = st.integers(min_value=0, max_value=3)
JOB = st.integers(min_value=0, max_value=4)  # index into the jobs budgeted so far (modulo), 4 = unknown job

deposit = st.tuples(st.just("deposit"), RENTER, AMOUNT)
withdraw = st.tuples(st.just("withdraw"), RENTER, AMOUNT)
budget = st.tuples(st.just("budget"), RENTER, AMOUNT)
release = st.tuples(st.just("release"), JOB)
withdraw_earnings = st.tuples(st.just("withdraw_earnings"), PROVIDER)
lease_move = st.sampled_from(["same", "next", "stale"])
settle_item = st.tuples(JOB, PROVIDER, lease_move, st.integers(min_value=-5_000, max_value=30_000))
settle = st.tuples(st.just("settle"), st.lists(settle_item, min_size=1, max_size=6))
OPERATION = st.one_of(deposit, withdraw, budget, settle, release, withdraw_earnings)


@dataclass
class JobModel:
    job_id: int
    renter: int
    budget: int
    remaining: int
    lease_id: int = 0
    settled: int = 0
    closed: bool = False
    spent: int = 0


@dataclass
class Model:
    fee_bps: int
    available: list[int] = field(default_factory=lambda: [0, 0, 0])
    earnings: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    fees: int = 0
    jobs: list[JobModel] = field(default_factory=list)


def _apply_settlement(model: Model, job: JobModel | None, provider: int, lease_id: int, cumulative: int) -> None:
    """The contract's settlement rule, restated."""
    if job is None or job.closed or lease_id < job.lease_id:
        return
    settled = job.settled if lease_id == job.lease_id else 0
    if cumulative <= settled:
        return
    pay = min(cumulative - settled, job.remaining)
    job.lease_id, job.settled = lease_id, cumulative
    job.remaining -= pay
    job.spent += pay
    fee = pay * model.fee_bps // 10_000
    model.fees += fee
    model.earnings[provider] += pay - fee


def _check(chain: Chain, model: Model) -> None:
    escrow = chain.escrow.functions
    on_chain_available = [escrow.availableBalance(r.address).call() for r in chain.renters]
    on_chain_earnings = [escrow.earnings(p.address).call() for p in chain.providers]
    remaining = []
    for job in model.jobs:
        _, _, job_remaining, _, _, closed = escrow.job(job.job_id).call()
        remaining.append(job_remaining)
        assert closed == job.closed
        assert job.spent <= job.budget, "a job paid past its budget"
        if not closed:
            # What left the reservation is exactly what providers and the fee received for the job.
            assert job.budget - job_remaining == job.spent
    fees = escrow.feesAccrued().call()

    assert on_chain_available == model.available
    assert on_chain_earnings == model.earnings
    assert remaining == [job.remaining for job in model.jobs]
    assert fees == model.fees
    owed = sum(on_chain_available) + sum(remaining) + sum(on_chain_earnings) + fees
    assert chain.token_balance(chain.escrow.address) == owed


@settings(
    max_examples=examples(quick=8, deep=60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    opening=st.lists(st.tuples(st.just("budget"), RENTER, AMOUNT), min_size=1, max_size=3),
    operations=st.lists(OPERATION, min_size=1, max_size=8),
)
def test_random_operations_conserve_money_and_respect_budgets(
    tester_chain: Chain, opening: list, operations: list
) -> None:
    chain = tester_chain
    _give_renters_tokens(chain)  # once per test: kept across examples, rolled back with the fixture
    revert = _snapshot(chain.w3, "eth-tester")  # each example starts from the freshly deployed escrow
    # Every renter starts with a deposit and some budgets are active, so most examples reach settlement.
    funding = [("deposit", renter, 60_000) for renter in range(len(chain.renters))]
    try:
        _run(chain, [*funding, *opening, *operations])
    finally:
        revert()


def _give_renters_tokens(chain: Chain) -> None:
    for renter in chain.renters:
        if chain.token.functions.allowance(renter.address, chain.escrow.address).call() == 0:
            chain.send(chain.token.functions.mint(renter.address, 10**12), renter)
            chain.send(chain.token.functions.approve(chain.escrow.address, 2**256 - 1), renter)


def _run(chain: Chain, operations: list) -> None:
    model = Model(fee_bps=chain.escrow.functions.feeBps().call())
    next_job_id = 1_000
    for operation in operations:
        kind = operation[0]
        if kind == "deposit":
            _, renter, amount = operation
            chain.send(chain.escrow.functions.deposit(amount), chain.renters[renter])
            model.available[renter] += amount
        elif kind == "withdraw":
            _, renter, amount = operation
            call = chain.escrow.functions.withdraw(amount)
            if amount <= model.available[renter]:
                chain.send(call, chain.renters[renter])
                model.available[renter] -= amount
            else:
                assert chain.revert_of(call, chain.renters[renter]).name == "GpgpuEscrow_InsufficientBalance"
        elif kind == "budget":
            _, renter, amount = operation
            next_job_id += 1
            authorization = chain.budget(chain.renters[renter], next_job_id, amount)
            receipt = chain.reserve([authorization])
            if amount <= model.available[renter]:
                assert len(chain.events(receipt, "BudgetReserved")) == 1
                model.available[renter] -= amount
                model.jobs.append(JobModel(job_id=next_job_id, renter=renter, budget=amount, remaining=amount))
            else:
                [skipped] = chain.events(receipt, "BudgetSkipped")
                assert skipped["args"]["reason"] == BUDGET_SKIP_INSUFFICIENT_BALANCE
        elif kind == "settle":
            items = []
            for job_index, provider, move, charge in operation[1]:
                job = model.jobs[job_index % len(model.jobs)] if model.jobs and job_index < 4 else None
                job_id = job.job_id if job else 999_999
                current = job.lease_id if job else 0
                lease_id = {"same": max(current, 1), "next": current + 1, "stale": max(current - 1, 1)}[move]
                base = job.settled if job and lease_id == current else 0
                cumulative = max(base + charge, 0)
                items.append(
                    SettlementItem(
                        lease_id=lease_id,
                        job_id=job_id,
                        provider=chain.providers[provider].address,
                        cumulative_charge=cumulative,
                    )
                )
                _apply_settlement(model, job, provider, lease_id, cumulative)
            chain.settle(items)
        elif kind == "release":
            _, job_index = operation
            if not model.jobs:
                continue
            job = model.jobs[job_index % len(model.jobs)]
            call = chain.escrow.functions.releaseJob(job.job_id, 0, 0)
            if job.closed:
                assert chain.revert_of(call, chain.operator).name == "GpgpuEscrow_JobClosed"
            else:
                chain.send(call, chain.operator)
                model.available[job.renter] += job.remaining
                job.remaining, job.closed = 0, True
        elif kind == "withdraw_earnings":
            _, provider = operation
            account = chain.providers[provider]
            call = chain.escrow.functions.withdrawEarnings()
            if model.earnings[provider]:
                before = chain.token_balance(account.address)
                chain.send(call, account)
                assert chain.token_balance(account.address) == before + model.earnings[provider]
                model.earnings[provider] = 0
            else:
                assert chain.revert_of(call, account).name == "GpgpuEscrow_NothingToWithdraw"
        # The full comparison is the slow part (a dozen calls): do it where money moves between holders.
        if kind in ("settle", "release"):
            _check(chain, model)
    _check(chain, model)
