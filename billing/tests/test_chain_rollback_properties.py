"""Property test: whatever the chain takes back, and whenever, every charge is paid once and the
ledger ends equal to the escrow.

Hypothesis interleaves, at random, the billing runs (reservation, settlement, reconciler, release)
with leases being metered and ending, and with the chain going back: to a block remembered
earlier in the example (the node rolled back, or restored from older state), right away or in the
moment after a run checked that the chain still holds what the ledger rests on and before its
transaction is sent (the race `rewound_before_send` leaves open; its transaction then goes out
under a nonce counter the rollback made stale). The chain never goes back past the renters'
deposits.

At the end (every lease ended and finally metered, then the runs repeated until nothing moves):
every lease's whole charge is settled and nothing of it waits unsettled or in settlement, the
provider's earnings on chain are what the ledger owes it, every job is closed in the escrow, and
the ledger equals the escrow renter by renter (ledger_check passes).

Found this way first, by the fault suite: a settlement mined after a rollback took its job's
reservation, whose skipped item then counted as sent (`SettlementItem.job_unknown`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone
from eth_account import Account
from hexbytes import HexBytes
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from billing import release as release_module
from billing import reservations as reservations_module
from billing import services
from billing import settlement as settlement_module
from billing.chain import ChainClient, chain_client_eth_tester
from billing.chain.anvil import anvil_running
from billing.chain.client import ANVIL_DEV_KEY_0
from billing.deposits import chain_watch, wallet_link
from billing.ledger_check import ledger_check_run
from billing.models import BudgetAuthorization, LeaseCharge, Settlement
from billing.release import jobs_release_on_chain
from billing.reservations import reserve_run
from billing.selectors import provider_payable_micro
from billing.settlement import settle_run, settlements_reconcile
from billing.statements import lease_money
from billing.tests._escrow_env import ONE, EscrowEnv, ProviderFactory, escrow_env_deployed
from billing.tests.support import new_job, require_anvil, rolled_back_after_check
from jobs.models import Job, Lease, UsageReport
from jobs.services import lease_end
from tests.depth import evms, examples
from tests.factories import RenterFactory, placed_lease

pytestmark = pytest.mark.django_db

EXAMPLES = int(os.environ.get("ROLLBACK_PROPERTY_EXAMPLES", examples(quick=5, deep=40)))
RENTERS = 2
JOBS_MAX = 4
STEP_S = 600  # one metering period of a lease


class Chain:
    """A deployed escrow on one backend, and how to remember a block and go back to it."""

    def __init__(self, backend: str, env: EscrowEnv, mark: Callable[[], Any], back: Callable[[Any], None]) -> None:
        self.backend, self.env, self._mark, self._back = backend, env, mark, back

    def __repr__(self) -> str:
        return f"Chain({self.backend})"

    def mark(self) -> tuple[Any, int]:
        """The chain as it is now: (snapshot, head block)."""
        return self._mark(), self.env.client.block_number()

    def back(self, mark: tuple[Any, int], *, mined_again: bool = False) -> None:
        """The node comes back as it was at `mark`: its later blocks and their transactions gone
        or, `mined_again` (a reorg on a live chain; anvil only), mined again in new blocks, in
        their order, those the new chain still accepts."""
        snapshot, block = mark
        raws = []
        if mined_again and self.backend == "anvil":
            w3 = self.env.client.web3
            for number in range(block + 1, self.env.client.block_number() + 1):
                for tx_hash in w3.eth.get_block(number)["transactions"]:
                    found = w3.provider.make_request("eth_getRawTransactionByHash", [HexBytes(tx_hash).to_0x_hex()])
                    raws.append(found["result"])
        self._back(snapshot)
        accepted = 0
        for raw in raws:
            answer = w3.provider.make_request("eth_sendRawTransaction", [raw])  # a refusal is the new chain's answer
            accepted += "result" in answer
        if raws:
            event(f"a reorg mined transactions again: {'some' if accepted else 'none'}")


def _chain(backend: str, tmp: Path, w3: Any = None) -> Chain:
    if backend == "eth-tester":
        client = chain_client_eth_tester(receipt_timeout_s=0.3, poll_interval_s=0.01)
        tester = client.web3.provider.ethereum_tester

        def mark() -> Any:
            return tester.take_snapshot()

        def back(snapshot: Any) -> None:
            tester.revert_to_snapshot(snapshot)
            tester.mine_blocks(1)

    else:
        client = ChainClient(
            w3, operator_account=Account.from_key(ANVIL_DEV_KEY_0), receipt_timeout_s=0.3, poll_interval_s=0.01
        )

        def mark() -> Any:
            return w3.provider.make_request("evm_snapshot", [])["result"]

        def back(snapshot: Any) -> None:
            w3.provider.make_request("evm_revert", [snapshot])
            w3.provider.make_request("evm_mine", [])

    return Chain(backend, escrow_env_deployed(client, tmp / f"{backend}.json"), mark, back)


@pytest.fixture(scope="module")
def _eth_tester_chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return _chain("eth-tester", tmp_path_factory.mktemp("eth-tester"))


@pytest.fixture(scope="module")
def _anvil_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    require_anvil()
    with anvil_running() as w3:
        yield _chain("anvil", tmp_path_factory.mktemp("anvil"), w3)


@pytest.fixture(params=evms())
def chain(request: pytest.FixtureRequest, settings: Any, tmp_path: Path) -> Chain:
    settings.VAR_DIR = tmp_path
    settings.CHAIN_CONFIRMATIONS = 1
    # This node loses blocks and may mine no more: read as gone at once (billing.rewind.node_behind_wait).
    settings.CHAIN_BEHIND_GRACE_S = 0
    return request.getfixturevalue(f"_{request.param.replace('-', '_')}_chain")


# ---------------------------------------------------------------------------- operations

RUNS = ("reserve", "settle", "reconcile", "release")
BACK_BEFORE_SEND = st.tuples(st.just("back_before_send"), st.sampled_from(RUNS), st.integers(0, 7))
RUN = st.tuples(st.just("run"), st.sampled_from(RUNS))
# The runs and the races drawn twice as often as the rest: they are where the ledger can part
# from the chain.
OPERATION = st.one_of(
    st.tuples(st.just("job"), st.integers(0, RENTERS - 1)),
    st.tuples(st.just("meter"), st.integers(0, JOBS_MAX - 1)),  # the lease runs one more period
    st.tuples(st.just("end"), st.integers(0, JOBS_MAX - 1)),
    RUN,
    RUN,
    st.just(("mark",)),
    st.tuples(st.just("back"), st.integers(0, 7)),  # to one of the blocks remembered
    st.tuples(st.just("reorg"), st.integers(0, 7)),  # the same, its transactions mined again
    BACK_BEFORE_SEND,
    BACK_BEFORE_SEND,
)


class Rollback(Exception):
    pass


@pytest.mark.timeout(3600)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(operations=st.lists(OPERATION, min_size=6, max_size=24))
# The settlement mined after a rollback took its job's reservation (its item skipped, `UnknownJob`).
@example(operations=[("job", 0), ("run", "reserve"), ("meter", 0), ("end", 0), ("back_before_send", "settle", 0)])
# Then a second batch of the same lease, gathered while the first was in flight, paid both parts
# under its cumulative charge, and the ledger booked only its own delta.
@example(operations=[("job", 0), ("mark",), ("meter", 0), ("back_before_send", "settle", 0), ("meter", 0)])
def test_whatever_the_chain_takes_back_every_charge_is_paid_once_and_the_ledger_equals_the_escrow(
    chain: Chain, operations: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    start = chain.mark()
    client = chain.env.client
    try:
        with transaction.atomic():
            Play(chain, monkeypatch).run(operations)
            raise Rollback
    except Rollback:
        pass
    finally:
        monkeypatch.undo()
        chain.back(start)
        client.nonce_reset()  # the chain forgot what this example sent


class Play:
    """One example: two funded renters, a provider, their jobs and the operations."""

    def __init__(self, chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chain, self.env, self.monkeypatch = chain, chain.env, monkeypatch
        self.client = chain.env.client
        self.renters = []
        for index in range(RENTERS):
            renter = RenterFactory(funds=0)
            account = self.env.account(f"rollback property: renter {index}")
            wallet_link(renter=renter, address=account.address)
            self.env.deposit(account, 10 * ONE)
            self.renters.append((renter, account))
        chain_watch(client=self.client, deployment=self.env.deployment)
        self.payee = self.env.account("rollback property: payee")
        self.provider = ProviderFactory(payout_address=self.payee.address)
        self.leases: list[Lease] = []
        self.metered: dict[int, int] = {}  # lease id → seconds reported
        self.t0 = timezone.now() - timedelta(days=2)
        # The chain never goes back past the deposits (the watcher's side of that is its own test).
        self.marks: list[Any] = [chain.mark()]

    def run(self, operations: list[tuple[Any, ...]]) -> None:
        for operation in operations:
            note(f"{operation}")
            getattr(self, "op_" + operation[0])(*operation[1:])
        self.drain()
        self.check()

    # ------------------------------------------------------------------ operations

    def op_job(self, renter_index: int) -> None:
        if len(self.leases) >= JOBS_MAX:
            return
        renter, account = self.renters[renter_index]
        job = new_job(renter)  # 1 GPU at 1.00/GPU-hour for at most 2 h
        self.env.sign_budget(account, job, 2 * ONE)
        lease = placed_lease(job=job, provider=self.provider, price="1.00", started=self.t0)
        self.leases.append(lease)
        self.metered[lease.pk] = 0

    def _lease(self, index: int) -> Lease | None:
        if not self.leases:
            return None
        lease = self.leases[index % len(self.leases)]
        lease.refresh_from_db()
        return lease if lease.ended_at is None else None

    def op_meter(self, index: int) -> None:
        lease = self._lease(index)
        if lease is None or self.metered[lease.pk] + STEP_S > 7200:
            return
        start = self.metered[lease.pk]
        self.metered[lease.pk] = start + STEP_S
        UsageReport.objects.create(
            lease=lease,
            report_id=f"until {start + STEP_S}",
            period_start=self.t0 + timedelta(seconds=start),
            period_end=self.t0 + timedelta(seconds=start + STEP_S),
            gpu_seconds=1,
        )
        services.lease_meter(lease_id=lease.pk)

    def op_end(self, index: int) -> None:
        lease = self._lease(index)
        if lease is None:
            return
        lease_end(
            lease_id=lease.pk,
            reason=Lease.EndReason.SUCCEEDED,
            actor="test",
            exit_code=0,
            at=self.t0 + timedelta(seconds=max(self.metered[lease.pk], 1)),
        )
        services.lease_meter(lease_id=lease.pk)

    def op_run(self, name: str) -> None:
        deployment = self.env.deployment
        if name == "reserve":
            reserve_run(client=self.client, deployment=deployment)
        elif name == "settle":
            settle_run(client=self.client, deployment=deployment, force=True)
        elif name == "reconcile":
            settlements_reconcile(client=self.client, deployment=deployment, older_than_s=0)
        else:
            services.budgets_release()
            jobs_release_on_chain(client=self.client, deployment=deployment)

    def op_mark(self) -> None:
        self.marks.append(self.chain.mark())

    def _back(self, which: int, *, mined_again: bool = False) -> None:
        index = which % len(self.marks)
        self.chain.back(self.marks[index], mined_again=mined_again)
        # A mark is used up by going back to it (evm_revert), and later ones went with it.
        del self.marks[index:]
        self.marks.append(self.chain.mark())

    def op_back(self, which: int) -> None:
        self._back(which)

    def op_reorg(self, which: int) -> None:
        """The blocks since a remembered one are replaced, their transactions mined again in new
        blocks (on anvil; on the in-process EVM, gone as with `back`)."""
        self._back(which, mined_again=True)

    def op_back_before_send(self, name: str, which: int) -> None:
        """The run `name` checks that the chain holds what the ledger rests on; the chain goes
        back the moment after, before the run's transaction is sent."""
        module = {
            "reserve": reservations_module,
            "settle": settlement_module,
            "reconcile": settlement_module,
            "release": release_module,
        }[name]
        checked = module.rewound_before_send
        rolled_back_after_check(self.monkeypatch, module, lambda: self._back(which))
        try:
            self.op_run(name)
        finally:  # a run that sent nothing did not check
            self.monkeypatch.setattr(module, "rewound_before_send", checked)

    # ------------------------------------------------------------------ the end

    def drain(self) -> None:
        """Every lease ends and is finally metered; then the runs go on as the beat would."""
        for index in range(len(self.leases)):
            self.op_end(index)
        for _ in range(6):
            for name in RUNS:
                self.op_run(name)

    def check(self) -> None:
        charged = 0
        for lease in self.leases:
            charge = LeaseCharge.objects.get(lease=lease)
            assert charge.final, f"lease {lease.pk} not finally metered"
            money = lease_money(lease_ids=[lease.pk])[lease.pk]
            assert (money.settled, money.unsettled) == (charge.cumulative_micro, 0), (lease.pk, money, charge)
            charged += charge.cumulative_micro
        in_flight = list(Settlement.objects.exclude(status__in=("confirmed", "failed")).values_list("pk", "status"))
        assert in_flight == []
        earned = int(self.env.escrow.functions.earnings(self.payee.address).call())
        fees = int(self.env.escrow.functions.feesAccrued().call())
        assert earned == provider_payable_micro(provider_id=self.provider.pk) and earned + fees == charged
        for lease in self.leases:
            job = Job.objects.get(pk=lease.job_id)
            assert job.status in Job.TERMINAL
            auth = BudgetAuthorization.objects.get(job=job)
            assert auth.released_on_chain_at is not None, f"job {job.pk}: its budget was not released on chain"
            assert self.env.escrow.functions.job(job.pk).call()[5], f"job {job.pk} still open in the escrow"
        renters = {renter.pk: account.address for renter, account in self.renters}
        assert self.env.disagreements(renters, {self.provider.pk: self.payee.address}) == []
        check = ledger_check_run(client=self.client, deployment=self.env.deployment)
        assert (check.problems, check.differences, check.error) == ([], [], ""), check.as_dict()
