"""The node misbehaving under the operator's confirmed and submitted transactions, on the in-process
EVM and on a real anvil node: a block rolled back under a confirmed settlement, reservation and
release; a submitted settlement whose transaction vanished; a node restarted from saved state
without its history under a submitted settlement. Each test ends with the chain and the ledger in
agreement (the ledger check passes), every charge paid once and every batch sent again at most once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from eth_account import Account
from web3 import Web3

from billing import release as release_module
from billing import reservations as reservations_module
from billing import services
from billing import settlement as engine
from billing.chain import ChainClient, ChainError
from billing.chain.anvil import AnvilNode, anvil_start
from billing.chain.client import ANVIL_DEV_KEY_0
from billing.ledger_check import ledger_check_run
from billing.models import BudgetAuthorization, BudgetReservation, LedgerEntry, Settlement, SettlementItem
from billing.release import jobs_release_on_chain
from billing.reservations import reserve_run
from billing.selectors import provider_payable_micro, renter_available_micro
from billing.statements import LeaseMoney, lease_money, provider_earnings, renter_balance
from billing.tests._escrow_env import ONE, EscrowEnv, ProviderFactory, charged_job, escrow_env, escrow_env_deployed
from billing.tests.support import (
    funded_renter,
    new_job,
    ran_half_hour_until,
    require_anvil,
    rolled_back_after_check,
    rolled_back_after_rewind,
)
from tests.depth import evms
from tests.factories import placed_lease

pytestmark = pytest.mark.django_db(transaction=True)


class Node:
    """An escrow on one backend, with the faults the node can be made to show."""

    def __init__(self, backend: str, env: EscrowEnv, anvil: AnvilNode | None = None) -> None:
        self.backend, self.env, self.anvil = backend, env, anvil

    @property
    def w3(self) -> Web3:
        return self.env.client.web3

    def mark(self) -> int:
        """Remember the chain as it is now (eth-tester: a snapshot id; anvil: the head)."""
        if self.anvil is None:
            return int(self.w3.provider.ethereum_tester.take_snapshot())  # type: ignore[attr-defined]
        return int(self.w3.eth.block_number)

    def roll_back(self, mark: int) -> None:
        """The node comes back as it was at `mark`: the blocks since are gone, and their
        transactions with them (neither backend puts them back in its pool)."""
        if self.anvil is None:
            self.w3.provider.ethereum_tester.revert_to_snapshot(mark)  # type: ignore[attr-defined]
        else:
            self.w3.provider.make_request("anvil_rollback", [self.w3.eth.block_number - mark])  # type: ignore[arg-type]

    def mine(self, blocks: int) -> None:
        if self.anvil is None:
            self.w3.provider.ethereum_tester.mine_blocks(blocks)  # type: ignore[attr-defined]
        else:
            for _ in range(blocks):
                self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    def client(self, *, confirmations: int = 1) -> ChainClient:
        """The operator on this node, needing `confirmations` (a fresh nonce counter)."""
        return ChainClient(
            self.w3,
            operator_account=self.env.client.account,
            confirmations=confirmations,
            receipt_timeout_s=0.3,
            poll_interval_s=0.01,
        )


def _anvil_env(anvil: AnvilNode, tmp_path: Path) -> EscrowEnv:
    client = ChainClient(anvil.web3(), operator_account=Account.from_key(ANVIL_DEV_KEY_0), receipt_timeout_s=5)
    return escrow_env_deployed(client, tmp_path / "anvil.json")


def _node(backend: str, tmp_path: Path) -> Node:
    if backend == "eth-tester":
        return Node(backend, escrow_env(tmp_path))
    require_anvil()
    anvil = anvil_start(state_path=tmp_path / "anvil-state.json")
    return Node(backend, _anvil_env(anvil, tmp_path), anvil)


@pytest.fixture(params=evms())
def node(request: pytest.FixtureRequest, tmp_path: Path, settings: Any) -> Iterator[Node]:
    settings.VAR_DIR = tmp_path
    settings.CHAIN_CONFIRMATIONS = 1
    # This node loses blocks and may mine no more: read as gone at once (billing.rewind.node_behind_wait).
    settings.CHAIN_BEHIND_GRACE_S = 0
    made = _node(request.param, tmp_path)
    try:
        yield made
    finally:
        if made.anvil is not None:
            made.anvil.stop()


def _charged(node: Node, label: str):  # type: ignore[no-untyped-def]
    """A renter with 10 tokens in the escrow and a finished job (budget 2 tokens, reserved on
    chain) whose lease was charged 1 token, to be paid to a payee; the ledger has released the
    unspent token (as billing.tasks.release_budgets does within a minute)."""
    renter, account = funded_renter(node.env, label)
    payee = node.env.account(f"payee {label}")
    job, lease = charged_job(renter, provider_address=payee.address)
    node.env.sign_budget(account, job, 2 * ONE)
    assert reserve_run(client=node.env.client, deployment=node.env.deployment)["reserved"] == 1
    assert services.budgets_release()["released"] == 1
    return renter, account, payee, job, lease


def _agree(node: Node, renters: dict[int, str], providers: dict[int, str]) -> None:
    """The escrow equals the ledger (the tests' own comparison, and the ledger check's)."""
    assert node.env.disagreements(renters, providers) == []
    check = ledger_check_run(client=node.env.client, deployment=node.env.deployment)
    assert (check.problems, check.differences, check.error) == ([], [], ""), check.as_dict()
    assert check.ok and check.chain_compared


def _earnings(node: Node, payee: Any) -> int:
    return int(node.env.escrow.functions.earnings(payee.address).call())


# ---------------------------------------------------------------------------- a node behind the chain


class _Lagging(ChainClient):
    """A node whose head is `lag_head` while the chain is further on (one of several nodes behind a
    load balancer): it knows no block above its head, nor the operator's nonces used there."""

    lag_head: int | None = None
    stale_nonce: int | None = None
    deaf: bool = False  # it never heard of the operator's transactions it has not mined

    def transaction_known(self, tx_hash: str) -> bool:
        return False if self.deaf else super().transaction_known(tx_hash)

    def block_number(self) -> int:
        real = super().block_number()
        return real if self.lag_head is None else min(real, self.lag_head)

    def block_hash(self, number: int) -> str | None:
        if self.lag_head is not None and number > self.lag_head:
            return None
        return super().block_hash(number)

    def transaction_count(self, block: str = "latest") -> int:
        return super().transaction_count(block) if self.stale_nonce is None else self.stale_nonce


