"""Operator console for the fleet: providers, registration tokens, machines, GPUs, schedules
and telemetry.

What agents report (inventory, status, telemetry, capabilities) is read-only here: the next
heartbeat would overwrite an edit anyway. A machine's status changes only through the suspend /
unsuspend actions, and its credential only through the rotate / revoke actions, which call
providers.services (ending its leases and re-queueing their jobs where needed).
Secrets (registration tokens, machine credentials) are stored as digests and never shown; a
new one is shown once, in the message after the action that made it.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypedDict

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, DecimalField, F, QuerySet
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from core.admin import ReadOnlyAdmin, change_link, operator_actor
from providers import services, telemetry
from providers.availability import mask_to_days
from providers.errors import Conflict, ValidationFailed
from providers.leases import machine_leases
from providers.models import (
    GPU,
    PRICE_DECIMALS,
    PRICE_MAX_DIGITS,
    AvailabilityWindow,
    Blackout,
    Machine,
    MachineCredentialRevocation,
    MachineIdleProfile,
    Provider,
    RegistrationToken,
    TelemetryRollup,
    TelemetrySample,
)
from providers.telemetry_charts import gpu_telemetry_charts

if TYPE_CHECKING:
    # django-stubs-ext is a development requirement: its names are for the types only.
    from django_stubs_ext import WithAnnotations


class _MachineCount(TypedDict):
    _machine_count: int


class _GpuCount(TypedDict):
    _gpu_count: int


# --- providers and registration tokens ------------------------------------------------------


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = ["display_name", "user", "payout_address", "default_price_floor", "machine_count", "created_at"]
    search_fields = ["display_name", "user__username", "user__email", "payout_address"]
    list_select_related = ["user"]
    raw_id_fields = ["user"]
    readonly_fields = ["created_at"]
    date_hierarchy = "created_at"
    actions = ["create_registration_tokens"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Provider]:
        return super().get_queryset(request).annotate(_machine_count=Count("machines"))

    @admin.display(description="machines", ordering="_machine_count")
    def machine_count(self, obj: WithAnnotations[Provider, _MachineCount]) -> str:
        url = reverse("admin:providers_machine_changelist") + f"?provider__id__exact={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, obj._machine_count)

    def has_delete_permission(self, request: HttpRequest, obj: Provider | None = None) -> bool:
        # Machines, leases and the ledger refer to providers: they are never deleted.
        return False

    @admin.action(description="Create a registration token for each selected provider", permissions=["change"])
    def create_registration_tokens(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        for provider in queryset:
            _, raw = services.registration_token_create(
                provider=provider, label=f"issued by operator {request.user.get_username()}"
            )
            self.message_user(request, _registration_token_message(provider, raw), messages.WARNING)


def _registration_token_message(provider: Provider, raw: str) -> str:
    return f"Registration token for {provider}: {raw} — copy it now, it is not stored and will not be shown again."


class RegistrationTokenAddForm(forms.ModelForm):
    class Meta:
        model = RegistrationToken
        fields = ["provider", "label"]


@admin.register(RegistrationToken)
class RegistrationTokenAdmin(admin.ModelAdmin):
    list_display = ["token_prefix", "provider", "label", "state", "created_at", "expires_at", "used_at", "machine"]
    list_filter = [("used_at", admin.EmptyFieldListFilter), "expires_at", "created_at"]
    search_fields = ["prefix", "label", "provider__display_name", "machine__hostname"]
    list_select_related = ["provider", "machine"]
    raw_id_fields = ["provider"]
    date_hierarchy = "created_at"
    fields = ("provider", "label", "prefix", "created_at", "expires_at", "used_at", "machine")

    @admin.display(description="token", ordering="prefix")
    def token_prefix(self, obj: RegistrationToken) -> str:
        return f"{obj.prefix}…"

    @admin.display(description="state")
    def state(self, obj: RegistrationToken) -> str:
        if obj.used_at is not None:
            return "used"
        return "expired" if obj.expires_at <= timezone.now() else "unused"

    # ModelAdmin.get_form's options for the form factory, untyped in django-stubs too.
    def get_form(
        self, request: HttpRequest, obj: RegistrationToken | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm]:
        if obj is None:
            kwargs["form"] = RegistrationTokenAddForm
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: RegistrationToken | None = None) -> tuple[str, ...]:
        return ("provider", "label") if obj is None else self.fields

    def get_readonly_fields(self, request: HttpRequest, obj: RegistrationToken | None = None) -> list[str]:
        return [] if obj is None else ["provider", "prefix", "created_at", "expires_at", "used_at", "machine"]

    def save_model(self, request: HttpRequest, obj: RegistrationToken, form: forms.ModelForm, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        token, raw = services.registration_token_create(
            provider=form.cleaned_data["provider"], label=form.cleaned_data["label"]
        )
        # The add view goes on with `obj` (its log entry, its redirect): make it the new row.
        obj.pk = token.pk
        for field in ("prefix", "token_digest", "created_at", "expires_at"):
            setattr(obj, field, getattr(token, field))
        obj._state.adding = False
        self.message_user(request, _registration_token_message(token.provider, raw), messages.WARNING)


# --- machines and GPUs ----------------------------------------------------------------------


class GPUInline(admin.TabularInline):
    model = GPU
    extra = 0
    can_delete = False
    show_change_link = True
    fields = (
        "index",
        "uuid",
        "model",
        "vram_mb",
        "state",
        "price_floor",
        "idle_since",
        "utilization_pct",
        "memory_used_mb",
        "temperature_c",
        "last_telemetry_at",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Machine | None = None) -> bool:
        return False


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


# `limits`: JSON from the machine's reported capabilities.
def _limits_text(limits: dict[str, Any] | None) -> str:
    if not limits:
        return "not reported"
    parts = []
    if limits.get("cpus") is not None:
        parts.append(f"{limits['cpus']:g} CPUs")
    if limits.get("memory_mb") is not None:
        parts.append(f"{limits['memory_mb']} MB memory")
    if limits.get("pids") is not None:
        parts.append(f"{limits['pids']} processes")
    return ", ".join(parts) or "none"


# `isolation`: JSON from the machine's reported capabilities.
def _isolation_rows(kind: str, isolation: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows describing how the machine isolates one job kind."""

    def named(name_key: str, version_key: str) -> str:
        return " ".join(str(isolation[k]) for k in (name_key, version_key) if isolation.get(k)) or "unknown"

    if kind == "container":
        rows = [
            ("engine", named("engine", "engine_version")),
            ("runtime", isolation.get("runtime") or "unknown"),
            ("user namespace", _yes_no(isolation.get("user_namespace"))),
            ("read-only root", _yes_no(isolation.get("read_only_root"))),
        ]
    else:
        rows = [
            ("sandbox", named("sandbox", "sandbox_version")),
            ("runs as user", isolation.get("user") or "unknown"),
        ]
    rows.append(("network", isolation.get("network") or "unknown"))
    rows.append(("limits", _limits_text(isolation.get("limits"))))
    return [(f"{kind}: {label}", text) for label, text in rows]


