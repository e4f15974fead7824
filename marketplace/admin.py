"""Operator console for the project itself: how the periodic tasks have been doing (view-only;
marketplace.periodic writes the rows)."""

from __future__ import annotations

from django.contrib import admin

from marketplace.models import PeriodicTaskState
from providers.admin import ReadOnlyAdmin


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
