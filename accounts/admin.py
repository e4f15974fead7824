"""Operator console for API tokens.

A token is issued through accounts.services.api_token_create: the raw key is shown once, in
a message after the add form, and only its digest is stored (never displayed). Tokens are
revoked, not deleted, so the audit of who held which key survives.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.models import ApiToken
from accounts.services import api_token_create, api_token_revoke

admin.site.site_header = "GPGPU operator console"
admin.site.site_title = "GPGPU console"
admin.site.index_title = "Marketplace"


class ApiTokenAddForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["user", "name"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["key_prefix", "name", "user", "created_at", "last_used_at", "revoked_at", "is_active"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "created_at"]
    search_fields = ["prefix", "name", "user__username", "user__email"]
    list_select_related = ["user"]
    raw_id_fields = ["user"]
    date_hierarchy = "created_at"
    actions = ["revoke"]
    # The key digest is never shown: it is not a secret's hash anyone needs to read.
    fields = ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")

    @admin.display(description="key", ordering="prefix")
    def key_prefix(self, obj: ApiToken) -> str:
        return f"{obj.prefix}…"

    @admin.display(description="active", boolean=True)
    def is_active(self, obj: ApiToken) -> bool:
        return obj.revoked_at is None

    # ModelAdmin.get_form's options for the form factory, untyped in django-stubs too.
    def get_form(
        self, request: HttpRequest, obj: ApiToken | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm]:
        if obj is None:
            kwargs["form"] = ApiTokenAddForm
            kwargs["fields"] = ["user", "name"]
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> tuple[str, ...]:
        return ("user", "name") if obj is None else self.fields

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> list[str]:
        if obj is None:
            return []
        return ["user", "prefix", "created_at", "last_used_at", "revoked_at"]

    def save_model(self, request: HttpRequest, obj: ApiToken, form: forms.ModelForm, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        token, raw = api_token_create(user=form.cleaned_data["user"], name=form.cleaned_data["name"])
        # The add view goes on with `obj` (its log entry, its redirect): make it the new row.
        obj.pk = token.pk
        obj.prefix, obj.key_digest, obj.created_at = token.prefix, token.key_digest, token.created_at
        obj._state.adding = False
        self.message_user(
            request,
            f"API token for {token.user}: {raw} — copy it now, it is not stored and will not be shown again.",
            messages.WARNING,
        )

    def has_delete_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return False

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        live = list(queryset.filter(revoked_at__isnull=True))
        for token in live:
            api_token_revoke(token=token)
        self.message_user(request, f"Revoked {len(live)} token(s).", messages.SUCCESS)
