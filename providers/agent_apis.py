"""The agent API (/api/agent/v1/): what a provider's agent daemon calls. See docs/agent-api.md.

Views are thin: validate the body, call one service, serialise the answer. Unknown top-level
fields are ignored, so a newer agent can talk to an older marketplace; every known field is
validated strictly (lengths, ranges, finite numbers) and a refusal changes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, serializers, status
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request
from rest_framework.response import Response

from core import parsers, prom, throttling
from core.api import (
    BaseApi,
    NamedChoiceField,
    error_responses,
    eth_address_field,
)
from gpgpu_agent import protocol
from providers import heartbeat_steady, services
from providers.auth import MACHINE_CREDENTIAL_MAX_LENGTH, IsMachine, MachineAuthentication
from providers.models import JobKind, Machine

MAX_GPUS_PER_MACHINE = 64
MAX_LEASES_PER_HEARTBEAT = 128
MAX_LOG_TAIL_BYTES = 64 * 1024
INT32_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1
UUID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
SIGNATURE_REGEX = r"^(0x[0-9a-fA-F]+)?$"
# Bounds of a machine's reported isolation limits.
MAX_LIMIT_CPUS = 4096
MAX_LIMIT_MEMORY_MB = 10**12


class AgentAPIView(BaseApi):
    """Base of the agent's endpoints: Machine authentication (and BaseApi's 413 check)."""

    authentication_classes = [MachineAuthentication]
    permission_classes = [IsMachine]


def _unique(items: Sequence[Mapping[str, object]], key: str, what: str) -> None:
    seen: set[object] = set()
    for item in items:
        if item[key] in seen:
            raise serializers.ValidationError(f"{what} {item[key]!r} appears more than once.")
        seen.add(item[key])


# --- register -------------------------------------------------------------------------------


class RegisterApi(AgentAPIView):
    """Trade a one-time registration token for this machine's credential (shown once)."""

    authentication_classes: list[type[BaseAuthentication]] = []
    permission_classes = [permissions.AllowAny]

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentRegisterInput"

        token = serializers.CharField(max_length=200, help_text="The one-time registration token (gpreg_…).")
        hostname = serializers.CharField(max_length=255)
        agent_version = serializers.CharField(max_length=50)
        signing_address = eth_address_field(
            required=False,
            allow_blank=True,
            default="",
            help_text="The agent's usage-report signing address (0x followed by 40 hex digits).",
        )
        region = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentRegisterOutput"

        machine_id = serializers.IntegerField()
        credential = serializers.CharField(help_text="Send as `Authorization: Machine <credential>`; shown once.")
        heartbeat_interval_s = serializers.IntegerField()
        usage_signing_chain_id = serializers.IntegerField(
            help_text="The chainId of the EIP-712 domain usage reports are signed under."
        )

    @extend_schema(
        operation_id="agent_register",
        tags=["agent"],
        auth=[],
        request=InputSerializer,
        responses={201: OutputSerializer, **error_responses(400, 401, 413)},
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        machine, credential = services.machine_register(
            raw_token=v["token"],
            hostname=v["hostname"],
            agent_version=v["agent_version"],
            signing_address=v["signing_address"],
            region=v["region"],
        )
        out = {
            "machine_id": machine.pk,
            "credential": credential,
            "heartbeat_interval_s": settings.GPGPU["HEARTBEAT_INTERVAL_S"],
            "usage_signing_chain_id": services.usage_signing_chain_id(),
        }
        return Response(self.OutputSerializer(out).data, status=status.HTTP_201_CREATED)


# --- heartbeat ------------------------------------------------------------------------------


class GpuReportSerializer(serializers.Serializer):
    uuid = serializers.RegexField(UUID_REGEX, max_length=96)
    index = serializers.IntegerField(min_value=0, max_value=255)
    model = serializers.CharField(max_length=100)
    vram_mb = serializers.IntegerField(min_value=0, max_value=INT32_MAX)
    memory_used_mb = serializers.IntegerField(min_value=0, max_value=INT32_MAX, allow_null=True, default=None)
    utilization_pct = serializers.FloatField(min_value=0, max_value=100, allow_null=True, default=None)
    temperature_c = serializers.FloatField(min_value=0, max_value=200, allow_null=True, default=None)
    power_w = serializers.FloatField(min_value=0, max_value=10_000, allow_null=True, default=None)
    idle = serializers.BooleanField(help_text="The agent's verdict: free for renters now.")
    idle_since = serializers.DateTimeField(allow_null=True, default=None)
    owner_busy = serializers.BooleanField(default=False, help_text="The owner is using the GPU now.")


class LeaseReportSerializer(serializers.Serializer):
    lease_id = serializers.IntegerField(min_value=1, max_value=BIGINT_MAX)
    state = serializers.ChoiceField(choices=["starting", "running", "stopping"])


class LeaseCheckpointSerializer(serializers.Serializer):
    dir = serializers.CharField(help_text="The job's checkpoint directory, a path of its view under /work.")
    max_bytes = serializers.IntegerField(help_text="The most the packed directory (a tar archive) may be.")
    upload_url = serializers.CharField(
        help_text="Where to PUT the archive when the lease is stopped: a path of the agent API (sent with the "
        "machine's credential), or an absolute pre-signed URL (sent without it)."
    )
    restore_url = serializers.CharField(
        allow_null=True, help_text="Where to GET the archive to restore before the job starts; null: none yet."
    )
    restore_sha256 = serializers.CharField(help_text="The archive's SHA-256 (hex); the agent refuses other bytes.")
    restore_size = serializers.IntegerField()
    resume_count = serializers.IntegerField(help_text="How many earlier leases of the job ran.")
    upload_direct = serializers.BooleanField(
        default=False,
        help_text="Upload straight to the store: POST {upload_url}/upload for a pre-signed PUT, PUT the archive "
        "there, then POST {upload_url}/commit. False: PUT the archive to upload_url.",
    )


class LeaseStartSerializer(serializers.Serializer):
    lease_id = serializers.IntegerField()
    job_id = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=["container", "process"])
    image = serializers.CharField()
    command = serializers.ListField(child=serializers.CharField())
    env = serializers.DictField(child=serializers.CharField())
    gpu_uuids = serializers.ListField(child=serializers.CharField())
    max_duration_s = serializers.IntegerField()
    price_per_gpu_hour = serializers.CharField(help_text="Decimal, per GPU-hour.")
    checkpoint_interval_s = serializers.IntegerField(
        allow_null=True, help_text="How often the job promised to checkpoint, seconds (null: no promise)."
    )
    checkpoint = LeaseCheckpointSerializer(
        allow_null=True, help_text="The job's checkpoint directory, carried between its leases; null: none."
    )


