"""Who may call which part of the public REST API.

A user is a renter when it has a `renter` profile (jobs.Renter) and a provider when it has a
`provider` profile (providers.Provider); one user may be both. Renter endpoints refuse a
provider-only user and provider endpoints a renter-only user with 403; objects that belong to
someone else are answered with 404 by the views' scoped selectors, so their existence does not
leak.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView


# The profiles are jobs' and providers' models, which core (below both) cannot name; `user` may
# be an AnonymousUser or a User with or without them.
def user_renter(user: Any) -> Any | None:
    """The user's renter profile, or None."""
    if not getattr(user, "is_authenticated", False):
        return None
    try:
        return user.renter
    except ObjectDoesNotExist:
        return None


# As user_renter: a providers.models.Provider, not nameable in core.
def user_provider(user: Any) -> Any | None:
    """The user's provider profile, or None."""
    if not getattr(user, "is_authenticated", False):
        return None
    try:
        return user.provider
    except ObjectDoesNotExist:
        return None


class IsRenter(BasePermission):
    """An authenticated user with a renter profile."""

    message = "This endpoint is for renters; this account has no renter profile."
    code = "not_a_renter"

    def has_permission(self, request: Request, view: APIView) -> bool:
        return user_renter(request.user) is not None


class IsProvider(BasePermission):
    """An authenticated user with a provider profile."""

    message = "This endpoint is for providers; this account has no provider profile."
    code = "not_a_provider"

    def has_permission(self, request: Request, view: APIView) -> bool:
        return user_provider(request.user) is not None
