"""Property test of issue 8's invariant, on both EVM backends (eth-tester in process, anvil):

    every second a provider ran under a verified lease is paid on chain, and a renter can
    withdraw only what no admitted job can still spend.

Hypothesis interleaves, at random, the real services against a deployed escrow: renters deposit
on chain, jobs are admitted (and their budgets signed, or not), the reservation run sends
budgets, the matcher places jobs and their leases run and are metered, renters *request* a
withdrawal (a `withdraw` transaction sent while the chain mines nothing: anvil with automine off,
eth-tester with auto-mining disabled) and the block holding it is mined later, the watcher reads
the chain, settlement runs, and finished jobs are released in the ledger and then in the escrow.
While a withdrawal waits, the operator's own transactions wait with it (each sender has at most
one transaction waiting; a second one mines the block first), so a reservation or a settlement
and a withdrawal land in one block in either order.

After every step:
- gate: every job with a lease has its budget reserved in the escrow (BudgetReserved seen in a
  confirmed receipt), for at least its ledger budget;
- nothing a placed job can still spend is withdrawable: the escrow's reservation of every job
  with a lease covers what the ledger says the job can still be charged plus what it was charged
  and not yet paid (checked while no settlement is in flight);
- the ledger is consistent and nothing is flagged: every withdrawal the watcher saw was covered
  (by cancelling unreserved jobs when needed);
- the escrow's token balance equals what it owes.
At the end (everything mined, watched, reserved, settled and released): every lease's whole
charge was paid on chain (providers' earnings + fees == the sum of all charges), the ledger
equals the escrow renter by renter, ledger_check passes, and no job billing cancelled ever ran.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from web3 import Web3

from billing import reservations, services
from billing.authorizations import EscrowDomain, budget_authorization_store
from billing.chain import ChainClient, ContractReverted, chain_client_eth_tester
from billing.chain.anvil import anvil_running
from billing.chain.client import ANVIL_DEV_KEY_0
from billing.contract import budget_sign
from billing.deposits import chain_flags, chain_watch, wallet_link
from billing.errors import InsufficientFunds
from billing.models import BudgetAuthorization, BudgetReservation, ChainLog, LeaseCharge, LedgerAccount, Settlement
from billing.release import jobs_release_on_chain
from billing.selectors import job_budget, ledger_violations
from billing.settlement import settle_run, settlements_reconcile
from billing.tests._escrow_env import EscrowEnv, escrow_env_deployed
from billing.tests.support import require_anvil
from jobs.models import Event, Job, Lease, UsageReport
from jobs.services import JobSpec, lease_end, lease_mark_started
from marketplace.matching import match_cycle
from marketplace.submit import job_submit
from tests.depth import evms, examples
from tests.factories import RenterFactory, machine_with_gpus

pytestmark = pytest.mark.django_db

ONE = 10**6
RENTERS = 2
AK = LedgerAccount.Kind
EXAMPLES = int(os.environ.get("BUDGET_PROPERTY_EXAMPLES", examples(quick=6, deep=50)))
WITHDRAW_GAS = 120_000


# ---------------------------------------------------------------------------- the two chains


@dataclass(repr=False)
class World:
    """A deployed escrow on one backend, its operator, two renters and a provider's payout key."""

    backend: str
    env: EscrowEnv
    renters: list[LocalAccount]
    payee: LocalAccount
    pause: Callable[[], None]
    mine: Callable[[], None]
    resume: Callable[[], None]
    snapshot: Callable[[], Callable[[], None]]
    # Per example: whether blocks wait, and the senders with a transaction waiting in them.
    paused: bool = False
    waiting: set[str] = field(default_factory=set)
    clients: dict[str, ChainClient] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"World({self.backend})"

    @property
    def operator(self) -> ChainClient:
        return self.env.client

    def mine_now(self) -> None:
        """Mine the waiting transactions in one block and let every later one be mined at once."""
        if self.paused:
            self.mine()
            self.resume()
        self.paused, self.waiting = False, set()

    def sending(self, client: ChainClient) -> ChainClient:
        """Make `client` keep to one waiting transaction: a second one mines the block first."""
        original = client.transact

        def transact(fn: Any, **kwargs: Any) -> Any:
            if self.paused and client.address in self.waiting:
                self.mine_now()
            sent = original(fn, **kwargs)
            if self.paused:
                self.waiting.add(client.address)
            return sent

        client.transact = transact  # type: ignore[method-assign]
        return client


