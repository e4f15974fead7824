"""`gpgpu deposit` against a real chain node (anvil, from `npm ci`) with the escrow and the mock
stablecoin deployed: the renter's key approves the escrow and deposits, both transactions signed
by the client and sent over plain JSON-RPC, and the escrow then holds the amount for that wallet.
Without anvil the module is skipped locally and fails in CI (`CI` set), as billing's chain tests do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak
from web3 import Web3

from billing.chain.anvil import anvil_binary, anvil_running
from billing.contract import ESCROW, STABLECOIN, contract_deploy
from gpgpu_client import chain
from gpgpu_client.cli import main

pytestmark = pytest.mark.timeout(120)

RENTER = Account.from_key(keccak(text="client deposit tests: renter"))


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    if anvil_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("anvil is missing in CI (npm ci)")
        pytest.skip("anvil binary missing (run `npm ci`)")
    with anvil_running() as w3:
        deployer = w3.eth.accounts[0]
        token = contract_deploy(w3, STABLECOIN, sender=deployer)
        escrow = contract_deploy(w3, ESCROW, token.address, deployer, w3.eth.accounts[1], 500, sender=deployer)
        w3.eth.wait_for_transaction_receipt(
            w3.eth.send_transaction({"from": deployer, "to": RENTER.address, "value": 10**18})
        )
        w3.eth.wait_for_transaction_receipt(
            token.functions.mint(RENTER.address, 100_000_000).transact({"from": deployer})
        )
        key_file = tmp_path / "renter.key"
        key_file.write_text("0x" + bytes(RENTER.key).hex())
        key_file.chmod(0o600)
        monkeypatch.delenv("GPGPU_RPC_URL", raising=False)
        monkeypatch.delenv("GPGPU_ESCROW_ADDRESS", raising=False)
        monkeypatch.delenv("GPGPU_TOKEN_ADDRESS", raising=False)
        yield {"w3": w3, "url": w3.provider.endpoint_uri, "token": token, "escrow": escrow, "key_file": str(key_file)}


def test_deposit_approves_the_escrow_and_deposits_so_the_escrow_holds_it(
    node: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a renter's wallet with 100 tokens and no allowance
    escrow, token = node["escrow"], node["token"]
    argv = ["deposit", "--rpc-url", node["url"], "--escrow", escrow.address, "--key-file", node["key_file"]]

    # When it deposits 12.5 tokens, then 1 more (the allowance left is used up, so approve again)
    code = main([*argv, "12.5", "--yes", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    first = json.loads(out)

    # Then the escrow holds 12.5 tokens for the wallet, and the token moved from it
    assert escrow.functions.availableBalance(RENTER.address).call() == 12_500_000
    assert token.functions.balanceOf(RENTER.address).call() == 87_500_000
    assert first["address"] == RENTER.address.lower() and first["amount"] == 12_500_000
    assert first["token"] == token.address.lower()  # read from the escrow
    assert first["approve_tx"] and first["deposit_tx"] and first["available_after"] == 12_500_000
    assert node["w3"].eth.get_transaction_receipt(first["deposit_tx"])["status"] == 1

    assert main([*argv, "1", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "Approved the escrow" in out and "Available in the escrow: 13.5 tokens" in out
    assert escrow.functions.availableBalance(RENTER.address).call() == 13_500_000


def test_deposit_of_more_than_the_wallet_holds_sends_nothing(
    node: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    nonce = node["w3"].eth.get_transaction_count(RENTER.address)
    argv = ["deposit", "--rpc-url", node["url"], "--escrow", node["escrow"].address, "--key-file", node["key_file"]]

    code = main([*argv, "101", "--yes"])

    assert code == 1
    assert "holds 100000000 of the token" in capsys.readouterr().err
    assert node["w3"].eth.get_transaction_count(RENTER.address) == nonce


@pytest.mark.parametrize(
    ("signature", "selector"),
    [
        ("approve(address,uint256)", chain.SELECTOR_APPROVE),
        ("allowance(address,address)", chain.SELECTOR_ALLOWANCE),
        ("balanceOf(address)", chain.SELECTOR_BALANCE_OF),
        ("deposit(uint256)", chain.SELECTOR_DEPOSIT),
        ("token()", chain.SELECTOR_TOKEN),
        ("availableBalance(address)", chain.SELECTOR_AVAILABLE),
    ],
)
def test_the_function_selectors_are_those_of_their_signatures(signature: str, selector: str) -> None:
    assert Web3.keccak(text=signature)[:4].hex() == selector
