"""What every HTTP endpoint shares: the error shape (also for Django's own 400/404/500 answers under
/api/), the exception handler, row ids in URLs, strict pagination, and the schema inspector that
documents the errors every operation can give."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.db.models import Model, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import Direction, OpenApiResponse
from rest_framework import exceptions, pagination, serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from core.errors import RequestTooLarge, ServiceError
from core.middleware import database_unavailable_response, is_database_unavailable
from core.permissions import IsProvider, IsRenter, user_provider, user_renter
from core.prices import PRICE_DECIMALS, PRICE_MAX_DIGITS

if TYPE_CHECKING:
    # ApiSchemaMixin's base for the types alone: at run time _ApiSchema combines the two, since
    # drf_spectacular.openapi cannot be imported with this module (see _ApiSchema).
    from drf_spectacular.openapi import AutoSchema
    from rest_framework.schemas.inspectors import ViewInspector

    _SchemaMixinBase = AutoSchema
else:
    _SchemaMixinBase = object


class ErrorSerializer(serializers.Serializer):
    """The one error body every endpoint returns."""

    code = serializers.CharField(help_text="Stable, machine-readable error code.")
    detail = serializers.CharField(help_text="What went wrong, for a person.")
    # DRF's serializer metaclass takes declared fields off the class, so this does not replace
    # Serializer.fields at run time; the stubs cannot know that.
    fields = serializers.DictField(  # type: ignore[assignment]
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
        405: "Method not allowed",
        406: "Not acceptable: the answer is application/json",
        409: "Conflict with the current state",
        413: "Request body too large",
        415: "Unsupported media type: send application/json",
        429: "Too many requests",
        503: "Unavailable for now (database_unavailable: the database cannot be reached); retry after Retry-After",
    }
    return {s: OpenApiResponse(ErrorSerializer, description=descriptions.get(s, "Error")) for s in statuses}


def _flatten(detail: object, prefix: str = "") -> dict[str, list[str]]:
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


# DRF's EXCEPTION_HANDLER signature (the stubs type its context's values loosely).
def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Render every error as {"code", "detail"} (plus "fields" for validation errors). A database
    connection error is not answered here: DRF raises it again and core.middleware answers 503."""
    if isinstance(exc, ServiceError):
        body: dict[str, object] = {"code": exc.code, "detail": exc.detail, **exc.extra}
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


# --- Django's own error answers, in the one shape under /api/ --------------------------------
# Django answers by itself when no URL matches (/api/v1/jobs/abc/), when a request is malformed
# before any view runs, and when a view crashes. Under /api/ those answers use the error shape;
# elsewhere (the admin) Django's pages stay. Wired as handler400/403/404/500 in marketplace.urls.


def _is_api(request: HttpRequest) -> bool:
    return request.path_info.startswith("/api/")


def _error(status: int, code: str, detail: str) -> JsonResponse:
    return JsonResponse({"code": code, "detail": detail}, status=status)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _is_api(request):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return _error(413, RequestTooLarge.default_code, "The request body is too large.")
    return _error(400, "bad_request", "The request is malformed.")


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not _is_api(request):
        return defaults.permission_denied(request, exception)
    return _error(403, exceptions.PermissionDenied.default_code, str(exceptions.PermissionDenied.default_detail))


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if not _is_api(request):
        return defaults.page_not_found(request, exception)
    return _error(404, exceptions.NotFound.default_code, str(exceptions.NotFound.default_detail))


def server_error(request: HttpRequest) -> HttpResponse:
    # Django calls this while handling the exception (core.middleware): a database that cannot be
    # reached, whether a middleware or a view hit it, is a 503 to retry, not a crash.
    exc = sys.exc_info()[1]
    if is_database_unavailable(exc):
        return database_unavailable_response(request, exc)
    if not _is_api(request):
        return defaults.server_error(request)
    return _error(500, "server_error", "The server failed to answer this request; it has been logged.")


# --- row ids in URLs ------------------------------------------------------------------------
# Every id in a URL (`<int:job_id>`) is a BigAutoField primary key: BaseApi answers an id above
# ID_MAX with 404 before any query (the database could not even compare it), and the schema
# bounds every integer path parameter to 1..ID_MAX.
ID_MAX = 2**63 - 1
_INT_PARAMETER_RE = re.compile(r"<int:(?P<name>\w+)>")


