"""Signed usage reports as the marketplace checks them: a machine that registered a signing
address gets a report stored only when it carries that key's EIP-712 signature over exactly its
fields (docs/agent-api.md, "Signed usage reports")."""

from __future__ import annotations

import secrets
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

# The agent's own package: the same code signs on providers' machines.
from gpgpu_agent.protocol import UsageStruct
from gpgpu_agent.signing import SigningKey, sign_usage
from jobs.models import Lease, UsageReport
from providers import services as provider_services
from providers.models import Machine
from tests.factories import agent_client, machine_with_gpus, placed_lease

pytestmark = pytest.mark.django_db

API = "/api/agent/v1/"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def signing_machine(key: SigningKey | None, gpus: int = 1) -> tuple[Machine, APIClient, Lease]:
    """A machine (with `key`'s address registered, or none) and a lease running on it for ten
    minutes."""
    machine = machine_with_gpus(count=gpus)
    if key is not None:
        Machine.objects.filter(pk=machine.pk).update(signing_address=key.address)
    client = agent_client(machine)
    lease = placed_lease(machine=machine, gpus=gpus)
    started = client.post(
        f"{API}leases/{lease.pk}/events",
        {"event_id": "start", "type": "started", "at": timezone.now().isoformat()},
        format="json",
    )
    assert started.status_code == 200, started.json()
    Lease.objects.filter(pk=lease.pk).update(started_at=timezone.now() - timedelta(minutes=10))
    lease.refresh_from_db()
    return machine, client, lease


def signed_body(
    lease: Lease, key: SigningKey, *, gpu_seconds: float = 57.345, chain_id: int = 31337, **measured: Any
) -> dict[str, Any]:
    """A usage report built and signed the way the agent does."""
    start = lease.started_at + timedelta(seconds=60)
    report = UsageStruct.measure(
        lease_id=lease.pk,
        report_id=measured.pop("report_id", secrets.token_hex(6)),
        period_start=start,
        period_end=start + timedelta(seconds=60),
        gpu_seconds=gpu_seconds,
        mean_utilization_pct=measured.pop("mean_utilization_pct", 93.57),
        peak_memory_mb=measured.pop("peak_memory_mb", 20480),
    )
    return {**report.to_wire(), "signature": sign_usage(report, key, chain_id=chain_id)}


def post_usage(client: APIClient, lease: Lease, body: dict[str, Any]):  # type: ignore[no-untyped-def]
    return client.post(f"{API}leases/{lease.pk}/usage", body, format="json")


def test_report_signed_by_the_machines_key_is_stored_as_verified(key: SigningKey) -> None:
    _, client, lease = signing_machine(key)
    body = signed_body(lease, key)

    resp = post_usage(client, lease, body)

    assert resp.status_code == 201, resp.json()
    report = UsageReport.objects.get()
    assert (report.report_id, report.gpu_seconds, report.mean_utilization_pct, report.peak_memory_mb) == (
        body["report_id"],
        Decimal("57.345"),
        93.57,
        20480,
    )
    assert report.signature == body["signature"]
    assert report.verified_signer == key.address


def test_repeating_a_signed_report_is_a_harmless_duplicate(key: SigningKey) -> None:
    _, client, lease = signing_machine(key)
    body = signed_body(lease, key)

    assert post_usage(client, lease, body).status_code == 201
    again = post_usage(client, lease, body)

    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert UsageReport.objects.count() == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gpu_seconds", "59.999"),
        ("mean_utilization_pct", 99.0),
        ("peak_memory_mb", 1024),
        ("report_id", "another-id"),
        ("mean_utilization_pct", None),
    ],
)
def test_a_field_changed_after_signing_is_refused_and_nothing_is_stored(
    key: SigningKey, field: str, value: object
) -> None:
    _, client, lease = signing_machine(key)
    body = signed_body(lease, key)
    body[field] = value

    resp = post_usage(client, lease, body)

    assert resp.status_code == 400
    assert resp.json()["code"] == "usage_signature_invalid"
    assert key.address in resp.json()["detail"]
    assert not UsageReport.objects.exists()


def test_a_changed_period_is_refused(key: SigningKey) -> None:
    _, client, lease = signing_machine(key)
    body = signed_body(lease, key)
    body["period_start"] = (lease.started_at + timedelta(seconds=30)).replace(microsecond=0).isoformat()

    resp = post_usage(client, lease, body)

    assert resp.status_code == 400
    assert resp.json()["code"] == "usage_signature_invalid"
    assert not UsageReport.objects.exists()


