"""Errors a service raises on purpose. The HTTP layer turns each into one response shape:

    {"code": "<stable machine-readable code>", "detail": "<human sentence>"}

Each app's errors.py subclasses these so that callers can catch by meaning.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses. `code` is stable; `detail` is for people."""

    status_code = 400
    default_code = "invalid"

    # `extra`: more keys for the error body, JSON values whose type each reader knows by key.
    def __init__(self, detail: str, *, code: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code
        self.extra = extra or {}


class ValidationFailed(ServiceError):
    status_code = 400
    default_code = "invalid"


class NotFound(ServiceError):
    status_code = 404
    default_code = "not_found"


class PermissionDenied(ServiceError):
    status_code = 403
    default_code = "permission_denied"


class Conflict(ServiceError):
    """The row is not in a state that allows this (for example cancelling a finished job)."""

    status_code = 409
    default_code = "conflict"


class RequestTooLarge(ServiceError):
    status_code = 413
    default_code = "too_large"


class DatabaseUnavailable(ServiceError):
    """The database cannot be reached (or dropped the connection): the request may succeed if sent
    again later. Raised by nobody on purpose; core.middleware answers it for every request that
    hits a database connection error."""

    status_code = 503
    default_code = "database_unavailable"