# --- pagination -----------------------------------------------------------------------------

_PAGE_NUMBER_RE = re.compile(r"[0-9]{1,10}")


class Pagination(pagination.LimitOffsetPagination):
    """limit/offset pagination that refuses what it cannot use (400 naming the parameter)
    instead of silently falling back to its defaults."""

    default_limit = 50
    max_limit = 500
    max_offset = 2**31 - 1

    def get_limit(self, request: Request) -> int:
        return self._parameter(request, self.limit_query_param, 1, self.max_limit, self.default_limit)

    def get_offset(self, request: Request) -> int:
        return self._parameter(request, self.offset_query_param, 0, self.max_offset, 0)

    @staticmethod
    def _parameter(request: Request, name: str, low: int, high: int, default: int) -> int:
        raw = request.query_params.get(name)
        if raw is None:
            return default
        if not _PAGE_NUMBER_RE.fullmatch(raw) or not low <= int(raw) <= high:
            raise exceptions.ValidationError({name: [f"Must be an integer from {low} to {high}."]})
        return int(raw)

    # OpenAPI parameter objects, untyped JSON in DRF's stubs.
    def get_schema_operation_parameters(self, view: APIView) -> list[dict[str, Any]]:
        bounds = {
            self.limit_query_param: (1, self.max_limit, f"How many results to return (default {self.default_limit})."),
            self.offset_query_param: (0, self.max_offset, "How many results to skip."),
        }
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            low, high, description = bounds[parameter["name"]]
            parameter["description"] = description
            parameter["schema"] = {"type": "integer", "minimum": low, "maximum": high}
        return parameters


# --- the schema inspector -------------------------------------------------------------------


