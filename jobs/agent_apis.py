"""The agent API's lease operations (/api/agent/v1/leases/…, docs/agent-api.md): what happened to
a lease (events), its usage and its job's output, ingested by jobs.ingestion. Authentication, the base view and the
bounds are the agent API's (providers.agent_apis); the URLs are in jobs.agent_urls.
"""

from __future__ import annotations

import time
from typing import Any, cast

from django.conf import settings
from django.db import connection
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import ID_MAX, BaseApi, DecimalInputField, decimal_pattern, error_responses
from gpgpu_agent import protocol as usage_protocol
from jobs import checkpoints, doorbell, ingestion, selectors
from providers.agent_apis import INT32_MAX, MAX_LOG_TAIL_BYTES, SIGNATURE_REGEX, AgentAPIView
from providers.models import Machine

# --- lease events ---------------------------------------------------------------------------


def _log_tail_size(value: str) -> None:
    if len(value.encode("utf-8", "surrogatepass")) > MAX_LOG_TAIL_BYTES:
        raise serializers.ValidationError(f"must be at most {MAX_LOG_TAIL_BYTES} bytes (UTF-8); send the last lines.")


class LeaseEventApi(AgentAPIView):
    """Report what happened to one of this machine's leases: started, exited, preempted by the
    owner, failed to start. A repeated event_id is answered like the first and changes nothing."""

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseEventInput"

        event_id = serializers.CharField(max_length=128, help_text="Unique per event; repeats are harmless.")
        type = serializers.ChoiceField(choices=list(ingestion.AGENT_EVENT_TYPES))
        at = serializers.DateTimeField(help_text="When it happened, by the agent's clock.")
        exit_code = serializers.IntegerField(
            min_value=-(2**31),
            max_value=INT32_MAX,
            required=False,
            allow_null=True,
            default=None,
            help_text="Required for `exited`: 0 means the job succeeded.",
        )
        detail = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
        log_tail = serializers.CharField(
            required=False,
            allow_blank=True,
            allow_null=True,
            default=None,
            trim_whitespace=False,
            validators=[_log_tail_size],
            help_text="The last lines of the job's output, at most 64 KiB.",
        )

        # Validated data: each field's own type.
        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            if attrs["type"] == "exited" and attrs.get("exit_code") is None:
                raise serializers.ValidationError({"exit_code": ["is required for an exited event."]})
            return attrs

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseEventOutput"

        lease_id = serializers.IntegerField()
        lease_status = serializers.CharField()
        job_status = serializers.CharField()
        duplicate = serializers.BooleanField()

    @extend_schema(
        operation_id="agent_lease_event",
        tags=["agent"],
        request=InputSerializer,
        responses={200: OutputSerializer, **error_responses(400, 401, 403, 404, 409, 413)},
    )
    def post(self, request: Request, lease_id: int) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        lease, duplicate = ingestion.lease_event_ingest(
            machine=cast(Machine, request.auth),  # AgentAPIView's IsMachine admits only a Machine
            lease_id=lease_id,
            event_id=v["event_id"],
            type=v["type"],
            at=v["at"],
            exit_code=v["exit_code"],
            detail=v["detail"],
            log_tail=v["log_tail"],
        )
        out = {
            "lease_id": lease.pk,
            "lease_status": lease.status,
            "job_status": lease.job.status,
            "duplicate": duplicate,
        }
        return Response(self.OutputSerializer(out).data)


# --- usage ----------------------------------------------------------------------------------