def test_a_node_behind_the_chain_is_waited_for_and_a_settlement_is_neither_undone_nor_sent_again(node, settings):
    """Read as a chain that went back, a node one block behind undid the confirmed settlement and
    sent it again; the contract paid nothing the second time (the charge was paid), and the ledger
    then booked the charge as unpaid for good: the provider owed in the ledger what the chain had
    paid, the ledger check failing from then on. The deposit watcher gave a withdrawal back."""
    from billing.chain import NodeBehind
    from billing.deposits import chain_watch

    settings.CHAIN_BEHIND_GRACE_S = 300
    renter, account, payee, _job, lease = _charged(node, "lag")
    renters, providers = {renter.pk: account.address}, {lease.machine.provider_id: payee.address}
    node.env.send_as(account, node.env.escrow.functions.withdraw(ONE))
    chain_watch(client=node.env.client, deployment=node.env.deployment)
    available = renter_available_micro(renter_id=renter.pk)
    assert engine.settle_run(client=node.env.client, deployment=node.env.deployment, force=True)["confirmed"] == 1
    settlement = Settlement.objects.get()
    chain_watch(client=node.env.client, deployment=node.env.deployment)
    lagging = _Lagging(
        node.w3, operator_account=node.env.client.account, confirmations=1, receipt_timeout_s=0.3, poll_interval_s=0.01
    )
    lagging.lag_head, lagging.stale_nonce = (settlement.block_number or 0) - 2, settlement.nonce

    behind = engine.settle_run(client=lagging, deployment=node.env.deployment)
    with pytest.raises(NodeBehind):
        chain_watch(client=lagging, deployment=node.env.deployment)

    assert "is behind" in behind["node_unavailable"] and behind["sent"] == 0
    settlement.refresh_from_db()
    assert (settlement.status, settlement.attempts, settlement.rewinds) == ("confirmed", 1, 0)
    assert renter_available_micro(renter_id=renter.pk) == available
    # Caught up: nothing to undo, nothing sent again, the ledger and the chain agree.
    head = node.env.client.block_number()
    caught_up = engine.settle_run(client=node.client(), deployment=node.env.deployment, force=True)
    assert caught_up["sent"] == 0 and "rewound" not in caught_up and node.env.client.block_number() == head
    assert chain_watch(client=node.env.client, deployment=node.env.deployment).rewound == 0
    assert _earnings(node, payee) == 900_000 == provider_payable_micro(provider_id=lease.machine.provider_id)
    _agree(node, renters, providers)


def test_a_node_that_stays_behind_past_the_grace_is_read_as_a_chain_that_went_back(node, settings):
    """A node restored from older state that mines nothing more: after CHAIN_BEHIND_GRACE_S the
    blocks above its head are gone, and the settlement is undone and paid once more."""
    import time

    from django.core.cache import caches

    settings.CHAIN_BEHIND_GRACE_S = 300
    renter, account, payee, _job, lease = _charged(node, "stuck")
    renters, providers = {renter.pk: account.address}, {lease.machine.provider_id: payee.address}
    mark = node.mark()
    assert engine.settle_run(client=node.env.client, deployment=node.env.deployment, force=True)["confirmed"] == 1
    node.roll_back(mark)
    client = node.client()

    assert "is behind" in engine.settle_run(client=client, deployment=node.env.deployment)["node_unavailable"]
    caches["coordination"].set("billing.node_behind.operator", time.time() - 301, timeout=None)  # 5 minutes on
    result = engine.settle_run(client=client, deployment=node.env.deployment)

    assert result["rewound"] == {"settlements": 1} and result["sent"] == 1 and result["confirmed"] == 1
    assert _earnings(node, payee) == 900_000 == provider_payable_micro(provider_id=lease.machine.provider_id)
    _agree(node, renters, providers)


