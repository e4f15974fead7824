"""Renters' REST API under /api/v1/: submit, follow and cancel jobs; read their leases and
audit trail. Views validate input, call one selector or service and serialise the result.

A renter sees only its own jobs and leases: another renter's is a 404, not a 403, so their
existence does not leak. Money is a decimal string in JSON, never a float.
"""

from __future__ import annotations

import re
from typing import Any

from django.http import HttpResponseRedirect, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import NotAcceptable
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.serializer_helpers import ReturnDict

from core.api import (
    NamedChoiceField,
    RenterApi,
    StrictInputSerializer,
    error_responses,
    price_field,
    price_input_field,
)
from jobs import checkpoints, lease_telemetry, selectors, services
from jobs.errors import ValidationFailed
from jobs.models import Checkpoint, Job, Lease

# Bounds on a job request, so one request cannot store or ship something absurd.
MAX_COMMAND_PARTS = 256
MAX_ARGUMENT_CHARS = 4096
MAX_ENV_VARS = 128
MAX_ENV_VALUE_CHARS = 4096
MAX_ALLOWED_MODELS = 32
MAX_VRAM_MB = 10_000_000
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# 1 to 128 visible ASCII characters (spaces inside are allowed).
IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,126}[\x21-\x7e])?")
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": f"^{IDEMPOTENCY_KEY_RE.pattern}$",
}


# --- output ---------------------------------------------------------------------------------


class LeaseGpuSerializer(serializers.Serializer):
    uuid = serializers.CharField()
    model = serializers.CharField()
    vram_mb = serializers.IntegerField()


class LeaseSerializer(serializers.Serializer):
    """A lease as its renter sees it (no provider identity or machine hostname)."""

    id = serializers.IntegerField()
    job = serializers.IntegerField(source="job_id")
    status = NamedChoiceField(Lease.Status.choices, enum_name="LeaseStatus")
    machine = serializers.IntegerField(source="machine_id")
    region = serializers.CharField(source="machine.region")
    gpu_count = serializers.IntegerField()
    gpus = LeaseGpuSerializer(many=True, source="gpus.all")
    price_per_gpu_hour = price_field()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    ended_at = serializers.DateTimeField(allow_null=True)
    stop_requested_at = serializers.DateTimeField(allow_null=True)
    stop_reason = NamedChoiceField(Lease.EndReason.choices, enum_name="LeaseEndReason", allow_null=True)
    end_reason = NamedChoiceField(Lease.EndReason.choices, enum_name="LeaseEndReason", allow_null=True)
    end_detail = serializers.CharField()
    exit_code = serializers.IntegerField(allow_null=True)


class LeaseDetailSerializer(LeaseSerializer):
    log_tail = serializers.CharField(help_text="The last lines of the job's output, as the agent last sent them.")


class UnplacedReasonSerializer(serializers.Serializer):
    code = serializers.CharField(source="unplaced_code", help_text="Stable code, e.g. no_gpu_matches.")
    detail = serializers.CharField(source="unplaced_detail")
    checked_at = serializers.DateTimeField(source="unplaced_checked_at", allow_null=True)


class CheckpointSerializer(serializers.Serializer):
    lease = serializers.IntegerField(source="lease_id", help_text="The lease whose agent saved it.")
    size = serializers.IntegerField(help_text="Bytes (the packed directory, a tar archive).")
    sha256 = serializers.CharField()
    created_at = serializers.DateTimeField()
    kept_until = serializers.SerializerMethodField(
        help_text="When the checkpoint of a job cancelled keeping it is deleted (CHECKPOINT_KEEP_AFTER_CANCEL_H "
        "after the job ended); null for any other job, whose checkpoint goes when it ends."
    )

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_kept_until(self, checkpoint: Checkpoint) -> str | None:
        until = checkpoints.kept_until(checkpoint.job)
        return serializers.DateTimeField().to_representation(until) if until is not None else None


class JobSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    kind = NamedChoiceField(Job.Kind.choices, enum_name="JobKind")
    image = serializers.CharField()
    command = serializers.ListField(child=serializers.CharField())
    env = serializers.DictField(child=serializers.CharField())
    gpu_count = serializers.IntegerField()
    min_vram_mb = serializers.IntegerField()
    allowed_models = serializers.ListField(child=serializers.CharField())
    region = serializers.CharField()
    max_price_per_gpu_hour = price_field()
    expected_duration_s = serializers.IntegerField()
    max_duration_s = serializers.IntegerField()
    interruptible = serializers.BooleanField()
    checkpoint_interval_s = serializers.IntegerField(
        allow_null=True,
        help_text="The renter's promise: the job saves its progress at least this often (seconds), so an "
        "interruption loses at most this much work. null: an interruption loses all of it.",
    )
    checkpoint_dir = serializers.CharField(
        help_text="The directory under /work that follows the job from lease to lease; empty: none."
    )
    checkpoint = serializers.SerializerMethodField(
        help_text="Its newest saved checkpoint, restored when its next lease starts (null: none yet, or the job "
        "has ended and it was deleted). After a cancel that kept it, the final one, until `kept_until`. Its "
        "renter downloads the archive at GET /api/v1/jobs/{id}/checkpoint/."
    )
    keep_checkpoint = serializers.BooleanField(
        help_text="Cancelled asking to keep its checkpoint: the agent saved it as it stopped the job, and it is "
        "kept for CHECKPOINT_KEEP_AFTER_CANCEL_H hours after the job ended."
    )
    status = NamedChoiceField(Job.Status.choices, enum_name="JobStatus")
    unplaced_reason = serializers.SerializerMethodField(
        help_text="While pending: why the matcher could not place it yet (null once placed or never checked)."
    )
    attempts = serializers.IntegerField()
    exit_code = serializers.IntegerField(allow_null=True)
    failure_reason = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)

    @extend_schema_field(CheckpointSerializer(allow_null=True))
    def get_checkpoint(self, job: Job) -> ReturnDict | None:
        try:
            return CheckpointSerializer(job.checkpoint).data
        except Checkpoint.DoesNotExist:
            return None

    @extend_schema_field(UnplacedReasonSerializer(allow_null=True))
    def get_unplaced_reason(self, job: Job) -> ReturnDict | None:
        if job.status != Job.Status.PENDING or not job.unplaced_code:
            return None
        return UnplacedReasonSerializer(job).data


class EventSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField(help_text="e.g. job.created, lease.assigned, lease.started, lease.ended.")
    lease = serializers.IntegerField(source="lease_id", allow_null=True)
    from_status = serializers.CharField()
    to_status = serializers.CharField()
    actor = serializers.CharField(help_text="Who caused it: renter:<id>, machine:<id>, matcher, operator:<id>.")
    detail = serializers.DictField()
    created_at = serializers.DateTimeField()


# --- jobs -----------------------------------------------------------------------------------


@extend_schema_field(
    {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": MAX_ENV_VALUE_CHARS},
        "maxProperties": MAX_ENV_VARS,
        "description": f"Environment variables, at most {MAX_ENV_VARS}; each name matches "
        f"{ENV_NAME_RE.pattern} (OpenAPI 3.0 cannot state a pattern for names).",
    }
)
class EnvField(serializers.DictField):
    child = serializers.CharField(max_length=MAX_ENV_VALUE_CHARS, allow_blank=True, trim_whitespace=False)