def capabilities_html(machine: Machine) -> str:
    """The machine's reported capabilities as a small table an operator can read."""
    capabilities = machine.capabilities
    if capabilities is None:
        return "not reported yet: accepts containers only (the default until its agent says otherwise)"
    rows: list[tuple[str, str]] = [("accepts", ", ".join(capabilities.get("kinds") or []) or "nothing")]
    for kind in ("container", "process"):
        isolation = capabilities.get(kind)
        if isolation:
            rows.extend(_isolation_rows(kind, isolation))
    for kind, why in sorted((capabilities.get("refused") or {}).items()):
        rows.append((f"{kind}: refused", why))
    return format_html("<table>{}</table>", format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows))


# How far back a machine's page draws its GPUs' telemetry.
TELEMETRY_SPAN = timedelta(hours=24)


@admin.register(Machine)
class MachineAdmin(admin.ModelAdmin):
    list_display = [
        "hostname",
        "provider",
        "status",
        "accepts",
        "region",
        "gpu_count",
        "last_heartbeat_at",
        "agent_version",
        "driver_version",
        "created_at",
    ]
    list_filter = ["status", "accepts_container", "accepts_process", "region", "agent_version"]
    search_fields = ["=id", "hostname", "provider__display_name", "provider__user__username", "signing_address"]
    list_select_related = ["provider"]
    date_hierarchy = "created_at"
    inlines = [GPUInline]
    actions = ["suspend", "unsuspend", "rotate_credential", "revoke_credential", "remove"]
    fields = (
        "provider",
        "hostname",
        "region",
        "status",
        "suspended_reason",
        "accepts",
        "capabilities_table",
        "capabilities_reported_at",
        "credential",
        "credential_revoked_at",
        "credential_history",
        "signing_address",
        "agent_version",
        "driver_version",
        "cuda_version",
        "cpu_cores",
        "ram_mb",
        "disk_gb",
        "last_heartbeat_at",
        "created_at",
        "telemetry",
    )
    # All of it is the agent's report or the result of a service: the status changes only
    # through the actions below.
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Machine]:
        return super().get_queryset(request).annotate(_gpu_count=Count("gpus"))

    @admin.display(description="GPUs", ordering="_gpu_count")
    def gpu_count(self, obj: WithAnnotations[Machine, _GpuCount]) -> int:
        return obj._gpu_count

    @admin.display(description="credential")
    def credential(self, obj: Machine) -> str:
        if obj.credential_revoked_at is not None:
            return "revoked"
        # Enough of the digest to tell two machines' credentials apart, no more.
        return f"sha256 {obj.credential_digest[:8]}…"

    @admin.display(description="telemetry, last 24 hours")
    def telemetry(self, obj: Machine) -> str:
        until = timezone.now()
        charts = gpu_telemetry_charts(gpus=list(obj.gpus.all()), since=until - TELEMETRY_SPAN, until=until)
        return format_html(
            '<div class="console-charts">{}</div>',
            format_html_join("", '<figure class="console-chart"><figcaption>{}</figcaption>{}</figure>', charts),
        )

    @admin.display(description="accepts")
    def accepts(self, obj: Machine) -> str:
        return ", ".join(obj.accepted_kinds) or "nothing"

    @admin.display(description="capabilities")
    def capabilities_table(self, obj: Machine) -> str:
        return capabilities_html(obj)

    @admin.display(description="credential history")
    def credential_history(self, obj: Machine) -> str:
        revocations = list(obj.credential_revocations.order_by("-revoked_at", "-pk")[:20])
        if not revocations:
            return "-"
        return format_html(
            "<table><tr><th>when</th><th>what</th><th>by</th><th>reason</th></tr>{}</table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                ((f"{r.revoked_at:%Y-%m-%d %H:%M:%S}", r.get_kind_display(), r.actor, r.reason) for r in revocations),
            ),
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Machines join through an agent and a registration token.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Machine | None = None) -> bool:
        return False

    @admin.action(description="Suspend selected machines", permissions=["change"])
    def suspend(self, request: HttpRequest, queryset: QuerySet[Machine]) -> None:
        reason = f"suspended by operator {request.user.get_username()}"
        machines = list(queryset.exclude(status=Machine.Status.SUSPENDED).order_by("pk"))
        skipped = queryset.filter(status=Machine.Status.SUSPENDED).count()
        ended_before = machine_leases().active_count(machine_ids=[m.pk for m in machines])
        for machine in machines:
            services.machine_suspend(machine=machine, reason=reason, actor=operator_actor(request))
        self.message_user(
            request,
            f"Suspended {len(machines)} machine(s); {ended_before} active lease(s) ended.",
            messages.SUCCESS,
        )
        if skipped:
            self.message_user(request, f"{skipped} machine(s) were already suspended.", messages.INFO)

    @admin.action(description="Unsuspend selected machines", permissions=["change"])
    def unsuspend(self, request: HttpRequest, queryset: QuerySet[Machine]) -> None:
        done: list[Machine] = []
        refused: list[str] = []
        for machine in queryset.order_by("pk"):
            try:
                services.machine_unsuspend(machine=machine, actor=operator_actor(request))
            except Conflict:
                refused.append(str(machine))
            else:
                done.append(machine)
        if done:
            self.message_user(
                request,
                f"Unsuspended {len(done)} machine(s); each shows offline until its next heartbeat.",
                messages.SUCCESS,
            )
        if refused:
            self.message_user(request, f"Not suspended, left as they were: {', '.join(refused)}.", messages.WARNING)

    @admin.action(description="Rotate the credential of selected machines", permissions=["change"])
    def rotate_credential(self, request: HttpRequest, queryset: QuerySet[Machine]) -> None:
        refused: list[str] = []
        for machine in queryset.order_by("pk"):
            try:
                raw = services.machine_credential_rotate(machine=machine, actor=operator_actor(request))
            except Conflict:
                refused.append(str(machine))
                continue
            self.message_user(
                request,
                f"New credential for {machine}: {raw} — copy it now, it is not stored and will not be shown "
                "again. Install it on the machine with `gpgpu-agent rotate-credential --credential-stdin`; "
                "the old one no longer works.",
                messages.WARNING,
            )
        if refused:
            self.message_user(
                request,
                f"Credential revoked, not rotated (register them again): {', '.join(refused)}.",
                messages.WARNING,
            )

    @admin.action(description="Revoke the credential of selected machines", permissions=["change"])
    def revoke_credential(self, request: HttpRequest, queryset: QuerySet[Machine]) -> None:
        reason = f"revoked by operator {request.user.get_username()}"
        machines = list(queryset.filter(credential_revoked_at__isnull=True).order_by("pk"))
        skipped = queryset.filter(credential_revoked_at__isnull=False).count()
        active = machine_leases().active_count(machine_ids=[m.pk for m in machines])
        for machine in machines:
            services.machine_credential_revoke(machine=machine, actor=operator_actor(request), reason=reason)
        self.message_user(
            request,
            f"Revoked the credential of {len(machines)} machine(s); {active} active lease(s) ended. "
            "They must be registered again to come back.",
            messages.SUCCESS,
        )
        if skipped:
            self.message_user(request, f"{skipped} machine(s) were already revoked.", messages.INFO)

    @admin.action(description="Remove selected machines (once they run no lease)", permissions=["change"])
    def remove(self, request: HttpRequest, queryset: QuerySet[Machine]) -> None:
        removed: list[Machine] = []
        refused: list[str] = []
        for machine in queryset.filter(removed_at__isnull=True).order_by("pk"):
            try:
                removed.append(services.machine_remove(machine=machine, actor=operator_actor(request)))
            except Conflict as exc:
                refused.append(str(exc))
        if removed:
            self.message_user(request, f"Removed {len(removed)} machine(s); their credentials are revoked.")
        for sentence in refused:
            self.message_user(request, sentence, messages.WARNING)