def test_a_batch_sent_again_after_its_first_transaction_paid_it_is_booked_paid(node, settings):
    """A node behind past the grace (or any way the marketplace loses track of a batch it sent)
    has the batch undone and sent again while its first transaction stands: the escrow pays
    nothing the second time, the charge being settled. It was booked as unpaid, never sent again
    (its cumulative settled), and the ledger owed the provider what the chain had paid, for good."""
    import time

    from django.core.cache import caches

    settings.CHAIN_BEHIND_GRACE_S = 300
    renter, account, payee, _job, lease = _charged(node, "twice")
    renters, providers = {renter.pk: account.address}, {lease.machine.provider_id: payee.address}
    assert engine.settle_run(client=node.env.client, deployment=node.env.deployment, force=True)["confirmed"] == 1
    settlement = Settlement.objects.get()
    lagging = _Lagging(
        node.w3, operator_account=node.env.client.account, confirmations=1, receipt_timeout_s=0.3, poll_interval_s=0.01
    )
    lagging.lag_head = (settlement.block_number or 0) - 1
    caches["coordination"].set("billing.node_behind.operator", time.time() - 301, timeout=None)
    behind = engine.settle_run(client=lagging, deployment=node.env.deployment)
    assert behind["rewound"] == {"settlements": 1} and behind["sent"] == 1  # the same batch, again
    assert _earnings(node, payee) == 900_000  # paid once: the contract skipped the replay

    engine.settle_run(client=node.client(), deployment=node.env.deployment)  # caught up: confirms it

    settlement.refresh_from_db()
    assert (settlement.status, settlement.attempts) == ("confirmed", 2)
    assert provider_payable_micro(provider_id=lease.machine.provider_id) == 900_000
    assert lease_money(lease_ids=[lease.pk])[lease.pk] == LeaseMoney(settled=ONE, fee=100_000, unsettled=0)
    _agree(node, renters, providers)


def test_a_node_that_has_no_block_after_a_batch_was_sent_does_not_make_it_vanish(node, settings):
    """A node at the very block a batch was sent from, which never heard of its transaction (one
    of several behind a load balancer), passed the wait for nodes behind: the batch was read as
    vanished, put back to pending and sent a second time."""
    from billing.rewind import chain_rewind

    settings.CHAIN_BEHIND_GRACE_S = 300
    _charged(node, "deaf")
    # Needing 3 blocks, it is not confirmed by this run: it stays submitted.
    engine.settle_run(client=node.client(confirmations=3), deployment=node.env.deployment, force=True)
    settlement = Settlement.objects.get()
    assert settlement.status == "submitted"
    deaf = _Lagging(
        node.w3, operator_account=node.env.client.account, confirmations=1, receipt_timeout_s=0.3, poll_interval_s=0.01
    )
    deaf.lag_head, deaf.stale_nonce, deaf.deaf = settlement.sent_from_block, settlement.nonce, True

    assert chain_rewind(client=deaf).vanished == 0

    settlement.refresh_from_db()
    assert settlement.status == "submitted"


def test_a_cache_that_cannot_be_read_stops_no_run_on_a_node_that_is_not_behind(monkeypatch):
    """The wait for a node behind keeps when it began in the coordination cache; a cache outage
    failed every chain run, the healthy ones too."""
    from django.core.cache import caches

    from billing.chain import NodeBehind
    from billing.rewind import node_behind_wait

    def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("the cache's Redis is down")

    cache = caches["coordination"]
    for name in ("get", "set", "delete"):
        monkeypatch.setattr(cache, name, down)

    assert node_behind_wait(head=10, needed=10, scope="operator", what="a record") is False
    with pytest.raises(NodeBehind):
        node_behind_wait(head=9, needed=10, scope="operator", what="a record")


# ---------------------------------------------------------------------------- a rollback under confirmed work


def test_a_settlement_whose_block_left_the_chain_is_undone_in_the_ledger_and_paid_once_more(node):
    renter, account, payee, _job, lease = _charged(node, "abe")
    renters, providers = {renter.pk: account.address}, {lease.machine.provider_id: payee.address}
    mark = node.mark()
    assert engine.settle_run(client=node.env.client, deployment=node.env.deployment, force=True)["confirmed"] == 1
    settlement = Settlement.objects.get()
    assert _earnings(node, payee) == 900_000 == provider_payable_micro(provider_id=lease.machine.provider_id)

    # The node comes back without the settlement's block, then mines on: the block at that number is another.
    node.roll_back(mark)
    node.mine(2)
    assert _earnings(node, payee) == 0 and provider_payable_micro(provider_id=lease.machine.provider_id) == 900_000
    check = ledger_check_run(client=node.env.client, deployment=node.env.deployment)
    assert not check.ok and any("earnings of 0, the ledger expects 900000" in d for d in check.differences)

    result = engine.settle_run(client=node.env.client, deployment=node.env.deployment)

    assert result["rewound"] == {"settlements": 1} and result["sent"] == 1 and result["confirmed"] == 1
    settlement.refresh_from_db()
    assert (settlement.status, settlement.attempts, settlement.rewinds) == ("confirmed", 2, 1)
    assert _earnings(node, payee) == 900_000 == provider_payable_micro(provider_id=lease.machine.provider_id)
    # The first confirmation was compensated, never edited: one reversal, two confirmations.
    kinds = list(
        LedgerEntry.objects.filter(settlement_ref=f"settlement:{settlement.pk}").values_list("kind", flat=True)
    )
    assert sorted(kinds) == ["chain_reversal", "settlement_confirm", "settlement_confirm", "settlement_submit"]
    # What the provider and the renter are shown counts the payment once.
    assert provider_earnings(provider_id=lease.machine.provider_id).earned == 900_000
    assert renter_balance(renter_id=renter.pk).settled == ONE
    assert lease_money(lease_ids=[lease.pk])[lease.pk] == LeaseMoney(settled=ONE, fee=100_000, unsettled=0)
    _agree(node, renters, providers)

    # Sent once more, not twice.
    head = node.env.client.block_number()
    again = engine.settle_run(client=node.env.client, deployment=node.env.deployment)
    assert again["sent"] == 0 and "rewound" not in again and node.env.client.block_number() == head
    assert _earnings(node, payee) == 900_000


