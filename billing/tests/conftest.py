"""Chains for the escrow contract tests: the in-process EVM (eth-tester + py-evm) and a real anvil node.

`chain` is parametrised over both backends, so every contract test runs twice. Each backend is
started and deployed once per session; every test runs inside a snapshot that is reverted after it.
anvil comes from the npm package @foundry-rs/anvil (`npm ci`); without it the anvil half is skipped
locally and fails when the CI environment variable is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_utils import keccak
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD
from web3.middleware import SignAndSendRawMiddlewareBuilder

from billing.chain.anvil import anvil_binary, anvil_running
from billing.contract import (
    ESCROW,
    STABLECOIN,
    BudgetAuthorization,
    DecodedError,
    SettlementItem,
    budget_sign,
    contract_deploy,
    revert_decode,
    settlement_items_encode,
)
from tests.depth import evms

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKENDS = evms()  # anvil unless GPGPU_TEST_EVMS says otherwise (tests/depth.py)
INITIAL_FEE_BPS = 500
ONE_TOKEN = 10**6  # MockStablecoin has 6 decimals


# ---------------------------------------------------------------------------- the chain under test


def _key(label: str) -> LocalAccount:
    """A deterministic account per role, identical on both backends."""
    return Account.from_key(keccak(text=f"gpgpu escrow tests: {label}"))


@dataclass
class Chain:
    """A deployed escrow and token with funded, locally signing accounts, on one backend."""

    backend: str
    w3: Web3
    admin: LocalAccount
    operator: LocalAccount
    pauser: LocalAccount
    treasury: LocalAccount
    outsider: LocalAccount
    renters: list[LocalAccount]
    providers: list[LocalAccount]
    token: Any
    escrow: Any
    _next_job: int = field(default=1)

    @property
    def chain_id(self) -> int:
        return self.w3.eth.chain_id

    def now(self) -> int:
        """Timestamp of the latest block."""
        return self.w3.eth.get_block("latest")["timestamp"]

    def advance_time(self, seconds: int) -> None:
        """Mine a block `seconds` later than the latest one."""
        if self.backend == "eth-tester":
            self.w3.provider.ethereum_tester.time_travel(self.now() + seconds)
        else:
            self.w3.provider.make_request("evm_increaseTime", [seconds])
            self.w3.provider.make_request("evm_mine", [])

    def send(self, call: Any, sender: LocalAccount) -> Any:
        """Send a contract call from `sender` and return its receipt; a revert raises a web3 exception."""
        tx_hash = call.transact({"from": sender.address})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash)
        assert receipt["status"] == 1
        return receipt

    def revert_of(self, call: Any, sender: LocalAccount) -> DecodedError:
        """Send a call expected to revert and return the decoded error (fails the test otherwise)."""
        # JSON-RPC nodes raise web3's ContractLogicError; eth-tester raises its own TransactionFailed.
        with pytest.raises((ContractLogicError, TransactionFailed)) as caught:
            self.send(call, sender)
        decoded = revert_decode(caught.value)
        assert decoded is not None, f"undecodable revert: {caught.value!r}"
        return decoded

    # -- domain helpers

    def fund_renter(self, renter: LocalAccount, amount: int) -> None:
        """Mint `amount`, approve and deposit it into the escrow for `renter`."""
        self.send(self.token.functions.mint(renter.address, amount), renter)
        self.send(self.token.functions.approve(self.escrow.address, amount), renter)
        self.send(self.escrow.functions.deposit(amount), renter)

    def new_job_id(self) -> int:
        job_id = self._next_job
        self._next_job += 1
        return job_id

    def budget(
        self, renter: LocalAccount, job_id: int, max_amount: int, *, deadline: int | None = None
    ) -> BudgetAuthorization:
        """A budget signed by `renter` (deadline one hour ahead unless given)."""
        return budget_sign(
            private_key=renter.key,
            chain_id=self.chain_id,
            escrow=self.escrow.address,
            job_id=job_id,
            max_amount=max_amount,
            deadline=self.now() + 3600 if deadline is None else deadline,
        )

    def reserve_call(self, budgets: list[BudgetAuthorization]) -> Any:
        return self.escrow.functions.reserve([b.as_abi() for b in budgets])

    def reserve(self, budgets: list[BudgetAuthorization]) -> Any:
        """Reserve budgets as the operator and return the receipt."""
        return self.send(self.reserve_call(budgets), self.operator)

    def settle_call(self, items: list[SettlementItem], budgets: list[BudgetAuthorization] = ()) -> Any:  # type: ignore[assignment]
        return self.escrow.functions.settle(settlement_items_encode(items), [b.as_abi() for b in budgets])

    def settle(self, items: list[SettlementItem], budgets: list[BudgetAuthorization] = ()) -> Any:  # type: ignore[assignment]
        """Settle as the operator and return the receipt."""
        return self.send(self.settle_call(items, budgets), self.operator)

    def events(self, receipt: Any, name: str) -> list[Any]:
        """Decoded escrow events of `name` in `receipt`."""
        event = getattr(self.escrow.events, name)()
        return [log for log in event.process_receipt(receipt, errors=DISCARD) if log["address"] == self.escrow.address]

    def token_balance(self, address: str) -> int:
        return self.token.functions.balanceOf(address).call()


def _snapshot(w3: Web3, backend: str) -> Callable[[], None]:
    """Take a snapshot and return the function that reverts to it."""
    if backend == "eth-tester":
        tester = w3.provider.ethereum_tester
        snapshot_id = tester.take_snapshot()
        return lambda: tester.revert_to_snapshot(snapshot_id)
    snapshot_id = w3.provider.make_request("evm_snapshot", [])["result"]
    return lambda: w3.provider.make_request("evm_revert", [snapshot_id])


def _build_chain(backend: str, w3: Web3) -> Chain:
    roles = ["admin", "operator", "pauser", "treasury", "outsider"]
    accounts = {role: _key(role) for role in roles}
    renters = [_key(f"renter {i}") for i in range(3)]
    providers = [_key(f"provider {i}") for i in range(4)]
    everyone = [*accounts.values(), *renters, *providers]
    w3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build(everyone), layer=0)
    faucet = w3.eth.accounts[0]
    for account in everyone:
        tx = w3.eth.send_transaction({"from": faucet, "to": account.address, "value": 10**20})
        w3.eth.wait_for_transaction_receipt(tx)

    admin = accounts["admin"]
    token = contract_deploy(w3, STABLECOIN, sender=admin.address)
    escrow = contract_deploy(
        w3, ESCROW, token.address, admin.address, accounts["treasury"].address, INITIAL_FEE_BPS, sender=admin.address
    )
    chain = Chain(
        backend=backend,
        w3=w3,
        admin=admin,
        operator=accounts["operator"],
        pauser=accounts["pauser"],
        treasury=accounts["treasury"],
        outsider=accounts["outsider"],
        renters=renters,
        providers=providers,
        token=token,
        escrow=escrow,
    )
    chain.send(escrow.functions.grantRole(escrow.functions.OPERATOR_ROLE().call(), chain.operator.address), admin)
    chain.send(escrow.functions.grantRole(escrow.functions.PAUSER_ROLE().call(), chain.pauser.address), admin)
    return chain


def eth_tester_web3() -> Web3:
    """A Web3 on a fresh in-process py-evm chain."""
    from eth_tester import EthereumTester
    from web3 import EthereumTesterProvider

    from billing.chain.evm import eth_tester_backend

    return Web3(EthereumTesterProvider(EthereumTester(eth_tester_backend())))


@pytest.fixture(autouse=True)
def _own_var_dir(settings: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """billing's tests keep their files (deployment files above all) in a directory of their own:
    a developer's var/chain/ (a demo's deployment) must not make `manage.py ledger_check` look for
    a chain node. A test that needs its own sets VAR_DIR again."""
    settings.VAR_DIR = tmp_path_factory.mktemp("var")


@pytest.fixture(autouse=True)
def dispatched(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Reservation runs billing asked Celery for (billing.reservations.reservation_request_soon),
    recorded instead of sent: billing's tests drive the runs themselves and write no broker files."""
    from billing import reservations, tasks
    from core import soon

    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(tasks.reserve_budgets, "apply_async", lambda *args, **kwargs: sent.append(kwargs))
    soon.marker_delete(reservations._QUEUED_KEY)
    return sent


@pytest.fixture(params=BACKENDS)
def chain(request: pytest.FixtureRequest) -> Iterator[Chain]:
    """A freshly deployed escrow on each backend; state changes are rolled back after the test."""
    deployed: Chain = request.getfixturevalue(f"_deployed_{request.param.replace('-', '_')}")
    revert = _snapshot(deployed.w3, deployed.backend)
    next_job = deployed._next_job
    try:
        yield deployed
    finally:
        revert()
        deployed._next_job = next_job


@pytest.fixture(scope="session")
def _deployed_eth_tester() -> Chain:
    return _build_chain("eth-tester", eth_tester_web3())


@pytest.fixture(scope="session")
def _deployed_anvil() -> Iterator[Chain]:
    if anvil_binary() is None:
        message = "anvil binary missing (run `npm ci`): the anvil backend was not tested"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with anvil_running() as w3:
        yield _build_chain("anvil", w3)


@pytest.fixture
def tester_chain(_deployed_eth_tester: Chain) -> Iterator[Chain]:
    """The eth-tester backend only (fast), for property tests; rolled back after the test."""
    revert = _snapshot(_deployed_eth_tester.w3, "eth-tester")
    try:
        yield _deployed_eth_tester
    finally:
        revert()
