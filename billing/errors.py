"""Errors of the billing services (ledger, metering, admission)."""

from __future__ import annotations

from core.errors import Conflict, NotFound, ServiceError, ValidationFailed


class LedgerError(ServiceError):
    """A movement the ledger refuses."""

    status_code = 409
    default_code = "ledger_refused"


class UnbalancedEntry(LedgerError):
    """An entry whose postings do not sum to zero: a programming error, never written."""

    status_code = 500
    default_code = "ledger_unbalanced"


class IdempotencyConflict(LedgerError):
    """An idempotency key already used for an entry with other postings (or another kind)."""

    default_code = "ledger_idempotency_conflict"


class InsufficientBalance(LedgerError):
    """A posting would take a guarded account below zero; nothing was written."""

    default_code = "insufficient_balance"


class InsufficientFunds(InsufficientBalance):
    """The renter's available balance does not cover what is asked (a job's budget, a withdrawal)."""

    status_code = 402
    default_code = "insufficient_funds"


__all__ = [
    "Conflict",
    "IdempotencyConflict",
    "InsufficientBalance",
    "InsufficientFunds",
    "LedgerError",
    "NotFound",
    "ServiceError",
    "UnbalancedEntry",
    "ValidationFailed",
]