def test_a_reservation_whose_block_left_the_chain_is_reserved_again_once(node):
    renter, account = funded_renter(node.env, "bea")
    job = new_job(renter)
    node.env.sign_budget(account, job, 2 * ONE)  # the job's budget: 1.00/GPU-hour for 2 h
    mark = node.mark()
    assert reserve_run(client=node.env.client, deployment=node.env.deployment)["reserved"] == 1
    auth = BudgetAuthorization.objects.get(job=job)
    assert auth.status == "reserved" and node.env.escrow.functions.job(job.pk).call()[2] == 2 * ONE

    node.roll_back(mark)
    node.mine(1)
    assert int(node.env.escrow.functions.job(job.pk).call()[0], 16) == 0  # the escrow holds no budget for it
    assert not ledger_check_run(client=node.env.client, deployment=node.env.deployment).ok

    result = reserve_run(client=node.env.client, deployment=node.env.deployment)

    assert result["rewound"] == {"reservations": 1} and (result["sent"], result["reserved"]) == (1, 1)
    auth.refresh_from_db()
    batch = BudgetReservation.objects.get()
    assert auth.status == "reserved" and auth.activated_at is not None
    assert (batch.status, batch.attempts, batch.rewinds) == ("confirmed", 2, 1)
    assert node.env.escrow.functions.job(job.pk).call()[2] == 2 * ONE
    _agree(node, {renter.pk: account.address}, {})
    head = node.env.client.block_number()
    assert reserve_run(client=node.env.client, deployment=node.env.deployment)["sent"] == 0
    assert node.env.client.block_number() == head


def test_a_release_whose_block_left_the_chain_is_sent_again_once(node):
    renter, account, payee, job, lease = _charged(node, "cy")
    assert engine.settle_run(client=node.env.client, deployment=node.env.deployment, force=True)["confirmed"] == 1
    mark = node.mark()
    assert jobs_release_on_chain(client=node.env.client, deployment=node.env.deployment)["released"] == 1
    assert node.env.escrow.functions.job(job.pk).call()[5]  # closed

    node.roll_back(mark)
    node.mine(1)
    assert not node.env.escrow.functions.job(job.pk).call()[5]  # open again: 1 token still reserved there
    assert not ledger_check_run(client=node.env.client, deployment=node.env.deployment).ok

    result = jobs_release_on_chain(client=node.env.client, deployment=node.env.deployment)

    assert result["rewound"] == {"releases": 1} and result["released"] == 1
    assert node.env.escrow.functions.job(job.pk).call()[5]
    assert int(node.env.escrow.functions.availableBalance(account.address).call()) == 9 * ONE
    assert renter_available_micro(renter_id=renter.pk) == 9 * ONE
    _agree(node, {renter.pk: account.address}, {lease.machine.provider_id: payee.address})
    head = node.env.client.block_number()
    assert jobs_release_on_chain(client=node.env.client, deployment=node.env.deployment)["released"] == 0
    assert node.env.client.block_number() == head


def test_a_rollback_under_reservation_settlement_and_release_undoes_all_three_and_redoes_each_once(node):
    renter, account = funded_renter(node.env, "dot")
    payee = node.env.account("payee dot")
    job, lease = charged_job(renter, provider_address=payee.address)
    node.env.sign_budget(account, job, 2 * ONE)
    mark = node.mark()
    client = node.env.client
    assert engine.settle_run(client=client, deployment=node.env.deployment, force=True)["confirmed"] == 1
    services.budgets_release()
    assert jobs_release_on_chain(client=client, deployment=node.env.deployment)["released"] == 1

    node.roll_back(mark)  # the reservation, the settlement and the release are gone
    node.mine(4)
    engine.settle_run(client=client, deployment=node.env.deployment)
    jobs_release_on_chain(client=client, deployment=node.env.deployment)

    assert (BudgetReservation.objects.get().attempts, Settlement.objects.get().attempts) == (2, 2)
    assert _earnings(node, payee) == 900_000
    assert node.env.escrow.functions.job(job.pk).call()[5]
    _agree(node, {renter.pk: account.address}, {lease.machine.provider_id: payee.address})


