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
from core.api import ErrorSerializer, RenterApi, error_responses
from jobs import apis as job_apis
from jobs import selectors, services
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


class JobDetailSerializer(JobSerializer):
    current_lease = LeaseSerializer(allow_null=True, help_text="The assigned or running lease, if any.")
    budget = JobBudgetSerializer(help_text="The job's budget, in tokens: see docs/billing.md.")


def _job_detail(job: Job) -> ReturnDict:
    # For JobDetailSerializer alone, not fields of the model.
    job.current_lease = selectors.job_current_lease(job=job)  # type: ignore[attr-defined]
    job.budget = billing_selectors.job_budget(job_id=job.pk)  # type: ignore[attr-defined]
    return JobDetailSerializer(job).data


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


class JobCancelApi(RenterApi):
    @extend_schema(
        tags=["jobs"],
        summary="Cancel a job",
        description="A running job's lease is asked to stop. Cancelling a cancelled job is harmless; "
        "a finished job is refused (409 invalid_transition).",
        request=None,
        responses={200: JobDetailSerializer, **error_responses(401, 403, 404, 409)},
    )
    def post(self, request: Request, job_id: int) -> Response:
        job = selectors.job_get_for_renter(renter=self.renter, job_id=job_id)
        job = services.job_cancel(job=job, actor=f"renter:{self.renter.pk}")
        return Response(_job_detail(job))