class LeaseStopSerializer(serializers.Serializer):
    lease_id = serializers.IntegerField()
    reason = serializers.CharField(
        help_text="The lease's end reason or stop reason; `unknown_lease` for a lease this machine does not have."
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        # The flag's wire name is the agent protocol's (gpgpu_agent.protocol), not declared again
        # here; LeaseStop.save_checkpoint bears the same name.
        fields = super().get_fields()
        fields[protocol.STOP_SAVE_CHECKPOINT] = serializers.BooleanField(
            help_text="Pack and upload the job's checkpoint directory before reporting the exit, whatever the "
            "reason (its renter cancelled it keeping its checkpoint). An agent that does not know it still stops "
            "the lease.",
        )
        return fields


class MachineScheduleSerializer(serializers.Serializer):
    available_now = serializers.BooleanField(
        help_text="Inside the owner's availability schedule now; false: offer nothing and reclaim running rentals."
    )
    available_until = serializers.DateTimeField(
        allow_null=True, help_text="When the current stretch ends; null when not available or indefinitely."
    )
    indefinitely = serializers.BooleanField(help_text="Available with no end in sight.")


# --- capabilities: which job kinds a machine accepts, and how it isolates them ---------------
# Used for the heartbeat's input and, as stored, in the provider API's machine output. Unknown
# keys inside are ignored (a newer agent may say more); only the fields below are stored.


def _positive(value: float) -> None:
    if value <= 0:
        raise serializers.ValidationError("must be greater than 0.")


def _optional_text(max_length: int, help_text: str) -> serializers.CharField:
    return serializers.CharField(
        max_length=max_length, required=False, allow_blank=True, allow_null=True, default=None, help_text=help_text
    )


def _network_field() -> NamedChoiceField:
    return NamedChoiceField(
        ["filtered", "none"],
        enum_name="IsolationNetwork",
        required=False,
        allow_null=True,
        default=None,
        help_text="filtered: outbound only, the owner's LAN and the host unreachable; none: no network at all.",
    )


class IsolationLimitsSerializer(serializers.Serializer):
    cpus = serializers.FloatField(
        max_value=MAX_LIMIT_CPUS,
        validators=[_positive],
        required=False,
        allow_null=True,
        default=None,
        help_text="CPUs a job may use (more than 0); null: no limit.",
    )
    memory_mb = serializers.IntegerField(
        min_value=0, max_value=MAX_LIMIT_MEMORY_MB, required=False, allow_null=True, default=None
    )
    pids = serializers.IntegerField(min_value=1, max_value=INT32_MAX, required=False, allow_null=True, default=None)


class ContainerIsolationSerializer(serializers.Serializer):
    engine = serializers.CharField(max_length=32, help_text="The container engine, e.g. docker or podman.")
    engine_version = _optional_text(64, "The engine's version.")
    runtime = _optional_text(32, "The OCI runtime, e.g. runc, crun or runsc.")
    user_namespace = serializers.BooleanField(
        required=False, allow_null=True, default=None, help_text="Root in the container is not root on the host."
    )
    network = _network_field()
    read_only_root = serializers.BooleanField(
        required=False, allow_null=True, default=None, help_text="The container's root filesystem is read-only."
    )
    limits = IsolationLimitsSerializer(required=False, allow_null=True, default=None)


class ProcessIsolationSerializer(serializers.Serializer):
    sandbox = serializers.CharField(max_length=32, help_text="The process sandbox, e.g. bubblewrap.")
    sandbox_version = _optional_text(64, "The sandbox's version.")
    user = _optional_text(64, "The unprivileged user process jobs run as.")
    network = _network_field()
    limits = IsolationLimitsSerializer(required=False, allow_null=True, default=None)


class RefusedKindsSerializer(serializers.Serializer):
    container = serializers.CharField(max_length=300, required=False, allow_null=True, default=None)
    process = serializers.CharField(max_length=300, required=False, allow_null=True, default=None)


def _plain(value: Any) -> Any:  # JSON-like values of whatever shape the serializers gave
    """Validated data as plain JSON values (dicts, lists), for the JSONField."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


class CapabilitiesSerializer(serializers.Serializer):
    """What job kinds a machine accepts now and how it isolates each. A real machine accepts
    containers only unless its provider opted in to process jobs."""

    class Meta:
        ref_name = "MachineCapabilities"

    kinds = serializers.ListField(
        child=NamedChoiceField(JobKind.choices, enum_name="JobKind"),
        max_length=len(JobKind.choices),
        help_text="The job kinds this machine accepts now, each once; empty: none.",
    )
    container = ContainerIsolationSerializer(
        required=False, allow_null=True, default=None, help_text="Required when kinds has container."
    )
    process = ProcessIsolationSerializer(
        required=False, allow_null=True, default=None, help_text="Required when kinds has process."
    )
    refused = RefusedKindsSerializer(
        required=False,
        allow_null=True,
        default=None,
        help_text="For a kind this machine does not accept: why (shown to its provider).",
    )

    def validate_kinds(self, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise serializers.ValidationError("Each kind may appear once.")
        return value

    # Validated data: each field's own type.
    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        errors: dict[str, list[str]] = {}
        refused = {kind: why for kind, why in (attrs.get("refused") or {}).items() if why}
        for kind in attrs["kinds"]:
            if attrs.get(kind) is None:
                errors[kind] = [f"is required when kinds has {kind}."]
            if kind in refused:
                errors[f"refused.{kind}"] = [f"{kind} is in kinds: it is accepted, not refused."]
        if errors:
            raise serializers.ValidationError(errors)
        return _plain(
            {
                "kinds": [kind for kind, _ in JobKind.choices if kind in attrs["kinds"]],
                "container": attrs.get("container"),
                "process": attrs.get("process"),
                "refused": refused,
            }
        )


# Each telemetry field's bounds, read from the serializer (the rules are written there once):
# (name, integer only, low, high).
_TELEMETRY_BOUNDS: list[tuple[str, bool, float, float]] = []


def _telemetry_valid(gpus: list[dict[str, Any]]) -> bool:
    """Whether every GPU's telemetry is what GpuReportSerializer accepts, in its plainest form
    (JSON numbers, null or absent); anything else goes to the full heartbeat, which says what
    is wrong."""
    if not _TELEMETRY_BOUNDS:
        fields = GpuReportSerializer().fields
        for name in heartbeat_steady.TELEMETRY_FIELDS:
            field = fields[name]
            assert isinstance(field, serializers.IntegerField | serializers.FloatField)
            assert field.min_value is not None and field.max_value is not None
            integer = isinstance(field, serializers.IntegerField)
            _TELEMETRY_BOUNDS.append((name, integer, float(field.min_value), float(field.max_value)))
    # The body is parsed JSON: a number is exactly an int or a float (true and false are bools,
    # not ints), and a float outside the finite bounds (infinite, or NaN, which no comparison
    # holds for) fails them.
    for gpu in gpus:
        for name, integer, low, high in _TELEMETRY_BOUNDS:
            value = gpu.get(name)
            if value is None:
                continue
            kind = type(value)
            if not (kind is int or (kind is float and not integer)) or not low <= value <= high:
                return False
    return True


# The steady reply's fixed parts, per (heartbeat interval, fence): the full heartbeat's
# serializer writes it once; the text before, between and after its server_time and
# predicted_idle_s, and whether server_time comes first.
_STEADY_REPLIES: dict[tuple[int, int], tuple[bytes, bytes, bytes, bool]] = {}
_CUT = "\x00cut\x00"  # a value no serializer writes, marking where the moving values go
_SERVER_TIME = serializers.DateTimeField()  # as the reply's serializer writes server_time


def _steady_reply(now: datetime, predicted_idle_s: int | None) -> bytes:
    """What the full heartbeat answers a machine with no order or schedule: its serializer's
    output with this instant's server_time and the given predicted_idle_s."""
    interval, fence = settings.GPGPU["HEARTBEAT_INTERVAL_S"], settings.GPGPU["LEASE_FENCE_S"]
    parts = _STEADY_REPLIES.get((interval, fence))
    if parts is None:
        reply = services.HeartbeatReply(
            heartbeat_interval_s=interval,
            server_time=now,
            start=[],
            stop=[],
            lease_fence_s=fence,
            schedule=services.ALWAYS_AVAILABLE,
            predicted_idle_s=None,
        )
        # The serializer's output rendered once, the two values that move cut out of it.
        template = dict(HeartbeatApi.OutputSerializer(reply).data, server_time=_CUT, predicted_idle_s=_CUT)
        text = json.dumps(template, ensure_ascii=False, separators=(",", ":"))
        first = list(template).index("server_time") < list(template).index("predicted_idle_s")
        before, between, after = (part.encode() for part in text.split(json.dumps(_CUT)))
        parts = _STEADY_REPLIES[(interval, fence)] = (before, between, after, first)
    head, middle, tail, time_first = parts
    at = json.dumps(_SERVER_TIME.to_representation(now)).encode()
    predicted = b"null" if predicted_idle_s is None else str(int(predicted_idle_s)).encode()
    return head + (at if time_first else predicted) + middle + (predicted if time_first else at) + tail


# Set in a request's environ by providers.heartbeat_front when it has tried the steady answer and
# handed the heartbeat to Django: the view does not try again.
STEADY_TRIED = "gpgpu.steady_tried"


def steady_enabled() -> bool:
    """Whether a heartbeat may be answered steady: the setting on, and the rate limit kept in
    Redis (core.throttling), where the steady script keeps it."""
    return heartbeat_steady.enabled() and throttling.redis_log() is not None


def steady_reply(request: HttpRequest) -> bytes | None:
    """The answer to a steady heartbeat (providers.heartbeat_steady), or None: the full
    heartbeat answers. Only what the full heartbeat would accept and answer the same way is
    answered here: a well-formed credential, a JSON body within the size limit, a record of
    the same report, valid telemetry, the rate limit not reached. Callers check
    steady_enabled() first."""
    if request.method != "POST" or request.META.get("HTTP_ACCEPT", "*/*") not in ("*/*", "application/json"):
        return None
    scheme, _, raw = str(request.META.get("HTTP_AUTHORIZATION", "")).partition(" ")
    if scheme.lower() != protocol.AUTH_SCHEME.lower() or not raw or " " in raw:
        return None
    if len(raw) > MACHINE_CREDENTIAL_MAX_LENGTH or request.content_type != "application/json":
        return None
    try:
        if int(request.META.get("CONTENT_LENGTH") or 0) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            return None
        data = parsers.loads(request.body.decode("utf-8"))
    except ValueError:  # a bad length, not UTF-8, not JSON, nested too deep
        return None
    if not isinstance(data, dict) or (fp := heartbeat_steady.fingerprint(data)) is None:
        return None
    if not _telemetry_valid(data["gpus"]):
        return None
    now = timezone.now()
    digest = services.secret_digest(raw)
    budget = throttling.budget(*Machine.throttle_key_of(digest))  # the credential's, as the throttles count it
    try:
        answer = heartbeat_steady.steady(digest=digest, fp=fp, at=now, gpus=data["gpus"], rate_limit=budget)
    except heartbeat_steady.REDIS_ERRORS:
        heartbeat_steady.warn_unreachable()
        return None
    if answer.code not in (heartbeat_steady.STEADY, heartbeat_steady.SAMPLED):
        return None  # not steady, or over the rate limit: the full heartbeat answers (429 for that)
    predicted = None
    if answer.predicted is not None:
        predicted = services.predicted_idle_countdown(*answer.predicted, now=now.timestamp())
    return _steady_reply(now, predicted)


def steady_response(reply: bytes) -> HttpResponse:
    """The steady answer `reply` as Django's response, with the headers DRF's dispatch gives the
    full heartbeat's (Allow, and Vary where it negotiates); the middlewares add theirs."""
    global _view_headers
    response = HttpResponse(reply, content_type="application/json")
    headers = _view_headers
    if headers is None:  # the view's, the same for every answer: read once
        headers = _view_headers = tuple(HeartbeatApi().default_response_headers.items())
    for name, value in headers:  # as DRF's finalize_response
        if name == "Vary":
            patch_vary_headers(response, [v.strip() for v in value.split(",")])
        else:
            response[name] = value
    return response


_view_headers: tuple[tuple[str, str], ...] | None = None


MACHINE_FACTS = ("agent_version", "driver_version", "cuda_version", "cpu_cores", "ram_mb", "disk_gb", "region")


class HeartbeatApi(AgentAPIView):
    """Inventory, telemetry and idleness of every GPU, the job kinds the machine accepts, and the
    leases the agent is handling; answers which leases to start and which to stop. Omitted or
    null machine facts (capabilities included) keep their stored value."""

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentHeartbeatInput"

        agent_version = serializers.CharField(max_length=50, required=False, allow_null=True)
        driver_version = serializers.CharField(max_length=50, required=False, allow_blank=True, allow_null=True)
        cuda_version = serializers.CharField(max_length=50, required=False, allow_blank=True, allow_null=True)
        cpu_cores = serializers.IntegerField(min_value=0, max_value=100_000, required=False, allow_null=True)
        ram_mb = serializers.IntegerField(min_value=0, max_value=10**12, required=False, allow_null=True)
        disk_gb = serializers.IntegerField(min_value=0, max_value=10**9, required=False, allow_null=True)
        region = serializers.CharField(max_length=64, required=False, allow_blank=True, allow_null=True)
        # With many=True, DRF hands max_length to the ListSerializer; the stubs' signature lacks it.
        gpus = GpuReportSerializer(many=True, max_length=MAX_GPUS_PER_MACHINE)  # type: ignore[call-arg]
        leases = LeaseReportSerializer(many=True, max_length=MAX_LEASES_PER_HEARTBEAT, required=False)  # type: ignore[call-arg]
        capabilities = CapabilitiesSerializer(
            required=False,
            allow_null=True,
            help_text="Which job kinds the machine accepts and how it isolates them; omitted or null: unchanged.",
        )

        # Validated reports: each field's own type.
        def validate_gpus(self, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
            _unique(value, "uuid", "GPU uuid")
            _unique(value, "index", "GPU index")
            return value

        # Validated reports: each field's own type.
        def validate_leases(self, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
            _unique(value, "lease_id", "lease_id")
            return value

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentHeartbeatOutput"

        heartbeat_interval_s = serializers.IntegerField()
        server_time = serializers.DateTimeField()
        lease_fence_s = serializers.IntegerField(
            help_text="Stop every rental's workload once this many seconds pass without a successful heartbeat: "
            "the marketplace declares a silent machine's leases lost only later, so a job never runs twice."
        )
        start = LeaseStartSerializer(many=True, help_text="Leases to start (idempotent on the agent's side).")
        stop = LeaseStopSerializer(many=True, help_text="Leases to stop.")
        schedule = MachineScheduleSerializer(help_text="The owner's availability schedule for this machine now.")
        predicted_idle_s = serializers.IntegerField(
            allow_null=True,
            help_text="How much longer this machine's idle stretch is likely to last (its forecast's median), "
            "seconds; null when unknown or no lease runs here. The agent tells its jobs.",
        )

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        # Counted around DRF's whole dispatch, so a heartbeat refused before post() (a bad
        # credential, a suspended machine, the rate limit) counts too, and one that raises (the
        # database gone: core.middleware answers it) counts as an error. A steady heartbeat
        # (providers.heartbeat_steady) is answered before DRF sees it.
        started = time.perf_counter()
        outcome = "error"
        try:
            # Not twice: providers.heartbeat_front, in front of Django, has tried already.
            tried = request.META.get(STEADY_TRIED, False)
            body = None if tried or not steady_enabled() else steady_reply(request)
            steady = steady_response(body) if body is not None else None
            response = steady if steady is not None else super().dispatch(request, *args, **kwargs)
            outcome = prom.heartbeat_outcome(response.status_code)
            return response
        finally:
            prom.heartbeat_observe(outcome=outcome, seconds=time.perf_counter() - started)

    @extend_schema(
        operation_id="agent_heartbeat",
        tags=["agent"],
        request=InputSerializer,
        responses={200: OutputSerializer, **error_responses(400, 401, 403, 409, 413)},
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        report = services.HeartbeatReport(
            gpus=[services.GpuReport(**g) for g in v["gpus"]],
            leases=[services.LeaseReport(**lr) for lr in v.get("leases", [])],
            capabilities=v.get("capabilities"),
            **{name: v.get(name) for name in MACHINE_FACTS},
        )
        machine = cast(Machine, request.auth)  # IsMachine admits only a request whose auth is a Machine
        generation = heartbeat_steady.generation(machine.pk)  # before anything is read
        reply = services.machine_heartbeat(machine=machine, report=report)
        if reply.steady and generation is not None:
            fp = heartbeat_steady.fingerprint(request.data) if isinstance(request.data, Mapping) else None
            if fp is not None:
                heartbeat_steady.remember(
                    digest=machine.credential_digest,
                    machine_id=machine.pk,
                    fp=fp,
                    at=reply.server_time,
                    capabilities=v.get("capabilities") is not None,
                    gpus=reply.gpus,
                    generation_before=generation,
                    predicted=reply.predicted_basis,
                )
        return Response(self.OutputSerializer(reply).data)


# --- credential rotation --------------------------------------------------------------------


class CredentialRotateApi(AgentAPIView):
    """Replace this machine's credential with a new one (shown once). The credential this call
    was made with answers 401 `credential_revoked` from then on; leases go on untouched."""

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentCredentialRotateInput"

        signing_address = eth_address_field(
            required=False,
            allow_null=True,
            default=None,
            help_text="Also replace the machine's usage-signing address (0x followed by 40 hex digits).",
        )

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentCredentialRotateOutput"

        machine_id = serializers.IntegerField()
        credential = serializers.CharField(help_text="Send as `Authorization: Machine <credential>`; shown once.")

    @extend_schema(
        operation_id="agent_credential_rotate",
        tags=["agent"],
        request=InputSerializer,
        responses={200: OutputSerializer, **error_responses(400, 401, 403, 413)},
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        machine = cast(Machine, request.auth)  # IsMachine admits only a request whose auth is a Machine
        credential = services.machine_credential_rotate(
            machine=machine,
            actor=f"machine:{machine.pk}",
            signing_address=data.validated_data["signing_address"],
            only_if_digest=machine.credential_digest,
        )
        return Response(self.OutputSerializer({"machine_id": machine.pk, "credential": credential}).data)
