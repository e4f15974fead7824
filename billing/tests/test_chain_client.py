"""The chain client on the in-process EVM and on a real anvil node: sends, receipts, errors, nonces, keys."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from billing.chain.anvil import anvil_running, free_port
from billing.chain.client import (
    ANVIL_DEV_KEY_0,
    ChainClient,
    chain_client_eth_tester,
    chain_client_from_settings,
    key_file_read,
    operator_account_from_settings,
)
from billing.chain.deployment import deployment_ensure
from billing.chain.errors import (
    ChainConfigurationError,
    ContractReverted,
    InsufficientGasFunds,
    NodeUnavailable,
    TransactionTimeout,
)
from billing.contract import ESCROW, STABLECOIN
from billing.tests.support import require_anvil
from tests.depth import evms

BACKENDS = evms()  # anvil unless GPGPU_TEST_EVMS says otherwise (tests/depth.py)
OPERATOR = Account.from_key(keccak(text="gpgpu chain client tests: operator"))
RENTER = Account.from_key(keccak(text="gpgpu chain client tests: renter"))


@dataclass
class Node:
    """One backend with the escrow deployed by the client under test, and ways to steer mining."""

    backend: str
    client: ChainClient
    escrow: Any
    token: Any
    mine: Callable[[int], None]
    set_automine: Callable[[bool], None]
    snapshot: Callable[[], Callable[[], None]]


def _eth_tester_node(tmp: Path) -> Node:
    client = chain_client_eth_tester(operator_account=OPERATOR, poll_interval_s=0.01)
    tester = client.web3.provider.ethereum_tester

    def set_automine(on: bool) -> None:
        (tester.enable_auto_mine_transactions if on else tester.disable_auto_mine_transactions)()

    def snapshot() -> Callable[[], None]:
        snapshot_id = tester.take_snapshot()
        return lambda: tester.revert_to_snapshot(snapshot_id)

    return _deployed("eth-tester", client, tmp, lambda n: tester.mine_blocks(n), set_automine, snapshot)


def _anvil_node(w3: Any, tmp: Path) -> Node:
    faucet = w3.eth.accounts[0]
    for account in (OPERATOR, RENTER):
        w3.eth.wait_for_transaction_receipt(
            w3.eth.send_transaction({"from": faucet, "to": account.address, "value": 10**21})
        )
    client = ChainClient(w3, operator_account=OPERATOR, receipt_timeout_s=10, poll_interval_s=0.02)

    def mine(n: int) -> None:
        for _ in range(n):
            w3.provider.make_request("evm_mine", [])

    def snapshot() -> Callable[[], None]:
        snapshot_id = w3.provider.make_request("evm_snapshot", [])["result"]
        return lambda: w3.provider.make_request("evm_revert", [snapshot_id])

    return _deployed("anvil", client, tmp, mine, lambda on: w3.provider.make_request("evm_setAutomine", [on]), snapshot)


def _deployed(backend: str, client: ChainClient, tmp: Path, *steering: Any) -> Node:
    if backend == "eth-tester":
        faucet = client.web3.eth.accounts[0]
        client.web3.eth.send_transaction({"from": faucet, "to": RENTER.address, "value": 10**21})
    deployment, _ = deployment_ensure(
        client=client, treasury=OPERATOR.address, fee_bps=500, dev_token=True, path=tmp / f"{backend}.json"
    )
    return Node(
        backend,
        client,
        client.contract(ESCROW, deployment.escrow),
        client.contract(STABLECOIN, deployment.token),
        *steering,
    )


@pytest.fixture(scope="module")
def _eth_tester(tmp_path_factory: pytest.TempPathFactory) -> Node:
    return _eth_tester_node(tmp_path_factory.mktemp("eth-tester"))


@pytest.fixture(scope="module")
def _anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    require_anvil()
    with anvil_running() as w3:
        yield _anvil_node(w3, tmp_path_factory.mktemp("anvil"))


@pytest.fixture(params=BACKENDS)
def node(request: pytest.FixtureRequest) -> Iterator[Node]:
    """A deployed escrow on each backend, with a fresh client (nonce counter); rolled back afterwards."""
    base: Node = request.getfixturevalue(f"_{request.param.replace('-', '_')}")
    revert = base.snapshot()
    fresh = base.client.for_account(OPERATOR)
    try:
        yield Node(base.backend, fresh, base.escrow, base.token, base.mine, base.set_automine, base.snapshot)
    finally:
        base.set_automine(True)
        revert()


# ---------------------------------------------------------------------------- sending and receipts


def test_sent_transaction_is_mined_and_gains_confirmations(node: Node) -> None:
    client = node.client
    holder = Account.create().address

    sent = client.transact(node.token.functions.mint(holder, 5_000_000))
    receipt = client.wait_receipt(sent.hash)

    assert receipt.succeeded and receipt.tx_hash == sent.hash
    assert client.call(node.token.functions.balanceOf(holder)) == 5_000_000
    assert client.confirmations(sent.hash) == 1
    node.mine(2)
    assert client.confirmations(sent.hash) == 3
    assert client.wait_confirmations(receipt, 3).block_hash == receipt.block_hash
    assert client.block_hash(receipt.block_number) == receipt.block_hash
    with pytest.raises(TransactionTimeout):
        client.wait_confirmations(receipt, 10, timeout_s=0.2)


def test_revert_at_estimation_raises_the_contract_error_and_sends_nothing(node: Node) -> None:
    client = node.client
    nonce_before = client.web3.eth.get_transaction_count(client.address)
    block_before = client.block_number()

    with pytest.raises(ContractReverted) as caught:
        client.transact(node.escrow.functions.withdrawEarnings())

    assert caught.value.name == "GpgpuEscrow_NothingToWithdraw"
    assert caught.value.tx_hash is None
    assert client.web3.eth.get_transaction_count(client.address) == nonce_before
    assert client.block_number() == block_before


def test_revert_with_arguments_is_decoded_the_same_on_every_backend(node: Node) -> None:
    renter = node.client.for_account(RENTER)

    with pytest.raises(ContractReverted) as caught:
        renter.transact(node.escrow.functions.withdraw(7))

    assert caught.value.name == "GpgpuEscrow_InsufficientBalance"
    assert caught.value.error_args == (RENTER.address, 0, 7)


def test_mined_revert_is_raised_with_its_decoded_name(node: Node) -> None:
    client = node.client
    # An explicit gas limit skips estimation, so the failing transaction is really mined.
    sent = client.transact(node.escrow.functions.withdrawEarnings(), gas=100_000)

    with pytest.raises(ContractReverted) as caught:
        client.wait_receipt(sent.hash)

    assert caught.value.name == "GpgpuEscrow_NothingToWithdraw"
    assert caught.value.tx_hash == sent.hash
    assert caught.value.receipt.status == 0


def test_receipt_wait_times_out_while_nothing_is_mined(node: Node) -> None:
    client = node.client
    node.set_automine(False)
    sent = client.transact(node.token.functions.mint(client.address, 1))

    started = time.monotonic()
    with pytest.raises(TransactionTimeout) as caught:
        client.wait_receipt(sent.hash, timeout_s=0.3)
    assert time.monotonic() - started < 5
    assert caught.value.tx_hash == sent.hash
    assert client.confirmations(sent.hash) == 0

    node.mine(1)
    assert client.wait_receipt(sent.hash, timeout_s=5).succeeded


@pytest.fixture
def anvil_node(request: pytest.FixtureRequest) -> Iterator[Node]:
    """`node` on anvil only: a real node's pool, which holds a transaction past a nonce gap."""
    base: Node = request.getfixturevalue("_anvil")
    revert = base.snapshot()
    try:
        yield Node(base.backend, base.client.for_account(OPERATOR), *list(vars(base).values())[2:])
    finally:
        base.set_automine(True)
        revert()


