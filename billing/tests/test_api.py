"""Billing's REST API: what a renter sees of its money, statements that add up, wallets and job
budgets signed with a real key, and a provider's earnings read from the escrow (or not, when
the node is down)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from django.utils import timezone
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak

from billing import authorizations, services
from billing.chain import ChainClient
from billing.contract import SettlementItem as ChainItem
from billing.models import BudgetAuthorization, RenterWallet, Settlement, SettlementItem
from billing.tests.support import new_job, run_lease
from jobs.models import Lease
from tests.factories import RenterFactory

pytestmark = pytest.mark.django_db

WALLET = Account.from_key(keccak(text="billing api tests: renter wallet"))
OTHER_WALLET = Account.from_key(keccak(text="billing api tests: someone else"))
ESCROW = "0x" + "e5" * 20
TOKEN = "0x" + "70" * 20
CHAIN_ID = 31337


def micro(body: dict[str, Any]) -> int:
    return body["micro"]


def settle(lease: Lease, amount: int, *, ref: str, fee_bps: int = 1000) -> None:
    services.settlement_submit_record(lease_id=lease.pk, amount=amount, settlement_ref=ref)
    services.settlement_confirm_record(
        lease_id=lease.pk, amount=amount, fee_bps=fee_bps, settlement_ref=ref, tx_hash=f"0x{ref}"
    )


# --- balance, deposits, charges -------------------------------------------------------------


def test_balance_shows_available_reserved_unsettled_and_settled_money(renter_client):
    client, renter = renter_client  # funded with 10,000 tokens
    job = new_job(renter)  # budget 1.00 × 1 GPU × 7200 s = 2 tokens
    lease = run_lease(job, seconds=3600)  # 1 token charged
    settle(lease, 400_000, ref="s1")

    body = client.get("/api/v1/billing/balance/").json()

    assert body["available"] == {"tokens": "9998.000000", "micro": 9_998_000_000}
    assert micro(body["reserved"]) == 1_000_000
    assert micro(body["unsettled"]) == 600_000
    assert micro(body["in_settlement"]) == 0
    assert micro(body["settled"]) == 400_000
    assert micro(body["deposited"]) == 10_000_000_000
    assert micro(body["total"]) == 10_000_000_000 - 400_000


def test_deposits_list_shows_chain_references_and_withdrawals_of_this_renter_only(renter_client):
    client, renter = renter_client
    services.deposit_record(renter=renter, amount=5_000_000, tx_hash="0xabc", log_index=3)
    services.renter_withdrawal_record(renter=renter, amount=2_000_000, tx_hash="0xdef", log_index=1)
    services.deposit_record(renter=RenterFactory(), amount=7_000_000, tx_hash="0xother", log_index=0)

    body = client.get("/api/v1/billing/deposits/").json()

    assert body["count"] == 3  # the factory's funding, the deposit, the withdrawal
    withdrawal, deposit = body["results"][0], body["results"][1]
    assert (withdrawal["kind"], micro(withdrawal["amount"]), withdrawal["tx_hash"], withdrawal["log_index"]) == (
        "renter_withdrawal",
        -2_000_000,
        "0xdef",
        1,
    )
    assert (deposit["kind"], deposit["amount"]["tokens"], deposit["tx_hash"], deposit["log_index"]) == (
        "deposit",
        "5.000000",
        "0xabc",
        3,
    )
    assert "0xother" not in str(body)


def test_charges_list_each_lease_with_seconds_charge_and_settled_part(renter_client):
    client, renter = renter_client
    job = new_job(renter)
    lease = run_lease(job, seconds=1800)  # 0.5 token
    settle(lease, 200_000, ref="c1")
    run_lease(new_job(RenterFactory()), seconds=60)

    body = client.get("/api/v1/billing/charges/").json()

    assert body["count"] == 1
    [row] = body["results"]
    assert row["lease"] == lease.pk and row["job"] == job.pk
    assert row["billable_seconds"] == 1800
    assert micro(row["charge"]) == 500_000
    assert micro(row["settled"]) == 200_000
    assert micro(row["unsettled"]) == 300_000
    assert row["final"] is True


# --- statements -----------------------------------------------------------------------------


def test_job_statement_adds_up_over_two_leases_with_fees_and_release(renter_client):
    client, renter = renter_client
    job = new_job(renter)  # interruptible: an owner reclaim sends it back to the queue
    first = run_lease(job, seconds=1200, reason=Lease.EndReason.PREEMPTED_BY_OWNER)
    second = run_lease(job, seconds=2400, price="0.50")
    settle(first, 333_333, ref="j1")  # fee 10 %: 33_333
    services.budgets_release()

    body = client.get(f"/api/v1/billing/statements/jobs/{job.pk}/").json()

    charges = [micro(lease["charge"]) for lease in body["leases"]]
    assert [lease["lease"] for lease in body["leases"]] == [first.pk, second.pk]
    assert charges == [333_333, 333_333]  # 1200 s at 1.00, 2400 s at 0.50, each rounded down
    assert [lease["billable_seconds"] for lease in body["leases"]] == [1200, 2400]
    assert [lease["price_per_gpu_hour"] for lease in body["leases"]] == ["1.000000", "0.500000"]
    budget = body["budget"]
    assert micro(budget["reserved"]) == 2_000_000
    assert micro(budget["charged"]) == sum(charges)
    assert micro(budget["released"]) == 2_000_000 - sum(charges)
    assert micro(budget["remaining"]) == 0
    assert micro(body["leases"][0]["fee"]) == 33_333
    assert micro(body["leases"][0]["provider_share"]) == 300_000
    assert micro(body["settled"]) == 333_333 and micro(body["fees"]) == 33_333
    assert micro(body["unsettled"]) == 333_333


def test_another_renters_job_statement_is_not_found(renter_client):
    client, _ = renter_client
    theirs = new_job(RenterFactory())

    response = client.get(f"/api/v1/billing/statements/jobs/{theirs.pk}/")

    assert response.status_code == 404 and response.json()["code"] == "not_found"


def test_monthly_statement_opens_with_last_months_balance_and_closes_with_the_movements(renter_client, monkeypatch):
    client, renter = renter_client  # 10,000 tokens deposited now
    clock = {"now": datetime(2020, 10, 20, tzinfo=UTC)}
    monkeypatch.setattr(timezone, "now", lambda: clock["now"])
    services.deposit_record(renter=renter, amount=1_000_000, tx_hash="0xoct", log_index=0)
    clock["now"] = datetime(2020, 11, 3, tzinfo=UTC)
    services.deposit_record(renter=renter, amount=4_000_000, tx_hash="0xnov", log_index=0)
    job = new_job(renter, max_duration_s=3600)  # reserves 1 token
    clock["now"] = datetime(2020, 11, 28, tzinfo=UTC)
    services.renter_withdrawal_record(renter=renter, amount=500_000, tx_hash="0xout", log_index=0)
    clock["now"] = datetime(2020, 12, 1, tzinfo=UTC)
    services.deposit_record(renter=renter, amount=9_000_000, tx_hash="0xdec", log_index=0)
    monkeypatch.undo()
    assert job.pk

    body = client.get("/api/v1/billing/statements/monthly/", {"month": "2020-11"}).json()

    movements = {m["kind"]: (m["count"], micro(m["amount"])) for m in body["movements"]}
    assert micro(body["opening_balance"]) == 1_000_000
    assert movements == {"deposit": (1, 4_000_000), "reserve": (1, -1_000_000), "renter_withdrawal": (1, -500_000)}
    assert micro(body["closing_balance"]) == 1_000_000 + 4_000_000 - 1_000_000 - 500_000
    december = client.get("/api/v1/billing/statements/monthly/", {"month": "2020-12"}).json()
    assert december["opening_balance"] == body["closing_balance"]


@pytest.mark.parametrize("month", ["", "2026-13", "2026-1", "26-11", "2026-11-01"])
def test_monthly_statement_refuses_a_malformed_month(renter_client, month):
    client, _ = renter_client

    response = client.get("/api/v1/billing/statements/monthly/", {"month": month})

    assert response.status_code == 400 and response.json()["code"] == "invalid"


def test_settlements_list_those_that_carried_my_leases_with_status_and_tx_hash(renter_client):
    client, renter = renter_client
    lease = run_lease(new_job(renter), seconds=3600)
    theirs = run_lease(new_job(RenterFactory()), seconds=3600)
    mine = Settlement.objects.create(status=Settlement.Status.CONFIRMED, tx_hash="0x" + "ab" * 32, fee_bps=1000)
    SettlementItem.objects.create(
        settlement=mine, lease=lease, job=lease.job, provider_address="0x" + "01" * 20,
        cumulative_micro=1_000_000, delta_micro=1_000_000,
    )  # fmt: skip
    other = Settlement.objects.create(status=Settlement.Status.SUBMITTED, tx_hash="0x" + "cd" * 32)
    SettlementItem.objects.create(
        settlement=other, lease=theirs, job=theirs.job, provider_address="0x" + "01" * 20,
        cumulative_micro=1_000_000, delta_micro=1_000_000,
    )  # fmt: skip

    body = client.get("/api/v1/billing/settlements/").json()

    assert body["count"] == 1
    [row] = body["results"]
    assert (row["id"], row["status"], row["tx_hash"], row["my_items"]) == (mine.pk, "confirmed", mine.tx_hash, 1)
    assert micro(row["my_amount"]) == 1_000_000


# --- wallets --------------------------------------------------------------------------------


def link_signature(account: Any, renter_id: int, address: str | None = None) -> str:
    message = f"Link wallet {(address or account.address).lower()} to GPGPU renter {renter_id}"
    return "0x" + bytes(account.sign_message(encode_defunct(text=message)).signature).hex()


def test_a_wallet_is_linked_with_its_own_signature_and_relinking_is_harmless(renter_client):
    client, renter = renter_client
    body = {"address": WALLET.address, "signature": link_signature(WALLET, renter.pk)}

    first = client.post("/api/v1/billing/wallets/", body, format="json")
    again = client.post("/api/v1/billing/wallets/", body, format="json")

    assert first.status_code == 201, first.content
    assert first.json()["address"] == WALLET.address.lower()
    assert again.status_code == 200
    assert client.get("/api/v1/billing/wallets/").json()["count"] == 1


@pytest.mark.parametrize(
    "signature",
    [
        lambda renter: link_signature(OTHER_WALLET, renter.pk, WALLET.address),  # signed by another key
        lambda renter: link_signature(WALLET, renter.pk + 1),  # for another renter
        lambda renter: "0x" + "00" * 65,  # not a signature at all
    ],
)
def test_a_wallet_signature_by_anyone_else_is_refused_and_nothing_is_linked(renter_client, signature):
    client, renter = renter_client

    response = client.post(
        "/api/v1/billing/wallets/", {"address": WALLET.address, "signature": signature(renter)}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_signature"
    assert not RenterWallet.objects.exists()


def test_a_wallet_linked_to_another_renter_is_refused(renter_client):
    client, renter = renter_client
    RenterWallet.objects.create(renter=RenterFactory(), address=WALLET.address.lower())

    response = client.post(
        "/api/v1/billing/wallets/",
        {"address": WALLET.address, "signature": link_signature(WALLET, renter.pk)},
        format="json",
    )

    assert response.status_code == 400 and response.json()["code"] == "wallet_taken"


def test_a_malformed_wallet_request_is_refused_with_the_field(renter_client):
    client, _ = renter_client

    bad_address = client.post("/api/v1/billing/wallets/", {"address": "0x12", "signature": "x"}, format="json")
    unknown_key = client.post(
        "/api/v1/billing/wallets/", {"address": WALLET.address, "signature": "x", "x": 1}, format="json"
    )

    assert bad_address.status_code == 400 and "address" in bad_address.json()["fields"]
    assert unknown_key.status_code == 400 and "x" in unknown_key.json()["fields"]
    assert not RenterWallet.objects.exists()


# --- job budget authorization ---------------------------------------------------------------


@pytest.fixture
def escrow_settings(settings):  # type: ignore[no-untyped-def]
    settings.CHAIN_ID = CHAIN_ID
    settings.ESCROW_ADDRESS = ESCROW
    settings.TOKEN_ADDRESS = TOKEN
    return settings


def sign_typed(account: Any, typed: dict[str, Any]) -> str:
    return "0x" + bytes(Account.sign_typed_data(account.key, full_message=typed).signature).hex()


def put_body(typed: dict[str, Any], signature: str, **changes: Any) -> dict[str, Any]:
    message = typed["message"]
    body = {
        "renter_address": message["renter"],
        "max_amount": message["maxAmount"],
        "deadline": message["deadline"],
        "signature": signature,
    }
    return {**body, **changes}


@pytest.fixture
def linked(renter_client, escrow_settings):  # type: ignore[no-untyped-def]
    client, renter = renter_client
    RenterWallet.objects.create(renter=renter, address=WALLET.address.lower())
    return client, renter, new_job(renter)


def test_a_budget_signed_as_offered_is_stored_and_shown(linked):
    client, _, job = linked
    url = f"/api/v1/jobs/{job.pk}/budget-authorization/"

    offer = client.get(url).json()
    typed = offer["typed_data"]
    signature = sign_typed(WALLET, typed)
    response = client.put(url, put_body(typed, signature), format="json")

    assert offer["authorization"] is None
    assert typed["domain"]["chainId"] == CHAIN_ID
    assert typed["domain"]["verifyingContract"].lower() == ESCROW
    assert typed["message"]["jobId"] == job.pk
    assert typed["message"]["renter"] == WALLET.address
    assert typed["message"]["maxAmount"] == 2_000_000
    assert typed["message"]["deadline"] > timezone.now().timestamp() + 29 * 86400
    assert response.status_code == 200, response.content
    stored = BudgetAuthorization.objects.get(job=job)
    assert (stored.renter_address, stored.max_amount, stored.signature) == (
        WALLET.address.lower(),
        2_000_000,
        signature,
    )
    assert client.get(url).json()["authorization"]["signature"] == signature
    assert client.put(url, put_body(typed, signature), format="json").status_code == 200
    assert BudgetAuthorization.objects.count() == 1


def test_a_budget_signed_by_another_key_is_refused(linked):
    client, _, job = linked
    url = f"/api/v1/jobs/{job.pk}/budget-authorization/"
    typed = client.get(url).json()["typed_data"]

    response = client.put(url, put_body(typed, sign_typed(OTHER_WALLET, typed)), format="json")

    assert response.status_code == 400 and response.json()["code"] == "invalid_signature"
    assert not BudgetAuthorization.objects.exists()


def test_a_budget_whose_amount_differs_from_what_was_signed_is_refused(linked):
    client, _, job = linked
    url = f"/api/v1/jobs/{job.pk}/budget-authorization/"
    typed = client.get(url).json()["typed_data"]

    response = client.put(url, put_body(typed, sign_typed(WALLET, typed), max_amount=9_000_000), format="json")

    assert response.status_code == 400 and response.json()["code"] == "invalid_signature"


def test_a_budget_from_an_unlinked_wallet_is_refused(linked):
    client, _, job = linked
    url = f"/api/v1/jobs/{job.pk}/budget-authorization/"
    typed = client.get(url, {"address": OTHER_WALLET.address}).json()["typed_data"]

    response = client.put(url, put_body(typed, sign_typed(OTHER_WALLET, typed)), format="json")

    assert response.status_code == 400 and response.json()["code"] == "wallet_not_linked"
    assert not BudgetAuthorization.objects.exists()


def test_a_budget_below_the_jobs_reservation_is_refused(linked):
    client, _, job = linked
    url = f"/api/v1/jobs/{job.pk}/budget-authorization/"
    typed = client.get(url).json()["typed_data"]
    typed["message"]["maxAmount"] = 1_999_999

    response = client.put(url, put_body(typed, sign_typed(WALLET, typed)), format="json")

    assert response.status_code == 400 and response.json()["code"] == "budget_too_small"
    assert response.json()["needed"] == 2_000_000


def test_a_budget_whose_deadline_comes_before_a_run_of_the_job_and_its_settlement_is_refused(linked):
    """Past the deadline the escrow lets the renter take the job's budget back (releaseJob): a
    deadline a few minutes away would let them do it while the job runs, and leave its provider
    unpaid."""
    client, _, job = linked
    url = f"/api/v1/jobs/{job.pk}/budget-authorization/"
    typed = client.get(url).json()["typed_data"]
    earliest = int(timezone.now().timestamp()) + job.max_duration_s + 2 * 86400
    assert typed["message"]["deadline"] >= earliest  # the offer covers a run, placing and settling

    for deadline in (int(timezone.now().timestamp()) + 300, earliest - 60):
        typed["message"]["deadline"] = deadline
        response = client.put(url, put_body(typed, sign_typed(WALLET, typed)), format="json")

        assert response.status_code == 400 and response.json()["code"] == "deadline_too_soon", response.content
        assert earliest - 5 <= response.json()["earliest"] <= earliest + 5
        assert not BudgetAuthorization.objects.exists()

    typed["message"]["deadline"] = earliest + 60
    assert client.put(url, put_body(typed, sign_typed(WALLET, typed)), format="json").status_code == 200


def test_an_authorization_active_on_chain_cannot_change(linked):
    client, _, job = linked
    url = f"/api/v1/jobs/{job.pk}/budget-authorization/"
    typed = client.get(url).json()["typed_data"]
    client.put(url, put_body(typed, sign_typed(WALLET, typed)), format="json")
    BudgetAuthorization.objects.filter(job=job).update(activated_at=timezone.now())
    typed["message"]["maxAmount"] = 3_000_000

    response = client.put(url, put_body(typed, sign_typed(WALLET, typed)), format="json")

    assert response.status_code == 409 and response.json()["code"] == "authorization_active"
    assert BudgetAuthorization.objects.get(job=job).max_amount == 2_000_000


def test_the_budget_offer_needs_a_linked_wallet_or_an_address(renter_client, escrow_settings):
    client, renter = renter_client
    job = new_job(renter)

    response = client.get(f"/api/v1/jobs/{job.pk}/budget-authorization/")

    assert response.status_code == 409 and response.json()["code"] == "wallet_not_linked"


def test_the_budget_offer_is_503_when_the_escrow_cannot_be_found(renter_client, settings, monkeypatch):
    client, renter = renter_client
    settings.CHAIN_ID = None
    monkeypatch.setattr(authorizations, "chain_reader", unreachable_client)

    response = client.get(f"/api/v1/jobs/{new_job(renter).pk}/budget-authorization/", {"address": WALLET.address})

    assert response.status_code == 503 and response.json()["code"] == "chain_unavailable"


def test_the_offered_typed_data_is_what_the_escrow_contract_verifies(renter_client, tester_chain, settings):
    """The digest the renter signs equals the contract's own budgetDigest for the same budget."""
    from eth_account.messages import _hash_eip191_message, encode_typed_data

    client, renter = renter_client
    settings.CHAIN_ID = tester_chain.chain_id
    settings.ESCROW_ADDRESS = tester_chain.escrow.address
    settings.TOKEN_ADDRESS = tester_chain.token.address
    RenterWallet.objects.create(renter=renter, address=WALLET.address.lower())
    job = new_job(renter)

    typed = client.get(f"/api/v1/jobs/{job.pk}/budget-authorization/").json()["typed_data"]
    message = typed["message"]
    on_chain = tester_chain.escrow.functions.budgetDigest(
        (message["jobId"], message["renter"], message["maxAmount"], message["deadline"], b"")
    ).call()

    assert bytes(on_chain) == _hash_eip191_message(encode_typed_data(full_message=typed))