def test_a_rollback_after_the_release_checked_the_settlement_cannot_close_the_job_with_its_charge_unpaid(
    node, monkeypatch
):
    """The release run checks that the chain still holds what the ledger rests on, then the chain
    rolls back under it before the releaseJob is mined: the escrow refuses the release (it holds less
    settled for the job than the ledger), the ledger undoes the settlement, it is paid again, and
    only then is the job closed. Closed at once, the job would skip the settlement sent again: the provider
    unpaid for good, the ledger holding the charge forever."""
    renter, account, payee, job, lease = _charged(node, "hal")
    client = node.client()
    mark = node.mark()
    assert engine.settle_run(client=client, deployment=node.env.deployment, force=True)["confirmed"] == 1

    def roll_back() -> None:  # the settlement is gone the moment after the check
        node.roll_back(mark)
        node.mine(2)
        client.nonce_reset()  # the operator's next transaction is mined at once

    rolled_back_after_check(monkeypatch, release_module, roll_back)
    result = jobs_release_on_chain(client=client, deployment=node.env.deployment)

    assert result["waiting"] == 1 and result["released"] == 0
    assert Settlement.objects.get().status == "pending"  # the ledger undid it: it goes out again
    assert not node.env.escrow.functions.job(job.pk).call()[5]  # still open: the charge can be paid again
    assert _earnings(node, payee) == 0
    monkeypatch.undo()

    assert engine.settle_run(client=client, deployment=node.env.deployment)["confirmed"] == 1
    assert jobs_release_on_chain(client=client, deployment=node.env.deployment)["released"] == 1

    assert node.env.escrow.functions.job(job.pk).call()[5]
    assert _earnings(node, payee) == 900_000 == provider_payable_micro(provider_id=lease.machine.provider_id)
    _agree(node, {renter.pk: account.address}, {lease.machine.provider_id: payee.address})


def test_a_rollback_after_the_runs_rewind_holds_back_the_next_batch_of_the_lease_and_each_part_is_paid_once(
    node, monkeypatch
):
    """A running lease's first half hour is settled; the chain then rolls back under the run that
    settles its second half hour, after the run's own rewind found the chain whole. Sent then, the
    second batch would be mined on the shorter chain and pay, under the cumulative charge, both
    half hours while the ledger books one (it still holds the first batch confirmed); the first
    batch sent again would pay nothing and its half hour would wait unsettled for good (what the
    fault suite's chain rollback found once). The batch is held back, the ledger undoes the first
    one, and the next run pays each half hour once, in order."""
    renter, account = funded_renter(node.env, "ida")
    payee = node.env.account("payee ida")
    job = new_job(renter)
    node.env.sign_budget(account, job, 2 * ONE)
    client = node.client()
    deployment = node.env.deployment
    assert reserve_run(client=client, deployment=deployment)["reserved"] == 1
    t0 = timezone.now() - timedelta(hours=2)
    lease = placed_lease(job=job, provider=ProviderFactory(payout_address=payee.address), price="1.00", started=t0)

    ran_half_hour_until(lease, t0, 1800)
    mark = node.mark()
    assert engine.settle_run(client=client, deployment=deployment, force=True)["confirmed"] == 1
    assert _earnings(node, payee) == 450_000
    ran_half_hour_until(lease, t0, 3600)
    # The first batch is gone the moment after the run's rewind (the settlement run's starts
    # with the reservation run's).
    rolled_back_after_rewind(monkeypatch, reservations_module, lambda: node.roll_back(mark))
    held = engine.settle_run(client=client, deployment=deployment, force=True)
    monkeypatch.undo()

    assert held["held_back"] == 1 and held["sent"] == 0
    assert list(Settlement.objects.order_by("pk").values_list("status", flat=True)) == ["pending", "pending"]
    assert _earnings(node, payee) == 0

    again = engine.settle_run(client=client, deployment=deployment)

    assert again["confirmed"] == 2
    assert [s.delta_micro for s in SettlementItem.objects.order_by("settlement_id")] == [500_000, 500_000]
    assert _earnings(node, payee) == 900_000 == provider_payable_micro(provider_id=lease.machine.provider_id)
    _agree(node, {renter.pk: account.address}, {lease.machine.provider_id: payee.address})


def _skipped_then_paid(node: Node, monkeypatch: pytest.MonkeyPatch, label: str):  # type: ignore[no-untyped-def]
    """A finished job whose budget is reserved on chain; the settlement run checks that the chain
    still holds what the ledger rests on, then the chain rolls back under it (to `mark`, before the
    reservation) before its batch is mined: the escrow, which no longer knows the job, skips the
    item (`UnknownJob`) and pays nothing. Then the runs go on until the job is released."""
    renter, account = funded_renter(node.env, label)
    payee = node.env.account(f"payee {label}")
    job, lease = charged_job(renter, provider_address=payee.address)
    node.env.sign_budget(account, job, 2 * ONE)
    client = node.client()
    mark = node.mark()
    assert reserve_run(client=client, deployment=node.env.deployment)["reserved"] == 1
    assert services.budgets_release()["released"] == 1

    def roll_back() -> None:  # the reservation is gone the moment after the check
        node.roll_back(mark)
        node.mine(1)

    rolled_back_after_check(monkeypatch, engine, roll_back)
    engine.settle_run(client=client, deployment=node.env.deployment, force=True)
    monkeypatch.undo()
    assert _earnings(node, payee) == 0
    _runs(node, client)
    return renter, account, payee, job, lease, client, mark


def _runs(node: Node, client: ChainClient) -> None:
    """The billing runs, three times over: what billing's beat tasks do within a minute."""
    for _ in range(3):
        engine.settle_run(client=client, deployment=node.env.deployment, force=True)
        engine.settlements_reconcile(client=client, deployment=node.env.deployment, older_than_s=0)
        jobs_release_on_chain(client=client, deployment=node.env.deployment)


