"""Typed chain errors, and the one place that maps node, web3, eth-tester and HTTP exceptions to them.

Callers of the chain client catch these and nothing from web3:

- `NodeUnavailable`: the node could not be reached or did not answer in time. Transient: the
  settlement task waits and catches up later. A transaction whose send raised this may or may not
  have reached the node; look it up by hash before sending a replacement.
- `TransactionTimeout`: no receipt (or not enough confirmations) within the allotted time. The
  transaction may still be mined later.
- `ContractReverted`: the contract refused the call, at gas estimation (nothing was sent) or in a
  mined transaction (status 0). `name` is the Solidity error's name decoded from the ABIs
  (e.g. "GpgpuEscrow_NothingToWithdraw"), identical on every backend.
- `InsufficientGasFunds`: the sending account cannot pay for gas; an operator must top it up.
- `NonceConflict`: the nonce was taken by another transaction even after one refresh (another
  process sends with the same key), or a pending transaction with that nonce cannot be replaced.
- `ChainConfigurationError`: a setting is missing or unsafe (operator key, addresses, chain id).

Secrets in the node's URL: hosted node providers put the API key in CHAIN_RPC_URL's path or
query (https://mainnet.example/v3/<key>), some take user:password, and requests, urllib3 and web3
write that URL into their exception messages and debug logs. Every ChainError's message is
scrubbed (`scrub`: a URL keeps only scheme://host:port, a bare request path is dropped) when it is
made, the original exception is not chained to it (`raise … from None`: a traceback would print
its text), and `log_scrubbing_install` filters the same out of web3's and urllib3's own log
records. So no API body, console page or log line built from a chain error carries the key.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import requests
from eth_utils import is_hex_address, to_checksum_address
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    RequestTimedOut,
    TimeExhausted,
    Web3Exception,
    Web3RPCError,
)

from billing.contract import revert_data, revert_decode
from core.scrub import scrub

if TYPE_CHECKING:
    # For the type only: billing.chain.client imports this module.
    from billing.chain.client import Receipt


# A URL: scheme, optional userinfo, host[:port], then anything up to whitespace or a quote (a
# comma, full stop or parenthesis just before those is left to the sentence).
class ChainError(Exception):
    """Base class of every error the chain client raises. Its message is scrubbed of URL secrets."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(scrub(str(message)), *args)


class _ScrubRecord(logging.Filter):
    """Rewrites a log record's message (and formatted traceback) through `scrub`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        return True


# The loggers that write the node's URL (web3 at DEBUG: "Making request HTTP. URI: …"; urllib3's
# request lines). A filter on a logger sees only the records made on it, so each is named.
URL_LOGGERS = (
    "web3.providers.HTTPProvider",
    "web3.providers.AsyncHTTPProvider",
    "web3._utils.http_session_manager.HTTPSessionManager",
    "web3.manager.RequestManager",
    "urllib3.connectionpool",
)


def log_scrubbing_install() -> None:
    """Make the loggers in URL_LOGGERS scrub their records (idempotent)."""
    for name in URL_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(existing, _ScrubRecord) for existing in target.filters):
            target.addFilter(_ScrubRecord())


class ChainConfigurationError(ChainError):
    """A chain setting is missing, malformed or unsafe; the message names the setting."""


class NodeUnavailable(ChainError):
    """The node refused the connection, timed out, or answered with an HTTP error (transient)."""


class NodeBehind(NodeUnavailable):
    """The node's head is below a block the marketplace has already seen on the chain: a node
    that lags (or one of several behind a load balancer), not yet a chain that went back
    (billing.rewind.node_behind_wait)."""


class TransactionTimeout(ChainError):
    """No receipt, or too few confirmations, for `tx_hash` within `timeout_s` seconds."""

    def __init__(self, message: str, *, tx_hash: str, timeout_s: float) -> None:
        super().__init__(message)
        self.tx_hash = tx_hash
        self.timeout_s = timeout_s


class ContractReverted(ChainError):
    """The contract reverted.

    `name` is the decoded error name ("GpgpuEscrow_InsufficientBalance", "Error", "Panic",
    "AccessControlUnauthorizedAccount", ...) or None when the revert carried no data the ABIs know
    (out of gas, a bare `revert()`); `args` its arguments in ABI order; `raw` the revert data.
    `tx_hash` and `receipt` are set when a mined transaction failed, None when the revert was
    caught at estimation or in a call (and nothing was sent).
    """

    def __init__(
        self,
        name: str | None,
        args: tuple[Any, ...] = (),  # decoded ABI values, of their ABI types
        raw: bytes = b"",
        *,
        tx_hash: str | None = None,
        receipt: Receipt | None = None,
    ) -> None:
        label = name or (f"undecoded revert 0x{raw.hex()}" if raw else "revert without data")
        where = f" in transaction {tx_hash}" if tx_hash else ""
        super().__init__(f"{label}{args if args else ''}{where}")
        self.name = name
        self.args_ = args
        self.raw = raw
        self.tx_hash = tx_hash
        self.receipt = receipt

    @property
    def error_args(self) -> tuple[Any, ...]:  # decoded ABI values, of their ABI types
        """The decoded error's arguments (named so as not to shadow `BaseException.args`)."""
        return self.args_


