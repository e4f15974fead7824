"""`Authorization: Machine <credential>` for the agent API (/api/agent/v1/).

A machine is not a person: authentication yields an anonymous user and the Machine as
`request.auth`, and agent views admit only requests that carry one (IsMachine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib.auth.models import AnonymousUser
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request
from rest_framework.views import APIView

from core import logcontext
from gpgpu_agent import protocol
from providers.errors import MachineCredentialRevoked
from providers.models import Machine
from providers.services import machine_authenticate

if TYPE_CHECKING:
    # For the type only: drf_spectacular.openapi imports DRF's views, which import the
    # authentication classes in settings while they are defined.
    from drf_spectacular.openapi import AutoSchema

MACHINE_CREDENTIAL_MAX_LENGTH = 200


class MachineAuthentication(authentication.BaseAuthentication):
    """Authenticate an agent by its machine credential.

    Returns (AnonymousUser, machine). A missing header authenticates nothing (the view answers
    401 `not_authenticated`); an unknown or malformed credential is 401
    `machine_credential_invalid`; a rotated or revoked one is 401 `credential_revoked` (the
    detail says which, and when); a suspended machine is 403 `machine_suspended`.
    """

    keyword = protocol.AUTH_SCHEME

    def authenticate(self, request: Request) -> tuple[AnonymousUser, Machine] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2 or len(header[1]) > MACHINE_CREDENTIAL_MAX_LENGTH:
            raise exceptions.AuthenticationFailed(
                "Authorization header must be 'Machine <credential>'.", code=protocol.CODE_MACHINE_CREDENTIAL_INVALID
            )
        try:
            raw = header[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed(
                "The machine credential contains invalid characters.", code=protocol.CODE_MACHINE_CREDENTIAL_INVALID
            ) from None
        try:
            machine = machine_authenticate(raw_credential=raw)
        except MachineCredentialRevoked as exc:
            raise exceptions.AuthenticationFailed(exc.detail, code=exc.code) from None
        if machine is None:
            raise exceptions.AuthenticationFailed(
                "Unknown machine credential; register the machine again.", code=protocol.CODE_MACHINE_CREDENTIAL_INVALID
            )
        if machine.status == Machine.Status.SUSPENDED:
            reason = f": {machine.suspended_reason}" if machine.suspended_reason else ""
            raise exceptions.PermissionDenied(
                f"This machine is suspended{reason}. Contact the marketplace operators.",
                code=protocol.CODE_MACHINE_SUSPENDED,
            )
        logcontext.bind(machine_id=machine.pk)  # on the request's log lines
        return AnonymousUser(), machine

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


class IsMachine(permissions.BasePermission):
    """Admits requests authenticated by MachineAuthentication."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        return isinstance(request.auth, Machine)


class MachineCredentialScheme(OpenApiAuthenticationExtension):
    target_class = "providers.auth.MachineAuthentication"
    name = "machineAuth"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Machine <credential>`: the credential `POST /api/agent/v1/register` returned.",
        }