def _paid_once_and_released(node: Node, renter: Any, account: Any, payee: Any, job: Any, lease: Any) -> None:
    assert _earnings(node, payee) == 900_000 == provider_payable_micro(provider_id=lease.machine.provider_id)
    assert lease_money(lease_ids=[lease.pk])[lease.pk] == LeaseMoney(settled=ONE, fee=100_000, unsettled=0)
    assert node.env.escrow.functions.job(job.pk).call()[5]  # closed: the unspent token is the renter's again
    assert int(node.env.escrow.functions.availableBalance(account.address).call()) == 9 * ONE
    _agree(node, {renter.pk: account.address}, {lease.machine.provider_id: payee.address})


def test_a_settlement_mined_after_a_rollback_took_its_jobs_reservation_pays_the_charge_once_reserved_again(
    node, monkeypatch
):
    """The escrow skipped the item of a job whose reservation a rollback took just before the
    batch was mined (`_skipped_then_paid`): the charge went back to unsettled and goes out again
    once the budget is reserved again. Counted as sent by the skipped item, it waited unsettled
    for good, and the job's budget stayed reserved in the escrow though the ledger had released it
    (what the fault suite's chain rollback found twice)."""
    renter, account, payee, job, lease, _client, _mark = _skipped_then_paid(node, monkeypatch, "jo")

    _paid_once_and_released(node, renter, account, payee, job, lease)
    skipped, paid = Settlement.objects.order_by("pk")
    assert [(i.delta_micro, i.job_unknown) for i in skipped.items.all()] == [(ONE, True)]
    assert [(i.delta_micro, i.job_unknown) for i in paid.items.all()] == [(ONE, False)]
    assert "it knew no such job" in skipped.last_error


def test_a_rollback_under_a_skipped_item_and_the_batch_that_paid_it_pays_the_charge_once(node, monkeypatch):
    """After `_skipped_then_paid`, the chain goes back to before the reservation again: the batch
    that paid the charge, the reservation and the release are gone, and so is the batch whose item
    was skipped, which paid nothing. The first goes out again and pays the charge once; the second
    has nothing to send (its charge went out in the first) and stays confirmed."""
    renter, account, payee, job, lease, client, mark = _skipped_then_paid(node, monkeypatch, "kai")

    node.roll_back(mark)
    node.mine(2)
    _runs(node, client)

    _paid_once_and_released(node, renter, account, payee, job, lease)
    skipped, paid = Settlement.objects.order_by("pk")
    assert (skipped.status, skipped.rewinds, skipped.block_number) == ("confirmed", 1, None)
    assert (paid.status, paid.rewinds, paid.attempts) == ("confirmed", 1, 2)
    assert BudgetReservation.objects.get().rewinds == 2


# ---------------------------------------------------------------------------- a submitted transaction vanishes


def test_a_submitted_settlement_whose_transaction_vanished_is_sent_again_exactly_once(node):
    renter, account, payee, _job, lease = _charged(node, "eli")
    mark = node.mark()
    client = node.client(confirmations=2)  # mined, not deep enough: the batch stays submitted
    engine.settle_run(client=client, deployment=node.env.deployment, force=True)
    settlement = Settlement.objects.get()
    assert settlement.status == "submitted" and _earnings(node, payee) == 900_000

    node.roll_back(mark)  # its transaction is gone from the chain and from the node's pool
    assert client.receipt(settlement.tx_hash) is None and _earnings(node, payee) == 0

    first = engine.settle_run(client=client, deployment=node.env.deployment)
    node.mine(1)
    second = engine.settlements_reconcile(client=client, deployment=node.env.deployment, older_than_s=0)

    assert first["rewound"] == {"vanished": 1} and first["sent"] == 1
    assert second["confirmed"] == 1 and second["sent"] == 0
    settlement.refresh_from_db()
    assert (settlement.status, settlement.attempts) == ("confirmed", 2)
    assert _earnings(node, payee) == 900_000 == provider_payable_micro(provider_id=lease.machine.provider_id)
    _agree(node, {renter.pk: account.address}, {lease.machine.provider_id: payee.address})


def test_a_submitted_reservation_whose_transaction_vanished_is_sent_again_exactly_once(node):
    renter, account = funded_renter(node.env, "fin")
    job = new_job(renter)
    node.env.sign_budget(account, job, 2 * ONE)
    mark = node.mark()
    client = node.client(confirmations=2)
    reserve_run(client=client, deployment=node.env.deployment)
    batch = BudgetReservation.objects.get()
    assert batch.status == "submitted"

    node.roll_back(mark)
    first = reserve_run(client=client, deployment=node.env.deployment)
    node.mine(1)
    second = reserve_run(client=client, deployment=node.env.deployment)

    assert first["rewound"] == {"vanished": 1} and first["sent"] == 1
    assert second["sent"] == 0 and second["reserved"] == 1
    batch.refresh_from_db()
    assert (batch.status, batch.attempts) == ("confirmed", 2)
    assert BudgetAuthorization.objects.get(job=job).status == "reserved"
    assert node.env.escrow.functions.job(job.pk).call()[2] == 2 * ONE
    _agree(node, {renter.pk: account.address}, {})