@admin.register(MachineCredentialRevocation)
class MachineCredentialRevocationAdmin(ReadOnlyAdmin):
    """Credentials that no longer authenticate: rotated or revoked, when, by whom and why."""

    list_display = ["revoked_at", "machine_link", "kind", "actor", "reason", "digest_prefix"]
    list_filter = ["kind", "revoked_at"]
    search_fields = ["=machine__id", "machine__hostname", "actor", "reason"]
    list_select_related = ["machine"]
    date_hierarchy = "revoked_at"
    fields = ("machine", "kind", "reason", "actor", "revoked_at", "digest_prefix")
    readonly_fields = fields

    @admin.display(description="machine", ordering="machine__hostname")
    def machine_link(self, obj: MachineCredentialRevocation) -> str:
        return change_link(obj.machine)

    @admin.display(description="credential")
    def digest_prefix(self, obj: MachineCredentialRevocation) -> str:
        return f"sha256 {obj.digest[:8]}…"


@admin.register(GPU)
class GPUAdmin(admin.ModelAdmin):
    list_display = [
        "uuid",
        "model",
        "vram_mb",
        "state",
        "machine_link",
        "effective_price_floor",
        "idle_since",
        "utilization_pct",
        "memory_used_mb",
        "temperature_c",
        "last_telemetry_at",
    ]
    list_filter = ["state", "model", "machine__region", "machine__status"]
    search_fields = ["uuid", "model", "machine__hostname", "machine__provider__display_name"]
    list_select_related = ["machine", "machine__provider"]
    fields = (
        "machine",
        "index",
        "uuid",
        "model",
        "vram_mb",
        "state",
        "price_floor",
        "effective_price_floor",
        "idle_since",
        "utilization_pct",
        "memory_used_mb",
        "temperature_c",
        "power_w",
        "last_telemetry_at",
        "last_24_hours",
    )
    readonly_fields = [f for f in fields if f != "price_floor"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[GPU]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                _effective_floor=Coalesce(
                    F("price_floor"),
                    F("machine__provider__default_price_floor"),
                    output_field=DecimalField(max_digits=PRICE_MAX_DIGITS, decimal_places=PRICE_DECIMALS),
                )
            )
        )

    @admin.display(description="machine", ordering="machine__hostname")
    def machine_link(self, obj: GPU) -> str:
        return change_link(obj.machine, obj.machine.hostname)

    @admin.display(description="price floor / GPU-hour", ordering="_effective_floor")
    def effective_price_floor(self, obj: GPU) -> str:
        floor = getattr(obj, "_effective_floor", None)
        if floor is None:
            floor = obj.price_floor if obj.price_floor is not None else obj.machine.provider.default_price_floor
        # SQLite hands computed decimals back unscaled: show the model's precision.
        shown = Decimal(floor).quantize(Decimal(1).scaleb(-PRICE_DECIMALS))
        return f"{shown}" if obj.price_floor is not None else f"{shown} (provider default)"

    @admin.display(description="last 24 hours")
    def last_24_hours(self, obj: GPU) -> str:
        now = timezone.now()
        points = telemetry.gpu_history(gpu=obj, since=now - timedelta(hours=24), until=now)
        if not points:
            return "no telemetry"

        def cell(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    p["hour"].strftime("%Y-%m-%d %H:00") + (" (so far)" if p["partial"] else ""),
                    p["samples"],
                    cell(p["utilization_avg"], ".0f"),
                    cell(p["temperature_max_c"], ".0f"),
                    cell(p["power_avg_w"], ".0f"),
                    format(p["idle_ratio"], ".0%"),
                    format(p["leased_ratio"], ".0%"),
                )
                for p in points
            ),
        )
        return format_html(
            "<table><tr><th>hour (UTC)</th><th>samples</th><th>util avg %</th><th>temp max °C</th>"
            "<th>power avg W</th><th>idle</th><th>leased</th></tr>{}</table>",
            rows,
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: GPU | None = None) -> bool:
        return False


