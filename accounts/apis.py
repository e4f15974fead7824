"""Who the caller is: GET /api/v1/me."""

from __future__ import annotations

from typing import cast

from django.contrib.auth.models import User
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import BaseApi, error_responses
from core.permissions import user_provider, user_renter


class RoleProfileSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    display_name = serializers.CharField()


class MeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.CharField()
    roles = serializers.ListField(
        child=serializers.ChoiceField(choices=["renter", "provider"]),
        help_text="renter: may submit jobs; provider: may manage machines. A user may be both.",
    )
    renter = RoleProfileSerializer(allow_null=True)
    provider = RoleProfileSerializer(allow_null=True)


class MeApi(BaseApi):
    permission_classes = [IsAuthenticated]

    @extend_schema(
        tags=["account"],
        summary="Who am I, and in which roles",
        responses={200: MeSerializer, **error_responses(401)},
    )
    def get(self, request: Request) -> Response:
        user = cast(User, request.user)  # IsAuthenticated: never the AnonymousUser
        renter, provider = user_renter(user), user_provider(user)
        roles = [role for role, profile in (("renter", renter), ("provider", provider)) if profile is not None]
        me = {
            "id": user.pk,
            "username": user.get_username(),
            "email": user.email,
            "roles": roles,
            "renter": renter,
            "provider": provider,
        }
        return Response(MeSerializer(me).data)