def _world(backend: str, w3: Web3 | None, tmp: Path) -> World:
    if backend == "eth-tester":
        client = chain_client_eth_tester(receipt_timeout_s=0.3, poll_interval_s=0.01)
        tester = client.web3.provider.ethereum_tester
        pause, resume = tester.disable_auto_mine_transactions, tester.enable_auto_mine_transactions

        def mine() -> None:
            tester.mine_blocks(1)

        def snapshot() -> Callable[[], None]:
            snapshot_id = tester.take_snapshot()
            return lambda: tester.revert_to_snapshot(snapshot_id)

    else:
        assert w3 is not None
        client = ChainClient(
            w3, operator_account=Account.from_key(ANVIL_DEV_KEY_0), receipt_timeout_s=0.3, poll_interval_s=0.01
        )

        def pause() -> None:
            w3.provider.make_request("evm_setAutomine", [False])

        def resume() -> None:
            w3.provider.make_request("evm_setAutomine", [True])

        def mine() -> None:
            w3.provider.make_request("evm_mine", [])

        def snapshot() -> Callable[[], None]:
            snapshot_id = w3.provider.make_request("evm_snapshot", [])["result"]
            return lambda: w3.provider.make_request("evm_revert", [snapshot_id])

    env = escrow_env_deployed(client, tmp / f"{backend}.json")
    renters = [Account.from_key(keccak(text=f"budget invariant: renter {i}")) for i in range(RENTERS)]
    payee = Account.from_key(keccak(text="budget invariant: provider payout"))
    for account in [*renters, payee]:
        client.wait_receipt(client.send_value(account.address, 10**19).hash)
    for account in renters:
        env.send_as(account, env.token.functions.mint(account.address, 10**12))
        env.send_as(account, env.token.functions.approve(env.escrow.address, 2**256 - 1))
    return World(backend, env, renters, payee, pause, mine, resume, snapshot)


@pytest.fixture(scope="module")
def _eth_tester_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return _world("eth-tester", None, tmp_path_factory.mktemp("eth-tester"))


@pytest.fixture(scope="module")
def _anvil_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_anvil()
    with anvil_running() as w3:
        yield _world("anvil", w3, tmp_path_factory.mktemp("anvil"))


@pytest.fixture(params=evms())
def world(request: pytest.FixtureRequest, settings: Any, tmp_path: Path) -> World:
    settings.VAR_DIR = tmp_path
    settings.CHAIN_CONFIRMATIONS = 1
    # This node loses blocks and may mine no more: read as gone at once (billing.rewind.node_behind_wait).
    settings.CHAIN_BEHIND_GRACE_S = 0
    return request.getfixturevalue(f"_{request.param.replace('-', '_')}_world")


# ---------------------------------------------------------------------------- operations

RENTER = st.integers(0, RENTERS - 1)
OPERATION = st.one_of(
    st.tuples(st.just("deposit"), RENTER, st.sampled_from([1, 2, 5])),
    st.tuples(
        st.just("admit"),
        RENTER,
        st.sampled_from(["0.50", "1.00", "2.40"]),  # price per GPU-hour, 1 GPU
        st.sampled_from([900, 1800, 3600]),  # max_duration_s: budgets from 0.125 to 2.4 tokens
        st.booleans(),  # the renter signs the budget at once (else it never does)
    ),
    st.just(("reserve",)),
    st.tuples(st.just("run"), st.sampled_from([0.3, 0.7, 1.0, 1.6])),  # run time, as a share of max_duration_s
    st.tuples(st.just("withdraw_request"), RENTER, st.sampled_from([0.5, 1.0])),  # share of its on-chain balance
    st.just(("withdraw",)),  # the block holding the waiting transactions is mined
    st.just(("watch",)),
    st.just(("settle",)),
    st.just(("release",)),
)