# --- availability ---------------------------------------------------------------------------


class _ServiceForm(forms.ModelForm):
    """A form whose row is written by a providers.services function, so the admin keeps the
    rules the API keeps (validation, the per-provider cap and its lock): `write` calls the
    service from clean(), inside the admin's transaction, and the service's refusal shows on the
    form, field by field, with nothing saved. save() then hands the admin the service's row."""

    def write(self, data: dict[str, Any]) -> Any:
        raise NotImplementedError

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        try:
            self.instance = self.write(data)
        except ValidationFailed as exc:
            fields = (exc.extra or {}).get("fields") or {}
            for name, problems in fields.items():
                for problem in problems:
                    self.add_error(name if name in self.fields else None, problem)
            if not fields:
                raise forms.ValidationError(str(exc)) from None
        return data

    def save(self, commit: bool = True) -> Any:
        return self.instance

    def save_m2m(self) -> None:
        """These rows have no many-to-many fields."""


class AvailabilityWindowForm(_ServiceForm):
    class Meta:
        model = AvailabilityWindow
        fields = ["provider", "machine", "days", "start_time", "end_time", "timezone"]

    def write(self, data: dict[str, Any]) -> AvailabilityWindow:
        machine = data.get("machine")
        window = {
            "machine_id": machine.pk if machine is not None else None,
            "days": mask_to_days(data["days"]),
            "start_time": data["start_time"],
            "end_time": data["end_time"],
            "timezone_name": data["timezone"],
        }
        if self.instance.pk is None:
            return services.availability_window_create(provider=data["provider"], **window)
        return services.availability_window_update(window=self.instance, **window)


