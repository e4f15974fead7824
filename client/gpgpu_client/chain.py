"""Depositing into the escrow from the renter's wallet: the token's `approve`, then the escrow's
`deposit(amount)`, each an EIP-1559 transaction signed here with eth-account and sent over plain
JSON-RPC (no web3: the client stays small). The marketplace credits the deposit once its chain
watcher sees it confirmed.

The node is the renter's choice (--rpc-url / GPGPU_RPC_URL); the escrow's address comes from
--escrow / GPGPU_ESCROW_ADDRESS (the marketplace's renter API does not publish it outside a job's
budget offer), and the token from the escrow itself (`token()`).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from gpgpu_client.errors import ClientError

# Function selectors: the first 4 bytes of keccak256 of each signature (checked in the tests).
SELECTOR_APPROVE = "095ea7b3"  # approve(address,uint256)
SELECTOR_ALLOWANCE = "dd62ed3e"  # allowance(address,address)
SELECTOR_BALANCE_OF = "70a08231"  # balanceOf(address)
SELECTOR_DEPOSIT = "b6b55f25"  # deposit(uint256)
SELECTOR_TOKEN = "fc0c546a"  # noqa: S105 - token(): a selector, not a password
SELECTOR_AVAILABLE = "a0821be3"  # availableBalance(address)

ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")
# What a node asks for when it does not say: 1 gwei of tip.
DEFAULT_PRIORITY_FEE_WEI = 10**9
# Gas estimates get this much headroom (the state may move between estimate and mining).
GAS_HEADROOM = 1.2


class ChainError(ClientError):
    """The node could not be reached, refused a call, or a transaction failed (reverted)."""


def _word(value: int) -> str:
    return f"{value:064x}"


def _address_word(address: str) -> str:
    return address.lower().removeprefix("0x").rjust(64, "0")


def approve_data(spender: str, amount: int) -> str:
    return "0x" + SELECTOR_APPROVE + _address_word(spender) + _word(amount)


def deposit_data(amount: int) -> str:
    return "0x" + SELECTOR_DEPOSIT + _word(amount)


@dataclass(frozen=True)
class Deposit:
    """What a deposit did: the transactions it sent (approve only when the allowance was short)."""

    address: str
    amount: int
    chain_id: int
    escrow: str
    token: str
    approve_tx: str | None
    deposit_tx: str
    available_after: int


class Rpc:
    """A JSON-RPC node at `url`."""

    def __init__(self, url: str, *, session: requests.Session | None = None, timeout_s: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ClientError(f"the RPC URL must start with http:// or https://, not {url!r}")
        self.url = url
        self.session = session or requests.Session()
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)

    def call(self, method: str, *params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        try:
            response = self.session.post(self.url, json=body, timeout=self.timeout_s)
            answer = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise ChainError(f"cannot reach the chain node {self.url}: {exc}") from exc
        if not isinstance(answer, dict):
            raise ChainError(f"the chain node {self.url} answered something that is not JSON-RPC")
        if answer.get("error"):
            error = answer["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise ChainError(f"the chain node refused {method}: {message}")
        return answer.get("result")

    def read(self, to: str, data: str) -> int:
        """eth_call returning one uint256 (or address) word, as an int."""
        result = self.call("eth_call", {"to": to, "data": data}, "latest")
        return int(result or "0x0", 16)


def escrow_deposit(
    rpc: Rpc,
    account: LocalAccount,
    *,
    escrow: str,
    amount: int,
    token: str | None = None,
    receipt_timeout_s: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Deposit:
    """Deposit `amount` (the token's smallest unit) from `account` into `escrow`: approve the
    escrow on the token for it unless the allowance already covers it, then deposit. Each
    transaction is waited for (mined, status 1). Refused before anything is sent when the wallet
    holds less than `amount` of the token. Raises ChainError."""
    if amount <= 0:
        raise ClientError("the amount to deposit must be more than 0")
    for name, value in (("escrow", escrow), ("token", token)):
        if value is not None and not ADDRESS_RE.fullmatch(value):
            raise ClientError(f"the {name} address must be 0x followed by 40 hex digits, not {value!r}")
    owner = account.address
    chain_id = int(rpc.call("eth_chainId"), 16)
    if token is None:
        token = "0x" + f"{rpc.read(escrow, '0x' + SELECTOR_TOKEN):040x}"
    held = rpc.read(token, "0x" + SELECTOR_BALANCE_OF + _address_word(owner))
    if held < amount:
        raise ChainError(f"the wallet {owner} holds {held} of the token {token}, less than the {amount} to deposit")
    allowance = rpc.read(token, "0x" + SELECTOR_ALLOWANCE + _address_word(owner) + _address_word(escrow))
    approve_tx = None
    if allowance < amount:
        approve_tx = _transact(rpc, account, chain_id, token, approve_data(escrow, amount), receipt_timeout_s, sleep)
    deposit_tx = _transact(rpc, account, chain_id, escrow, deposit_data(amount), receipt_timeout_s, sleep)
    available = rpc.read(escrow, "0x" + SELECTOR_AVAILABLE + _address_word(owner))
    return Deposit(
        address=owner.lower(),
        amount=amount,
        chain_id=chain_id,
        escrow=escrow.lower(),
        token=token.lower(),
        approve_tx=approve_tx,
        deposit_tx=deposit_tx,
        available_after=available,
    )


def _transact(
    rpc: Rpc,
    account: LocalAccount,
    chain_id: int,
    to: str,
    data: str,
    receipt_timeout_s: float,
    sleep: Callable[[float], None],
) -> str:
    """Sign, send and wait for one transaction; returns its hash. ChainError when it reverts."""
    sender = account.address
    nonce = int(rpc.call("eth_getTransactionCount", sender, "pending"), 16)
    gas = int(int(rpc.call("eth_estimateGas", {"from": sender, "to": to, "data": data}), 16) * GAS_HEADROOM)
    block = rpc.call("eth_getBlockByNumber", "latest", False) or {}
    base_fee = int(block.get("baseFeePerGas") or "0x0", 16)
    try:
        tip = int(rpc.call("eth_maxPriorityFeePerGas"), 16)
    except ChainError:
        tip = DEFAULT_PRIORITY_FEE_WEI
    transaction: dict[str, Any] = {
        "type": 2,
        "chainId": chain_id,
        "nonce": nonce,
        # eth-account takes a checksummed address or none (eth_utils comes with eth-account).
        "to": to_checksum_address(to),
        "value": 0,
        "data": data,
        "gas": gas,
        "maxPriorityFeePerGas": tip,
        "maxFeePerGas": 2 * base_fee + tip,
    }
    signed = account.sign_transaction(transaction)
    tx_hash = str(rpc.call("eth_sendRawTransaction", "0x" + bytes(signed.raw_transaction).hex()))
    deadline = time.monotonic() + receipt_timeout_s
    while True:
        receipt = rpc.call("eth_getTransactionReceipt", tx_hash)
        if receipt:
            if int(receipt.get("status") or "0x0", 16) != 1:
                raise ChainError(f"the transaction {tx_hash} to {to} failed (reverted)")
            return tx_hash
        if time.monotonic() > deadline:
            raise ChainError(f"the transaction {tx_hash} was not mined within {receipt_timeout_s:g} s")
        sleep(1.0)
