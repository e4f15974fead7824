"""Errors of the jobs and leases services."""

from core.errors import Conflict, NotFound, PermissionDenied, ServiceError, ValidationFailed


class InvalidTransition(Conflict):
    """The job or lease is not in a state this move starts from."""

    default_code = "invalid_transition"


class IdempotencyKeyReused(Conflict):
    default_code = "idempotency_key_reused"


__all__ = [
    "Conflict",
    "IdempotencyKeyReused",
    "InvalidTransition",
    "NotFound",
    "PermissionDenied",
    "ServiceError",
    "ValidationFailed",
]