class InsufficientGasFunds(ChainError):
    """The sender's native balance does not cover gas * price + value."""


class NonceConflict(ChainError):
    """The nonce is used by another transaction and a refresh did not resolve it.

    `too_low` marks the node's "nonce too low" answer, on which the client refreshes and retries once.
    """

    def __init__(self, message: str, *, too_low: bool = False) -> None:
        super().__init__(message)
        self.too_low = too_low


# Lower-case fragments of node and eth-tester messages, by meaning.
_NONCE_TOO_LOW = ("nonce too low", "invalid transaction nonce", "nonce has already been used", "oldnonce")
_NONCE_OTHER = ("replacement transaction underpriced", "nonce too high", "already imported")
_ALREADY_KNOWN = ("already known", "known transaction", "alreadyknown")
_NO_FUNDS = ("insufficient funds", "cannot afford txn gas", "insufficientfunds", "lack of funds")


def is_nonce_too_low(error: BaseException) -> bool:
    """Whether `error` says the transaction's nonce was already used (the signal to refresh and retry)."""
    return isinstance(error, NonceConflict) and error.too_low


def is_already_known(error: BaseException) -> bool:
    """Whether the node already holds this exact signed transaction (sending it again is a no-op)."""
    return _message_has(error, _ALREADY_KNOWN)


def _message_has(error: BaseException, fragments: tuple[str, ...]) -> bool:
    text = str(error).lower()
    return any(fragment in text for fragment in fragments)


def translate(error: BaseException) -> ChainError:
    """Map any exception from web3, eth-tester, requests or a socket to its typed chain error.

    A ChainError is returned unchanged. Unknown exceptions become a plain ChainError that keeps the
    original as `__cause__` when raised with `raise translate(e) from e`.
    """
    if isinstance(error, ChainError):
        return error
    if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return NodeUnavailable(f"chain node unreachable: {_short(error)}")
    if isinstance(error, requests.exceptions.HTTPError):
        return NodeUnavailable(f"chain node answered with an HTTP error: {_short(error)}")
    if isinstance(error, ProviderConnectionError | RequestTimedOut | ConnectionError | socket.timeout | TimeoutError):
        return NodeUnavailable(f"chain node unreachable: {_short(error)}")
    if isinstance(error, TimeExhausted):
        return TransactionTimeout(str(error), tx_hash="", timeout_s=0.0)
    if _is_revert(error):
        decoded = revert_decode(error)
        raw = revert_data(error)
        if decoded is None:
            return ContractReverted(None, (), raw)
        # eth-abi decodes addresses lower-case; the rest of the project compares checksummed ones.
        args = tuple(to_checksum_address(a) if isinstance(a, str) and is_hex_address(a) else a for a in decoded.args)
        return ContractReverted(decoded.name, args, raw)
    if _message_has(error, _NO_FUNDS):
        return InsufficientGasFunds(f"the sender cannot pay for gas: {_short(error)}")
    if _message_has(error, _NONCE_TOO_LOW):
        return NonceConflict(f"nonce already used: {_short(error)}", too_low=True)
    if _message_has(error, _NONCE_OTHER):
        return NonceConflict(_short(error))
    return ChainError(f"{type(error).__name__}: {_short(error)}")


def _is_revert(error: BaseException) -> bool:
    if isinstance(error, ContractLogicError):
        return True
    # eth-tester raises its own TransactionFailed ("execution reverted: b'...'"); importing it
    # lazily keeps eth-tester a test/development dependency of this module only.
    with contextlib.suppress(ImportError):
        from eth_tester.exceptions import TransactionFailed

        if isinstance(error, TransactionFailed):
            return True
    if isinstance(error, Web3RPCError) and "revert" in str(error).lower():
        return True
    return False


def _short(error: BaseException, limit: int = 300) -> str:
    # Scrubbed before it is cut, so a cut cannot leave half a secret the patterns no longer match.
    text = scrub(str(error)) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def chain_errors() -> Iterator[None]:
    """Re-raise anything raised inside as its typed ChainError. The original is not chained (its
    text may carry the node URL's secrets; see the module docstring): the typed error's message
    keeps its type and scrubbed text."""
    try:
        yield
    except ChainError:
        raise
    except (Web3Exception, requests.exceptions.RequestException, OSError, ValueError) as error:
        raise translate(error) from None
    except Exception as error:
        # eth-tester's ValidationError / TransactionFailed do not derive from the classes above.
        if type(error).__module__.startswith(("eth_tester", "eth_utils", "eth", "web3")):
            raise translate(error) from None
        raise