class ApiSchemaMixin(_SchemaMixinBase):
    """What every BaseApi view shares, written into each of its operations by drf-spectacular's
    inspector: `<int:…>` path parameters as ids (1 to ID_MAX), and the errors the framework
    answers whatever the view declares: 406 for an Accept header without application/json; 413
    for any body over the limit; 400 and 415 for an operation that reads a JSON body; 400 for a
    bad limit/offset; 429 when the view throttles; 503 when the database cannot be reached
    (core.middleware)."""

    # OpenAPI parameter objects, untyped JSON in drf-spectacular.
    def _resolve_path_parameters(self, variables: list[str]) -> list[dict[str, Any]]:
        parameters = super()._resolve_path_parameters(variables)
        ids = set(_INT_PARAMETER_RE.findall(self.path_regex))
        for parameter in parameters:
            if parameter["name"] in ids:
                parameter["schema"] = {"type": "integer", "format": "int64", "minimum": 1, "maximum": ID_MAX}
        return parameters

    def _implied_error_statuses(self) -> set[int]:
        statuses = {406, 413, 503}
        if self.method in {"POST", "PUT", "PATCH"} and self.get_request_serializer() is not None:
            statuses |= {400, 415}
        if self._get_pagination_parameters():
            statuses.add(400)
        if self.view.get_throttles():
            statuses.add(429)
        return statuses

    # OpenAPI response objects, untyped JSON in drf-spectacular (its _SchemaType).
    def _get_response_bodies(self, direction: Direction = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        implied = error_responses(*sorted(self._implied_error_statuses()))
        for status, response in implied.items():
            if str(status) not in responses:
                responses[str(status)] = self._get_response_for_code(response, str(status), direction=direction)
        return dict(sorted(responses.items()))


class _ApiSchema:
    """BaseApi.schema: one drf-spectacular AutoSchema with ApiSchemaMixin, as a class attribute
    `schema = AutoSchema()` would be, but made on first use, not at import: drf_spectacular.openapi
    imports rest_framework.generics, which imports this module's Pagination (DRF's
    DEFAULT_PAGINATION_CLASS)."""

    _inspector: AutoSchema | None = None

    def _get(self) -> ViewInspector:
        if self._inspector is None:
            from drf_spectacular.openapi import AutoSchema

            self._inspector = type("ApiAutoSchema", (ApiSchemaMixin, AutoSchema), {})()
        return self._inspector

    def __get__(self, instance: APIView | None, owner: type[APIView]) -> ViewInspector:
        return self._get().__get__(instance, owner)

    def __set__(self, instance: APIView, value: ViewInspector | None) -> None:
        self._get().__set__(instance, value)


class StrictInputSerializer(serializers.Serializer):
    """An input serializer that refuses keys it does not know, so a misspelt field is a 400
    instead of being silently ignored. `also_allowed` names keys others handle (pagination)."""

    also_allowed: frozenset[str] = frozenset()

    # DRF's signature: the request's parsed body, of no known shape yet.
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

    # Passed on to ChoiceField, whose stubs type choices and options loosely.
    def __init__(self, choices: Any, *, enum_name: str, **kwargs: Any) -> None:
        self.enum_name = enum_name
        super().__init__(choices, **kwargs)

    # DRF's signature: a ChoiceField's value is whatever its choices hold.
    def to_representation(self, value: Any) -> Any:
        if value in ("", None) and self.allow_null:
            return None
        return super().to_representation(value)


class NamedChoiceFieldExtension(OpenApiSerializerFieldExtension):
    target_class = NamedChoiceField

    def get_name(self) -> str:
        return self.target.enum_name

    # The schema fragment: untyped JSON in drf-spectacular (its _SchemaType).
    def map_serializer_field(self, auto_schema: AutoSchema, direction: Direction) -> dict[str, Any]:
        return {"type": "string", "enum": [str(choice) for choice in self.target.choices]}


# The field's other options, passed on to DecimalField as they are.
def price_field(**kwargs: Any) -> serializers.DecimalField:
    """A price per GPU-hour, rendered as a decimal string."""
    return serializers.DecimalField(
        max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_DECIMALS, coerce_to_string=True, **kwargs
    )


# --- input fields whose schema states the whole rule ----------------------------------------


def decimal_pattern(
    *, whole_digits: int, decimal_places: int, maximum: Decimal | None = None, positive: bool = False
) -> str:
    """A regex for plain decimal strings ("12", "0.5"): at most `whole_digits` digits before the
    point and `decimal_places` after it; with `maximum` (a power of ten, at most `whole_digits` + 1
    digits), nothing above it; with `positive`, not zero. For the OpenAPI schema: what matches is
    accepted (the server also takes other spellings, such as "1e2" or a JSON number)."""
    fraction = rf"(?:\.[0-9]{{1,{decimal_places}}})?"
    top = ""
    if maximum is not None:
        assert maximum == 10**whole_digits, "maximum must be 10 ** whole_digits"
        top = rf"|{int(maximum)}(?:\.0{{1,{decimal_places}}})?"
    if not positive:
        return rf"^(?:[0-9]{{1,{whole_digits}}}{fraction}{top})$"

    def nonzero(width: int) -> str:
        # A run of at most `width` digits, not all zero: leading zeros, a non-zero digit, the rest.
        return "|".join(
            "0" * i + "[1-9]" + (f"[0-9]{{0,{width - i - 1}}}" if width - i - 1 else "") for i in range(width)
        )

    return (
        rf"^(?:(?:{nonzero(whole_digits)}){fraction}"
        rf"|0{{1,{whole_digits}}}\.(?:{nonzero(decimal_places)}){top})$"
    )


class DecimalInputField(serializers.DecimalField):
    """A decimal input whose schema carries its pattern (decimal_pattern): OpenAPI cannot bound
    a string's value, so the pattern states the digits and the range."""

    # DecimalField's options, passed on as they are.
    def __init__(self, *, pattern: str, **kwargs: Any) -> None:
        self.pattern = pattern
        super().__init__(**kwargs)


class DecimalInputFieldExtension(OpenApiSerializerFieldExtension):
    target_class = DecimalInputField
    match_subclasses = True

    # The schema fragment: untyped JSON in drf-spectacular (its _SchemaType).
    def map_serializer_field(self, auto_schema: AutoSchema, direction: Direction) -> dict[str, Any]:
        return {"type": "string", "format": "decimal", "pattern": self.target.pattern}


def _not_zero(value: Decimal) -> None:
    if value == 0:
        raise serializers.ValidationError("Must be greater than 0.")


# The field's other options, passed on to DecimalField as they are.
def price_input_field(*, maximum: Decimal, positive: bool = False, **kwargs: Any) -> DecimalInputField:
    """A price per GPU-hour as input: from 0 (or above 0 when `positive`) to `maximum`, at most
    PRICE_DECIMALS decimal places, its whole rule in the schema's pattern."""
    whole_digits = len(str(int(maximum))) - 1
    return DecimalInputField(
        pattern=decimal_pattern(
            whole_digits=whole_digits, decimal_places=PRICE_DECIMALS, maximum=maximum, positive=positive
        ),
        max_digits=PRICE_MAX_DIGITS,
        decimal_places=PRICE_DECIMALS,
        min_value=Decimal(0),
        max_value=maximum,
        validators=[_not_zero] if positive else [],
        **kwargs,
    )


ETH_ADDRESS_REGEX = r"^0x[0-9a-fA-F]{40}$"
SIGNATURE_REGEX = r"^0x[0-9a-fA-F]{130}$"


# The field's other options, passed on to RegexField as they are.
def eth_address_field(*, allow_blank: bool = False, **kwargs: Any) -> serializers.RegexField:
    """An Ethereum address (0x + 40 hex digits; or empty, with `allow_blank`: DRF takes "" before
    the pattern is tried, and the schema says oneOf the pattern or an empty string)."""
    return serializers.RegexField(
        ETH_ADDRESS_REGEX,
        max_length=42,
        allow_blank=allow_blank,
        error_messages={"invalid": "Must be 0x followed by 40 hex digits."},
        **kwargs,
    )


# The field's other options, passed on to RegexField as they are.
def signature_field(**kwargs: Any) -> serializers.RegexField:
    """A 65-byte secp256k1 signature, 0x + 130 hex digits."""
    return serializers.RegexField(
        SIGNATURE_REGEX,
        max_length=132,
        error_messages={"invalid": "Must be 0x followed by 130 hex digits (65 bytes)."},
        **kwargs,
    )


# The field's other options, passed on to IntegerField as they are.
def id_field(**kwargs: Any) -> serializers.IntegerField:
    """The id of a row (1 to ID_MAX) in a body: bigger would not fit the database's column."""
    return serializers.IntegerField(min_value=1, max_value=ID_MAX, **kwargs)


_M = TypeVar("_M", bound=Model)


class BaseApi(APIView):
    """Base of every API view (renter, provider and agent): a body over MAX_REQUEST_BYTES is
    refused with 413 before it is read (DRF's parsers read the stream without Django's size
    check), an id in the URL above ID_MAX is a 404, and GET lists are paginated (limit/offset,
    see Pagination)."""

    pagination_class = Pagination
    schema = _ApiSchema()

    # APIView.initial's signature: the URL's arguments.
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
        if any(isinstance(value, int) and value > ID_MAX for value in kwargs.values()):
            raise exceptions.NotFound()

    def paginate(self, queryset: QuerySet[_M]) -> tuple[Pagination, list[_M]]:
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(queryset, self.request, view=self)
        return paginator, list(page or [])

    def paginated_response(self, queryset: QuerySet[Model], serializer_class: type[serializers.Serializer]) -> Response:
        paginator, page = self.paginate(queryset)
        return paginator.get_paginated_response(serializer_class(page, many=True).data)


class RenterApi(BaseApi):
    """A renter-only endpoint; `self.renter` is the caller's renter profile."""

    # This docstring is the schema's description of every renter operation: `renter` is a
    # jobs.models.Renter.

    permission_classes = [IsAuthenticated, IsRenter]

    @property
    def renter(self) -> Any:  # a jobs.models.Renter, which core (below jobs) cannot name
        return user_renter(self.request.user)


class ProviderApi(BaseApi):
    """A provider-only endpoint; `self.provider` is the caller's provider profile."""

    # This docstring is the schema's description of every provider operation: `provider` is a
    # providers.models.Provider.

    permission_classes = [IsAuthenticated, IsProvider]

    @property
    def provider(self) -> Any:  # a providers.models.Provider, which core (below providers) cannot name
        return user_provider(self.request.user)
