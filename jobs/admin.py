"""Operator console for renters, jobs, leases and their audit trail.

Job and lease status change only through jobs.services (the state machines documented in
jobs/models.py), so every field here is read-only; the one way to change a job is the
"Cancel selected jobs" action, which calls jobs.services.job_cancel as the operator.
Events and usage reports are records of what happened: view-only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict, TypeVar

from django.contrib import admin, messages
from django.db.models import Count, Model, Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html_join

from jobs.errors import InvalidTransition
from jobs.models import Event, Job, Lease, LeaseGPU, Renter, UsageReport
from jobs.services import job_cancel
from providers.admin import ReadOnlyAdmin, change_link, operator_actor
from providers.telemetry_charts import gpu_telemetry_charts

if TYPE_CHECKING:
    # django-stubs-ext is a development requirement: its names are for the types only.
    from django_stubs_ext import WithAnnotations

_M = TypeVar("_M", bound=Model)


class _JobCount(TypedDict):
    _job_count: int


def _search_by_number(queryset: QuerySet[_M], search_term: str, *id_fields: str) -> tuple[QuerySet[_M], bool] | None:
    """A number typed in the search box means an id (operators paste job and lease ids), not
    any text containing those digits; None when the term is not a number."""
    term = search_term.strip().lstrip("#")
    if not term.isdigit():
        return None
    match = Q()
    for field in id_fields:
        match |= Q(**{field: int(term)})
    return queryset.filter(match), False


def _all_fields(model: type[Model], *, hide: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in model._meta.concrete_fields if f.name != "id" and f.name not in hide)


@admin.register(Renter)
class RenterAdmin(admin.ModelAdmin):
    list_display = ["display_name", "user", "job_count", "created_at"]
    search_fields = ["display_name", "user__username", "user__email"]
    list_select_related = ["user"]
    raw_id_fields = ["user"]
    readonly_fields = ["created_at"]
    date_hierarchy = "created_at"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Renter]:
        return super().get_queryset(request).annotate(_job_count=Count("jobs"))

    @admin.display(description="jobs", ordering="_job_count")
    def job_count(self, obj: WithAnnotations[Renter, _JobCount]) -> int:
        return obj._job_count

    def has_delete_permission(self, request: HttpRequest, obj: Renter | None = None) -> bool:
        return False


class LeaseInline(admin.TabularInline):
    model = Lease
    extra = 0
    can_delete = False
    show_change_link = True
    fields = (
        "machine",
        "status",
        "gpu_count",
        "price_per_gpu_hour",
        "end_reason",
        "created_at",
        "started_at",
        "ended_at",
        "stop_requested_at",
        "stop_reason",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Lease]:
        return super().get_queryset(request).select_related("machine")


class EventInline(admin.TabularInline):
    model = Event
    extra = 0
    can_delete = False
    fields = ("created_at", "kind", "from_status", "to_status", "actor", "lease", "detail")
    readonly_fields = fields
    ordering = ["created_at", "id"]

    def has_add_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "name",
        "renter",
        "status",
        "gpu_count",
        "max_price_per_gpu_hour",
        "unplaced_reason",
        "attempts",
        "interruptible",
        "created_at",
    ]
    list_display_links = ["id", "name"]
    list_filter = ["status", "kind", "interruptible", "unplaced_code", "region"]
    search_fields = ["=id", "name", "renter__display_name", "renter__user__username", "image", "idempotency_key"]
    list_select_related = ["renter"]
    date_hierarchy = "created_at"
    inlines = [LeaseInline, EventInline]
    actions = ["cancel"]
    # Read-only, status first of all: it moves only through jobs.services.
    readonly_fields = _all_fields(Job, hide=("request_fingerprint",))
    fields = readonly_fields

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Job], search_term: str
    ) -> tuple[QuerySet[Job], bool]:
        by_id = _search_by_number(queryset, search_term, "pk")
        return by_id if by_id is not None else super().get_search_results(request, queryset, search_term)

    @admin.display(description="unplaced reason", ordering="unplaced_code")
    def unplaced_reason(self, obj: Job) -> str:
        if not obj.unplaced_code:
            return "-"
        return f"{obj.unplaced_code}: {obj.unplaced_detail}" if obj.unplaced_detail else obj.unplaced_code

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Jobs come from renters through the API (marketplace.submit.job_submit).
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    @admin.action(description="Cancel selected jobs", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        cancelled: list[int] = []
        already: list[int] = []
        refused: list[str] = []
        for job in queryset.order_by("pk"):
            if job.status == Job.Status.CANCELLED:
                already.append(job.pk)
                continue
            try:
                job_cancel(job=job, actor=operator_actor(request))
            except InvalidTransition:
                refused.append(f"job {job.pk} ({job.status})")
            else:
                cancelled.append(job.pk)
        if cancelled:
            self.message_user(request, f"Cancelled {len(cancelled)} job(s).", messages.SUCCESS)
        if already:
            self.message_user(request, f"{len(already)} job(s) were already cancelled.", messages.INFO)
        if refused:
            self.message_user(
                request, f"Could not cancel {len(refused)} finished job(s): {', '.join(refused)}.", messages.WARNING
            )


class LeaseGPUInline(admin.TabularInline):
    model = LeaseGPU
    extra = 0
    can_delete = False
    fields = ("gpu", "active")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Lease | None = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[LeaseGPU]:
        return super().get_queryset(request).select_related("gpu")


@admin.register(Lease)
class LeaseAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "job_link",
        "machine_link",
        "status",
        "end_reason",
        "gpu_count",
        "price_per_gpu_hour",
        "created_at",
        "started_at",
        "ended_at",
        "stop_requested_at",
    ]
    list_filter = ["status", "end_reason", "stop_reason"]
    search_fields = ["=id", "=job__id", "machine__hostname", "job__renter__display_name"]
    list_select_related = ["job", "machine"]
    date_hierarchy = "created_at"
    inlines = [LeaseGPUInline]
    # Read-only, status first of all: it moves only through jobs.services.
    readonly_fields = (*_all_fields(Lease), "gpu_utilisation")
    fields = readonly_fields

    @admin.display(description="GPU utilisation over the lease")
    def gpu_utilisation(self, obj: Lease) -> str:
        since = obj.started_at or obj.created_at
        until = obj.ended_at or timezone.now()
        if until <= since:
            return "-"
        charts = gpu_telemetry_charts(gpus=list(obj.gpus.all()), since=since, until=until, metrics=["utilization_pct"])
        return format_html_join("", '<figure class="console-chart"><figcaption>{}</figcaption>{}</figure>', charts)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Lease], search_term: str
    ) -> tuple[QuerySet[Lease], bool]:
        by_id = _search_by_number(queryset, search_term, "pk", "job_id")
        return by_id if by_id is not None else super().get_search_results(request, queryset, search_term)

    @admin.display(description="job", ordering="job_id")
    def job_link(self, obj: Lease) -> str:
        return change_link(obj.job, f"job {obj.job_id}")

    @admin.display(description="machine", ordering="machine__hostname")
    def machine_link(self, obj: Lease) -> str:
        return change_link(obj.machine, obj.machine.hostname)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Lease | None = None) -> bool:
        return False


@admin.register(LeaseGPU)
class LeaseGPUAdmin(ReadOnlyAdmin):
    list_display = ["id", "lease_id", "gpu", "active"]
    list_filter = ["active"]
    search_fields = ["=lease__id", "=gpu__uuid"]
    list_select_related = ["gpu"]


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "job_id", "lease_id", "kind", "from_status", "to_status", "actor"]
    list_filter = ["kind"]
    search_fields = ["=job__id", "=lease__id", "kind", "actor"]
    date_hierarchy = "created_at"
    show_full_result_count = False


@admin.register(UsageReport)
class UsageReportAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "lease_id",
        "report_id",
        "period_start",
        "period_end",
        "gpu_seconds",
        "mean_utilization_pct",
        "peak_memory_mb",
        "received_at",
    ]
    search_fields = ["=lease__id", "report_id"]
    date_hierarchy = "period_start"
