"""The renter's API where a job meets its money: submitting a job (marketplace.submit) and the
job's detail with its budget (billing), above both jobs and billing. Same URLs, operation ids
and schema as the rest of /api/v1/jobs/ (jobs.apis)."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.serializer_helpers import ReturnDict

from billing import metering as billing_metering
from billing import selectors as billing_selectors
from core.api import ErrorSerializer, RenterApi, StrictInputSerializer, error_responses, price_field
from jobs import apis as job_apis
from jobs import lease_telemetry, selectors, services
from jobs.apis import (
    IDEMPOTENCY_HEADER,
    IDEMPOTENCY_KEY_SCHEMA,
    JobCreateInput,
    JobSerializer,
    LeaseSerializer,
    request_idempotency_key,
)
from jobs.models import Job
from marketplace.submit import job_submit
from providers import selectors as provider_selectors

# The most offers a pending job's detail shows.
JOB_OFFERS = 5


class JobBudgetSerializer(serializers.Serializer):
    """The job's money, in tokens (decimal strings): reserved at submission, charged by its
    leases so far, released back to the renter after it finished, and still reserved."""

    reserved = serializers.SerializerMethodField()
    charged = serializers.SerializerMethodField()
    released = serializers.SerializerMethodField()
    remaining = serializers.SerializerMethodField()

    @staticmethod
    def _tokens(micro: int) -> str:
        return str(billing_metering.micro_to_decimal(micro))

    def get_reserved(self, budget: billing_selectors.JobBudget) -> str:
        return self._tokens(budget.reserved)

    def get_charged(self, budget: billing_selectors.JobBudget) -> str:
        return self._tokens(budget.charged)

    def get_released(self, budget: billing_selectors.JobBudget) -> str:
        return self._tokens(budget.released)

    def get_remaining(self, budget: billing_selectors.JobBudget) -> str:
        return self._tokens(budget.remaining)


class OfferGpuSerializer(serializers.Serializer):
    uuid = serializers.CharField()
    model = serializers.CharField()
    vram_mb = serializers.IntegerField()


class OfferSerializer(serializers.Serializer):
    """A machine the pending job could be placed on now, and what the renter risks there."""

    machine = serializers.IntegerField(source="machine_id")
    region = serializers.CharField()
    gpus = OfferGpuSerializer(many=True, help_text="The cheapest of its GPUs that fit the job, as many as it asks.")
    price_per_gpu_hour = price_field(help_text="The highest floor among those GPUs, per GPU-hour.")
    available_until = serializers.DateTimeField(
        source="availability.until",
        allow_null=True,
        help_text="When the machine's availability ends; null when no end is known.",
    )
    predicted_idle_s = serializers.IntegerField(
        source="risk.predicted_idle_s",
        allow_null=True,
        help_text="How much longer its owner is likely to stay away, seconds (the median of the machine's idle "
        "forecast); null when unknown.",
    )
    p_finish = serializers.FloatField(
        source="risk.p_finish",
        allow_null=True,
        min_value=0,
        max_value=1,
        help_text="The probability, 0 to 1, that the job (its expected_duration_s) runs to its end there "
        "without the owner coming back; null when unknown.",
    )


class JobDetailSerializer(JobSerializer):
    current_lease = LeaseSerializer(allow_null=True, help_text="The assigned or running lease, if any.")
    gpu_utilization_mean = serializers.FloatField(
        allow_null=True,
        help_text="Mean utilisation of the job's GPUs, percent, over all its leases (each sample taken while a lease "
        "held its GPU weighs the same): near 0 for a job that leaves its GPUs idle. null before any telemetry. "
        "Per GPU and over time: GET /api/v1/leases/{id}/telemetry/. Not in the job list.",
    )
    budget = JobBudgetSerializer(help_text="The job's budget, in tokens: see docs/billing.md.")
    offers = OfferSerializer(
        many=True,
        allow_null=True,
        help_text=f"While pending: up to {JOB_OFFERS} machines the job could be placed on now (same constraints as "
        "the matcher: models, VRAM, region, price ceiling, accepted kind, GPU count, availability lasting its "
        "expected duration), the likeliest to finish it first (p_finish), then the cheapest. The matcher, not "
        "this list, decides where it runs. null once the job is no longer pending.",
    )


def _job_detail(job: Job) -> ReturnDict:
    # For JobDetailSerializer alone, not fields of the model.
    job.current_lease = selectors.job_current_lease(job=job)  # type: ignore[attr-defined]
    job.gpu_utilization_mean = lease_telemetry.job_gpu_utilization_mean(job_id=job.pk)  # type: ignore[attr-defined]
    job.budget = billing_selectors.job_budget(job_id=job.pk)  # type: ignore[attr-defined]
    job.offers = _job_offers(job)  # type: ignore[attr-defined]
    return JobDetailSerializer(job).data


def _job_offers(job: Job) -> list[provider_selectors.MachineOffer] | None:
    if job.status != Job.Status.PENDING:
        return None
    return provider_selectors.machine_offers(
        models=job.allowed_models,
        min_vram_mb=job.min_vram_mb,
        max_price=job.max_price_per_gpu_hour,
        region=job.region,
        kind=job.kind,
        gpu_count=job.gpu_count,
        duration_s=job.expected_duration_s,
        limit=JOB_OFFERS,
    )


class JobListApi(job_apis.JobListApi):
    # The renter's jobs (jobs.apis.JobListApi), and submitting one with its budget. No docstring:
    # the schema describes the operations with RenterApi's, as before.

    @extend_schema(
        tags=["jobs"],
        summary="Submit a job",
        description=(
            "With an Idempotency-Key header, repeating the same request returns the job created the first "
            "time (200); the same key with a different body is refused (409 idempotency_key_reused). "
            "The job's budget is reserved from the renter's available balance at once; without enough, "
            "402 insufficient_funds and no job is created. What the job did not spend is released after it ends."
        ),
        parameters=[
            OpenApiParameter(
                IDEMPOTENCY_HEADER,
                IDEMPOTENCY_KEY_SCHEMA,
                OpenApiParameter.HEADER,
                required=False,
                description="1 to 128 printable ASCII characters (no blank at either end), unique per job "
                "request; otherwise 400 invalid_idempotency_key.",
            )
        ],
        request=JobCreateInput,
        responses={
            201: OpenApiResponse(JobDetailSerializer, description="Created."),
            200: OpenApiResponse(JobDetailSerializer, description="A repeat of an earlier request with this key."),
            **error_responses(400, 401, 403, 409, 413),
            402: OpenApiResponse(
                ErrorSerializer,
                description="insufficient_funds: the renter's available balance does not cover the job's budget "
                "(max_price_per_gpu_hour × gpu_count × max_duration_s); no job is created.",
            ),
        },
    )
    def post(self, request: Request) -> Response:
        key = request_idempotency_key(request)
        data = JobCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        job, created = job_submit(renter=self.renter, spec=services.JobSpec(**data.validated_data), idempotency_key=key)
        return Response(_job_detail(job), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class JobDetailApi(RenterApi):
    @extend_schema(
        tags=["jobs"],
        summary="One of my jobs",
        responses={200: JobDetailSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, job_id: int) -> Response:
        return Response(_job_detail(selectors.job_get_for_renter(renter=self.renter, job_id=job_id)))


class JobCancelInput(StrictInputSerializer):
    keep_checkpoint = serializers.BooleanField(
        default=False,
        help_text="Keep the job's checkpoint: a running job's agent uploads its checkpoint_dir as it stops it "
        "(SIGTERM, then its stop grace), and the checkpoint is kept for CHECKPOINT_KEEP_AFTER_CANCEL_H hours "
        "after the job ended, for download at GET /api/v1/jobs/{id}/checkpoint/. Only for a job with a "
        "checkpoint_dir (400 no_checkpoint_dir otherwise).",
    )


class JobCancelApi(RenterApi):
    @extend_schema(
        tags=["jobs"],
        summary="Cancel a job",
        description="A running job's lease is asked to stop. The body is optional. Cancelling a cancelled job "
        "is harmless, unless it asks to keep a checkpoint the first cancel did not keep (409 "
        "invalid_transition: it is gone); a finished job is refused (409 invalid_transition).",
        request=JobCancelInput,
        responses={200: JobDetailSerializer, **error_responses(400, 401, 403, 404, 409)},
    )
    def post(self, request: Request, job_id: int) -> Response:
        body = JobCancelInput(data=request.data)
        body.is_valid(raise_exception=True)
        job = selectors.job_get_for_renter(renter=self.renter, job_id=job_id)
        job = services.job_cancel(
            job=job, actor=f"renter:{self.renter.pk}", keep_checkpoint=body.validated_data["keep_checkpoint"]
        )
        return Response(_job_detail(job))
