"""A renter's money from deposit to the provider's wallet, on a real anvil node.

Deploy the escrow; a renter links a wallet and deposits on chain; the watcher credits it; a job is
submitted through the API (its budget reserved) and its budget signed through the API; a lease
runs and is metered; the settlement engine pays the provider on chain; the provider withdraws
its earnings and the watcher records it; the operator closes the job's unspent reservation on
chain. At the end `ledger_check` passes and every balance the escrow holds equals the ledger's.

anvil comes from `npm ci`; without it this test is skipped locally and fails when CI is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_utils import keccak
from rest_framework.test import APIClient
from web3 import Web3

from billing import services
from billing.chain import ChainClient
from billing.chain.anvil import anvil_binary, anvil_running
from billing.chain.client import ANVIL_DEV_KEY_0
from billing.chain.deployment import deployment_ensure
from billing.contract import ESCROW, STABLECOIN
from billing.deposits import chain_watch
from billing.models import ChainLog, Settlement
from billing.release import jobs_release_on_chain
from billing.selectors import account_balance, provider_payable_micro, renter_available_micro
from billing.settlement import settle_run
from jobs.models import Job, Lease, UsageReport
from jobs.services import lease_end
from tests.factories import RenterFactory, machine_with_gpus, placed_lease, token_for

pytestmark = pytest.mark.django_db(transaction=True)

ONE = 10**6


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    if anvil_binary() is None:
        message = "anvil binary missing (run `npm ci`): the end-to-end billing test did not run"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with anvil_running() as w3:
        yield w3.provider.endpoint_uri


def _account(label: str):  # type: ignore[no-untyped-def]
    return Account.from_key(keccak(text=f"gpgpu billing end to end: {label}"))


def test_money_flows_from_a_deposit_to_the_provider_and_the_ledger_equals_the_chain(anvil_url, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    settings.CHAIN_RPC_URL = anvil_url
    settings.CHAIN_CONFIRMATIONS = 1
    operator = ChainClient(
        Web3(Web3.HTTPProvider(anvil_url, request_kwargs={"timeout": 30})),
        operator_account=Account.from_key(ANVIL_DEV_KEY_0),
        poll_interval_s=0.05,
        receipt_timeout_s=30,
    )
    deployment, _ = deployment_ensure(client=operator, treasury=operator.address, fee_bps=1000, dev_token=True)
    escrow = operator.contract(ESCROW, deployment.escrow)
    token = operator.contract(STABLECOIN, deployment.token)

    # Given a renter (API token) with a wallet holding 10 tokens, and a provider whose payout key we hold.
    renter = RenterFactory(funds=0)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_for(renter.user)}")
    wallet, payee = _account(f"renter {tmp_path.name}"), _account(f"provider {tmp_path.name}")
    for account in (wallet, payee):
        operator.wait_receipt(operator.send_value(account.address, 10**18).hash)
    as_renter, as_payee = operator.for_account(wallet), operator.for_account(payee)
    machine = machine_with_gpus(count=1)
    provider = machine.provider
    provider.payout_address = payee.address
    provider.save(update_fields=["payout_address"])

    # The renter links its wallet (EIP-191 signature) and deposits on chain; the watcher credits it.
    message = f"Link wallet {wallet.address.lower()} to GPGPU renter {renter.pk}"
    signature = "0x" + bytes(wallet.sign_message(encode_defunct(text=message)).signature).hex()
    linked = api.post("/api/v1/billing/wallets/", {"address": wallet.address, "signature": signature}, format="json")
    assert linked.status_code == 201, linked.json()
    for call in (
        token.functions.mint(wallet.address, 10 * ONE),
        token.functions.approve(escrow.address, 10 * ONE),
        escrow.functions.deposit(10 * ONE),
    ):
        as_renter.wait_receipt(as_renter.transact(call).hash)
    assert chain_watch(client=operator, deployment=deployment).credited == 1
    assert api.get("/api/v1/billing/balance/").json()["available"]["micro"] == 10 * ONE

    # A job is submitted through the API: its budget (1.00/GPU-hour × 2 h = 2 tokens) is reserved.
    submitted = api.post(
        "/api/v1/jobs/",
        {
            "kind": "process",
            "command": ["python3", "-c", "print('training')"],
            "gpu_count": 1,
            "max_price_per_gpu_hour": "1.00",
            "expected_duration_s": 3600,
            "max_duration_s": 7200,
        },
        format="json",
    )
    assert submitted.status_code == 201, submitted.json()
    job_id = submitted.json()["id"]
    assert renter_available_micro(renter_id=renter.pk) == 8 * ONE

    # The renter signs exactly the typed data the API offers and stores the signature.
    offer = api.get(f"/api/v1/jobs/{job_id}/budget-authorization/").json()
    typed = offer["typed_data"]
    assert typed["message"]["maxAmount"] == 2 * ONE and offer["authorization"] is None
    budget_signature = "0x" + bytes(wallet.sign_message(encode_typed_data(full_message=typed)).signature).hex()
    stored = api.put(
        f"/api/v1/jobs/{job_id}/budget-authorization/",
        {
            "renter_address": wallet.address.lower(),
            "max_amount": typed["message"]["maxAmount"],
            "deadline": typed["message"]["deadline"],
            "signature": budget_signature,
        },
        format="json",
    )
    assert stored.status_code == 200, stored.json()

    # A lease runs for one hour (reported by usage), ends, and is finally metered: 1 token.
    started = timezone.now() - timedelta(hours=3)
    lease = placed_lease(job=Job.objects.get(pk=job_id), machine=machine, price="1.00", started=started)
    UsageReport.objects.create(
        lease=lease, report_id="hour", period_start=started, period_end=started + timedelta(hours=1), gpu_seconds=1
    )
    lease_end(
        lease_id=lease.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", exit_code=0, at=started + timedelta(hours=1)
    )
    services.leases_meter()
    charges = api.get("/api/v1/billing/charges/").json()["results"]
    assert len(charges) == 1 and charges[0]["lease"] == lease.pk
    assert charges[0]["charge"]["micro"] == ONE and charges[0]["final"] is True
    assert Job.objects.get(pk=job_id).status == Job.Status.SUCCEEDED

    # The settlement is sent to anvil and confirms: 0.9 to the provider, 0.1 fee.
    result = settle_run(client=operator, deployment=deployment, force=True)
    assert result["confirmed"] == 1, result
    settlement = Settlement.objects.get()
    assert settlement.status == Settlement.Status.CONFIRMED and settlement.tx_hash.startswith("0x")
    assert int(escrow.functions.earnings(payee.address).call()) == 900_000
    assert provider_payable_micro(provider_id=provider.pk) == 900_000

    # The provider withdraws on chain from its payout address; the watcher records it.
    as_payee.wait_receipt(as_payee.transact(escrow.functions.withdrawEarnings()).hash)
    assert chain_watch(client=operator, deployment=deployment).credited == 1
    assert ChainLog.objects.get(event="EarningsWithdrawn").status == "credited"
    assert provider_payable_micro(provider_id=provider.pk) == 0
    assert int(token.functions.balanceOf(payee.address).call()) == 900_000

    # The ledger releases the unspent token; the operator closes the reservation on chain.
    assert services.budgets_release()["released"] == 1
    assert jobs_release_on_chain(client=operator, deployment=deployment)["released"] == 1
    assert escrow.functions.job(job_id).call()[5] is True  # closed
    assert chain_watch(client=operator, deployment=deployment).credited == 0  # the release moves no token

    # The ledger checks out and equals the chain.
    call_command("ledger_check")
    assert int(escrow.functions.availableBalance(wallet.address).call()) == 9 * ONE
    assert renter_available_micro(renter_id=renter.pk) == 9 * ONE
    assert int(escrow.functions.earnings(payee.address).call()) == provider_payable_micro(provider_id=provider.pk)
    assert int(escrow.functions.feesAccrued().call()) == account_balance(kind="platform_fees") == 100_000
    assert int(token.functions.balanceOf(escrow.address).call()) == -account_balance(kind="escrow_chain")
