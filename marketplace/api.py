"""What every HTTP endpoint shares: the error shape, the exception handler and pagination."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.db.models import QuerySet
from django.http import Http404
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import OpenApiResponse
from rest_framework import exceptions, pagination, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from marketplace.errors import RequestTooLarge, ServiceError
from providers.models import PRICE_DECIMALS, PRICE_MAX_DIGITS


class ErrorSerializer(serializers.Serializer):
    """The one error body every endpoint returns."""

    code = serializers.CharField(help_text="Stable, machine-readable error code.")
    detail = serializers.CharField(help_text="What went wrong, for a person.")
    fields = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="For validation errors: the messages for each offending field.",
    )


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    """OpenAPI response entries for the given error statuses, all with the error shape."""
    descriptions = {
        400: "Invalid input",
        401: "Not authenticated",
        403: "Not allowed",
        404: "Not found",
        409: "Conflict with the current state",
        413: "Request body too large",
        429: "Too many requests",
    }
    return {s: OpenApiResponse(ErrorSerializer, description=descriptions.get(s, "Error")) for s in statuses}


def _flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.update(_flatten(value, name))
    elif isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            out[prefix or "non_field_errors"] = [str(item) for item in detail]
        else:
            for index, item in enumerate(detail):
                out.update(_flatten(item, f"{prefix}[{index}]"))
    else:
        out[prefix or "non_field_errors"] = [str(detail)]
    return out


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Render every error as {"code", "detail"} (plus "fields" for validation errors)."""
    if isinstance(exc, ServiceError):
        body: dict[str, Any] = {"code": exc.code, "detail": exc.detail, **exc.extra}
        return Response(body, status=exc.status_code)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        fields = _flatten(exc.detail)
        first_field, first_messages = next(iter(fields.items()))
        detail = f"{first_field}: {first_messages[0]}" if first_field != "non_field_errors" else first_messages[0]
        response.data = {"code": "invalid", "detail": detail, "fields": fields}
    elif isinstance(exc, exceptions.APIException):
        code = exc.get_codes()
        if not isinstance(code, str):
            code = exc.default_code
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        response.data = {"code": code, "detail": str(detail)}
    return response


class Pagination(pagination.LimitOffsetPagination):
    default_limit = 50
    max_limit = 500


class StrictInputSerializer(serializers.Serializer):
    """An input serializer that refuses keys it does not know, so a misspelt field is a 400
    instead of being silently ignored. `also_allowed` names keys others handle (pagination)."""

    also_allowed: frozenset[str] = frozenset()

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            known = set(self.fields) | self.also_allowed
            unknown = sorted(str(key) for key in data if key not in known)
            if unknown:
                raise serializers.ValidationError({key: ["Unknown field."] for key in unknown})
        return super().to_internal_value(data)


class NamedChoiceField(serializers.ChoiceField):
    """A choice field whose choice set is one named component in the OpenAPI schema (GpuState,
    JobStatus, …), however many serializers use it, so clients get one enum per set. A blank
    stored value is rendered as null when the field allows null."""

    def __init__(self, choices: Any, *, enum_name: str, **kwargs: Any) -> None:
        self.enum_name = enum_name
        super().__init__(choices, **kwargs)

    def to_representation(self, value: Any) -> Any:
        if value in ("", None) and self.allow_null:
            return None
        return super().to_representation(value)


class NamedChoiceFieldExtension(OpenApiSerializerFieldExtension):
    target_class = NamedChoiceField

    def get_name(self) -> str:
        return self.target.enum_name

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        return {"type": "string", "enum": [str(choice) for choice in self.target.choices]}


def price_field(**kwargs: Any) -> serializers.DecimalField:
    """A price per GPU-hour, rendered as a decimal string."""
    return serializers.DecimalField(
        max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_DECIMALS, coerce_to_string=True, **kwargs
    )


class BaseApi(APIView):
    """Base of every API view (renter, provider and agent): a body over MAX_REQUEST_BYTES is
    refused with 413 before it is read (DRF's parsers read the stream without Django's size
    check), and GET lists are paginated (limit/offset, see Pagination)."""

    pagination_class = Pagination

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            raise RequestTooLarge(
                f"The request body is {length} bytes; at most {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} are accepted."
            )
        super().initial(request, *args, **kwargs)

    def paginate(self, queryset: QuerySet[Any]) -> tuple[Pagination, list[Any]]:
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(queryset, self.request, view=self)
        return paginator, list(page or [])

    def paginated_response(self, queryset: QuerySet[Any], serializer_class: type[serializers.Serializer]) -> Response:
        paginator, page = self.paginate(queryset)
        return paginator.get_paginated_response(serializer_class(page, many=True).data)