# --- provider earnings ----------------------------------------------------------------------


def unreachable_client() -> ChainClient:
    from web3 import Web3

    from billing.chain.anvil import free_port

    web3 = Web3(Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}", exception_retry_configuration=None))
    return ChainClient(web3, operator_account=WALLET)


def test_earnings_come_from_the_ledger_and_say_so_when_the_chain_is_unreachable(provider_client, monkeypatch):
    client, provider = provider_client
    monkeypatch.setattr(authorizations, "chain_reader", unreachable_client)
    lease = run_lease(new_job(RenterFactory()), seconds=3600, provider=provider)
    settle(lease, 600_000, ref="e1")  # provider 540_000, fee 60_000
    services.provider_withdrawal_record(provider=provider, amount=140_000, tx_hash="0xw", log_index=0)

    response = client.get("/api/v1/billing/earnings/")

    assert response.status_code == 200
    body = response.json()
    assert micro(body["earned"]) == 540_000
    assert micro(body["withdrawn"]) == 140_000
    assert micro(body["payable"]) == 400_000
    assert micro(body["pending"]) == 400_000
    assert body["on_chain"]["reachable"] is False
    assert body["on_chain"]["withdrawable"] is None
    assert body["on_chain"]["detail"]
    assert body["how_to_withdraw"]["function"] == "withdrawEarnings()"
    assert body["how_to_withdraw"]["caller"] == provider.payout_address.lower()
    assert body["fee_bps"] is None  # no node to ask, and no settlement confirmed yet

    # The fee the latest confirmed settlement paid at stands in for the escrow's.
    Settlement.objects.create(status=Settlement.Status.CONFIRMED, confirmed_at=timezone.now(), fee_bps=700)
    assert client.get("/api/v1/billing/earnings/").json()["fee_bps"] == 700


