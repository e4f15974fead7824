"""Billing's REST API under /api/v1/ (see billing.apis)."""

from django.urls import path

from billing import apis

urlpatterns = [
    path("billing/balance/", apis.BalanceApi.as_view(), name="billing-balance"),
    path("billing/deposits/", apis.DepositListApi.as_view(), name="billing-deposit-list"),
    path("billing/charges/", apis.ChargeListApi.as_view(), name="billing-charge-list"),
    path("billing/statements/jobs/<int:job_id>/", apis.JobStatementApi.as_view(), name="billing-job-statement"),
    path("billing/statements/monthly/", apis.MonthlyStatementApi.as_view(), name="billing-monthly-statement"),
    path("billing/settlements/", apis.SettlementListApi.as_view(), name="billing-settlement-list"),
    path("billing/wallets/", apis.WalletListApi.as_view(), name="billing-wallet-list"),
    path("billing/earnings/", apis.EarningsApi.as_view(), name="billing-earnings"),
    # A provider's machine, day by day: here, above jobs (its leases) and the ledger.
    path("machines/<int:machine_id>/usage/", apis.MachineUsageApi.as_view(), name="machine-usage"),
    path(
        "jobs/<int:job_id>/budget-authorization/",
        apis.BudgetAuthorizationApi.as_view(),
        name="job-budget-authorization",
    ),
]
