"""Operator console for billing: the ledger, lease charges, wallets, budget authorizations and
their reservation batches, settlement batches, what the chain watcher read, and the ledger
checks (the ledger against the chain; the newest first).

Money moves only through billing.services (docs/billing.md), so every page here is view-only:
ledger entries and postings are append-only, and a mistake is corrected by a new entry, never
by an edit. The one action is "Retry selected settlements", which calls
billing.settlement.settlement_retry for each selected batch and says what became of it; in a
process without the operator's key (docker-compose gives it to the worker and beat only, never to
web), it queues a settlement run for the worker instead, which finishes every pending and
submitted batch.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Model, QuerySet
from django.http import HttpRequest

from billing import settlement as settlement_engine
from billing.chain import ChainConfigurationError, ChainError, operator_account_from_settings
from billing.models import (
    BudgetAuthorization,
    BudgetReservation,
    ChainCursor,
    ChainLog,
    LeaseCharge,
    LedgerAccount,
    LedgerCheck,
    LedgerEntry,
    Posting,
    RenterWallet,
    Settlement,
    SettlementItem,
)
from core.errors import ServiceError
from providers.admin import ReadOnlyAdmin, change_link


def _fields(model: type[Model]) -> list[str]:
    return [f.name for f in model._meta.concrete_fields]


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


# --- the ledger -----------------------------------------------------------------------------


@admin.register(LedgerAccount)
class LedgerAccountAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "owner_key", "owner", "balance", "updated_at"]
    list_filter = ["kind"]
    search_fields = ["=id", "owner_key"]
    list_select_related = ["renter", "provider", "job", "lease"]
    readonly_fields = _fields(LedgerAccount)

    @admin.display(description="owner")
    def owner(self, obj: LedgerAccount) -> str:
        return change_link(obj.renter or obj.provider or obj.job or obj.lease) if obj.owner_key else "-"


class PostingInline(ReadOnlyInline):
    model = Posting
    fields = ("account", "amount")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Posting]:
        return super().get_queryset(request).select_related("account")


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "idempotency_key", "job", "lease", "settlement_ref", "chain_tx_hash", "created_at"]
    list_filter = ["kind"]
    search_fields = ["=id", "idempotency_key", "chain_tx_hash", "settlement_ref", "memo"]
    readonly_fields = _fields(LedgerEntry)
    date_hierarchy = "created_at"
    inlines = [PostingInline]


@admin.register(LeaseCharge)
class LeaseChargeAdmin(ReadOnlyAdmin):
    list_display = ["lease", "billable_seconds", "cumulative_micro", "uncapped_micro", "capped", "final", "updated_at"]
    list_filter = ["final", "capped"]
    search_fields = ["=lease__id"]
    readonly_fields = _fields(LeaseCharge)


# --- wallets and budgets --------------------------------------------------------------------


@admin.register(RenterWallet)
class RenterWalletAdmin(ReadOnlyAdmin):
    """Linked by the renter with a signature (POST /api/v1/billing/wallets/), never by hand."""

    list_display = ["address", "renter", "created_at"]
    search_fields = ["address", "renter__display_name", "renter__user__username"]
    list_select_related = ["renter"]
    readonly_fields = _fields(RenterWallet)


@admin.register(BudgetAuthorization)
class BudgetAuthorizationAdmin(ReadOnlyAdmin):
    """Signed by the renter, reserved (or refused) by the escrow (billing.reservations)."""

    list_display = [
        "job",
        "status",
        "renter_address",
        "max_amount",
        "deadline",
        "reservation",
        "created_at",
        "activated_at",
    ]
    list_filter = ["status", ("activated_at", admin.EmptyFieldListFilter)]
    search_fields = ["=job__id", "renter_address"]
    readonly_fields = _fields(BudgetAuthorization)


class ReservedAuthorizationInline(ReadOnlyInline):
    model = BudgetAuthorization
    fields = ("job", "status", "renter_address", "max_amount", "rejected_reason")
    readonly_fields = fields


@admin.register(BudgetReservation)
class BudgetReservationAdmin(ReadOnlyAdmin):
    """One `reserve` transaction. A batch left pending or submitted is completed by the next
    reservation run (beat, every few seconds), so there is nothing to retry by hand."""

    list_display = [
        "id",
        "status",
        "reserved_count",
        "refused_count",
        "tx_hash",
        "block_number",
        "attempts",
        "last_error",
        "created_at",
    ]
    list_filter = ["status"]
    search_fields = ["=id", "tx_hash"]
    readonly_fields = _fields(BudgetReservation)
    date_hierarchy = "created_at"
    inlines = [ReservedAuthorizationInline]


# --- settlements ----------------------------------------------------------------------------


class SettlementItemInline(ReadOnlyInline):
    model = SettlementItem
    fields = ("lease", "job", "provider_address", "cumulative_micro", "delta_micro", "carries_budget")
    readonly_fields = fields


@admin.register(Settlement)
class SettlementAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "status",
        "item_count",
        "total_micro",
        "fee_bps",
        "tx_hash",
        "block_number",
        "attempts",
        "short_error",
        "created_at",
    ]
    list_filter = ["status"]
    search_fields = ["=id", "tx_hash"]
    readonly_fields = _fields(Settlement)
    date_hierarchy = "created_at"
    inlines = [SettlementItemInline]
    actions = ["retry"]

    @admin.display(description="last error")
    def short_error(self, obj: Settlement) -> str:
        return (obj.last_error[:80] + "…") if len(obj.last_error) > 80 else obj.last_error

    def has_retry_permission(self, request: HttpRequest) -> bool:
        """Retrying sends or completes a settlement on chain: staff who may change settlements,
        not those who may only view them (the page itself is read-only for everyone)."""
        return request.user.has_perm("billing.change_settlement")

    @admin.action(description="Retry selected settlements", permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: QuerySet[Settlement]) -> None:
        try:
            operator_account_from_settings()
        except ChainConfigurationError as error:
            # No key to sign with here (module docstring): the worker's run, which has one, does
            # what a retry would for every batch still open.
            from billing.tasks import settle

            settle.apply_async(expires=300)
            self.message_user(
                request,
                f"This process cannot send transactions ({error}), so a settlement run was queued for the worker: "
                "it sends or completes every pending and submitted batch. Reload this page for their status.",
                messages.WARNING,
            )
            return
        for batch in queryset.order_by("pk"):
            before = batch.status
            try:
                after = settlement_engine.settlement_retry(settlement=batch)
            except (ServiceError, ChainError) as error:
                self.message_user(request, f"Settlement {batch.pk}: not retried: {error}", messages.ERROR)
                continue
            level = messages.ERROR if after.status == Settlement.Status.FAILED else messages.SUCCESS
            self.message_user(
                request, f"Settlement {batch.pk}: {before} → {after.status} (attempts {after.attempts}).", level
            )


# --- the chain watcher ----------------------------------------------------------------------


@admin.register(ChainLog)
class ChainLogAdmin(ReadOnlyAdmin):
    list_display = ["event", "status", "address", "block_number", "tx_hash", "log_index", "credits", "created_at"]
    list_filter = ["status", "event"]
    search_fields = ["tx_hash", "address"]
    readonly_fields = _fields(ChainLog)


@admin.register(ChainCursor)
class ChainCursorAdmin(ReadOnlyAdmin):
    list_display = ["name", "last_block", "last_block_hash", "updated_at"]
    readonly_fields = _fields(ChainCursor)


@admin.register(LedgerCheck)
class LedgerCheckAdmin(ReadOnlyAdmin):
    list_display = ["id", "checked_at", "ok", "chain_compared", "block_number", "difference_count", "error"]
    list_filter = ["ok", "chain_compared"]
    readonly_fields = _fields(LedgerCheck)

    @admin.display(description="differences")
    def difference_count(self, obj: LedgerCheck) -> int:
        return len(obj.differences or [])
