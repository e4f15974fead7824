"""The fleet's REST API under /api/v1/: the GPU market (any signed-in user) and providers'
own machines, GPU price floors, profile, availability windows, blackouts and registration
tokens. Views validate input, call one selector or service and serialise the result.

A provider sees and changes only its own rows: another provider's machine, window, blackout or
GPU is a 404. Money is a decimal string in JSON, never a float.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from zoneinfo import available_timezones

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.serializer_helpers import ReturnDict

from core.api import (
    BaseApi,
    NamedChoiceField,
    ProviderApi,
    StrictInputSerializer,
    error_responses,
    eth_address_field,
    id_field,
    price_field,
    price_input_field,
)
from providers import selectors, services
from providers.agent_apis import CapabilitiesSerializer
from providers.availability import DAY_NAMES, FOREVER, mask_to_days
from providers.models import GPU, AvailabilityWindow, Machine, Provider, RegistrationToken

PRICE_MAX = services.PRICE_FLOOR_MAX
# Bounds on search filters, so a query string cannot ask for something absurd.
MAX_MODELS_PER_SEARCH = 32
MAX_VRAM_MB = 10_000_000
# The longest job duration a search asks about: 30 days, the longest job (jobs.services.MAX_DURATION_S).
MAX_SEARCH_DURATION_S = 30 * 24 * 3600


# --- the market -----------------------------------------------------------------------------


class MarketGpuSerializer(serializers.Serializer):
    """A GPU as renters see it: no provider identity, hostname, credentials or payout data."""

    uuid = serializers.CharField()
    model = serializers.CharField()
    vram_mb = serializers.IntegerField()
    price_per_gpu_hour = price_field(source="effective_price", help_text="The effective price floor per GPU-hour.")
    region = serializers.CharField(source="machine.region")
    machine = serializers.IntegerField(source="machine_id")
    state = NamedChoiceField(GPU.State.choices, enum_name="GpuState")
    idle_since = serializers.DateTimeField(allow_null=True)
    available_now = serializers.BooleanField(
        source="availability.available_now",
        help_text="Idle, its machine online, not leased, and inside its owner's schedule now.",
    )
    available_until = serializers.DateTimeField(
        source="availability.until",
        allow_null=True,
        help_text="When its current stretch of availability ends; null when not available now or "
        "when no end is known (then available_indefinitely is true).",
    )
    available_indefinitely = serializers.BooleanField(source="availability.forever")
    utilization_pct = serializers.FloatField(allow_null=True)
    memory_used_mb = serializers.IntegerField(allow_null=True)
    temperature_c = serializers.FloatField(allow_null=True)
    last_telemetry_at = serializers.DateTimeField(allow_null=True)
    predicted_idle_s = serializers.IntegerField(
        source="idle_risk.predicted_idle_s",
        allow_null=True,
        help_text="How much longer its owner is likely to stay away, seconds: the median of its machine's idle "
        "forecast, learnt from when the owner came back before (at this hour of the week). Not capped by "
        "available_until. null when the owner is not away now (using the GPU, or it is offline).",
    )
    p_finish = serializers.FloatField(
        source="idle_risk.p_finish",
        allow_null=True,
        min_value=0,
        max_value=1,
        help_text="With duration_s: the probability, 0 to 1, that a job of that length started now runs to its "
        "end without its owner coming back; 0 when its availability window ends first. null without "
        "duration_s, or when the GPU cannot take a job now or its owner is not away.",
    )


class GpuSearchApi(BaseApi):
    class FilterSerializer(StrictInputSerializer):
        also_allowed = frozenset({"limit", "offset"})

        model = serializers.CharField(
            required=False,
            allow_blank=True,
            max_length=MAX_MODELS_PER_SEARCH * 101,
            help_text=f"A model name or a comma-separated list of at most {MAX_MODELS_PER_SEARCH}, each at most "
            "100 characters, case-insensitive; empty: any.",
        )
        min_vram_mb = serializers.IntegerField(required=False, min_value=0, max_value=MAX_VRAM_MB)
        max_price = price_input_field(
            required=False,
            maximum=PRICE_MAX,
            help_text="Only GPUs whose effective price floor per GPU-hour is at most this.",
        )
        region = serializers.CharField(required=False, allow_blank=True, max_length=64, help_text="Empty: any.")
        available_now = serializers.ChoiceField(
            choices=["true", "false"],
            required=False,
            help_text="true: only GPUs a job could be placed on now; false: only the others.",
        )
        duration_s = serializers.IntegerField(
            required=False,
            min_value=1,
            max_value=MAX_SEARCH_DURATION_S,
            help_text="Your job's expected duration, seconds: each GPU then shows p_finish, the probability that "
            "the job runs to its end there without its owner coming back.",
        )

        def validate_model(self, value: str) -> list[str]:
            names = [name.strip() for name in value.split(",") if name.strip()]
            if len(names) > MAX_MODELS_PER_SEARCH:
                raise serializers.ValidationError(f"At most {MAX_MODELS_PER_SEARCH} models.")
            if any(len(name) > 100 for name in names):
                raise serializers.ValidationError("A model name is at most 100 characters.")
            return names

    @extend_schema(
        tags=["market"],
        summary="Search the GPUs on the market",
        parameters=[FilterSerializer],
        responses={200: MarketGpuSerializer(many=True), **error_responses(400, 401)},
    )
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        data = filters.validated_data
        available_now = data.get("available_now")
        queryset = selectors.gpu_search(
            models=data.get("model", []),
            min_vram_mb=data.get("min_vram_mb"),
            max_price=data.get("max_price"),
            region=data.get("region", ""),
            available_now=None if available_now is None else available_now == "true",
        )
        paginator, page = self.paginate(queryset)
        now = timezone.now()
        availability = selectors.gpus_availability(gpus=page, now=now)
        # A machine takes a job now when one of its GPUs on the page does.
        machines: dict[int, selectors.GpuAvailability] = {}
        for gpu in page:
            if gpu.machine_id not in machines or availability[gpu.pk].available_now:
                machines[gpu.machine_id] = availability[gpu.pk]
        risks = selectors.machines_idle_risk(availability=machines, duration_s=data.get("duration_s"), now=now)
        for gpu in page:
            # For MarketGpuSerializer alone, not fields of the model.
            gpu.availability = availability[gpu.pk]  # type: ignore[attr-defined]
            gpu.idle_risk = selectors.IdleRisk(  # type: ignore[attr-defined]
                predicted_idle_s=risks[gpu.machine_id].predicted_idle_s,
                p_finish=risks[gpu.machine_id].p_finish if availability[gpu.pk].available_now else None,
            )
        return paginator.get_paginated_response(MarketGpuSerializer(page, many=True).data)


# --- provider: machines and GPUs ------------------------------------------------------------


class MachineSummarySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    hostname = serializers.CharField()
    status = NamedChoiceField(Machine.Status.choices, enum_name="MachineStatus")
    region = serializers.CharField()
    agent_version = serializers.CharField()
    last_heartbeat_at = serializers.DateTimeField(allow_null=True)
    # Declared wider: MachineDetailSerializer counts the GPUs itself.
    gpu_count: serializers.Field = serializers.IntegerField()
    accepts_container = serializers.BooleanField(help_text="Container jobs may be placed on it.")
    accepts_process = serializers.BooleanField(
        help_text="Process jobs may be placed on it: only when its agent says the provider opted in."
    )
    capabilities = CapabilitiesSerializer(
        allow_null=True,
        help_text="What its agent last reported: accepted job kinds, how each is isolated, why a kind is "
        "refused. null until first reported (then: containers only).",
    )
    capabilities_reported_at = serializers.DateTimeField(allow_null=True)
    credential_revoked_at = serializers.DateTimeField(
        allow_null=True, help_text="When its credential was revoked; it must be registered again."
    )
    created_at = serializers.DateTimeField()


class ProviderGpuSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    uuid = serializers.CharField()
    index = serializers.IntegerField()
    model = serializers.CharField()
    vram_mb = serializers.IntegerField()
    state = NamedChoiceField(GPU.State.choices, enum_name="GpuState")
    idle_since = serializers.DateTimeField(allow_null=True)
    price_floor = price_field(allow_null=True, help_text="This GPU's own floor; null: the provider's default.")
    effective_price_floor = price_field(source="effective_price", help_text="The floor that applies.")
    utilization_pct = serializers.FloatField(allow_null=True)
    memory_used_mb = serializers.IntegerField(allow_null=True)
    temperature_c = serializers.FloatField(allow_null=True)
    power_w = serializers.FloatField(allow_null=True)
    last_telemetry_at = serializers.DateTimeField(allow_null=True)


class MachineDetailSerializer(MachineSummarySerializer):
    gpu_count = serializers.SerializerMethodField()
    driver_version = serializers.CharField()
    cuda_version = serializers.CharField()
    cpu_cores = serializers.IntegerField(allow_null=True)
    ram_mb = serializers.IntegerField(allow_null=True)
    disk_gb = serializers.IntegerField(allow_null=True)
    signing_address = serializers.CharField()
    suspended_reason = serializers.CharField()
    schedule_open_now = serializers.BooleanField(help_text="Inside its availability windows and no blackout now.")
    schedule_open_until = serializers.DateTimeField(
        allow_null=True, help_text="When the current stretch ends; null when closed or open indefinitely."
    )
    gpus = ProviderGpuSerializer(many=True)

    @extend_schema_field(OpenApiTypes.INT)
    def get_gpu_count(self, machine: Machine) -> int:
        return len(machine.gpus.all())


class MachineListApi(ProviderApi):
    @extend_schema(
        tags=["machines"],
        summary="List my machines",
        responses={200: MachineSummarySerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        return self.paginated_response(
            selectors.machine_list_for_provider(provider=self.provider), MachineSummarySerializer
        )


class MachineDetailApi(ProviderApi):
    @extend_schema(
        tags=["machines"],
        summary="One of my machines, with its GPUs",
        responses={200: MachineDetailSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, machine_id: int) -> Response:
        return Response(_machine_detail(provider=self.provider, machine_id=machine_id))

    @extend_schema(
        tags=["machines"],
        summary="Remove one of my machines",
        description="Takes the machine out of the fleet for good once it runs no lease (else 409 "
        "machine_busy): its credential is revoked and it no longer shows in the lists. Its GPUs may "
        "then be registered again, by any provider.",
        responses={204: None, **error_responses(401, 403, 404, 409)},
    )
    def delete(self, request: Request, machine_id: int) -> Response:
        machine = selectors.machine_get_for_provider(provider=self.provider, machine_id=machine_id)
        services.machine_remove(machine=machine, actor=f"provider:{self.provider.pk}")
        return Response(status=status.HTTP_204_NO_CONTENT)


def _machine_detail(*, provider: Provider, machine_id: int) -> ReturnDict:
    machine = selectors.machine_get_for_provider(provider=provider, machine_id=machine_id)
    until = selectors.machine_available_until(machine=machine, now=timezone.now())
    # For MachineDetailSerializer alone, not fields of the model.
    machine.schedule_open_now = until is not None  # type: ignore[attr-defined]
    machine.schedule_open_until = None if until in (None, FOREVER) else until  # type: ignore[attr-defined]
    return MachineDetailSerializer(machine).data


class MachineCredentialSerializer(serializers.Serializer):
    machine_id = serializers.IntegerField()
    credential = serializers.CharField(
        help_text="Shown once: install it on the machine with `gpgpu-agent rotate-credential --credential-stdin`."
    )


class MachineCredentialRotateApi(ProviderApi):
    class RotateInput(StrictInputSerializer):
        """No fields: the body is empty or {}."""

    @extend_schema(
        tags=["machines"],
        summary="Rotate a machine's credential",
        description="Issues the machine a new credential, shown once. The old one stops working at once "
        "(401 credential_revoked): install the new one on the machine. A revoked machine is 409 machine_revoked.",
        request=RotateInput,
        responses={200: MachineCredentialSerializer, **error_responses(400, 401, 403, 404, 409, 413)},
    )
    def post(self, request: Request, machine_id: int) -> Response:
        machine = selectors.machine_get_for_provider(provider=self.provider, machine_id=machine_id)
        self.RotateInput(data=request.data).is_valid(raise_exception=True)
        credential = services.machine_credential_rotate(machine=machine, actor=f"provider:{self.provider.pk}")
        return Response(MachineCredentialSerializer({"machine_id": machine.pk, "credential": credential}).data)


class MachineCredentialRevokeApi(ProviderApi):
    class RevokeInput(StrictInputSerializer):
        reason = serializers.CharField(required=False, allow_blank=True, max_length=255, default="")

    @extend_schema(
        tags=["machines"],
        summary="Revoke a machine's credential",
        description="The machine can no longer authenticate: it goes offline, its running rentals end "
        "(interruptible jobs go back to the queue). To bring it back, register it again with a new "
        "registration token. Revoking a revoked machine changes nothing.",
        request=RevokeInput,
        responses={200: MachineDetailSerializer, **error_responses(400, 401, 403, 404, 413)},
    )
    def post(self, request: Request, machine_id: int) -> Response:
        machine = selectors.machine_get_for_provider(provider=self.provider, machine_id=machine_id)
        data = self.RevokeInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.machine_credential_revoke(
            machine=machine,
            actor=f"provider:{self.provider.pk}",
            reason=data.validated_data["reason"] or "revoked by the provider",
        )
        return Response(_machine_detail(provider=self.provider, machine_id=machine_id))


class MachineGpuApi(ProviderApi):
    class PriceFloorInput(StrictInputSerializer):
        price_floor = price_input_field(
            allow_null=True, maximum=PRICE_MAX, help_text="Per GPU-hour; null: use my default."
        )

    @extend_schema(
        tags=["machines"],
        summary="Set a GPU's price floor",
        request=PriceFloorInput,
        responses={200: ProviderGpuSerializer, **error_responses(400, 401, 403, 404, 413)},
    )
    def patch(self, request: Request, machine_id: int, gpu_id: int) -> Response:
        gpu = selectors.gpu_get_for_provider(provider=self.provider, machine_id=machine_id, gpu_id=gpu_id)
        data = self.PriceFloorInput(data=request.data)
        data.is_valid(raise_exception=True)
        gpu = services.gpu_price_floor_set(gpu=gpu, price_floor=data.validated_data["price_floor"])
        # For ProviderGpuSerializer alone, as machine_get_for_provider annotates it.
        gpu.effective_price = (  # type: ignore[attr-defined]
            gpu.price_floor if gpu.price_floor is not None else self.provider.default_price_floor
        )
        return Response(ProviderGpuSerializer(gpu).data)


# --- provider: profile ----------------------------------------------------------------------


class ProviderProfileSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    display_name = serializers.CharField()
    payout_address = serializers.CharField(help_text="Where settlements are paid; empty until set.")
    default_price_floor = price_field(help_text="Per GPU-hour, for GPUs without their own floor.")
    created_at = serializers.DateTimeField()


class ProviderProfileApi(ProviderApi):
    class ProfileInput(StrictInputSerializer):
        display_name = serializers.CharField(required=False, max_length=100)
        payout_address = eth_address_field(
            required=False, allow_blank=True, help_text="0x followed by 40 hex digits, or empty."
        )
        default_price_floor = price_input_field(required=False, maximum=PRICE_MAX)

    @extend_schema(
        tags=["provider"],
        summary="My provider profile",
        responses={200: ProviderProfileSerializer, **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        return Response(ProviderProfileSerializer(self.provider).data)

    @extend_schema(
        tags=["provider"],
        summary="Change my provider profile",
        request=ProfileInput,
        responses={200: ProviderProfileSerializer, **error_responses(400, 401, 403, 413)},
    )
    def patch(self, request: Request) -> Response:
        data = self.ProfileInput(data=request.data)
        data.is_valid(raise_exception=True)
        provider = services.provider_update(provider=self.provider, **data.validated_data)
        return Response(ProviderProfileSerializer(provider).data)


# --- provider: availability windows ---------------------------------------------------------


class DaysField(serializers.ListField):
    child = serializers.ChoiceField(choices=list(DAY_NAMES))

    # The stored day mask, an int, where ListField's stubs expect a list.
    def to_representation(self, data: Any) -> list[str]:
        return mask_to_days(data)


@extend_schema_field({"type": "string", "pattern": "^(?:[01][0-9]|2[0-3]):[0-5][0-9]$", "example": "08:30"})
class HourMinuteField(serializers.TimeField):
    """A local time of day as HH:MM, in and out."""

    # TimeField's other options, passed on as they are.
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="%H:%M", input_formats=["%H:%M"], **kwargs)


# The names availability.validate_timezone accepts.
TIME_ZONES = sorted(available_timezones() | {"UTC"})


class WindowSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    machine = serializers.IntegerField(
        source="machine_id", allow_null=True, help_text="null: every machine without windows of its own."
    )
    days = DaysField(help_text="The days the window starts on.")
    start_time = HourMinuteField()
    end_time = HourMinuteField(help_text="At or before start_time: the next day.")
    timezone = serializers.CharField(help_text="An IANA time zone, e.g. Europe/Paris.")
    created_at = serializers.DateTimeField()


class WindowInput(StrictInputSerializer):
    machine = id_field(required=False, allow_null=True, help_text="One of my machines; null or omitted: all.")
    days = serializers.ListField(child=serializers.ChoiceField(choices=list(DAY_NAMES)), min_length=1, max_length=7)
    start_time = HourMinuteField(help_text="Local time, HH:MM.")
    end_time = HourMinuteField(help_text="Local time, HH:MM.")
    timezone = NamedChoiceField(TIME_ZONES, enum_name="TimeZone", help_text="An IANA time zone, e.g. Europe/Paris.")


# Validated input of mixed types, passed on as the service's keyword arguments.
def _window_service_args(data: Mapping[str, Any]) -> dict[str, Any]:
    renames = {"machine": "machine_id", "timezone": "timezone_name"}
    return {renames.get(key, key): value for key, value in data.items()}


class WindowListApi(ProviderApi):
    @extend_schema(
        tags=["availability"],
        summary="List my availability windows",
        responses={200: WindowSerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        return self.paginated_response(selectors.availability_window_list(provider=self.provider), WindowSerializer)

    @extend_schema(
        tags=["availability"],
        summary="Declare an availability window",
        request=WindowInput,
        responses={201: WindowSerializer, **error_responses(400, 401, 403, 413)},
    )
    def post(self, request: Request) -> Response:
        data = WindowInput(data=request.data)
        data.is_valid(raise_exception=True)
        args = {"machine_id": None, **_window_service_args(data.validated_data)}
        window = services.availability_window_create(provider=self.provider, **args)
        return Response(WindowSerializer(window).data, status=status.HTTP_201_CREATED)


class WindowDetailApi(ProviderApi):
    def _window(self, window_id: int) -> AvailabilityWindow:
        return selectors.availability_window_get(provider=self.provider, window_id=window_id)

    @extend_schema(
        tags=["availability"],
        summary="One of my availability windows",
        responses={200: WindowSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, window_id: int) -> Response:
        return Response(WindowSerializer(self._window(window_id)).data)

    @extend_schema(
        tags=["availability"],
        summary="Replace an availability window",
        request=WindowInput,
        responses={200: WindowSerializer, **error_responses(400, 401, 403, 404, 413)},
    )
    def put(self, request: Request, window_id: int) -> Response:
        return self._update(request, window_id, partial=False)

    @extend_schema(
        tags=["availability"],
        summary="Change an availability window",
        request=WindowInput(partial=True),
        responses={200: WindowSerializer, **error_responses(400, 401, 403, 404, 413)},
    )
    def patch(self, request: Request, window_id: int) -> Response:
        return self._update(request, window_id, partial=True)

    def _update(self, request: Request, window_id: int, *, partial: bool) -> Response:
        window = self._window(window_id)
        data = WindowInput(data=request.data, partial=partial)
        data.is_valid(raise_exception=True)
        args = _window_service_args(data.validated_data)
        if not partial:
            args.setdefault("machine_id", None)
        window = services.availability_window_update(window=window, **args)
        return Response(WindowSerializer(window).data)

    @extend_schema(
        tags=["availability"],
        summary="Delete an availability window",
        responses={204: None, **error_responses(401, 403, 404)},
    )
    def delete(self, request: Request, window_id: int) -> Response:
        services.availability_window_delete(window=self._window(window_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- provider: blackouts --------------------------------------------------------------------


class BlackoutSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    machine = serializers.IntegerField(source="machine_id", allow_null=True, help_text="null: all my machines.")
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    reason = serializers.CharField()


class BlackoutListApi(ProviderApi):
    class BlackoutInput(StrictInputSerializer):
        machine = id_field(required=False, allow_null=True, help_text="One of my machines; null or omitted: all.")
        starts_at = serializers.DateTimeField()
        ends_at = serializers.DateTimeField(help_text="After starts_at.")
        reason = serializers.CharField(required=False, allow_blank=True, max_length=255, default="")

    @extend_schema(
        tags=["availability"],
        summary="List my blackouts",
        responses={200: BlackoutSerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        return self.paginated_response(selectors.blackout_list(provider=self.provider), BlackoutSerializer)

    @extend_schema(
        tags=["availability"],
        summary="Declare a blackout",
        request=BlackoutInput,
        responses={201: BlackoutSerializer, **error_responses(400, 401, 403, 413)},
    )
    def post(self, request: Request) -> Response:
        data = self.BlackoutInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        blackout = services.blackout_create(
            provider=self.provider,
            machine_id=values.get("machine"),
            starts_at=values["starts_at"],
            ends_at=values["ends_at"],
            reason=values["reason"],
        )
        return Response(BlackoutSerializer(blackout).data, status=status.HTTP_201_CREATED)


class BlackoutDetailApi(ProviderApi):
    @extend_schema(
        tags=["availability"],
        summary="One of my blackouts",
        responses={200: BlackoutSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, blackout_id: int) -> Response:
        blackout = selectors.blackout_get(provider=self.provider, blackout_id=blackout_id)
        return Response(BlackoutSerializer(blackout).data)

    @extend_schema(
        tags=["availability"],
        summary="Delete a blackout",
        responses={204: None, **error_responses(401, 403, 404)},
    )
    def delete(self, request: Request, blackout_id: int) -> Response:
        services.blackout_delete(blackout=selectors.blackout_get(provider=self.provider, blackout_id=blackout_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- provider: registration tokens ----------------------------------------------------------


class RegistrationTokenSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    prefix = serializers.CharField(help_text="The token's first characters, to tell tokens apart.")
    # Declared fields are taken off the class by DRF's metaclass: this does not replace Field.label.
    label = serializers.CharField()  # type: ignore[assignment]
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()
    used_at = serializers.DateTimeField(allow_null=True)
    machine = serializers.IntegerField(source="machine_id", allow_null=True, help_text="The machine it registered.")
    state = serializers.SerializerMethodField()

    @extend_schema_field(NamedChoiceField(["unused", "used", "expired"], enum_name="RegistrationTokenState"))
    def get_state(self, token: RegistrationToken) -> str:
        if token.used_at is not None:
            return "used"
        return "expired" if token.expires_at <= timezone.now() else "unused"


class RegistrationTokenCreatedSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    token = serializers.CharField(help_text="Shown once: give it to the agent's register call.")
    prefix = serializers.CharField()
    # Declared fields are taken off the class by DRF's metaclass: this does not replace Field.label.
    label = serializers.CharField()  # type: ignore[assignment]
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()


class RegistrationTokenApi(ProviderApi):
    class TokenInput(StrictInputSerializer):
        # Declared fields are taken off the class by DRF's metaclass: this does not replace Field.label.
        label = serializers.CharField(  # type: ignore[assignment]
            required=False, allow_blank=True, max_length=100, default=""
        )

    @extend_schema(
        tags=["machines"],
        summary="List my registration tokens (never the tokens themselves)",
        responses={200: RegistrationTokenSerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        return self.paginated_response(
            selectors.registration_token_list(provider=self.provider), RegistrationTokenSerializer
        )

    @extend_schema(
        tags=["machines"],
        summary="Create a one-time token to register a machine",
        request=TokenInput,
        responses={201: RegistrationTokenCreatedSerializer, **error_responses(400, 401, 403, 413)},
    )
    def post(self, request: Request) -> Response:
        data = self.TokenInput(data=request.data)
        data.is_valid(raise_exception=True)
        token, raw = services.registration_token_create(provider=self.provider, label=data.validated_data["label"])
        token.token = raw  # type: ignore[attr-defined]  # the raw token, for the answer alone: never stored
        return Response(RegistrationTokenCreatedSerializer(token).data, status=status.HTTP_201_CREATED)
