"""The chain client: the one way the marketplace talks to an EVM node.

    client = chain_client_from_settings()          # HTTP JSON-RPC on CHAIN_RPC_URL, operator key from settings
    escrow = client.contract(ESCROW, deployment.escrow)
    sent = client.transact(escrow.functions.settle(items, budgets))   # -> SentTx(hash, nonce)
    receipt = client.wait_receipt(sent.hash)        # -> Receipt; a revert raises ContractReverted
    receipt = client.wait_confirmations(receipt)    # CHAIN_CONFIRMATIONS deep
    events = client.get_logs(escrow.events.Deposited, from_block, to_block)

A client is created by a factory (`chain_client_from_settings`, `chain_client_eth_tester`) and
passed to whoever needs it; there is no module-level instance. Every failure surfaces as one of
the typed errors in `billing.chain.errors`, never as a web3, eth-tester or requests exception.

Sending: transactions are EIP-1559 (maxPriorityFeePerGas = the node's suggestion, never below a
floor; maxFeePerGas = 2 × latest base fee + priority), gas is estimated first (a revert at that
point raises ContractReverted and nothing is sent), signed locally with the operator's key and
sent raw. Nonces are allocated under a lock: next = max(local counter, node's pending count), so
threads of one process never collide; on "nonce too low" (another process used the key) the
client refreshes from the node and retries once, then raises NonceConflict.

Thread safety: one client may be shared by threads of one process. Several processes sending with
the same key (e.g. several Celery workers) must serialise their sends themselves (a lock around
the settlement task), or they will see NonceConflict.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, HexStr
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractEvent, ContractFunction
from web3.exceptions import BlockNotFound, TransactionNotFound
from web3.types import BlockIdentifier, RPCEndpoint, RPCResponse, TxReceipt, Wei

from billing.chain.errors import (
    ChainConfigurationError,
    ChainError,
    ContractReverted,
    NodeUnavailable,
    NonceConflict,
    TransactionTimeout,
    chain_errors,
    is_already_known,
    log_scrubbing_install,
)
from billing.contract import load_artifact

logger = logging.getLogger(__name__)

# Anvil's (and Hardhat's) development account #0, derived from the public "test test … junk"
# mnemonic: known to everyone, so it is only ever a default in DEBUG.
ANVIL_DEV_KEY_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"

DEFAULT_PRIORITY_FEE_FLOOR_WEI = 10**8  # 0.1 gwei
# Estimates are exact for the state they ran on; the state may change before the block is built
# (other settlements, deposits), so the gas limit keeps a margin. Unused gas is not paid.
GAS_MARGIN_NUM, GAS_MARGIN_DEN = 6, 5


@dataclass(frozen=True)
class SentTx:
    """A transaction accepted by the node: its hash (0x-hex) and the nonce it used."""

    hash: str
    nonce: int


@dataclass(frozen=True)
class Receipt:
    """A mined transaction. `raw` is web3's receipt, for `contract.events.X().process_receipt(raw)`."""

    tx_hash: str
    block_number: int
    block_hash: str
    status: int
    gas_used: int
    effective_gas_price: int
    contract_address: str | None
    raw: TxReceipt

    @property
    def succeeded(self) -> bool:
        return self.status == 1


@dataclass(frozen=True)
class ChainEvent:
    """One decoded contract event. (`tx_hash`, `log_index`) identifies it uniquely on a chain."""

    name: str
    args: dict[str, Any]  # the event's ABI arguments, of their ABI types
    address: str
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int


def _hex(value: bytes | str) -> str:
    return HexBytes(value).to_0x_hex()