class LeaseUsageApi(AgentAPIView):
    """Usage of one interval of one of this machine's leases, stored for billing. A machine with a
    signing address must sign it (EIP-712, docs/agent-api.md): else 400 usage_signature_invalid.
    A repeated report_id is answered 200 with duplicate=true; a new one 201."""

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseUsageInput"

        report_id = serializers.CharField(
            max_length=usage_protocol.MAX_REPORT_ID_CHARS, help_text="Unique per lease; repeats are harmless."
        )
        period_start = serializers.DateTimeField()
        period_end = serializers.DateTimeField()
        gpu_seconds = DecimalInputField(
            pattern=decimal_pattern(whole_digits=13, decimal_places=3),
            max_digits=16,
            decimal_places=3,
            min_value=0,
        )
        mean_utilization_pct = serializers.FloatField(
            min_value=0, max_value=100, required=False, allow_null=True, default=None
        )
        peak_memory_mb = serializers.IntegerField(
            min_value=0, max_value=INT32_MAX, required=False, allow_null=True, default=None
        )
        signature = serializers.RegexField(
            SIGNATURE_REGEX, max_length=200, required=False, allow_blank=True, default=""
        )

        # Validated data: each field's own type.
        def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
            if attrs["period_end"] <= attrs["period_start"]:
                raise serializers.ValidationError({"period_end": ["must be after period_start."]})
            return attrs

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseUsageOutput"

        id = serializers.IntegerField()
        lease_id = serializers.IntegerField()
        report_id = serializers.CharField()
        duplicate = serializers.BooleanField()

    @extend_schema(
        operation_id="agent_lease_usage",
        tags=["agent"],
        request=InputSerializer,
        responses={
            201: OutputSerializer,
            200: OpenApiResponse(OutputSerializer, description="A repeat of a report already stored"),
            **error_responses(400, 401, 403, 404, 413),
        },
    )
    def post(self, request: Request, lease_id: int) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        row, created = ingestion.usage_report_ingest(
            machine=cast(Machine, request.auth),  # AgentAPIView's IsMachine admits only a Machine
            lease_id=lease_id,
            # The report as sent, for billing's signature check: its own fields only. Others are
            # ignored (the contract), never stored: they were not checked (a NUL that jsonb
            # refuses, a quarter MiB of anything in every report).
            report=ingestion.UsageReportData(
                **v, payload={name: value for name, value in cast(dict, request.data).items() if name in data.fields}
            ),
        )
        out = {"id": row.pk, "lease_id": row.lease_id, "report_id": row.report_id, "duplicate": not created}
        return Response(
            self.OutputSerializer(out).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


# --- the job's output -----------------------------------------------------------------------


def _log_chunk_size(value: str) -> None:
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > ingestion.MAX_LOG_CHUNK_BYTES:
        raise serializers.ValidationError(
            f"must be at most {ingestion.MAX_LOG_CHUNK_BYTES} bytes (UTF-8); this one has {size}.",
            code=ingestion.CODE_LOG_CHUNK_TOO_LARGE,
        )


class LeaseLogApi(AgentAPIView):
    """One chunk of the output of one of this machine's leases, for its renter to follow. A
    repeated seq is answered 200 with duplicate=true; a new one 201. A job keeps at most
    JOB_LOG_MAX_BYTES of output: past it a chunk is answered stored=false (not an error)."""

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseLogInput"

        seq = serializers.IntegerField(
            min_value=0, max_value=INT32_MAX, help_text="The lease's chunks count from 0; repeats are harmless."
        )
        at = serializers.DateTimeField(help_text="When the agent read it, by its clock.")
        text = serializers.CharField(
            allow_blank=True,
            trim_whitespace=False,
            validators=[_log_chunk_size],
            help_text=f"The output, scrubbed of the machine's secrets; at most {ingestion.MAX_LOG_CHUNK_BYTES} "
            "bytes (UTF-8).",
        )
        truncated = serializers.BooleanField(
            required=False, default=False, help_text="The agent ships no more of this lease's output after it."
        )

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseLogOutput"

        lease_id = serializers.IntegerField()
        seq = serializers.IntegerField()
        duplicate = serializers.BooleanField()
        stored = serializers.BooleanField(help_text="False: the job's output passed JOB_LOG_MAX_BYTES before it.")

    @extend_schema(
        operation_id="agent_lease_log",
        tags=["agent"],
        request=InputSerializer,
        responses={
            201: OutputSerializer,
            200: OpenApiResponse(OutputSerializer, description="A repeat of a chunk, or one past the job's bound"),
            **error_responses(400, 401, 403, 404, 409, 413),
        },
    )
    def post(self, request: Request, lease_id: int) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        result = ingestion.lease_log_ingest(
            machine=cast(Machine, request.auth),  # AgentAPIView's IsMachine admits only a Machine
            lease_id=lease_id,
            seq=v["seq"],
            text=v["text"],
            at=v["at"],
            truncated=v["truncated"],
        )
        out = {"lease_id": lease_id, "seq": v["seq"], "duplicate": result.duplicate, "stored": result.stored}
        created = result.chunk is not None and not result.duplicate
        return Response(
            self.OutputSerializer(out).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


# --- orders: the agent's doorbell -----------------------------------------------------------

# How often a held orders/wait call looks for a new order: one small query per machine per check.
ORDERS_CHECK_S = 0.25


class OrdersWaitApi(AgentAPIView):
    """The agent's doorbell: held open until the machine has a new order (a lease to start, one
    to stop) or `wait_s` has passed, at most settings.GPGPU["AGENT_ORDERS_WAIT_S"] (0: answered
    at once). The orders themselves come with the heartbeat the agent sends as soon as this
    answers `orders: true`, so they are handed over once, in one place, as before."""

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentOrdersWaitInput"

        wait_s = serializers.FloatField(min_value=0, max_value=60, help_text="The longest to hold the call.")
        since = serializers.DateTimeField(
            required=False,
            allow_null=True,
            default=None,
            help_text="The server_time of the agent's last heartbeat reply: only orders newer than it ring.",
        )

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentOrdersWaitOutput"

        orders = serializers.BooleanField(help_text="True: heartbeat now, there is an order for this machine.")
        wait_s = serializers.FloatField(help_text="How long the marketplace holds these calls (0: it does not).")

    @extend_schema(
        operation_id="agent_orders_wait",
        tags=["agent"],
        request=InputSerializer,
        responses={200: OutputSerializer, **error_responses(400, 401, 403, 413)},
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        machine = cast(Machine, request.auth)  # AgentAPIView's IsMachine admits only a Machine
        held = float(settings.GPGPU["AGENT_ORDERS_WAIT_S"])
        deadline = time.monotonic() + min(data.validated_data["wait_s"], held)
        since = data.validated_data["since"]
        if deadline <= time.monotonic():  # not held (AGENT_ORDERS_WAIT_S 0, or wait_s 0): one look
            orders = selectors.machine_has_new_orders(machine_id=machine.pk, since=since)
            return Response(self.OutputSerializer({"orders": orders, "wait_s": held}).data)
        with doorbell.waiter(machine.pk) as bell:  # heard from before the first look: no ring lost
            while True:
                orders = selectors.machine_has_new_orders(machine_id=machine.pk, since=since)
                left = deadline - time.monotonic()
                if orders or left <= 0 or bell.superseded:  # a newer call of the machine holds now
                    break
                if bell.live:
                    # Rung when an order is committed (Redis pub/sub): no query meanwhile, and the
                    # database connection goes back while the call sleeps (a held call holds none).
                    if not connection.in_atomic_block:
                        connection.close()
                    bell.wait(left)  # then a last look, rung or not
                else:  # no Redis (or its subscription is down): look again soon
                    bell.wait(min(ORDERS_CHECK_S, left))
        return Response(self.OutputSerializer({"orders": orders, "wait_s": held}).data)


class LengthRequired(exceptions.APIException):
    status_code = status.HTTP_411_LENGTH_REQUIRED
    default_code = "length_required"


# --- checkpoints ----------------------------------------------------------------------------

SHA256_HEADER = "X-Checkpoint-SHA256"


class LeaseCheckpointApi(AgentAPIView):
    """The checkpoint of the job of one of this machine's leases (jobs.checkpoints).

    PUT: the archive as the raw body (`Content-Type: application/x-tar`, a Content-Length, its
    SHA-256 in X-Checkpoint-SHA256), from the machine of the job's newest lease while it is live
    or just ended; replaces the job's previous checkpoint. GET: the archive to restore, for the
    machine of the job's live lease only, with its SHA-256 in X-Checkpoint-SHA256."""

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseCheckpointOutput"

        lease_id = serializers.IntegerField()
        size = serializers.IntegerField()
        sha256 = serializers.CharField()

    # The archive is the body, streamed to storage: not bound by DATA_UPLOAD_MAX_MEMORY_SIZE
    # (BaseApi's check) but by CHECKPOINT_MAX_BYTES, which checkpoint_upload enforces.
    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        if request.method == "PUT":
            super(BaseApi, self).initial(request, *args, **kwargs)
            if any(isinstance(value, int) and value > ID_MAX for value in kwargs.values()):
                raise exceptions.NotFound()
            return
        super().initial(request, *args, **kwargs)

    @extend_schema(
        operation_id="agent_lease_checkpoint_upload",
        tags=["agent"],
        request={"application/x-tar": OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter(
                SHA256_HEADER,
                str,
                OpenApiParameter.HEADER,
                required=True,
                pattern="^[0-9a-fA-F]{64}$",
                description="The archive's SHA-256, 64 hex digits",
            )
        ],
        responses={201: OutputSerializer, **error_responses(400, 401, 403, 404, 409, 411, 413)},
    )
    def put(self, request: Request, lease_id: int) -> Response:
        try:
            size = int(request.META.get("CONTENT_LENGTH") or "")
        except ValueError:
            raise LengthRequired("A checkpoint upload needs a Content-Length.") from None
        if size < 0:
            raise LengthRequired("A checkpoint upload needs a Content-Length.")
        row = checkpoints.checkpoint_upload(
            machine_id=cast(Machine, request.auth).pk,  # AgentAPIView's IsMachine admits only a Machine
            lease_id=lease_id,
            stream=request._request,  # the raw body, read as it arrives
            size=size,
            sha256=str(request.META.get("HTTP_X_CHECKPOINT_SHA256", "")).strip().lower(),
        )
        out = {"lease_id": lease_id, "size": row.size, "sha256": row.sha256}
        return Response(self.OutputSerializer(out).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        operation_id="agent_lease_checkpoint_download",
        tags=["agent"],
        responses={
            (200, "application/x-tar"): OpenApiResponse(OpenApiTypes.BINARY, description="The archive"),
            **error_responses(401, 403, 404, 409),
        },
    )
    def get(self, request: Request, lease_id: int) -> StreamingHttpResponse:
        row = checkpoints.checkpoint_for_download(
            machine_id=cast(Machine, request.auth).pk,  # AgentAPIView's IsMachine admits only a Machine
            lease_id=lease_id,
        )
        response = StreamingHttpResponse(
            checkpoints.checkpoint_chunks(checkpoints.checkpoint_open(row)), content_type="application/x-tar"
        )
        response["Content-Length"] = str(row.size)
        response[SHA256_HEADER] = row.sha256
        response["Cache-Control"] = "no-store"
        return response


class LeaseCheckpointUploadApi(AgentAPIView):
    """A direct upload of the checkpoint of the job of one of this machine's leases, when the
    checkpoints' store signs URLs (the start order's `upload_direct`): a pre-signed PUT for an
    archive of `size` bytes and SHA-256 `sha256`, sent with exactly `headers`; then POST
    `leases/{id}/checkpoint/commit` with `token` (jobs.checkpoints.checkpoint_upload_begin)."""

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseCheckpointUploadInput"

        size = serializers.IntegerField(min_value=0, max_value=2**63 - 1)
        sha256 = serializers.RegexField(r"^[0-9a-f]{64}$", help_text="The archive's SHA-256, 64 lower-case hex digits")

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseCheckpointUploadOutput"

        url = serializers.URLField(help_text="The pre-signed PUT URL (send no credential to it).")
        headers = serializers.DictField(child=serializers.CharField(), help_text="Send exactly these headers.")
        token = serializers.CharField(help_text="What the commit sends back.")
        expires_s = serializers.IntegerField(help_text="Seconds the URL is valid for starting the PUT.")

    @extend_schema(
        operation_id="agent_lease_checkpoint_upload_begin",
        tags=["agent"],
        request=InputSerializer,
        responses={201: OutputSerializer, **error_responses(400, 401, 403, 404, 409)},
    )
    def post(self, request: Request, lease_id: int) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        upload = checkpoints.checkpoint_upload_begin(
            machine_id=cast(Machine, request.auth).pk,  # AgentAPIView's IsMachine admits only a Machine
            lease_id=lease_id,
            size=data["size"],
            sha256=data["sha256"],
        )
        out = {"url": upload.url, "headers": upload.headers, "token": upload.token, "expires_s": upload.expires_s}
        return Response(self.OutputSerializer(out).data, status=status.HTTP_201_CREATED)


class LeaseCheckpointCommitApi(AgentAPIView):
    """The end of a direct upload: the object the pre-signed PUT wrote becomes the job's checkpoint
    once its size and SHA-256 are the declared ones (jobs.checkpoints.checkpoint_upload_commit)."""

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "AgentLeaseCheckpointCommitInput"

        token = serializers.CharField(max_length=2048)

    @extend_schema(
        operation_id="agent_lease_checkpoint_upload_commit",
        tags=["agent"],
        request=InputSerializer,
        responses={201: LeaseCheckpointApi.OutputSerializer, **error_responses(400, 401, 403, 404, 409)},
    )
    def post(self, request: Request, lease_id: int) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        row = checkpoints.checkpoint_upload_commit(
            machine_id=cast(Machine, request.auth).pk,  # AgentAPIView's IsMachine admits only a Machine
            lease_id=lease_id,
            token=data["token"],
        )
        out = {"lease_id": lease_id, "size": row.size, "sha256": row.sha256}
        return Response(LeaseCheckpointApi.OutputSerializer(out).data, status=status.HTTP_201_CREATED)
