"""Errors of the fleet's services."""

from core.errors import Conflict, NotFound, PermissionDenied, ServiceError, ValidationFailed


class RegistrationTokenInvalid(ServiceError):
    status_code = 401
    default_code = "registration_token_invalid"


class MachineCredentialInvalid(ServiceError):
    status_code = 401
    default_code = "machine_credential_invalid"


class MachineCredentialRevoked(ServiceError):
    """The credential presented was rotated or revoked (the detail says which, and when)."""

    status_code = 401
    default_code = "credential_revoked"


class MachineSuspended(ServiceError):
    status_code = 403
    default_code = "machine_suspended"


__all__ = [
    "Conflict",
    "MachineCredentialInvalid",
    "MachineCredentialRevoked",
    "MachineSuspended",
    "NotFound",
    "PermissionDenied",
    "RegistrationTokenInvalid",
    "ServiceError",
    "ValidationFailed",
]
