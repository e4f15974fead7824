"""GPGPU's renter SDK and the `gpgpu` command line. Imports nothing from the marketplace's apps."""

from __future__ import annotations

__version__ = "0.1.0"

from gpgpu_client.client import Client
from gpgpu_client.errors import (
    ApiError,
    AuthenticationFailed,
    ClientError,
    Conflict,
    InsufficientFunds,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    Unavailable,
    ValidationFailed,
)

__all__ = [
    "ApiError",
    "AuthenticationFailed",
    "Client",
    "ClientError",
    "Conflict",
    "InsufficientFunds",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "Unavailable",
    "ValidationFailed",
    "__version__",
]