@admin.register(AvailabilityWindow)
class AvailabilityWindowAdmin(admin.ModelAdmin):
    form = AvailabilityWindowForm
    list_display = ["id", "provider", "machine", "day_names", "start_time", "end_time", "timezone", "created_at"]
    list_filter = ["timezone"]
    search_fields = ["provider__display_name", "machine__hostname"]
    list_select_related = ["provider", "machine"]
    raw_id_fields = ["provider", "machine"]

    @admin.display(description="days")
    def day_names(self, obj: AvailabilityWindow) -> str:
        return ", ".join(name.title() for name in mask_to_days(obj.days))

    def get_readonly_fields(self, request: HttpRequest, obj: AvailabilityWindow | None = None) -> list[str]:
        # A window stays its provider's (providers.services.availability_window_update).
        return [] if obj is None else ["provider"]

    def save_model(self, request: HttpRequest, obj: AvailabilityWindow, form: forms.ModelForm, change: bool) -> None:
        """Saved by the service in the form's clean()."""

    def delete_model(self, request: HttpRequest, obj: AvailabilityWindow) -> None:
        services.availability_window_delete(window=obj)


class BlackoutForm(_ServiceForm):
    class Meta:
        model = Blackout
        fields = ["provider", "machine", "starts_at", "ends_at", "reason"]

    def write(self, data: dict[str, Any]) -> Blackout:
        machine = data.get("machine")
        return services.blackout_create(
            provider=data["provider"],
            machine_id=machine.pk if machine is not None else None,
            starts_at=data["starts_at"],
            ends_at=data["ends_at"],
            reason=data.get("reason") or "",
        )