class Rollback(Exception):
    pass


@pytest.mark.timeout(3600)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(operations=st.lists(OPERATION, min_size=4, max_size=16))
def test_every_second_run_is_paid_and_renters_withdraw_only_what_no_admitted_job_can_spend(
    world: World, operations: list[tuple[Any, ...]]
) -> None:
    revert = world.snapshot()
    try:
        with transaction.atomic():
            Play(world).run(operations)
            raise Rollback
    except Rollback:
        pass
    finally:
        world.mine_now()
        revert()
        world.operator._next_local_nonce = None  # the chain forgot what this example sent
        world.clients.clear()


class Play:
    """One example: the marketplace's side (renters, a provider's machine) and the operations."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.env = world.env
        self.renters = [RenterFactory(funds=0) for _ in world.renters]
        for renter, account in zip(self.renters, world.renters, strict=True):
            wallet_link(renter=renter, address=account.address)
        machine = machine_with_gpus(count=2)
        self.provider = machine.provider
        self.provider.payout_address = world.payee.address
        self.provider.save(update_fields=["payout_address"])
        self.domain = EscrowDomain(chain_id=self.env.client.chain_id(), escrow=self.env.deployment.escrow)
        self.clock = timezone.now() - timedelta(days=20)  # leases run in the past, one after another
        world.sending(world.operator)

    def renter_client(self, index: int) -> ChainClient:
        account = self.world.renters[index]
        if account.address not in self.world.clients:
            self.world.clients[account.address] = self.world.sending(self.world.operator.for_account(account))
        return self.world.clients[account.address]

    def renter_send(self, index: int, fn: Any, *, gas: int | None = None) -> None:
        """Send from the renter's wallet; wait for the receipt unless blocks wait. A mined revert
        (a withdrawal the escrow no longer covers) is what the renter's wallet would show."""
        client = self.renter_client(index)
        sent = client.transact(fn, gas=gas)
        if not self.world.paused:
            try:
                client.wait_receipt(sent.hash)
            except ContractReverted as reverted:
                assert reverted.name == "GpgpuEscrow_InsufficientBalance", reverted
                event("a withdrawal reverted: the money was reserved first")

    # ------------------------------------------------------------------ operations

    def run(self, operations: list[tuple[Any, ...]]) -> None:
        try:
            self._run(operations)
        except AssertionError:
            self.note_state()
            raise

    def note_state(self) -> None:
        """What Hypothesis prints with a failing example: each job, batch and chain log."""
        for job in Job.objects.order_by("pk"):
            auth = BudgetAuthorization.objects.filter(job=job).first()
            kinds = list(Event.objects.filter(job=job).values_list("kind", flat=True))
            on_chain = self.env.escrow.functions.job(job.pk).call()
            note(
                f"job {job.pk} renter {job.renter_id} {job.status} budget {auth and auth.status} "
                f"{job_budget(job_id=job.pk)} escrow {on_chain} events {kinds}"
            )
        for batch in BudgetReservation.objects.order_by("pk"):
            note(f"batch {batch.pk} {batch.status} jobs {batch.job_ids} tx {batch.tx_hash} {batch.last_error}")
        for log in ChainLog.objects.order_by("block_number", "log_index"):
            note(f"log {log.event} block {log.block_number}:{log.log_index} {log.args} {log.status}")

    def _run(self, operations: list[tuple[Any, ...]]) -> None:
        for index in range(RENTERS):  # every renter starts with a little money on chain and seen
            self.renter_send(index, self.env.escrow.functions.deposit(3 * ONE))
        chain_watch(client=self.env.client, deployment=self.env.deployment)
        for operation in operations:
            getattr(self, f"op_{operation[0]}")(*operation[1:])
            self.check()
        self.drain()
        self.check_final()

    def op_deposit(self, renter: int, tokens: int) -> None:
        self.renter_send(renter, self.env.escrow.functions.deposit(tokens * ONE))

    def op_admit(self, renter: int, price: str, max_duration_s: int, signs: bool) -> None:
        spec = JobSpec(
            gpu_count=1,
            max_price_per_gpu_hour=Decimal(price),
            expected_duration_s=max_duration_s // 3,
            max_duration_s=max_duration_s,
            kind=Job.Kind.PROCESS,
            command=["train"],
        )
        before = Job.objects.count()
        try:
            job, _ = job_submit(renter=self.renters[renter], spec=spec)
        except InsufficientFunds:
            event("admission refused: 402 (the ledger's available balance is short)")
            assert Job.objects.count() == before
            return
        if signs:
            amount = job_budget(job_id=job.pk).reserved
            deadline = int(time.time()) + 30 * 86_400  # a run of the job, a day to place and to settle
            signed = budget_sign(
                private_key=self.world.renters[renter].key,
                chain_id=self.domain.chain_id,
                escrow=self.domain.escrow,
                job_id=job.pk,
                max_amount=amount,
                deadline=deadline,
            )
            budget_authorization_store(
                job=job,
                renter_address=self.world.renters[renter].address,
                max_amount=amount,
                deadline=deadline,
                signature="0x" + signed.signature.hex(),
                domain=self.domain,
            )

    def op_reserve(self) -> None:
        reservations.reserve_run(client=self.env.client, deployment=self.env.deployment)

    def op_run(self, share: float) -> None:
        before = set(Lease.objects.values_list("pk", flat=True))
        match_cycle()
        for lease in Lease.objects.exclude(pk__in=before).select_related("job").order_by("pk"):
            self.check_gate(lease.job)  # before the lease starts: the escrow holds the budget
            seconds = int(lease.job.max_duration_s * share)
            start, self.clock = self.clock, self.clock + timedelta(seconds=seconds + 600)
            lease_mark_started(lease_id=lease.pk, actor="test", at=start)
            end = start + timedelta(seconds=seconds)
            UsageReport.objects.create(lease=lease, report_id="all", period_start=start, period_end=end, gpu_seconds=1)
            lease_end(lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", exit_code=0, at=end)
            services.lease_meter(lease_id=lease.pk, now=end + timedelta(hours=1))
            event("a lease ran")

    def op_withdraw_request(self, renter: int, share: float) -> None:
        """The renter sends `withdraw` for a share of what the escrow says it may take now; the
        transaction waits unmined (with whatever the operator sends next) until a block is mined.
        Its gas is fixed, as a wallet would, so it is sent even if a waiting reservation will
        have taken the money by the time it is mined (it then reverts)."""
        account = self.world.renters[renter]
        if account.address in self.world.waiting:
            self.world.mine_now()  # one waiting transaction per sender
        available = int(self.env.escrow.functions.availableBalance(account.address).call())
        amount = int(available * share)
        if amount == 0:
            return
        if not self.world.paused:
            self.world.pause()
            self.world.paused = True
        self.renter_send(renter, self.env.escrow.functions.withdraw(amount), gas=WITHDRAW_GAS)

    def op_withdraw(self) -> None:
        self.world.mine_now()

    def op_watch(self) -> None:
        chain_watch(client=self.env.client, deployment=self.env.deployment)

    def op_settle(self) -> None:
        settle_run(client=self.env.client, deployment=self.env.deployment, force=True)
        settlements_reconcile(client=self.env.client, deployment=self.env.deployment, older_than_s=0)

    def op_release(self) -> None:
        services.budgets_release()
        jobs_release_on_chain(client=self.env.client, deployment=self.env.deployment)

    def drain(self) -> None:
        """Let everything happen: mine, watch, reserve, settle and release until nothing moves."""
        self.world.mine_now()
        for _ in range(3):
            self.op_watch()
            self.op_reserve()
            self.op_settle()
            self.op_release()
        self.op_watch()

    # ------------------------------------------------------------------ invariants

    def _balance(self, kind: str, owner_key: str) -> int:
        return (
            LedgerAccount.objects.filter(kind=kind, owner_key=owner_key).values_list("balance", flat=True).first() or 0
        )

    def _owed(self, job: Job) -> int:
        """What the job can still be charged plus what it was charged and not yet paid on chain."""
        leases = [f"lease:{pk}" for pk in job.leases.values_list("pk", flat=True)]
        unpaid = (
            LedgerAccount.objects.filter(
                kind__in=(AK.LEASE_UNSETTLED, AK.IN_SETTLEMENT), owner_key__in=leases
            ).aggregate(total=Sum("balance"))["total"]
            or 0
        )
        return self._balance(AK.JOB_RESERVED, f"job:{job.pk}") + unpaid

    def check_gate(self, job: Job) -> None:
        auth = BudgetAuthorization.objects.filter(job=job).first()
        assert auth is not None and auth.status == "reserved", f"job {job.pk} was placed unreserved"
        renter, _deadline, _remaining, _lease, _settled, closed = self.env.escrow.functions.job(job.pk).call()
        assert renter.lower() == auth.renter_address and not closed
        assert int(auth.max_amount) >= job_budget(job_id=job.pk).reserved

    def check(self) -> None:
        escrow = self.env.escrow.functions
        jobs = list(Job.objects.filter(leases__isnull=False).distinct())
        for job in jobs:
            self.check_gate_after(job)
        if not Settlement.objects.filter(status__in=("pending", "submitted")).exists():
            # What a placed job can still spend is in its reservation, which no withdrawal reaches.
            for job in jobs:
                _renter, _deadline, remaining, _lease, _settled, closed = escrow.job(job.pk).call()
                owed = self._owed(job)
                if closed:
                    assert owed == 0, f"job {job.pk} was closed on chain owing {owed}"
                else:
                    assert int(remaining) >= owed, f"job {job.pk}: the escrow holds {remaining}, it may spend {owed}"
        assert chain_flags() == []
        assert [p for p in ledger_violations() if "is finished and finally metered" not in p] == []
        self.check_conservation()

    def check_gate_after(self, job: Job) -> None:
        auth = BudgetAuthorization.objects.get(job=job)
        assert auth.status == "reserved" and auth.activated_at is not None

    def check_conservation(self) -> None:
        escrow = self.env.escrow.functions
        owed = sum(int(escrow.availableBalance(a.address).call()) for a in self.world.renters)
        owed += sum(int(escrow.job(pk).call()[2]) for pk in Job.objects.values_list("pk", flat=True))
        owed += int(escrow.earnings(self.world.payee.address).call()) + int(escrow.feesAccrued().call())
        assert int(self.env.token.functions.balanceOf(self.env.escrow.address).call()) == owed

    def check_final(self) -> None:
        escrow = self.env.escrow.functions
        charged = LeaseCharge.objects.aggregate(total=Sum("cumulative_micro"))["total"] or 0
        paid = int(escrow.earnings(self.world.payee.address).call()) + int(escrow.feesAccrued().call())
        assert paid == charged, f"providers and fees received {paid} on chain for {charged} charged"
        assert not LedgerAccount.objects.filter(kind__in=(AK.LEASE_UNSETTLED, AK.IN_SETTLEMENT), balance__gt=0).exists()
        renters = {r.pk: a.address for r, a in zip(self.renters, self.world.renters, strict=True)}
        assert self.env.disagreements(renters, {self.provider.pk: self.world.payee.address}) == []
        assert ledger_violations() == [] and chain_flags() == []
        cancelled = Event.objects.filter(kind__in=("budget.unfunded", "budget.refused")).values_list(
            "job_id", flat=True
        )
        assert not Lease.objects.filter(job_id__in=cancelled).exists()
        for kind, label in (("budget.unfunded", "unfunded jobs cancelled"), ("budget.refused", "budgets refused")):
            if Event.objects.filter(kind=kind).exists():
                event(f"{label} by billing")
        if charged:
            event("leases paid on chain")
        if any(self.env.escrow.events.Withdrawn().get_logs(from_block=self.env.deployment.deployment_block)):
            event("a withdrawal was mined")