def test_earnings_read_the_escrows_balance_for_the_payout_address(provider_client, tester_chain, settings, monkeypatch):
    client, provider = provider_client
    payee = tester_chain.providers[0]
    provider.payout_address = payee.address
    provider.save(update_fields=["payout_address"])
    renter = tester_chain.renters[0]
    tester_chain.fund_renter(renter, 5_000_000)
    job_id = tester_chain.new_job_id()
    tester_chain.settle(
        [ChainItem(lease_id=1, job_id=job_id, provider=payee.address, cumulative_charge=1_000_000)],
        [tester_chain.budget(renter, job_id, 2_000_000)],
    )
    settings.CHAIN_ID = None
    settings.ESCROW_ADDRESS = tester_chain.escrow.address
    settings.TOKEN_ADDRESS = tester_chain.token.address
    monkeypatch.setattr(
        authorizations, "chain_reader", lambda: ChainClient(tester_chain.w3, operator_account=tester_chain.outsider)
    )

    body = client.get("/api/v1/billing/earnings/").json()

    assert body["on_chain"]["reachable"] is True
    assert micro(body["on_chain"]["withdrawable"]) == 950_000  # 1 token less the chain's 5 % fee
    assert settings.PLATFORM_FEE_BPS != 500 and body["fee_bps"] == 500  # the escrow's fee, not the deployment default
    how = body["how_to_withdraw"]
    assert how["escrow_address"] == tester_chain.escrow.address
    assert how["chain_id"] == tester_chain.chain_id
    assert how["caller"] == payee.address.lower()
    assert "withdrawEarnings()" in how["instructions"]


def test_renters_and_providers_cannot_read_each_others_billing(renter_client, provider_client):
    renter, _ = renter_client
    provider, _ = provider_client

    assert renter.get("/api/v1/billing/earnings/").json()["code"] == "not_a_provider"
    assert provider.get("/api/v1/billing/balance/").json()["code"] == "not_a_renter"
    assert provider.get("/api/v1/billing/balance/").status_code == 403


def test_a_user_without_a_token_gets_401(api_client):
    assert api_client.get("/api/v1/billing/balance/").status_code == 401
