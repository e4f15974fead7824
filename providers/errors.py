"""Errors of the fleet's services. The codes an agent acts on come from its wire contract."""

from core.errors import Conflict, NotFound, PermissionDenied, ServiceError, ValidationFailed
from gpgpu_agent import protocol


class RegistrationTokenInvalid(ServiceError):
    status_code = 401
    default_code = "registration_token_invalid"


class MachineCredentialInvalid(ServiceError):
    status_code = 401
    default_code = protocol.CODE_MACHINE_CREDENTIAL_INVALID


class MachineCredentialRevoked(ServiceError):
    """The credential presented was rotated or revoked (the detail says which, and when)."""

    status_code = 401
    default_code = "credential_revoked"


class MachineSuspended(ServiceError):
    status_code = 403
    default_code = protocol.CODE_MACHINE_SUSPENDED


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
