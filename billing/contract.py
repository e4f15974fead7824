"""The escrow contract as seen from Python: committed artifacts, budget typed data, item packing, errors.

This module only describes the contract (`contracts/GpgpuEscrow.sol`, built into `contracts/build/`).
Sending transactions reliably (nonces, fees, receipts, retries, typed chain errors) belongs to the
chain client; the helpers here are what that client, the tests and the benchmarks share.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eth_abi import decode as abi_decode
from eth_account import Account
from eth_utils import keccak, to_checksum_address

if TYPE_CHECKING:
    # For the type only: this module describes the contract and imports no web3 at run time
    # (contract_deploy's caller brings its own).
    from web3 import Web3

ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "contracts" / "build"

ESCROW = "GpgpuEscrow"
STABLECOIN = "MockStablecoin"

MAX_UINT64 = 2**64 - 1
MAX_UINT96 = 2**96 - 1
MAX_UINT192 = 2**192 - 1

BUDGET_DOMAIN_NAME = "GpgpuEscrow"
BUDGET_DOMAIN_VERSION = "1"
BUDGET_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Budget": [
        {"name": "jobId", "type": "uint256"},
        {"name": "renter", "type": "address"},
        {"name": "maxAmount", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
    ],
}

# Skip reasons, in the order of the contract's `SkipReason` enum.
SKIP_UNKNOWN_JOB, SKIP_JOB_CLOSED, SKIP_STALE_LEASE, SKIP_INVALID_ITEM = range(4)

# Why a budget was not activated, in the order of the contract's `BudgetSkipReason` enum.
BUDGET_SKIP_REASONS = ("AlreadyKnown", "Expired", "InvalidBudget", "InvalidSignature", "InsufficientBalance")
(
    BUDGET_SKIP_ALREADY_KNOWN,
    BUDGET_SKIP_EXPIRED,
    BUDGET_SKIP_INVALID_BUDGET,
    BUDGET_SKIP_INVALID_SIGNATURE,
    BUDGET_SKIP_INSUFFICIENT_BALANCE,
) = range(len(BUDGET_SKIP_REASONS))


@dataclass(frozen=True)
class ContractArtifact:
    """One compiled contract as committed in contracts/build/<name>.json."""

    name: str
    abi: list[dict[str, Any]]  # the ABI's JSON
    bytecode: str
    deployed_bytecode: str
    compiler_version: str


@cache
def load_artifact(name: str) -> ContractArtifact:
    """Return the committed artifact of contract `name` (e.g. "GpgpuEscrow").

    Raises FileNotFoundError when the artifact was never built (`node scripts/compile-contracts.mjs`).
    """
    data = json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())
    return ContractArtifact(
        name=data["contractName"],
        abi=data["abi"],
        bytecode=data["bytecode"],
        deployed_bytecode=data["deployedBytecode"],
        compiler_version=data["compiler"]["version"],
    )


# ---------------------------------------------------------------------------- budget authorization


@dataclass(frozen=True)
class BudgetAuthorization:
    """A renter's signed permission to reserve up to `max_amount` for job `job_id` (token units)."""

    job_id: int
    renter: str
    max_amount: int
    deadline: int
    signature: bytes

    def as_abi(self) -> tuple[int, str, int, int, bytes]:
        """The tuple `reserve` (and `settle`) take for `IGpgpuEscrow.BudgetAuthorization`."""
        return (self.job_id, self.renter, self.max_amount, self.deadline, self.signature)


def budget_typed_data(
    *, chain_id: int, escrow: str, job_id: int, renter: str, max_amount: int, deadline: int
) -> dict[str, Any]:  # the EIP-712 message, JSON
    """The full EIP-712 message a renter signs (e.g. with `eth_signTypedData_v4` in a wallet)."""
    return {
        "types": BUDGET_TYPES,
        "primaryType": "Budget",
        "domain": {
            "name": BUDGET_DOMAIN_NAME,
            "version": BUDGET_DOMAIN_VERSION,
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(escrow),
        },
        "message": {
            "jobId": job_id,
            "renter": to_checksum_address(renter),
            "maxAmount": max_amount,
            "deadline": deadline,
        },
    }


def budget_sign(
    *, private_key: bytes | str, chain_id: int, escrow: str, job_id: int, max_amount: int, deadline: int
) -> BudgetAuthorization:
    """Sign a budget with a local key (development, tests and benchmarks; renters sign in their wallet)."""
    renter = Account.from_key(private_key).address
    typed = budget_typed_data(
        chain_id=chain_id, escrow=escrow, job_id=job_id, renter=renter, max_amount=max_amount, deadline=deadline
    )
    signed = Account.sign_typed_data(private_key, full_message=typed)
    return BudgetAuthorization(
        job_id=job_id, renter=renter, max_amount=max_amount, deadline=deadline, signature=bytes(signed.signature)
    )


# ---------------------------------------------------------------------------- settlement items


@dataclass(frozen=True)
class SettlementItem:
    """One lease's position: its total charge so far (token units), to be paid to `provider`."""

    lease_id: int
    job_id: int
    provider: str
    cumulative_charge: int