def test_a_report_signed_by_another_key_is_refused(key: SigningKey) -> None:
    _, client, lease = signing_machine(key)

    resp = post_usage(client, lease, signed_body(lease, SigningKey.generate()))

    assert resp.status_code == 400
    assert resp.json()["code"] == "usage_signature_invalid"
    assert not UsageReport.objects.exists()


@pytest.mark.parametrize("signature", [None, "", "0x" + "ab" * 65, "0x1234"])
def test_a_missing_or_malformed_signature_is_refused_when_the_machine_has_a_key(
    key: SigningKey, signature: str | None
) -> None:
    _, client, lease = signing_machine(key)
    body = signed_body(lease, key)
    if signature is None:
        del body["signature"]
    else:
        body["signature"] = signature

    resp = post_usage(client, lease, body)

    assert resp.status_code == 400
    assert resp.json()["code"] == "usage_signature_invalid"
    assert not UsageReport.objects.exists()


def test_a_signature_for_another_lease_does_not_carry_over(key: SigningKey) -> None:
    _, client, lease = signing_machine(key, gpus=2)
    body = signed_body(lease, key)
    # The same fields, signed for a lease id one higher, posted to this lease.
    report = UsageStruct.from_wire(
        lease_id=lease.pk + 1,
        report_id=body["report_id"],
        period_start=lease.started_at.replace(microsecond=0) + timedelta(seconds=60),
        period_end=lease.started_at.replace(microsecond=0) + timedelta(seconds=120),
        gpu_seconds=body["gpu_seconds"],
        mean_utilization_pct=body["mean_utilization_pct"],
        peak_memory_mb=body["peak_memory_mb"],
    )
    body["signature"] = sign_usage(report, key)

    resp = post_usage(client, lease, body)

    assert resp.status_code == 400
    assert resp.json()["code"] == "usage_signature_invalid"


def test_a_signed_report_with_a_fraction_of_a_second_is_refused_with_the_reason(key: SigningKey) -> None:
    _, client, lease = signing_machine(key)
    body = signed_body(lease, key)
    body["period_end"] = body["period_end"].replace("Z", ".250000Z")

    resp = post_usage(client, lease, body)

    assert resp.status_code == 400
    assert resp.json()["code"] == "usage_signature_invalid"
    assert "whole seconds" in resp.json()["detail"]


def test_a_correctly_signed_report_must_still_fit_the_lease(key: SigningKey) -> None:
    _, client, lease = signing_machine(key)

    resp = post_usage(client, lease, signed_body(lease, key, gpu_seconds=62))

    assert resp.status_code == 400
    assert resp.json()["code"] == "usage_gpu_seconds_exceeded"
    assert not UsageReport.objects.exists()


def test_the_chain_id_is_the_marketplaces_setting(key: SigningKey, settings: Any) -> None:
    _, client, lease = signing_machine(key)
    settings.GPGPU = {**settings.GPGPU, "USAGE_SIGNING_CHAIN_ID": 8453}

    wrong_chain = post_usage(client, lease, signed_body(lease, key))
    right_chain = post_usage(client, lease, signed_body(lease, key, chain_id=8453))

    assert wrong_chain.status_code == 400
    assert right_chain.status_code == 201, right_chain.json()


def test_register_tells_the_agent_which_chain_id_to_sign_for(api_client: APIClient, key: SigningKey) -> None:
    from tests.factories import ProviderFactory

    _, raw = provider_services.registration_token_create(provider=ProviderFactory(), label="rig")

    resp = api_client.post(
        API + "register",
        {"token": raw, "hostname": "rig", "agent_version": "0.1.0", "signing_address": key.address},
        format="json",
    )

    assert resp.status_code == 201
    assert resp.json()["usage_signing_chain_id"] == 31337


def test_a_machine_without_a_key_may_send_unsigned_reports_recorded_as_unsigned() -> None:
    _, client, lease = signing_machine(None)
    start = lease.started_at + timedelta(seconds=60)
    body = {
        "report_id": "old-agent-1",
        "period_start": start.isoformat(),
        "period_end": (start + timedelta(seconds=30.5)).isoformat(),
        "gpu_seconds": "30.250",
        "mean_utilization_pct": 93.5,
        "peak_memory_mb": 20480,
        "verified_signer": "0x" + "1" * 40,  # an agent cannot claim a verification
    }

    resp = post_usage(client, lease, body)

    assert resp.status_code == 201, resp.json()
    report = UsageReport.objects.get()
    assert report.signature == ""
    assert report.verified_signer == ""