def test_a_release_whose_transaction_vanished_before_it_confirmed_is_sent_again_exactly_once(node):
    renter, account, payee, job, lease = _charged(node, "gwen")
    assert engine.settle_run(client=node.env.client, deployment=node.env.deployment, force=True)["confirmed"] == 1
    mark = node.mark()
    client = node.client(confirmations=2)
    assert jobs_release_on_chain(client=client, deployment=node.env.deployment)["pending"] == 1
    sent = BudgetAuthorization.objects.get(job=job).release_tx_hash
    assert sent and node.env.escrow.functions.job(job.pk).call()[5]
    # A run while it waits for depth follows that transaction: nothing is sent again.
    head = client.block_number()
    assert jobs_release_on_chain(client=client, deployment=node.env.deployment)["pending"] == 1
    assert client.block_number() == head

    node.roll_back(mark)  # the releaseJob is gone: the job is open on chain again
    sent_by_operator = client.transaction_count("latest")
    again = jobs_release_on_chain(client=client, deployment=node.env.deployment)
    node.mine(1)
    done = jobs_release_on_chain(client=client, deployment=node.env.deployment)

    assert again["pending"] == 1 and done["released"] == 1
    assert client.transaction_count("latest") == sent_by_operator + 1  # one releaseJob more
    auth = BudgetAuthorization.objects.get(job=job)
    assert auth.released_on_chain_at is not None and auth.release_tx_hash.startswith("0x")
    assert node.env.escrow.functions.job(job.pk).call()[5]
    assert int(node.env.escrow.functions.availableBalance(account.address).call()) == 9 * ONE
    _agree(node, {renter.pk: account.address}, {lease.machine.provider_id: payee.address})


def test_a_release_sent_past_a_nonce_gap_after_a_rollback_is_mined_by_the_next_run(node):
    """The chain rolls back under the operator's nonce counter (two of its transactions are gone)
    and the release run sends the job's releaseJob under the stale counter: the node holds it
    past a gap of two nonces and, with nothing else going out, would never mine it (the fault run
    found two budgets left unreleased this way). The next run fills the gap and the release is
    mined, once."""
    if node.anvil is None:
        pytest.skip("py-evm refuses a nonce past a gap (the client then sends at its count): nothing waits behind one")
    renter, account, payee, job, lease = _charged(node, "ivy")
    assert engine.settle_run(client=node.env.client, deployment=node.env.deployment, force=True)["confirmed"] == 1
    client = node.client()
    mark = node.mark()
    for _ in range(2):
        client.wait_receipt(client.send_value(client.address, 0).hash)
    node.roll_back(mark)
    node.mine(1)
    sent_by_operator = client.transaction_count("latest")

    stalled = jobs_release_on_chain(client=client, deployment=node.env.deployment)

    assert (stalled["pending"], stalled["released"]) == (1, 0) and "stalled" in stalled
    sent = BudgetAuthorization.objects.get(job=job).release_tx_hash
    assert client.web3.eth.get_transaction(sent)["nonce"] == sent_by_operator + 2  # past the gap
    assert not node.env.escrow.functions.job(job.pk).call()[5]

    done = jobs_release_on_chain(client=client, deployment=node.env.deployment)

    assert done["rewound"] == {"gaps_filled": 2} and done["released"] == 1
    assert client.transaction_count("latest") == sent_by_operator + 3  # two fillers, one releaseJob
    auth = BudgetAuthorization.objects.get(job=job)
    assert auth.released_on_chain_at is not None and auth.release_tx_hash == sent
    assert node.env.escrow.functions.job(job.pk).call()[5]
    assert int(node.env.escrow.functions.availableBalance(account.address).call()) == 9 * ONE
    _agree(node, {renter.pk: account.address}, {lease.machine.provider_id: payee.address})
    head = client.block_number()
    assert jobs_release_on_chain(client=client, deployment=node.env.deployment)["released"] == 0
    assert client.block_number() == head


# ---------------------------------------------------------------------------- a node without history


class _PrunedClient(ChainClient):
    """A client on a node that keeps no state below `oldest` (restored from saved state, or
    pruned): reading it fails as anvil fails it (BlockOutOfRangeError)."""

    oldest = 0

    def call(self, fn: Any, *, block: Any = "latest") -> Any:
        if isinstance(block, int) and block < self.oldest:
            raise ChainError(f"BlockOutOfRangeError: block height is {self.oldest} but requested was {block}")
        return super().call(fn, block=block)


def _restart_without_history(node: Node, tmp_path: Path) -> ChainClient:
    """The node restarted from its saved state (anvil: stopped, which writes its state file, and
    started again from it; it then serves no state older than that), needing 2 confirmations."""
    if node.anvil is None:
        client = _PrunedClient(
            node.env.client.web3,
            operator_account=node.env.client.account,
            confirmations=2,
            receipt_timeout_s=0.3,
            poll_interval_s=0.01,
        )
        client.oldest = client.block_number()
        return client
    state = node.anvil.state_path
    node.anvil.stop()
    node.anvil = anvil_start(state_path=state)
    node.env = _anvil_env(node.anvil, tmp_path)  # the same deployment, found again in its file
    return node.client(confirmations=2)