@admin.register(Blackout)
class BlackoutAdmin(admin.ModelAdmin):
    """Added and deleted, as providers do through the API; a blackout is not edited (delete it
    and add the right one)."""

    form = BlackoutForm
    list_display = ["id", "provider", "machine", "starts_at", "ends_at", "reason"]
    search_fields = ["provider__display_name", "machine__hostname", "reason"]
    list_select_related = ["provider", "machine"]
    raw_id_fields = ["provider", "machine"]
    date_hierarchy = "starts_at"

    def has_change_permission(self, request: HttpRequest, obj: Blackout | None = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Blackout, form: forms.ModelForm, change: bool) -> None:
        """Saved by the service in the form's clean()."""

    def delete_model(self, request: HttpRequest, obj: Blackout) -> None:
        services.blackout_delete(blackout=obj)


# --- telemetry ------------------------------------------------------------------------------


@admin.register(TelemetrySample)
class TelemetrySampleAdmin(ReadOnlyAdmin):
    list_display = ["at", "gpu_uuid", "state", "utilization_pct", "memory_used_mb", "temperature_c", "power_w"]
    list_filter = ["state"]
    search_fields = ["=gpu__uuid", "gpu__machine__hostname"]
    list_select_related = ["gpu"]
    ordering = ["-at"]
    # The raw table is large: skip the unfiltered COUNT(*) on every page.
    show_full_result_count = False

    @admin.display(description="GPU", ordering="gpu__uuid")
    def gpu_uuid(self, obj: TelemetrySample) -> str:
        return obj.gpu.uuid


@admin.register(TelemetryRollup)
class TelemetryRollupAdmin(ReadOnlyAdmin):
    """Hourly telemetry per GPU (providers.telemetry.telemetry_rollup writes it)."""

    list_display = [
        "hour",
        "gpu_uuid",
        "samples",
        "utilization_avg_pct",
        "utilization_max",
        "memory_used_max_mb",
        "temperature_max_c",
        "power_avg",
        "idle_pct",
        "leased_pct",
    ]
    list_filter = ["hour"]
    search_fields = ["=gpu__uuid", "gpu__machine__hostname"]
    list_select_related = ["gpu"]
    ordering = ["-hour", "gpu_id"]
    show_full_result_count = False

    @admin.display(description="GPU", ordering="gpu__uuid")
    def gpu_uuid(self, obj: TelemetryRollup) -> str:
        return obj.gpu.uuid

    @admin.display(description="util avg %", ordering="utilization_avg")
    def utilization_avg_pct(self, obj: TelemetryRollup) -> str:
        return "-" if obj.utilization_avg is None else f"{obj.utilization_avg:.1f}"

    @admin.display(description="power avg W", ordering="power_avg_w")
    def power_avg(self, obj: TelemetryRollup) -> str:
        return "-" if obj.power_avg_w is None else f"{obj.power_avg_w:.1f}"

    @admin.display(description="idle", ordering="idle_ratio")
    def idle_pct(self, obj: TelemetryRollup) -> str:
        return f"{obj.idle_ratio:.0%}"

    @admin.display(description="leased", ordering="leased_ratio")
    def leased_pct(self, obj: TelemetryRollup) -> str:
        return f"{obj.leased_ratio:.0%}"


# --- idle forecasts ---------------------------------------------------------------------------


@admin.register(MachineIdleProfile)
class MachineIdleProfileAdmin(ReadOnlyAdmin):
    """Each machine's idle history (providers.idle_history folds it; counts as JSON)."""

    list_display = ["machine", "stretches", "decayed_at"]
    search_fields = ["=machine__id", "machine__hostname"]
    list_select_related = ["machine"]
    ordering = ["machine_id"]