def test_a_send_past_a_rollback_that_is_never_mined_does_not_strand_the_next_one(anvil_node: Node) -> None:
    """The chain rolls back under the client's local nonce counter (a reorg, a node restored from
    older state): the next transaction goes out past a gap and is never mined. Once its wait times
    out, the send after it asks the node again and is mined."""
    node = anvil_node
    client = node.client
    revert = node.snapshot()
    mined = client.transact(node.token.functions.mint(client.address, 1))
    client.wait_receipt(mined.hash)
    revert()  # the transaction and its nonce left the chain; the client's counter is past them

    stranded = client.transact(node.token.functions.mint(client.address, 2))
    assert stranded.nonce == mined.nonce + 1
    with pytest.raises(TransactionTimeout):
        client.wait_receipt(stranded.hash, timeout_s=0.5)

    after = client.transact(node.token.functions.mint(client.address, 4))

    assert after.nonce == mined.nonce
    assert client.wait_receipt(after.hash, timeout_s=5).succeeded


def test_concurrent_sends_all_succeed_with_distinct_nonces(node: Node) -> None:
    client = node.client
    first_nonce = client.web3.eth.get_transaction_count(client.address)
    holders = [Account.create().address for _ in range(8)]
    sent: list[Any] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(holders))

    def send(holder: str) -> None:
        try:
            start.wait()
            sent.append(client.transact(node.token.functions.mint(holder, 10)))
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=send, args=(h,)) for h in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(tx.nonce for tx in sent) == list(range(first_nonce, first_nonce + len(holders)))
    assert all(client.wait_receipt(tx.hash).succeeded for tx in sent)
    assert [client.call(node.token.functions.balanceOf(h)) for h in holders] == [10] * len(holders)


