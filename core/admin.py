"""What every app's operator console shares (the audit trail's operator name, links between
pages, view-only pages), and the console page of the project itself: how the periodic tasks have
been doing (view-only; core.periodic writes the rows)."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Model
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from core.models import PeriodicTaskState


def operator_actor(request: HttpRequest) -> str:
    """The audit trail's name for the operator making this request."""
    return f"operator:{request.user.pk}"


def change_link(obj: Model | None, text: str | None = None) -> str:
    """A link to `obj`'s page in this console."""
    if obj is None:
        return "-"
    opts = obj._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, text if text is not None else str(obj))


class ReadOnlyAdmin(admin.ModelAdmin):
    """A view-only page: rows are written by the system (agents, sweepers, services)."""

    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


@admin.register(PeriodicTaskState)
class PeriodicTaskStateAdmin(ReadOnlyAdmin):
    list_display = [
        "name",
        "last_ok",
        "consecutive_failures",
        "last_finished_at",
        "items_ok",
        "items_failed",
        "total_runs",
        "total_failures",
        "total_skipped",
        "last_error",
    ]
    list_filter = ["last_ok"]
    search_fields = ["name", "last_error"]
    readonly_fields = [f.name for f in PeriodicTaskState._meta.concrete_fields]
