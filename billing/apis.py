"""Billing's REST API under /api/v1/: a renter's balance, deposits, charges, statements,
settlements, wallets and job budget authorizations; a provider's earnings and how to withdraw
them. Views validate input, call one selector or service and serialise the result.

Every amount is an object {"tokens": "<decimal string>", "micro": <int>} (docs/billing.md,
"Units and rounding"): tokens for people, micro (10^-6 token, the unit on chain) for programs.
A renter sees only its own money; another renter's job is a 404. Renter endpoints refuse a
provider-only user and the provider endpoint a renter-only user with 403.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.serializer_helpers import ReturnDict

from billing import authorizations, machine_usage, metering, statements
from billing.deposits import wallet_link
from billing.models import BudgetAuthorization, LeaseCharge, LedgerEntry, Settlement
from core.api import (
    ErrorSerializer,
    NamedChoiceField,
    ProviderApi,
    RenterApi,
    StrictInputSerializer,
    error_responses,
    eth_address_field,
    price_field,
    signature_field,
)
from jobs import selectors as job_selectors
from jobs.models import Lease
from providers import selectors as provider_selectors

# The largest unix time a deadline may name (9999-12-31T23:59:59Z).
MAX_DEADLINE = 253_402_300_799

CHAIN_UNAVAILABLE = OpenApiResponse(
    ErrorSerializer,
    description="chain_unavailable: the escrow's chain id or address cannot be determined right now.",
)


# --- amounts --------------------------------------------------------------------------------


class AmountSerializer(serializers.Serializer):
    """An amount of the payment token: a decimal string in tokens and the exact int in micro."""

    tokens = serializers.CharField(help_text='Decimal string in tokens, e.g. "1.600445".')
    micro = serializers.IntegerField(help_text="The same amount in micro (10^-6 token), exact.")

    def to_representation(self, instance: int) -> dict[str, str | int]:
        return amount(instance)


def amount(micro: int) -> dict[str, str | int]:
    return {"tokens": str(metering.micro_to_decimal(micro)), "micro": int(micro)}


class AmountField(serializers.Field):
    """Renders an int of micro as an Amount object (read-only)."""

    # Field's options, passed on as they are.
    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def to_representation(self, value: int) -> dict[str, str | int]:
        return amount(value or 0)


extend_schema_field(AmountSerializer)(AmountField)


# --- renter: balance, deposits, charges -----------------------------------------------------


class BalanceSerializer(serializers.Serializer):
    available = AmountField(help_text="Free to reserve for new jobs or to withdraw from the escrow.")
    reserved = AmountField(help_text="Budgets held for the renter's jobs and not yet charged.")
    unsettled = AmountField(help_text="Charged by leases and not yet paid out on chain (in_settlement included).")
    in_settlement = AmountField(help_text="Part of `unsettled` inside a settlement transaction not yet confirmed.")
    settled = AmountField(help_text="Charges paid out on chain to date.")
    deposited = AmountField(help_text="Deposited into the escrow to date.")
    withdrawn = AmountField(help_text="Withdrawn from the escrow to date.")
    total = AmountField(help_text="What the escrow holds for the renter: available + reserved + unsettled.")


class BalanceApi(RenterApi):
    @extend_schema(
        tags=["billing"],
        summary="My balance",
        responses={200: BalanceSerializer, **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        return Response(BalanceSerializer(statements.renter_balance(renter_id=self.renter.pk)).data)


class DepositSerializer(serializers.Serializer):
    """One movement between the renter's wallet and the escrow, as the chain watcher recorded it."""

    id = serializers.IntegerField(source="entry_id")
    kind = NamedChoiceField(LedgerEntry.Kind.choices, enum_name="LedgerEntryKind", source="entry.kind")
    amount = AmountField(help_text="Positive for a deposit, negative for a withdrawal.")
    tx_hash = serializers.CharField(source="entry.chain_tx_hash")
    log_index = serializers.IntegerField(source="entry.chain_log_index", allow_null=True)
    memo = serializers.CharField(source="entry.memo")
    created_at = serializers.DateTimeField(source="entry.created_at")