class ChainClient:
    """Sends the operator's transactions and reads the chain through one Web3 instance.

    Construct with a factory unless you bring your own Web3 (tests):
    `confirmations` is how deep a receipt must be before `wait_confirmations` returns by default;
    `receipt_timeout_s` the default wait for a receipt; `poll_interval_s` how often to poll.
    `expected_chain_id`, when given, is checked against the node the first time it is needed
    (ChainConfigurationError on a mismatch: the wrong node must never receive the operator's txs).
    """

    def __init__(
        self,
        web3: Web3,
        *,
        operator_account: LocalAccount,
        confirmations: int = 1,
        receipt_timeout_s: float = 120.0,
        poll_interval_s: float = 0.5,
        expected_chain_id: int | None = None,
        priority_fee_floor_wei: int = DEFAULT_PRIORITY_FEE_FLOOR_WEI,
    ) -> None:
        if confirmations < 1:
            raise ValueError("confirmations must be at least 1")
        if receipt_timeout_s <= 0 or poll_interval_s <= 0:
            raise ValueError("receipt_timeout_s and poll_interval_s must be positive")
        self.web3 = web3
        self.account = operator_account
        self.confirmations_required = confirmations
        self.receipt_timeout_s = receipt_timeout_s
        self.poll_interval_s = poll_interval_s
        self.expected_chain_id = expected_chain_id
        self.priority_fee_floor_wei = priority_fee_floor_wei
        self._nonce_lock = threading.Lock()
        self._next_local_nonce: int | None = None
        self._contracts: dict[tuple[str, str], Contract] = {}
        self._chain_id: int | None = None

    # ------------------------------------------------------------------------------------- identity

    @property
    def address(self) -> ChecksumAddress:
        """The operator's (sender's) checksummed address."""
        return self.account.address

    def for_account(self, account: LocalAccount) -> ChainClient:
        """A client on the same node and settings that sends as `account` (its own nonce counter)."""
        return ChainClient(
            self.web3,
            operator_account=account,
            confirmations=self.confirmations_required,
            receipt_timeout_s=self.receipt_timeout_s,
            poll_interval_s=self.poll_interval_s,
            expected_chain_id=self.expected_chain_id,
            priority_fee_floor_wei=self.priority_fee_floor_wei,
        )

    def chain_id(self) -> int:
        """The node's chain id (cached), checked against `expected_chain_id`."""
        if self._chain_id is None:
            with chain_errors():
                chain_id = int(self.web3.eth.chain_id)
            if self.expected_chain_id is not None and chain_id != self.expected_chain_id:
                raise ChainConfigurationError(
                    f"the node at CHAIN_RPC_URL is chain {chain_id}, but CHAIN_ID is {self.expected_chain_id}"
                )
            self._chain_id = chain_id
        return self._chain_id

    def contract(self, name: str, address: str) -> Contract:
        """The web3 contract `name` (a committed artifact, e.g. billing.contract.ESCROW) at `address`.
        Made once per client and address: web3 builds a contract's functions and events from the
        whole ABI each time (8 ms for the escrow), and every run asks for it."""
        key = (name, to_checksum_address(address))
        made = self._contracts.get(key)
        if made is None:
            made = self._contracts[key] = self.web3.eth.contract(address=key[1], abi=load_artifact(name).abi)
        return made

    # ---------------------------------------------------------------------------------------- reads

    def block_number(self) -> int:
        """The latest block's number."""
        with chain_errors():
            return int(self.web3.eth.block_number)

    def block_hash(self, number: int) -> str | None:
        """The 0x-hex hash of block `number` on the node's canonical chain, None if not yet mined.

        Compare with a hash recorded earlier to detect a reorg.
        """
        with chain_errors():
            try:
                return _hex(self.web3.eth.get_block(number)["hash"])
            except BlockNotFound:
                return None

    def transaction_count(self, block: Literal["latest", "pending"] = "latest") -> int:
        """How many transactions the client's account has sent: mined ("latest"), or including
        those the node holds unmined ("pending"; eth-tester counts only mined ones)."""
        with chain_errors():
            return int(self.web3.eth.get_transaction_count(self.address, block))

    # Full transactions; web3 types the list as hashes or TxData, whichever was asked for.
    def block_transactions(self, number: int) -> list[Any]:
        """The transactions of block `number`, in full (from, nonce, input, hash, ...)."""
        with chain_errors():
            return list(self.web3.eth.get_block(number, full_transactions=True)["transactions"])

    def native_balance(self, address: str) -> int:
        """The native (gas) balance of `address`, in wei."""
        with chain_errors():
            return int(self.web3.eth.get_balance(to_checksum_address(address)))

    def code_at(self, address: str) -> bytes:
        """The runtime code at `address` (b"" for an account without code)."""
        with chain_errors():
            return bytes(self.web3.eth.get_code(to_checksum_address(address)))

    # The function's result: its ABI outputs, which web3 does not type.
    def call(self, fn: ContractFunction, *, block: BlockIdentifier = "latest") -> Any:
        """Run a view (or simulate a write) `fn` as the operator at `block`; a revert raises ContractReverted."""
        with chain_errors():
            return fn.call({"from": self.address}, block_identifier=block)

    def get_logs(self, event: ContractEvent | type[ContractEvent], from_block: int, to_block: int) -> list[ChainEvent]:
        """Events `event` (e.g. `escrow.events.Deposited`) emitted in blocks from_block..to_block inclusive.

        Sorted by (block, log index). Nodes limit the range one query may cover (often 1k-10k
        blocks) and answer a too-wide range with an error: callers scan in chunks.
        """
        if from_block > to_block:
            return []
        instance = event() if isinstance(event, type) else event
        with chain_errors():
            logs = instance.get_logs(from_block=from_block, to_block=to_block)
        found = [
            ChainEvent(
                name=log["event"],
                args=dict(log["args"]),
                address=to_checksum_address(log["address"]),
                block_number=int(log["blockNumber"]),
                block_hash=_hex(log["blockHash"]),
                tx_hash=_hex(log["transactionHash"]),
                log_index=int(log["logIndex"]),
            )
            for log in logs
        ]
        return sorted(found, key=lambda e: (e.block_number, e.log_index))

    # ---------------------------------------------------------------------------------------- sends

    # `fn`: a bound ContractFunction or a ContractConstructor, left untyped because web3 types the
    # transaction dicts below as TxParams (TypedDicts of NewTypes), which these plain dicts are not.
    def transact(self, fn: Any, *, gas: int | None = None, value: int = 0, nonce: int | None = None) -> SentTx:
        """Sign and send `fn` (a bound contract function or constructor) from the operator, with
        `nonce` when given (what the caller recorded, from next_nonce(), to find it by; another
        only after the node answered "nonce too low": SentTx says which).

        Returns as soon as the node accepted it; wait with `wait_receipt`. Without `gas`, the gas
        limit is estimated (plus a margin), and a revert at estimation raises ContractReverted
        before anything is sent. Raises NodeUnavailable (whether the node took the transaction is
        then unknown: re-read the contract state before sending again), InsufficientGasFunds,
        NonceConflict.
        """
        params: dict[str, Any] = {"from": self.address, "value": value}  # transaction fields of several types
        if gas is None:
            gas = self._estimate(lambda: fn.estimate_gas(params))
        fees = self._fees()
        chain_id = self.chain_id()

        def build(nonce: int) -> dict[str, Any]:  # the transaction to sign: fields of several types
            with chain_errors():
                return fn.build_transaction({**params, **fees, "gas": gas, "nonce": nonce, "chainId": chain_id})

        return self._sign_and_send(build, nonce=nonce)

    def send_value(self, to: str, amount_wei: int, *, gas: int = 21_000) -> SentTx:
        """Send `amount_wei` of the native coin to `to` (development funding of gas)."""
        return self._sign_and_send(self._value_transfer(to, amount_wei, gas=gas))

    # The builder returns the transaction to sign for a nonce: fields of several types.
    def _value_transfer(self, to: str, amount_wei: int, *, gas: int = 21_000) -> Callable[[int], dict[str, Any]]:
        """A builder of a plain transfer of `amount_wei` to `to` at today's fees, for a nonce."""
        fees = self._fees()
        chain_id = self.chain_id()
        recipient = to_checksum_address(to)
        return lambda nonce: {
            "to": recipient,
            "value": amount_wei,
            "gas": gas,
            "nonce": nonce,
            "chainId": chain_id,
            "type": 2,
            **fees,
        }

    def _estimate(self, estimate: Callable[[], int]) -> int:
        with chain_errors():
            estimated = int(estimate())
            limit = int(self.web3.eth.get_block("latest")["gasLimit"])
        return min(estimated * GAS_MARGIN_NUM // GAS_MARGIN_DEN, limit)

    def _fees(self) -> dict[str, int]:
        with chain_errors():
            base_fee = self.web3.eth.get_block("latest").get("baseFeePerGas")
        if base_fee is None:
            raise ChainConfigurationError(
                "the node's chain has no EIP-1559 base fee; the client sends only EIP-1559 txs"
            )
        try:
            with chain_errors():
                suggested = int(self.web3.eth.max_priority_fee)
        except NodeUnavailable:
            raise
        except ChainError:
            suggested = 0  # a node without eth_maxPriorityFeePerGas: the floor alone
        priority = max(suggested, self.priority_fee_floor_wei)
        return {"maxFeePerGas": 2 * int(base_fee) + priority, "maxPriorityFeePerGas": priority}

    def next_nonce(self) -> int:
        """The nonce the next transact() will use (barring a "nonce too low" from another process
        using the key): the node's pending count, or past it this client's own counter, when the
        node has not seen its last transaction yet (a node that lags, one of several behind a load
        balancer). What a batch records before it is sent, to be found by it if the sender dies."""
        with self._nonce_lock:
            return max(self._next_local_nonce or 0, self._pending_nonce())

    def _pending_nonce(self) -> int:
        with chain_errors():
            return int(self.web3.eth.get_transaction_count(self.address, "pending"))

    # `build`: the transaction to sign for a nonce, fields of several types.
    def _sign_and_send(self, build: Callable[[int], dict[str, Any]], *, nonce: int | None = None) -> SentTx:
        with self._nonce_lock:
            for attempt in (1, 2):
                if nonce is None or attempt == 2:
                    nonce = max(self._next_local_nonce or 0, self._pending_nonce())
                signed = self.account.sign_transaction(build(nonce))
                tx_hash = _hex(signed.hash)
                try:
                    with chain_errors():
                        self.web3.eth.send_raw_transaction(signed.raw_transaction)
                except NonceConflict as conflict:
                    self._next_local_nonce = None
                    if conflict.too_low and attempt == 1:
                        continue
                    raise
                except ChainError as error:
                    if not is_already_known(error):
                        # The outcome is unknown (e.g. a timeout after the node took it): forget the
                        # local counter so the next send asks the node's pending count again.
                        self._next_local_nonce = None
                        raise
                self._next_local_nonce = nonce + 1
                return SentTx(hash=tx_hash, nonce=nonce)
        raise NonceConflict("unreachable")  # pragma: no cover - the loop returns or raises

    # ------------------------------------------------------------------------------------- receipts

    def receipt(self, tx_hash: str) -> Receipt | None:
        """The receipt of `tx_hash` if it is mined on the node's current chain, else None."""
        with chain_errors():
            try:
                raw = self.web3.eth.get_transaction_receipt(HexStr(tx_hash))
            except TransactionNotFound:
                return None
        if raw is None or raw.get("blockNumber") is None:
            return None
        return Receipt(
            tx_hash=_hex(raw["transactionHash"]),
            block_number=int(raw["blockNumber"]),
            block_hash=_hex(raw["blockHash"]),
            status=int(raw["status"]),
            gas_used=int(raw["gasUsed"]),
            effective_gas_price=int(raw.get("effectiveGasPrice") or 0),
            contract_address=raw.get("contractAddress"),
            raw=raw,
        )

    def wait_receipt(self, tx_hash: str, *, timeout_s: float | None = None) -> Receipt:
        """Wait until `tx_hash` is mined and return its receipt.

        Raises TransactionTimeout when none arrives within `timeout_s` (default receipt_timeout_s);
        ContractReverted (with `tx_hash` and `receipt` set, `name` decoded by replaying the call on
        the parent block's state where the node can) when it was mined but reverted;
        NodeUnavailable when the node cannot be asked.
        """
        timeout = self.receipt_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while (receipt := self.receipt(tx_hash)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Not mined in time: it may wait past a gap (the chain rolled back under the local
                # nonce counter), so the next send asks the node's pending count again.
                self.nonce_reset()
                raise TransactionTimeout(
                    f"no receipt for {tx_hash} within {timeout:g}s", tx_hash=tx_hash, timeout_s=timeout
                )
            time.sleep(min(self.poll_interval_s, remaining))
        if not receipt.succeeded:
            raise self._revert_reason(receipt)
        return receipt

    def transaction_known(self, tx_hash: str) -> bool:
        """Whether the node knows `tx_hash` at all: mined on its current chain or waiting in its
        pool. False for a transaction it dropped, or that left the chain with a rollback and was
        not put back in the pool (anvil's anvil_rollback / evm_revert, a node restored from older
        state): such a transaction will never be mined unless it is sent again."""
        with chain_errors():
            try:
                return self.web3.eth.get_transaction(HexStr(tx_hash)) is not None
            except TransactionNotFound:
                return False

    def nonce_reset(self) -> None:
        """Forget the local nonce counter, so the next send asks the node's pending count. Called
        when transactions of the operator left the chain (a rollback): the counter would skip the
        nonces they used, and a transaction sent past a gap waits forever."""
        with self._nonce_lock:
            self._next_local_nonce = None

    def nonce_gaps_fill(self, tx_hashes: list[str], *, limit: int = 32) -> list[int]:
        """Fill the nonce gaps that keep the operator's transactions `tx_hashes` waiting in the
        node's pool. Returns the nonces filled.

        A transaction sent under a nonce counter that a rollback made stale sits past a gap: the
        node holds it (queued) but mines it only once every lower nonce is used, and when nothing
        else goes out it waits forever. For each of these transactions still unmined, every nonce
        from the node's pending count (past the mined and the executable ones) up to it that none
        of them holds gets a 0-value transfer to the operator itself (21,000 gas): the node then
        mines the queued transactions in order. A nonce the node already holds a transaction for
        is refused by it (already known, or an underpriced replacement) and left as it is; at most
        `limit` are filled per call. Raises NodeUnavailable."""
        waiting: set[int] = set()
        with chain_errors():
            for tx_hash in tx_hashes:
                try:
                    tx = self.web3.eth.get_transaction(HexStr(tx_hash))
                except TransactionNotFound:
                    continue
                if tx.get("blockNumber") is None and str(tx["from"]).lower() == self.address.lower():
                    waiting.add(int(tx["nonce"]))
        if not waiting:
            return []
        pending = self._pending_nonce()
        gaps = [nonce for nonce in range(pending, max(waiting)) if nonce not in waiting][:limit]
        if not gaps:
            return []
        filler = self._value_transfer(self.address, 0)
        filled: list[int] = []
        with self._nonce_lock:
            for nonce in gaps:
                signed = self.account.sign_transaction(filler(nonce))
                try:
                    with chain_errors():
                        self.web3.eth.send_raw_transaction(signed.raw_transaction)
                except NonceConflict:
                    continue  # the nonce is taken after all (mined or held meanwhile)
                except ChainError as error:
                    if is_already_known(error):
                        continue
                    raise
                filled.append(nonce)
            self._next_local_nonce = None
        if filled:
            logger.warning("nonces %s were a gap below the operator's waiting transactions: filled", filled)
        return filled

    def confirmations(self, tx_hash: str) -> int:
        """How many blocks (its own included) confirm `tx_hash`: 0 if not mined or reorged away."""
        receipt = self.receipt(tx_hash)
        if receipt is None:
            return 0
        if self.block_hash(receipt.block_number) != receipt.block_hash:
            return 0  # the node is switching to a chain without that block
        return max(0, self.block_number() - receipt.block_number + 1)

    def wait_confirmations(self, receipt: Receipt, n: int | None = None, *, timeout_s: float | None = None) -> Receipt:
        """Wait until `receipt`'s transaction is `n` blocks deep (default: the client's `confirmations`).

        Returns the receipt as the node now has it (after a reorg the transaction may sit in
        another block). Raises TransactionTimeout if it is not deep enough in time (the chain is not
        advancing, or the transaction was reorged out and not re-included), ContractReverted if the
        re-included transaction reverted.
        """
        depth = self.confirmations_required if n is None else n
        timeout = self.receipt_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while self.confirmations(receipt.tx_hash) < depth:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Not mined in time: it may wait past a gap (the chain rolled back under the local
                # nonce counter), so the next send asks the node's pending count again.
                self.nonce_reset()
                raise TransactionTimeout(
                    f"{receipt.tx_hash} did not reach {depth} confirmations within {timeout:g}s",
                    tx_hash=receipt.tx_hash,
                    timeout_s=timeout,
                )
            time.sleep(min(self.poll_interval_s, remaining))
        current = self.receipt(receipt.tx_hash)
        if current is None:  # reorged away between the two reads: try again within the same budget
            return self.wait_confirmations(receipt, depth, timeout_s=max(deadline - time.monotonic(), 0.001))
        if not current.succeeded:
            raise self._revert_reason(current)
        return current

    def _revert_reason(self, receipt: Receipt) -> ContractReverted:
        """Decode why a mined transaction reverted by replaying it as a call on its parent block's state."""
        reverted = ContractReverted(None, (), b"", tx_hash=receipt.tx_hash, receipt=receipt)
        try:
            with chain_errors():
                tx = self.web3.eth.get_transaction(HexStr(receipt.tx_hash))
                if tx.get("to") is None:
                    return reverted  # a failed deployment: nothing to call
                self.web3.eth.call(
                    {
                        "from": tx["from"],
                        "to": tx["to"],
                        "data": tx["input"],
                        "value": tx["value"],
                        "gas": tx["gas"],
                    },
                    max(receipt.block_number - 1, 0),
                )
        except ContractReverted as replayed:
            return ContractReverted(
                replayed.name, replayed.error_args, replayed.raw, tx_hash=receipt.tx_hash, receipt=receipt
            )
        except ChainError:
            pass  # the node keeps no state that old, or is gone: the reason stays unknown
        return reverted


# ----------------------------------------------------------------------------------------- keys


def account_from_key(key: str, *, setting: str) -> LocalAccount:
    """A local signing account from a 0x-hex (or bare hex) 32-byte private key; errors name `setting`."""
    text = key.strip()
    body = text[2:] if text.lower().startswith("0x") else text
    if len(body) != 64:
        raise ChainConfigurationError(f"{setting} must be a 32-byte hex private key")
    try:
        return Account.from_key(bytes.fromhex(body))
    except ValueError:
        raise ChainConfigurationError(f"{setting} must be a 32-byte hex private key") from None


def key_file_read(path: str | Path, *, setting: str = "CHAIN_OPERATOR_KEY_FILE") -> LocalAccount:
    """The account whose hex private key is in file `path`.

    Refuses a file that its group or others may read or write (chmod 600 it), a missing file, or
    anything but one hex key (surrounding whitespace allowed). Errors name `setting`.
    """
    file = Path(path)
    try:
        info = file.stat()
    except OSError as error:
        raise ChainConfigurationError(f"{setting}={file}: cannot read the key file ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ChainConfigurationError(f"{setting}={file} is not a regular file")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ChainConfigurationError(
            f"{setting}={file} is accessible by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); run chmod 600 on it"
        )
    return account_from_key(file.read_text(), setting=setting)


def key_file_create(path: str | Path) -> LocalAccount:
    """Create a new random key in `path` with mode 0600 (refusing to overwrite) and return its account."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    account = Account.create()
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(_hex(account.key) + "\n")
    return account


def operator_account_from_settings() -> LocalAccount:
    """The operator's account: CHAIN_OPERATOR_KEY, else CHAIN_OPERATOR_KEY_FILE, else (DEBUG only) anvil key #0.

    Raises ChainConfigurationError naming the settings when neither is set outside DEBUG, or when
    both are set (ambiguous).
    """
    from django.conf import settings

    key = getattr(settings, "CHAIN_OPERATOR_KEY", "")
    key_file = getattr(settings, "CHAIN_OPERATOR_KEY_FILE", "")
    if key and key_file:
        raise ChainConfigurationError("set only one of CHAIN_OPERATOR_KEY and CHAIN_OPERATOR_KEY_FILE")
    if key:
        return account_from_key(key, setting="CHAIN_OPERATOR_KEY")
    if key_file:
        return key_file_read(key_file, setting="CHAIN_OPERATOR_KEY_FILE")
    if settings.DEBUG:
        return Account.from_key(ANVIL_DEV_KEY_0)
    raise ChainConfigurationError(
        "no operator key: set CHAIN_OPERATOR_KEY_FILE (a 0600 file holding the hex key) or CHAIN_OPERATOR_KEY"
    )


# ------------------------------------------------------------------------------------ factories


def chain_client_from_settings(*, account: LocalAccount | None = None) -> ChainClient:
    """A client on CHAIN_RPC_URL (HTTP, CHAIN_RPC_TIMEOUT_S per request, no silent retries), sending as
    `account` or the operator from settings. Does no network I/O until first used. The URL may hold
    a provider's API key: web3's and urllib3's log records are scrubbed of it from here on (errors
    always are, see billing.chain.errors)."""
    from django.conf import settings

    log_scrubbing_install()
    provider = Web3.HTTPProvider(
        settings.CHAIN_RPC_URL,
        request_kwargs={"timeout": settings.CHAIN_RPC_TIMEOUT_S},
        # Failures surface at once as NodeUnavailable; the settlement task decides when to retry.
        exception_retry_configuration=None,
    )
    return ChainClient(
        Web3(provider),
        operator_account=account or operator_account_from_settings(),
        confirmations=settings.CHAIN_CONFIRMATIONS,
        receipt_timeout_s=float(settings.CHAIN_RECEIPT_TIMEOUT_S),
        poll_interval_s=0.5,
        expected_chain_id=settings.CHAIN_ID,
    )


def chain_client_eth_tester(
    *,
    operator_account: LocalAccount | None = None,
    fund_wei: int = 10**21,
    confirmations: int = 1,
    receipt_timeout_s: float = 10.0,
    poll_interval_s: float = 0.01,
) -> ChainClient:
    """A client on a fresh in-process EVM (eth-tester + py-evm), for fast tests.

    The operator (a fixed test key unless given) is funded with `fund_wei`. The tester is at
    `client.web3.provider.ethereum_tester` (mine_blocks, disable_auto_mine_transactions, snapshots).
    Requests are serialised by a lock, since py-evm is not thread-safe.
    """
    from eth_tester import EthereumTester
    from web3 import EthereumTesterProvider

    from billing.chain.evm import eth_tester_backend

    class _SerialisedEthereumTesterProvider(EthereumTesterProvider):
        _lock = threading.RLock()

        # EthereumTesterProvider.make_request's signature: the parameters are the method's own.
        def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
            with self._lock:
                return super().make_request(method, params)

    web3 = Web3(_SerialisedEthereumTesterProvider(EthereumTester(eth_tester_backend())))
    account = operator_account or Account.from_key(keccak(text="gpgpu chain client: eth-tester operator"))
    faucet = web3.eth.accounts[0]
    web3.eth.wait_for_transaction_receipt(
        web3.eth.send_transaction({"from": faucet, "to": account.address, "value": Wei(fund_wei)})
    )
    return ChainClient(
        web3,
        operator_account=account,
        confirmations=confirmations,
        receipt_timeout_s=receipt_timeout_s,
        poll_interval_s=poll_interval_s,
    )