def test_nonce_taken_by_another_sender_is_refreshed_and_the_send_succeeds(node: Node) -> None:
    client = node.client
    other_process = client.for_account(OPERATOR)
    stale = client.web3.eth.get_transaction_count(client.address, "pending")
    taken = other_process.transact(node.token.functions.mint(client.address, 1))
    other_process.wait_receipt(taken.hash)
    # This client last saw the node before the other sender's transaction.
    real_pending = client._pending_nonce
    answers = iter([stale])
    client._pending_nonce = lambda: next(answers, None) or real_pending()  # type: ignore[method-assign]

    sent = client.transact(node.token.functions.mint(client.address, 2))

    assert sent.nonce == taken.nonce + 1
    assert client.wait_receipt(sent.hash).succeeded


def test_sender_without_gas_money_gets_insufficient_gas_funds(node: Node) -> None:
    pauper = node.client.for_account(Account.create())

    with pytest.raises(InsufficientGasFunds):
        pauper.transact(node.token.functions.mint(pauper.address, 1))


def test_deposit_events_are_read_back_with_their_position(node: Node) -> None:
    client, renter = node.client, node.client.for_account(RENTER)
    start = client.block_number() + 1
    for call in (
        node.token.functions.mint(RENTER.address, 300),
        node.token.functions.approve(node.escrow.address, 300),
        node.escrow.functions.deposit(100),
        node.escrow.functions.deposit(200),
    ):
        last = renter.wait_receipt(renter.transact(call).hash)

    events = client.get_logs(node.escrow.events.Deposited, start, client.block_number())

    assert [(e.name, e.args["renter"], e.args["amount"]) for e in events] == [
        ("Deposited", RENTER.address, 100),
        ("Deposited", RENTER.address, 200),
    ]
    assert events[-1].tx_hash == last.tx_hash
    assert events[-1].block_hash == client.block_hash(events[-1].block_number)
    assert client.get_logs(node.escrow.events.Deposited, start, start - 1) == []
    assert client.block_hash(client.block_number() + 100) is None


# ---------------------------------------------------------------------------- node failures


def test_unreachable_node_raises_node_unavailable_quickly(settings: Any) -> None:
    settings.CHAIN_RPC_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings.CHAIN_OPERATOR_KEY = OPERATOR.key.hex()
    client = chain_client_from_settings()

    started = time.monotonic()
    with pytest.raises(NodeUnavailable):
        client.block_number()
    with pytest.raises(NodeUnavailable):
        client.send_value(RENTER.address, 1)
    assert time.monotonic() - started < 3


def test_client_refuses_a_node_on_another_chain(settings: Any) -> None:
    require_anvil()
    with anvil_running() as w3:
        settings.CHAIN_RPC_URL = w3.provider.endpoint_uri
        settings.CHAIN_ID = 1
        settings.CHAIN_OPERATOR_KEY = ANVIL_DEV_KEY_0
        client = chain_client_from_settings()

        with pytest.raises(ChainConfigurationError, match="CHAIN_ID is 1"):
            client.send_value(RENTER.address, 1)
        assert client.web3.eth.get_transaction_count(client.address) == 0


# ---------------------------------------------------------------------------- keys


def _write_key(path: Path, account: LocalAccount, mode: int) -> Path:
    path.write_text(account.key.to_0x_hex() + "\n")
    path.chmod(mode)
    return path


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = _write_key(tmp_path / "operator.key", OPERATOR, 0o644)

    with pytest.raises(ChainConfigurationError, match=r"CHAIN_OPERATOR_KEY_FILE.*chmod 600"):
        key_file_read(path)

    path.chmod(0o600)
    assert key_file_read(path).address == OPERATOR.address


def test_operator_key_comes_from_the_file_setting(settings: Any, tmp_path: Path) -> None:
    settings.CHAIN_OPERATOR_KEY = ""
    settings.CHAIN_OPERATOR_KEY_FILE = str(_write_key(tmp_path / "operator.key", OPERATOR, 0o600))

    assert operator_account_from_settings().address == OPERATOR.address


def test_missing_operator_key_names_the_setting_outside_debug(settings: Any) -> None:
    settings.DEBUG = False
    settings.CHAIN_OPERATOR_KEY = ""
    settings.CHAIN_OPERATOR_KEY_FILE = ""

    with pytest.raises(ChainConfigurationError, match="CHAIN_OPERATOR_KEY_FILE"):
        operator_account_from_settings()


def test_debug_falls_back_to_the_public_development_key(settings: Any) -> None:
    settings.DEBUG = True
    settings.CHAIN_OPERATOR_KEY = ""
    settings.CHAIN_OPERATOR_KEY_FILE = ""

    assert operator_account_from_settings().address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


def test_malformed_operator_key_is_refused_without_echoing_it(settings: Any) -> None:
    settings.CHAIN_OPERATOR_KEY = "0x1234nothex"

    with pytest.raises(ChainConfigurationError) as caught:
        operator_account_from_settings()
    assert "CHAIN_OPERATOR_KEY" in str(caught.value) and "1234nothex" not in str(caught.value)