class DepositListApi(RenterApi):
    @extend_schema(
        tags=["billing"],
        summary="My deposits and withdrawals",
        description="Deposits credit the available balance once the escrow's Deposited event is seen on chain "
        "from a linked wallet; withdrawals debit it. Newest first.",
        responses={200: DepositSerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        return self.paginated_response(statements.renter_chain_movements(renter_id=self.renter.pk), DepositSerializer)


class ChargeSerializer(serializers.Serializer):
    lease = serializers.IntegerField()
    job = serializers.IntegerField()
    lease_status = NamedChoiceField(Lease.Status.choices, enum_name="LeaseStatus")
    gpu_count = serializers.IntegerField()
    price_per_gpu_hour = price_field()
    started_at = serializers.DateTimeField(allow_null=True)
    ended_at = serializers.DateTimeField(allow_null=True)
    billable_seconds = serializers.IntegerField()
    charge = AmountField(help_text="Cumulative charge of the lease so far (rounded down to a micro).")
    settled = AmountField(help_text="Part of the charge paid out on chain.")
    unsettled = AmountField(help_text="Part of the charge not yet paid out on chain.")
    final = serializers.BooleanField(help_text="The lease ended and its charge will not change again.")
    capped = serializers.BooleanField(help_text="The charge stopped at what the job's budget could pay.")
    updated_at = serializers.DateTimeField()


def _charge_rows(charges: list[LeaseCharge]) -> list[dict[str, object]]:
    money = statements.lease_money(lease_ids=[c.lease_id for c in charges])
    return [
        {
            "lease": c.lease_id,
            "job": c.lease.job_id,
            "lease_status": c.lease.status,
            "gpu_count": c.lease.gpu_count,
            "price_per_gpu_hour": c.lease.price_per_gpu_hour,
            "started_at": c.lease.started_at,
            "ended_at": c.lease.ended_at,
            "billable_seconds": c.billable_seconds,
            "charge": c.cumulative_micro,
            "settled": money[c.lease_id].settled,
            "unsettled": money[c.lease_id].unsettled,
            "final": c.final,
            "capped": c.capped,
            "updated_at": c.updated_at,
        }
        for c in charges
    ]


class ChargeListApi(RenterApi):
    @extend_schema(
        tags=["billing"],
        summary="What my leases were charged",
        description="One row per metered lease, newest first: seconds billed, cumulative charge, settled part.",
        responses={200: ChargeSerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        paginator, page = self.paginate(statements.renter_charges(renter_id=self.renter.pk))
        return paginator.get_paginated_response(ChargeSerializer(_charge_rows(page), many=True).data)


# --- renter: statements ---------------------------------------------------------------------


class StatementBudgetSerializer(serializers.Serializer):
    reserved = AmountField(help_text="Reserved at submission.")
    charged = AmountField(help_text="Charged by the job's leases (the sum of their charges).")
    released = AmountField(help_text="Given back to the available balance after the job ended.")
    remaining = AmountField(help_text="Still reserved: reserved − charged − released.")


class StatementLeaseSerializer(serializers.Serializer):
    lease = serializers.IntegerField(source="lease.pk")
    status = NamedChoiceField(Lease.Status.choices, enum_name="LeaseStatus", source="lease.status")
    end_reason = NamedChoiceField(
        Lease.EndReason.choices, enum_name="LeaseEndReason", source="lease.end_reason", allow_null=True
    )
    started_at = serializers.DateTimeField(source="lease.started_at", allow_null=True)
    ended_at = serializers.DateTimeField(source="lease.ended_at", allow_null=True)
    billable_seconds = serializers.IntegerField()
    gpu_count = serializers.IntegerField(source="lease.gpu_count")
    price_per_gpu_hour = price_field(source="lease.price_per_gpu_hour")
    charge = AmountField(help_text="floor(price × gpu_count × billable_seconds / 3600), in micro.")
    settled = AmountField(source="money.settled", help_text="Paid out on chain.")
    fee = AmountField(source="money.fee", help_text="The platform's fee out of the settled part.")
    provider_share = AmountField(source="money.provider_share", help_text="The provider's part of the settled part.")
    unsettled = AmountField(source="money.unsettled", help_text="Charged, not yet paid out on chain.")
    final = serializers.BooleanField()
    capped = serializers.BooleanField()


class JobStatementSerializer(serializers.Serializer):
    job = serializers.IntegerField(source="job.pk")
    status = serializers.CharField(source="job.status")
    budget = StatementBudgetSerializer()
    leases = StatementLeaseSerializer(many=True)
    settled = AmountField(help_text="Sum of the leases' settled parts.")
    fees = AmountField(help_text="Sum of the platform's fees on them.")
    unsettled = AmountField(help_text="Sum of the leases' unsettled parts.")


class JobStatementApi(RenterApi):
    @extend_schema(
        tags=["billing"],
        summary="The statement of one of my jobs",
        description="Its budget (reserved, charged, released, remaining) and each lease with its period, "
        "billed seconds, rate, charge, settled part and fee.",
        responses={200: JobStatementSerializer, **error_responses(401, 403, 404)},
    )
    def get(self, request: Request, job_id: int) -> Response:
        job = job_selectors.job_get_for_renter(renter=self.renter, job_id=job_id)
        return Response(JobStatementSerializer(statements.job_statement(job=job)).data)


class MonthQuery(StrictInputSerializer):
    # YYYY-MM from 1970-01 to 9999-12, the rule the schema states as the pattern.
    month = serializers.RegexField(
        r"^(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[1-9]|1[0-2])$",
        max_length=7,
        error_messages={"invalid": "Give a month from 1970-01 on as YYYY-MM, e.g. 2026-11."},
        help_text="The calendar month (UTC), as YYYY-MM, from 1970-01.",
    )

    def validate_month(self, value: str) -> tuple[int, int]:
        year, month = value.split("-")
        return int(year), int(month)


class MonthMovementSerializer(serializers.Serializer):
    kind = NamedChoiceField(LedgerEntry.Kind.choices, enum_name="LedgerEntryKind")
    count = serializers.IntegerField()
    amount = AmountField(help_text="Signed: what these movements added to the available balance.")


class MonthlyStatementSerializer(serializers.Serializer):
    month = serializers.CharField()
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    opening_balance = AmountField(help_text="Available balance at the start of the month.")
    movements = MonthMovementSerializer(many=True, help_text="Movements of the available balance, summed by kind.")
    closing_balance = AmountField(help_text="opening_balance + the movements.")
    charged = AmountField(help_text="What the renter's leases were charged during the month (from job budgets).")
    settled = AmountField(help_text="What of the renter's charges was paid out on chain during the month.")


class MonthlyStatementApi(RenterApi):
    @extend_schema(
        tags=["billing"],
        summary="My statement for one month",
        parameters=[MonthQuery],
        responses={200: MonthlyStatementSerializer, **error_responses(400, 401, 403)},
    )
    def get(self, request: Request) -> Response:
        query = MonthQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        year, month = query.validated_data["month"]
        statement = statements.monthly_statement(renter_id=self.renter.pk, year=year, month=month)
        return Response(MonthlyStatementSerializer(statement).data)


# --- renter: settlements --------------------------------------------------------------------


class RenterSettlementSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    status = NamedChoiceField(Settlement.Status.choices, enum_name="SettlementStatus")
    tx_hash = serializers.CharField()
    block_number = serializers.IntegerField(allow_null=True)
    fee_bps = serializers.IntegerField()
    my_items = serializers.IntegerField(help_text="How many of my leases it carried.")
    my_amount = AmountField(help_text="How much of my leases' charges it carried.")
    created_at = serializers.DateTimeField()
    submitted_at = serializers.DateTimeField(allow_null=True)
    confirmed_at = serializers.DateTimeField(allow_null=True)


class SettlementListApi(RenterApi):
    @extend_schema(
        tags=["billing"],
        summary="Settlements that paid my leases' charges",
        responses={200: RenterSettlementSerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        paginator, page = self.paginate(statements.renter_settlements(renter_id=self.renter.pk))
        share = statements.settlement_share(settlement_ids=[s.pk for s in page], renter_id=self.renter.pk)
        for settlement in page:
            # For RenterSettlementSerializer alone, not fields of the model.
            settlement.my_items, settlement.my_amount = share.get(settlement.pk, (0, 0))  # type: ignore[attr-defined]
        return paginator.get_paginated_response(RenterSettlementSerializer(page, many=True).data)


# --- renter: wallets ------------------------------------------------------------------------


class WalletSerializer(serializers.Serializer):
    address = serializers.CharField(help_text="Lowercase 0x address.")
    created_at = serializers.DateTimeField()


class WalletLinkInput(StrictInputSerializer):
    address = eth_address_field()
    signature = signature_field(
        help_text="personal_sign (EIP-191) by `address` of the exact text "
        '"Link wallet <address lowercase> to GPGPU renter <renter id>".',
    )


class WalletListApi(RenterApi):
    @extend_schema(
        tags=["billing"],
        summary="My linked wallets",
        responses={200: WalletSerializer(many=True), **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        return self.paginated_response(authorizations.renter_wallets(renter=self.renter), WalletSerializer)

    @extend_schema(
        tags=["billing"],
        summary="Link a wallet",
        description="Deposits from a linked wallet credit my balance, and it signs my jobs' budgets. Sign the "
        'exact text "Link wallet <address lowercase> to GPGPU renter <my renter id>" with personal_sign. '
        "Linking a wallet already mine again is harmless (200); a wallet linked to someone else is refused "
        "(400 wallet_taken).",
        request=WalletLinkInput,
        responses={
            201: OpenApiResponse(WalletSerializer, description="Linked."),
            200: OpenApiResponse(WalletSerializer, description="Already linked to me."),
            **error_responses(400, 401, 403, 413),
        },
    )
    def post(self, request: Request) -> Response:
        data = WalletLinkInput(data=request.data)
        data.is_valid(raise_exception=True)
        address = authorizations.wallet_signature_verify(renter=self.renter, **data.validated_data)
        existed = authorizations.renter_wallets(renter=self.renter).filter(address=address).exists()
        wallet = wallet_link(renter=self.renter, address=address)
        return Response(
            WalletSerializer(wallet).data, status=status.HTTP_200_OK if existed else status.HTTP_201_CREATED
        )


# --- renter: a job's budget authorization ---------------------------------------------------


class BudgetAuthorizationSerializer(serializers.Serializer):
    renter_address = serializers.CharField()
    max_amount = AmountField()
    deadline = serializers.DateTimeField()
    signature = serializers.CharField()
    status = NamedChoiceField(
        BudgetAuthorization.Status.choices,
        enum_name="BudgetAuthorizationStatus",
        help_text="Where the budget stands in the escrow: signed, reserving, reserved (the job may run), refused "
        "(see rejected_reason; the job was cancelled). The job is placed only once it is reserved.",
    )
    created_at = serializers.DateTimeField()
    activated_at = serializers.DateTimeField(
        allow_null=True, help_text="When the escrow reserved it; from then on it is fixed."
    )
    rejected_reason = serializers.SerializerMethodField(
        help_text="Why the escrow refused this signature, if it did (sign a fresh budget); empty otherwise."
    )

    def get_rejected_reason(self, stored: BudgetAuthorization) -> str:
        # A reason is about the signature it refused; a fresh signature has none yet.
        return stored.rejected_reason if stored.rejected_signature == stored.signature else ""


class BudgetOfferSerializer(serializers.Serializer):
    typed_data = serializers.DictField(
        help_text="EIP-712 typed data (domain, types, primaryType Budget, message {jobId, renter, maxAmount, "
        "deadline}) to sign with eth_signTypedData_v4."
    )
    authorization = BudgetAuthorizationSerializer(allow_null=True, help_text="What is stored now, if anything.")


class BudgetOfferQuery(StrictInputSerializer):
    address = eth_address_field(
        required=False, help_text="The wallet that will sign (default: my latest linked wallet)."
    )

    def validate_address(self, value: str) -> str:
        return value.lower()


class BudgetAuthorizationInput(StrictInputSerializer):
    """Checked whole before the escrow's chain is asked anything (400 comes before 503)."""

    renter_address = eth_address_field()
    max_amount = serializers.IntegerField(min_value=1, max_value=2**63 - 1, help_text="In micro.")
    deadline = serializers.IntegerField(min_value=1, max_value=MAX_DEADLINE, help_text="Unix time, seconds.")
    signature = signature_field(help_text="0x + 65 bytes hex, EIP-712 signature.")


def _authorization(job_id: int) -> ReturnDict | None:
    stored = BudgetAuthorization.objects.filter(job_id=job_id).first()
    return BudgetAuthorizationSerializer(stored).data if stored else None


class BudgetAuthorizationApi(RenterApi):
    @extend_schema(
        tags=["jobs"],
        summary="The budget of one of my jobs to sign for the escrow",
        description="typed_data is what to sign (maxAmount = the job's reserved budget in micro, deadline 30 days "
        "ahead); PUT the signature back with the same values. 409 wallet_not_linked without a linked wallet "
        "and no ?address=.",
        parameters=[BudgetOfferQuery],
        responses={
            200: BudgetOfferSerializer,
            **error_responses(400, 401, 403, 404, 409),
            503: CHAIN_UNAVAILABLE,
        },
    )
    def get(self, request: Request, job_id: int) -> Response:
        job = job_selectors.job_get_for_renter(renter=self.renter, job_id=job_id)
        query = BudgetOfferQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        typed = authorizations.budget_offer(
            job=job, renter_address=query.validated_data.get("address"), domain=authorizations.escrow_domain()
        )
        return Response({"typed_data": typed, "authorization": _authorization(job.pk)})

    @extend_schema(
        tags=["jobs"],
        summary="Store my signed budget for one of my jobs",
        description="The signature must recover renter_address (a wallet linked to me) over exactly the typed "
        "data for this job with these max_amount and deadline; max_amount must cover the job's reserved "
        "budget. The same body again is harmless; a changed one is refused once the budget is active on "
        "chain (409 authorization_active).",
        request=BudgetAuthorizationInput,
        responses={
            200: BudgetAuthorizationSerializer,
            **error_responses(400, 401, 403, 404, 409, 413),
            503: CHAIN_UNAVAILABLE,
        },
    )
    def put(self, request: Request, job_id: int) -> Response:
        job = job_selectors.job_get_for_renter(renter=self.renter, job_id=job_id)
        data = BudgetAuthorizationInput(data=request.data)
        data.is_valid(raise_exception=True)
        stored, _ = authorizations.budget_authorization_store(
            job=job, domain=authorizations.escrow_domain(), **data.validated_data
        )
        return Response(BudgetAuthorizationSerializer(stored).data)


# --- provider: earnings ---------------------------------------------------------------------


class OnChainSerializer(serializers.Serializer):
    reachable = serializers.BooleanField(help_text="Whether the chain node answered.")
    withdrawable = AmountField(
        allow_null=True, help_text="escrow.earnings(payout_address) now; null when the node is unreachable."
    )
    detail = serializers.CharField(help_text="Why it could not be read, when it could not.")


class HowToWithdrawSerializer(serializers.Serializer):
    chain_id = serializers.IntegerField(allow_null=True)
    escrow_address = serializers.CharField(allow_null=True)
    function = serializers.CharField(help_text='Always "withdrawEarnings()": it pays all your earnings at once.')
    caller = serializers.CharField(
        allow_null=True, help_text="Your payout address: the transaction must be sent from it."
    )
    instructions = serializers.CharField()


class EarningsSerializer(serializers.Serializer):
    earned = AmountField(help_text="Your share of confirmed settlements to date (after the platform's fee).")
    pending = AmountField(help_text="Charges of leases on your machines not yet settled, before the fee.")
    fee_bps = serializers.IntegerField(
        allow_null=True,
        help_text="The platform's fee now, in basis points of each settled charge: the escrow's (feeBps); when "
        "the chain node cannot be read, the fee the latest confirmed settlement paid at; null when neither is known.",
    )
    payable = AmountField(help_text="Earned and not yet withdrawn, by the ledger.")
    withdrawn = AmountField(help_text="Withdrawn from the escrow to date.")
    on_chain = OnChainSerializer()
    how_to_withdraw = HowToWithdrawSerializer()


class EarningsApi(ProviderApi):
    @extend_schema(
        tags=["billing"],
        summary="My earnings and how to withdraw them",
        description="Ledger figures always; the withdrawable amount is read from the escrow when the chain node "
        "answers (on_chain.reachable false otherwise, the request does not fail).",
        responses={200: EarningsSerializer, **error_responses(401, 403)},
    )
    def get(self, request: Request) -> Response:
        provider = self.provider
        figures = statements.provider_earnings(provider_id=provider.pk)
        payout = provider.payout_address.lower() or None
        chain = authorizations.escrow_earnings_read(payout_address=payout)
        where = f"the escrow {chain.escrow or '(address not known yet)'} on chain {chain.chain_id or '(unknown)'}"
        instructions = (
            f"Send a transaction from {payout} calling withdrawEarnings() on {where}; it pays out all your "
            "earnings at once."
            if payout
            else "Set a payout address first (PATCH /api/v1/provider/); settlements pay your earnings to it."
        )
        body = {
            "earned": figures.earned,
            "pending": figures.pending,
            "fee_bps": chain.fee_bps if chain.reachable else statements.fee_bps_last_settled(),
            "payable": figures.payable,
            "withdrawn": figures.withdrawn,
            "on_chain": {"reachable": chain.reachable, "withdrawable": chain.withdrawable, "detail": chain.detail},
            "how_to_withdraw": {
                "chain_id": chain.chain_id,
                "escrow_address": chain.escrow,
                "function": "withdrawEarnings()",
                "caller": payout,
                "instructions": instructions,
            },
        }
        return Response(EarningsSerializer(body).data)


# --- provider: one machine's use, day by day ----------------------------------------------


class MachineUsageDaySerializer(serializers.Serializer):
    date = serializers.DateField(source="day", help_text="The UTC day; today's row runs up to now.")
    idle_hours = serializers.FloatField(
        help_text="GPU-hours the machine's GPUs were idle on offer (not rented), summed over its GPUs, from its "
        "telemetry: hours it sent none count as not idle."
    )
    rented_hours = serializers.FloatField(help_text="GPU-hours rented: each lease's GPUs × its time in the day.")
    charged = AmountField(help_text="Metered charges of the machine's leases posted that day, before the fee.")
    earned = AmountField(
        help_text="Your share (after the fee) of the settlements of the machine's leases confirmed that day."
    )


class MachineUsageSerializer(serializers.Serializer):
    machine = serializers.IntegerField()
    timezone = serializers.CharField(help_text='Always "UTC": the days are UTC days.')
    days = MachineUsageDaySerializer(many=True, help_text="Oldest first, every day of the range (zeros included).")


class MachineUsageApi(ProviderApi):
    class UsageFilter(StrictInputSerializer):
        days = serializers.IntegerField(
            required=False,
            min_value=1,
            max_value=machine_usage.MAX_DAYS,
            default=machine_usage.DEFAULT_DAYS,
            help_text=f"How many UTC days, ending today (1 to {machine_usage.MAX_DAYS}, "
            f"default {machine_usage.DEFAULT_DAYS}).",
        )

    @extend_schema(
        tags=["billing"],
        summary="One of my machines, day by day: idle hours, rented hours and earnings",
        parameters=[UsageFilter],
        responses={200: MachineUsageSerializer, **error_responses(400, 401, 403, 404)},
    )
    def get(self, request: Request, machine_id: int) -> Response:
        filters = self.UsageFilter(data=request.query_params)
        filters.is_valid(raise_exception=True)
        machine = provider_selectors.machine_get_for_provider(provider=self.provider, machine_id=machine_id)
        days = machine_usage.machine_usage_by_day(machine_id=machine.pk, days=filters.validated_data["days"])
        return Response(MachineUsageSerializer({"machine": machine.pk, "timezone": "UTC", "days": days}).data)