@pytest.mark.parametrize("leases", [3])
def test_a_settlement_submitted_before_the_node_restarted_without_history_confirms(node, tmp_path, leases):
    renters, providers, payees = {}, {}, []
    for n in range(leases):
        renter, account, payee, _job, lease = _charged(node, f"fay {n}")
        renters[renter.pk], providers[lease.machine.provider_id] = account.address, payee.address
        payees.append(payee)
    engine.settle_run(client=node.client(confirmations=2), deployment=node.env.deployment, force=True)
    settlement = Settlement.objects.get()
    assert settlement.status == "submitted" and settlement.item_count == leases

    client = _restart_without_history(node, tmp_path)
    with pytest.raises(ChainError):  # the state before the settlement's block is gone
        client.call(node.env.escrow.functions.feeBps(), block=client.block_number() - 1)
    node.mine(1)
    result = engine.settlements_reconcile(client=client, deployment=node.env.deployment, older_than_s=0)

    assert result["confirmed"] == 1 and "items_failed" not in result
    settlement.refresh_from_db()
    assert settlement.status == "confirmed" and settlement.block_hash and settlement.attempts == 1
    assert [_earnings(node, p) for p in payees] == [900_000] * leases
    node.env.client = client
    _agree(node, renters, providers)


def test_a_node_that_restarted_without_history_still_passes_the_reconciler_run(node, tmp_path, monkeypatch):
    """Through the task: the reconciler's run is ok (not failing every minute) once it confirmed."""
    import billing.chain
    from billing import tasks
    from core.models import PeriodicTaskState

    _charged(node, "gus")
    engine.settle_run(client=node.client(confirmations=2), deployment=node.env.deployment, force=True)
    client = _restart_without_history(node, tmp_path)
    node.mine(1)
    Settlement.objects.update(updated_at="2000-01-01T00:00:00Z")  # stuck long enough for the reconciler
    monkeypatch.setattr(billing.chain, "chain_client_from_settings", lambda: client)
    monkeypatch.setattr(engine, "deployment_require", lambda client: node.env.deployment)

    result = tasks.reconcile_settlements()

    assert result["confirmed"] == 1
    state = PeriodicTaskState.objects.get(name="billing.tasks.reconcile_settlements")
    assert (state.last_ok, state.consecutive_failures) == (True, 0)
    assert Settlement.objects.get().status == "confirmed"


def test_unresolvable_receipts_fail_the_run_loudly_instead_of_passing(node, tmp_path, monkeypatch):
    """A mined batch whose events do not add up, on a node without history, stays submitted and
    fails the reconciler's run (logged as an error, counted), rather than passing as succeeded."""
    import billing.chain
    from billing import tasks
    from core.models import PeriodicTaskState

    _charged(node, "hal")
    engine.settle_run(client=node.client(confirmations=2), deployment=node.env.deployment, force=True)
    client = _restart_without_history(node, tmp_path)
    node.mine(1)
    Settlement.objects.update(updated_at="2000-01-01T00:00:00Z")
    # The ledger believes it sent more than the chain was asked for.
    Settlement.objects.get().items.update(delta_micro=1_000_001)
    monkeypatch.setattr(billing.chain, "chain_client_from_settings", lambda: client)
    monkeypatch.setattr(engine, "deployment_require", lambda client: node.env.deployment)

    result = tasks.reconcile_settlements()

    assert result["items_failed"] == 1 and "SettlementUnresolved" in result["failed_items"][0]
    state = PeriodicTaskState.objects.get(name="billing.tasks.reconcile_settlements")
    assert (state.last_ok, state.consecutive_failures) == (False, 1)
    assert Settlement.objects.get().status == "submitted"


# ---------------------------------------------------------------------------- what the ledger check sees


def test_a_corrupted_ledger_fails_the_ledger_check_with_the_difference_printed(node, settings, capsys, monkeypatch):
    from django.core.management import CommandError, call_command

    import billing.chain
    from billing.chain.deployment import deployment_save

    renter, account, payee, _job, lease = _charged(node, "ida")
    assert engine.settle_run(client=node.env.client, deployment=node.env.deployment, force=True)["confirmed"] == 1
    provider_id = lease.machine.provider_id
    _agree(node, {renter.pk: account.address}, {provider_id: payee.address})
    # The command finds the escrow as production does (its deployment file) and reads the node.
    deployment_save(
        node.env.deployment, path=Path(settings.VAR_DIR) / "chain" / f"deployment-{node.env.client.chain_id()}.json"
    )
    monkeypatch.setattr(billing.chain, "chain_client_from_settings", lambda **kwargs: node.env.client)
    call_command("ledger_check")
    assert "agrees with the chain" in capsys.readouterr().out

    # A movement the chain never made, balanced and well formed: the ledger alone cannot tell.
    services.ledger_post(
        kind="settlement_confirm",
        idempotency_key="corruption",
        legs=[
            services.Leg(services.provider_payable(provider_id), -1),
            services.Leg(services.PLATFORM_FEES, 1),
        ],
    )
    with pytest.raises(CommandError) as failed:
        call_command("ledger_check")

    assert failed.value.returncode == 1
    out = capsys.readouterr().out
    assert "fees: the escrow accrued 100000, the ledger expects 100001 (platform_fees 100001)" in out
    assert f"provider {provider_id} ({payee.address.lower()}): the escrow holds earnings of 900000, " in out
    assert "the ledger expects 899999 (provider_payable 899999)" in out
