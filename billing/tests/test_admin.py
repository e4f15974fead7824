"""The billing pages of the operator console: they render, the ledger cannot be edited there,
and "Retry selected settlements" drives each batch through the settlement service."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing import settlement as settlement_engine
from billing.errors import ValidationFailed
from billing.models import (
    BudgetAuthorization,
    BudgetReservation,
    ChainCursor,
    ChainLog,
    LeaseCharge,
    LedgerAccount,
    LedgerEntry,
    Posting,
    RenterWallet,
    Settlement,
    SettlementItem,
)
from billing.tests.support import new_job, run_lease
from tests.factories import RenterFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator() -> Client:
    user = get_user_model().objects.create_superuser("operator", "op@example.org", "pw")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def books() -> dict[str, Any]:
    """One of every billing row."""
    renter = RenterFactory()
    job = new_job(renter)
    lease = run_lease(job, seconds=600)
    batch = Settlement.objects.create(status=Settlement.Status.SUBMITTED, tx_hash="0x" + "aa" * 32, attempts=1)
    reservation = BudgetReservation.objects.create(
        status=BudgetReservation.Status.CONFIRMED, tx_hash="0x" + "dd" * 32, job_ids=[job.pk], reserved_count=1
    )
    SettlementItem.objects.create(
        settlement=batch, lease=lease, job=job, provider_address="0x" + "02" * 20,
        cumulative_micro=166_666, delta_micro=166_666,
    )  # fmt: skip
    return {
        "account": LedgerAccount.objects.get(kind="renter_available", owner_key=f"renter:{renter.pk}"),
        "entry": LedgerEntry.objects.get(kind="charge"),
        "charge": LeaseCharge.objects.get(lease=lease),
        "wallet": RenterWallet.objects.create(renter=renter, address="0x" + "03" * 20),
        "authorization": BudgetAuthorization.objects.create(
            job=job,
            renter_address="0x" + "03" * 20,
            max_amount=2_000_000,
            deadline=timezone.now() + timedelta(days=30),
            signature="0x" + "11" * 65,
            status=BudgetAuthorization.Status.RESERVED,
            reservation=reservation,
        ),
        "reservation": reservation,
        "settlement": batch,
        "log": ChainLog.objects.create(
            tx_hash="0x" + "bb" * 32,
            log_index=0,
            block_number=7,
            block_hash="0x" + "cc" * 32,
            event="Deposited",
            status=ChainLog.Status.UNMATCHED,
            address="0x" + "04" * 20,
        ),
        "cursor": ChainCursor.objects.create(name="escrow", last_block=7),
    }


def admin_url(obj: Any, view: str = "change") -> str:
    opts = obj._meta
    args = [] if view in ("changelist", "add") else [obj.pk]
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=args)


def test_every_billing_page_renders_its_list_and_its_rows(operator, books):
    for obj in books.values():
        listing = operator.get(admin_url(obj, "changelist"))
        page = operator.get(admin_url(obj))

        assert listing.status_code == 200, type(obj).__name__
        assert page.status_code == 200, type(obj).__name__


def test_a_ledger_entry_shows_its_postings_and_cannot_be_added_changed_or_deleted(operator, books):
    entry = books["entry"]
    amounts = sorted(Posting.objects.filter(entry=entry).values_list("amount", flat=True))

    page = operator.get(admin_url(entry)).content.decode()
    add = operator.get(admin_url(entry, "add"))
    change = operator.post(admin_url(entry), {"memo": "edited"})
    delete = operator.post(admin_url(entry, "delete"), {"post": "yes"})

    assert str(amounts[0]) in page and str(amounts[1]) in page
    assert 'name="_save"' not in page
    assert (add.status_code, change.status_code, delete.status_code) == (403, 403, 403)
    assert LedgerEntry.objects.get(pk=entry.pk).memo != "edited"


def test_settlement_page_shows_its_items_status_and_last_error(operator, books):
    batch = books["settlement"]
    Settlement.objects.filter(pk=batch.pk).update(last_error="node timed out")

    page = operator.get(admin_url(batch)).content.decode()

    assert batch.tx_hash in page and "node timed out" in page and "166666" in page


def test_retry_action_calls_the_settlement_service_and_reports_each_batch(operator, books, monkeypatch, settings):
    from billing.chain.client import ANVIL_DEV_KEY_0

    settings.CHAIN_OPERATOR_KEY, settings.CHAIN_OPERATOR_KEY_FILE = ANVIL_DEV_KEY_0, ""  # this process can sign
    stuck = books["settlement"]
    busy = Settlement.objects.create(status=Settlement.Status.PENDING)
    retried: list[int] = []

    def fake_retry(*, settlement: Settlement, client: Any = None) -> Settlement:
        retried.append(settlement.pk)
        if settlement.pk == busy.pk:
            raise ValidationFailed("A settlement run is in progress; try again shortly.", code="settlement_busy")
        Settlement.objects.filter(pk=settlement.pk).update(status=Settlement.Status.CONFIRMED, attempts=2)
        return Settlement.objects.get(pk=settlement.pk)

    monkeypatch.setattr(settlement_engine, "settlement_retry", fake_retry)

    response = operator.post(
        admin_url(stuck, "changelist"),
        {"action": "retry", "_selected_action": [stuck.pk, busy.pk]},
        follow=True,
    )

    texts = [str(m) for m in get_messages(response.wsgi_request)]
    assert retried == [stuck.pk, busy.pk]
    assert any(f"Settlement {stuck.pk}: submitted → confirmed" in t for t in texts), texts
    assert any(f"Settlement {busy.pk}: not retried" in t and "in progress" in t for t in texts), texts


def test_retry_in_a_process_without_the_operator_key_queues_the_workers_settlement_run(
    operator, books, monkeypatch, settings
):
    """docker-compose gives the operator's key to the worker and beat only: web's retry answered
    "not retried: no operator key" for every batch, whatever the operator did."""
    from billing import tasks

    settings.DEBUG = False  # no development key to fall back on
    settings.CHAIN_OPERATOR_KEY = ""
    settings.CHAIN_OPERATOR_KEY_FILE = ""
    queued: list[dict[str, Any]] = []
    retried: list[int] = []
    monkeypatch.setattr(tasks.settle, "apply_async", lambda **options: queued.append(options))
    monkeypatch.setattr(
        settlement_engine, "settlement_retry", lambda *, settlement, client=None: retried.append(settlement.pk)
    )
    stuck = books["settlement"]

    response = operator.post(
        admin_url(stuck, "changelist"), {"action": "retry", "_selected_action": [stuck.pk]}, follow=True
    )

    texts = [str(m) for m in get_messages(response.wsgi_request)]
    assert len(queued) == 1 and retried == []
    assert any("queued for the worker" in t and "CHAIN_OPERATOR_KEY" in t for t in texts), texts


def test_staff_who_may_only_view_settlements_cannot_retry_them(books, monkeypatch):
    """Retrying sends a settlement on chain: it was offered to anyone who could open the list."""
    from django.contrib.auth.models import Permission

    viewer = get_user_model().objects.create_user("vera", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_settlement"))
    client = Client()
    client.force_login(viewer)
    retried: list[int] = []
    monkeypatch.setattr(settlement_engine, "settlement_retry", lambda *, settlement, client=None: retried.append(1))
    stuck = books["settlement"]

    page = client.get(admin_url(stuck, "changelist"))
    client.post(admin_url(stuck, "changelist"), {"action": "retry", "_selected_action": [stuck.pk]}, follow=True)

    assert page.status_code == 200 and 'value="retry"' not in page.content.decode()
    assert retried == []