def settlement_items_encode(items: Iterable[SettlementItem]) -> list[bytes]:
    """Pack items two 32-byte words each, as `settle` expects (see IGpgpuEscrow.sol).

    Items are emitted in the given order; sort them by provider to let the contract credit
    consecutive items of one provider with a single storage write. Raises ValueError for a field
    that does not fit its width (lease id 64 bits, job id 192 bits, charge 96 bits).
    """
    words: list[bytes] = []
    for item in items:
        if not 0 <= item.lease_id <= MAX_UINT64:
            raise ValueError(f"lease id out of range: {item.lease_id}")
        if not 0 <= item.job_id <= MAX_UINT192:
            raise ValueError(f"job id out of range: {item.job_id}")
        if not 0 <= item.cumulative_charge <= MAX_UINT96:
            raise ValueError(f"cumulative charge out of range: {item.cumulative_charge}")
        provider = int(to_checksum_address(item.provider), 16)
        words.append(((provider << 96) | item.cumulative_charge).to_bytes(32, "big"))
        words.append(((item.job_id << 64) | item.lease_id).to_bytes(32, "big"))
    return words


# ---------------------------------------------------------------------------- revert reasons


@dataclass(frozen=True)
class DecodedError:
    """A revert reason: the error's name and its arguments in ABI order."""

    name: str
    args: tuple[Any, ...]  # decoded ABI values, of their ABI types


_BUILTIN_ERRORS: dict[bytes, tuple[str, list[str]]] = {
    keccak(text="Error(string)")[:4]: ("Error", ["string"]),
    keccak(text="Panic(uint256)")[:4]: ("Panic", ["uint256"]),
}


def _abi_type(param: Mapping[str, Any]) -> str:  # `param`: an ABI parameter's JSON
    """Canonical ABI type of a parameter, expanding tuples."""
    kind = param["type"]
    if kind.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param["components"]) + ")" + kind[len("tuple") :]
    return kind


@cache
def _error_table(artifact_names: tuple[str, ...]) -> dict[bytes, tuple[str, list[str]]]:
    table = dict(_BUILTIN_ERRORS)
    for name in artifact_names:
        for entry in load_artifact(name).abi:
            if entry["type"] == "error":
                types = [_abi_type(p) for p in entry["inputs"]]
                table[keccak(text=f"{entry['name']}({','.join(types)})")[:4]] = (entry["name"], types)
    return table


def revert_data(error: BaseException | bytes | str) -> bytes:
    """The raw revert data carried by a web3 exception (or given directly as bytes or 0x-hex).

    JSON-RPC nodes (anvil, geth) give it to web3, which keeps it in `.data` (a hex string, or a
    dict holding one). The in-process eth-tester backend only keeps it as the repr of a bytes
    literal in the message ("execution reverted: b'...'"); that literal is parsed back safely,
    as web3 itself does for EIP-3668. Anything else gives b"".
    """
    if isinstance(error, bytes | bytearray):
        return bytes(error)
    if isinstance(error, str):
        return _data_from_text(error)
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        data: object = getattr(current, "data", None)
        if isinstance(data, Mapping):
            data = data.get("data")
        if isinstance(data, bytes | bytearray) and data:
            return bytes(data)
        if isinstance(data, str) and (found := _data_from_text(data)):
            return found
        for arg in current.args:
            if isinstance(arg, bytes | bytearray) and arg:
                return bytes(arg)
            if isinstance(arg, str) and (found := _data_from_text(arg)):
                return found
        current = current.__cause__ or current.__context__
    return b""


_REVERTED_PREFIX = "execution reverted: "


def _data_from_text(text: str) -> bytes:
    text = text.strip()
    if text.startswith(_REVERTED_PREFIX):
        text = text[len(_REVERTED_PREFIX) :]
    if text.startswith("0x"):
        try:
            return bytes.fromhex(text[2:])
        except ValueError:
            return b""
    if text[:2] in ("b'", 'b"'):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return b""
        return value if isinstance(value, bytes) else b""
    return b""


def revert_decode(
    error: BaseException | bytes | str, artifact_names: Sequence[str] = (ESCROW, STABLECOIN)
) -> DecodedError | None:
    """Name the custom error (or Error(string)/Panic) a call reverted with, using the ABIs' selectors.

    Returns None when there is no revert data or its selector is in none of the given ABIs.
    """
    data = revert_data(error)
    entry = _error_table(tuple(artifact_names)).get(data[:4]) if len(data) >= 4 else None
    if entry is None:
        return None
    name, types = entry
    return DecodedError(name=name, args=tuple(abi_decode(types, data[4:])))


# ---------------------------------------------------------------------------- deployment


# `args`: the constructor's ABI arguments. The result is a web3 Contract, which web3's types cannot
# tell from the class (the receipt's contractAddress may be None in its TypedDict).
def contract_deploy(w3: Web3, name: str, *args: Any, sender: str) -> Any:
    """Deploy the committed artifact `name` from `sender` and return the web3 contract at its address.

    Waits for the receipt and raises RuntimeError if the deployment transaction failed.
    """
    artifact = load_artifact(name)
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    tx_hash = factory.constructor(*args).transact({"from": sender})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
    if receipt["status"] != 1:
        raise RuntimeError(f"deployment of {name} failed in transaction {tx_hash.hex()}")
    return w3.eth.contract(address=receipt["contractAddress"], abi=artifact.abi)