class JobCreateInput(StrictInputSerializer):
    name = serializers.CharField(required=False, allow_blank=True, max_length=200, default="")
    kind = serializers.ChoiceField(choices=Job.Kind.choices, default=Job.Kind.CONTAINER)
    image = serializers.CharField(required=False, allow_blank=True, max_length=500, default="")
    command = serializers.ListField(
        child=serializers.CharField(max_length=MAX_ARGUMENT_CHARS, allow_blank=True, trim_whitespace=False),
        required=False,
        max_length=MAX_COMMAND_PARTS,
        default=list,
    )
    env = EnvField(required=False, default=dict)
    gpu_count = serializers.IntegerField(min_value=1, max_value=services.MAX_GPUS_PER_JOB)
    min_vram_mb = serializers.IntegerField(required=False, min_value=0, max_value=MAX_VRAM_MB, default=0)
    allowed_models = serializers.ListField(
        child=serializers.CharField(max_length=100),
        required=False,
        max_length=MAX_ALLOWED_MODELS,
        default=list,
        help_text="GPU models the job may run on; empty: any.",
    )
    region = serializers.CharField(required=False, allow_blank=True, max_length=64, default="")
    max_price_per_gpu_hour = price_input_field(
        maximum=services.MAX_PRICE, positive=True, help_text="Above 0, per GPU-hour."
    )
    expected_duration_s = serializers.IntegerField(min_value=1, max_value=services.MAX_DURATION_S)
    max_duration_s = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=services.MAX_DURATION_S,
        help_text="When the job is stopped, at least expected_duration_s; defaults to expected_duration_s.",
    )
    interruptible = serializers.BooleanField(required=False, default=True)
    checkpoint_interval_s = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        min_value=services.MIN_CHECKPOINT_INTERVAL_S,
        max_value=services.MAX_CHECKPOINT_INTERVAL_S,
        help_text=f"How often the job saves its progress, in seconds ({services.MIN_CHECKPOINT_INTERVAL_S} to "
        f"{services.MAX_CHECKPOINT_INTERVAL_S}): an interruption then loses at most this much work. Omitted or "
        "null: the job keeps no checkpoints and an interruption loses all its work.",
    )
    checkpoint_dir = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=services.MAX_CHECKPOINT_DIR_CHARS,
        help_text="A directory of the job's view under /work (like /work/checkpoints) that follows the job: when "
        "its lease is stopped (the owner comes back, the lease's window ends) the job gets SIGTERM and "
        "GPGPU_STOP_GRACE_S seconds to write it, then it is uploaded; the job's next lease, on any machine, starts "
        "with it restored. At most CHECKPOINT_MAX_BYTES; deleted when the job ends. Empty: none.",
    )

    def validate_checkpoint_dir(self, value: str) -> str:
        problem = services.checkpoint_dir_problem(value) if value else None
        if problem is not None:
            raise serializers.ValidationError(problem[:1].upper() + problem[1:] + ".")
        return value

    def validate_env(self, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_ENV_VARS:
            raise serializers.ValidationError(f"At most {MAX_ENV_VARS} variables.")
        bad = [name for name in value if not ENV_NAME_RE.fullmatch(name)]
        if bad:
            raise serializers.ValidationError(f"{bad[0][:60]!r} is not a valid variable name.")
        return value


_STATUS_NAME = f"(?:{'|'.join(Job.Status.values)})"


@extend_schema_field(
    {
        "type": "string",
        "maxLength": 200,
        # Statuses separated by commas; blanks around them and empty items are ignored.
        "pattern": rf"^\s*(?:{_STATUS_NAME}\s*)?(?:,\s*(?:{_STATUS_NAME}\s*)?)*$",
    }
)
class StatusListField(serializers.CharField):
    pass


class JobFilter(StrictInputSerializer):
    also_allowed = frozenset({"limit", "offset"})

    status = StatusListField(
        required=False,
        allow_blank=True,
        max_length=200,
        help_text="A status or a comma-separated list of them (case-insensitive); empty: all.",
    )

    def validate_status(self, value: str) -> list[str]:
        statuses = [part.strip().lower() for part in value.split(",") if part.strip()]
        unknown = [s for s in statuses if s not in Job.Status.values]
        if unknown:
            raise serializers.ValidationError(
                f"{unknown[0][:40]!r} is not a job status ({', '.join(Job.Status.values)})."
            )
        return statuses


def request_idempotency_key(request: Request) -> str | None:
    raw = request.headers.get(IDEMPOTENCY_HEADER)
    if raw is None:
        return None
    if not IDEMPOTENCY_KEY_RE.fullmatch(raw):
        raise ValidationFailed(
            f"{IDEMPOTENCY_HEADER} must be 1 to 128 printable ASCII characters.", code="invalid_idempotency_key"
        )
    return raw


class JobListApi(RenterApi):
    @extend_schema(
        tags=["jobs"],
        summary="List my jobs",
        parameters=[JobFilter],
        responses={200: JobSerializer(many=True), **error_responses(400, 401, 403)},
    )
    def get(self, request: Request) -> Response:
        filters = JobFilter(data=request.query_params)
        filters.is_valid(raise_exception=True)
        jobs = selectors.job_list_for_renter(renter=self.renter, statuses=filters.validated_data.get("status", []))
        return self.paginated_response(jobs, JobSerializer)


class JobLeaseListApi(RenterApi):
    @extend_schema(
        tags=["jobs"],
        summary="The leases of one of my jobs",
        responses={200: LeaseSerializer(many=True), **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, job_id: int) -> Response:
        job = selectors.job_get_for_renter(renter=self.renter, job_id=job_id)
        return self.paginated_response(selectors.lease_list_for_renter(renter=self.renter, job=job), LeaseSerializer)


class JobEventListApi(RenterApi):
    @extend_schema(
        tags=["jobs"],
        summary="The audit trail of one of my jobs",
        responses={200: EventSerializer(many=True), **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, job_id: int) -> Response:
        job = selectors.job_get_for_renter(renter=self.renter, job_id=job_id)
        return self.paginated_response(selectors.event_list_for_job(job=job), EventSerializer)


# --- output ---------------------------------------------------------------------------------

LOG_PAGE_DEFAULT = 50
LOG_PAGE_MAX = 200


class LogFilter(StrictInputSerializer):
    cursor = serializers.IntegerField(
        required=False,
        default=0,
        min_value=0,
        max_value=2**63 - 1,
        help_text="The next_cursor of the previous answer; 0 or omitted: from the start.",
    )
    limit = serializers.IntegerField(
        required=False, default=LOG_PAGE_DEFAULT, min_value=1, max_value=LOG_PAGE_MAX, help_text="Chunks at most."
    )


class LogChunkSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="Pass it as the cursor to read what follows.")
    lease = serializers.IntegerField(source="lease_id")
    seq = serializers.IntegerField(help_text="The chunk's place in its lease's output, from 0.")
    text = serializers.CharField(help_text="The output, scrubbed of the provider machine's secrets.")
    truncated = serializers.BooleanField(help_text="The output after this chunk is not kept (a size bound).")
    at = serializers.DateTimeField(help_text="When the provider's agent read it.")


class JobLogsSerializer(serializers.Serializer):
    chunks = LogChunkSerializer(many=True)
    next_cursor = serializers.IntegerField(help_text="Pass it as `cursor` to read on; the same when nothing came.")
    finished = serializers.BooleanField(
        help_text="The job is over and this answer holds the rest of its output: a follower can stop."
    )


class JobLogApi(RenterApi):
    @extend_schema(
        tags=["jobs"],
        summary="The output of one of my jobs, from a cursor",
        description="The job's output as its providers' agents ship it while it runs (scrubbed of the machines' "
        "secrets), in chunks after `cursor`, oldest first. Follow a running job by passing `next_cursor` back "
        "until `finished` is true. A job keeps at most JOB_LOG_MAX_BYTES of output, for JOB_LOG_RETENTION_H "
        "hours after it finished.",
        parameters=[LogFilter],
        responses={200: JobLogsSerializer, **error_responses(400, 401, 403, 404)},
    )
    def get(self, request: Request, job_id: int) -> Response:
        filters = LogFilter(data=request.query_params)
        filters.is_valid(raise_exception=True)
        cursor, limit = filters.validated_data["cursor"], filters.validated_data["limit"]
        job = selectors.job_get_for_renter(renter=self.renter, job_id=job_id)
        # Asked before the chunks are read: every chunk of a finished job is stored by then.
        over = selectors.job_output_finished(job=job)
        chunks = selectors.log_chunks_after(job=job, cursor=cursor, limit=limit)
        out = {
            "chunks": chunks,
            "next_cursor": chunks[-1].pk if chunks else cursor,
            "finished": over and len(chunks) < limit,
        }
        return Response(JobLogsSerializer(out).data)


# --- checkpoint ---------------------------------------------------------------------------

CHECKPOINT_SHA256_HEADER = "X-Checkpoint-SHA256"
ARCHIVE_TYPE = "application/x-tar"


class _ArchiveNegotiation(DefaultContentNegotiation):
    """Takes `Accept: application/x-tar`, the archive's own type and the only one the schema gives
    its 200 (406 before): the archive is a streamed response of its own, never rendered, and an
    error is answered in JSON."""

    def select_renderer(self, request: Request, renderers: Any, format_suffix: str | None = None) -> Any:
        try:
            return super().select_renderer(request, renderers, format_suffix)
        except NotAcceptable:
            if ARCHIVE_TYPE not in request.META.get("HTTP_ACCEPT", ""):
                raise
            return renderers[0], renderers[0].media_type


class JobCheckpointApi(RenterApi):
    content_negotiation_class = _ArchiveNegotiation

    @extend_schema(
        tags=["jobs"],
        summary="The checkpoint of one of my jobs",
        description="The job's checkpoint directory as its agent packed it (a tar archive), with its SHA-256 in "
        "X-Checkpoint-SHA256: the newest one while the job lives, and after a cancel that kept it "
        "(`keep_checkpoint`) the final one, for CHECKPOINT_KEEP_AFTER_CANCEL_H hours after the job ended. Where "
        "checkpoints are stored in S3, a 302 to a short-lived pre-signed URL of the archive. 404 `no_checkpoint` "
        "when the job has none (or it was deleted).",
        parameters=[
            OpenApiParameter(
                CHECKPOINT_SHA256_HEADER,
                str,
                OpenApiParameter.HEADER,
                description="The archive's SHA-256, 64 lower-case hex digits",
                response=[200, 302],
            ),
            OpenApiParameter(
                "Location", str, OpenApiParameter.HEADER, description="The pre-signed URL", response=[302]
            ),
        ],
        responses={
            (200, ARCHIVE_TYPE): OpenApiResponse(OpenApiTypes.BINARY, description="The archive"),
            302: OpenApiResponse(description="The archive is at the pre-signed URL in Location"),
            **error_responses(401, 403, 404),
        },
    )
    def get(self, request: Request, job_id: int) -> StreamingHttpResponse | HttpResponseRedirect:
        row = checkpoints.checkpoint_for_renter(renter=self.renter, job_id=job_id)
        url = checkpoints.presigned_get(row.storage_key)
        response: StreamingHttpResponse | HttpResponseRedirect
        if url is not None:
            response = HttpResponseRedirect(url)
        else:
            response = StreamingHttpResponse(
                checkpoints.checkpoint_chunks(checkpoints.checkpoint_open(row)), content_type=ARCHIVE_TYPE
            )
            response["Content-Length"] = str(row.size)
            response["Content-Disposition"] = f'attachment; filename="job-{job_id}-checkpoint.tar"'
        response[CHECKPOINT_SHA256_HEADER] = row.sha256
        response["Cache-Control"] = "no-store"
        return response


# --- leases ---------------------------------------------------------------------------------


class LeaseListApi(RenterApi):
    @extend_schema(
        tags=["leases"],
        summary="The leases of all my jobs",
        responses={200: LeaseSerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        return self.paginated_response(selectors.lease_list_for_renter(renter=self.renter), LeaseSerializer)


class LeaseDetailApi(RenterApi):
    @extend_schema(
        tags=["leases"],
        summary="One lease of my jobs, with the tail of its output",
        responses={200: LeaseDetailSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, lease_id: int) -> Response:
        lease = selectors.lease_get_for_renter(renter=self.renter, lease_id=lease_id)
        return Response(LeaseDetailSerializer(lease).data)


# --- a lease's telemetry --------------------------------------------------------------------


class TelemetryPointSerializer(serializers.Serializer):
    at = serializers.DateTimeField(help_text="The start of the bucket: the lease's start + i × bucket_s.")
    resolution_s = serializers.IntegerField(
        help_text="How finely the data behind this point was kept: bucket_s where raw samples were read, at least "
        "3600 where they had been pruned and hourly summaries were read instead."
    )
    samples = serializers.IntegerField(help_text="Telemetry samples summarised (one per GPU per sample interval).")
    utilization_avg = serializers.FloatField(allow_null=True, help_text="Mean GPU utilisation, percent.")
    utilization_max = serializers.FloatField(allow_null=True, help_text="Highest GPU utilisation sampled, percent.")
    memory_used_max_mb = serializers.IntegerField(allow_null=True, help_text="Most GPU memory in use sampled, MB.")


class GpuTelemetrySerializer(serializers.Serializer):
    uuid = serializers.CharField()
    index = serializers.IntegerField()
    model = serializers.CharField()
    utilization_mean = serializers.FloatField(
        allow_null=True, help_text="Mean utilisation over the whole lease, percent; null without telemetry."
    )
    points = TelemetryPointSerializer(many=True, help_text="Oldest first; a bucket with no samples has no point.")


class LeaseTelemetrySerializer(serializers.Serializer):
    lease = serializers.IntegerField(source="lease_id")
    since = serializers.DateTimeField(allow_null=True, help_text="The lease's start; null if it never started.")
    until = serializers.DateTimeField(allow_null=True, help_text="Its end, or now while it runs.")
    running = serializers.BooleanField(help_text="Not ended yet: `until` is now and the last point may grow.")
    bucket_s = serializers.IntegerField(help_text="The width of each point's bucket, in seconds.")
    points_max = serializers.IntegerField(help_text="The most points per GPU asked for (`points`).")
    gpus = GpuTelemetrySerializer(many=True)


class LeaseTelemetryFilter(StrictInputSerializer):
    points = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=lease_telemetry.MAX_POINTS,
        default=lease_telemetry.DEFAULT_POINTS,
        help_text=f"At most this many points per GPU (1 to {lease_telemetry.MAX_POINTS}, "
        f"default {lease_telemetry.DEFAULT_POINTS}).",
    )


class LeaseTelemetryApi(RenterApi):
    @extend_schema(
        tags=["leases"],
        summary="What one of my lease's GPUs did: utilisation and memory over the lease",
        description="Per GPU of the lease, its telemetry from the lease's start to its end (now while it runs), "
        "downsampled into at most `points` buckets of equal width. Only samples taken while the GPU was this "
        "lease's count; where raw samples have been pruned (older than the raw retention), hourly summaries are "
        "read instead (resolution_s 3600 or more), and the lease's first and last hour may then include samples "
        "from just outside it.",
        parameters=[LeaseTelemetryFilter],
        responses={200: LeaseTelemetrySerializer, **error_responses(400, 401, 403, 404)},
    )
    def get(self, request: Request, lease_id: int) -> Response:
        filters = LeaseTelemetryFilter(data=request.query_params)
        filters.is_valid(raise_exception=True)
        lease = selectors.lease_get_for_renter(renter=self.renter, lease_id=lease_id)
        telemetry = lease_telemetry.lease_telemetry(lease=lease, points=filters.validated_data["points"])
        return Response(LeaseTelemetrySerializer(telemetry).data)
