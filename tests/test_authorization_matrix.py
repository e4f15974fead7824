"""Who may call what on /api/v1/: anonymous callers get 401, renters and providers get 403 on
the other role's endpoints, and another user's objects are 404 (their existence does not leak).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Job
from providers.models import GPU, AvailabilityWindow, Blackout, Machine
from tests.factories import (
    GPUFactory,
    JobFactory,
    MachineFactory,
    ProviderFactory,
    RenterFactory,
    placed_lease,
    token_for,
)
from tests.module_db import built_once

pytestmark = pytest.mark.django_db

JOB_BODY = {
    "kind": "process",
    "command": ["true"],
    "gpu_count": 1,
    "max_price_per_gpu_hour": "1.00",
    "expected_duration_s": 60,
}
WINDOW_BODY = {"days": ["mon"], "start_time": "20:00", "end_time": "08:00", "timezone": "UTC"}
BLACKOUT_BODY = {"starts_at": "2030-01-01T00:00:00Z", "ends_at": "2030-01-02T00:00:00Z"}

# (method, path template, body). Templates name the object of the *owner* in the world below.
ANY_USER_ENDPOINTS = [
    ("get", "/api/v1/me", None),
    ("get", "/api/v1/gpus/", None),
]
RENTER_COLLECTION_ENDPOINTS = [
    ("get", "/api/v1/jobs/", None),
    ("post", "/api/v1/jobs/", JOB_BODY),
    ("get", "/api/v1/leases/", None),
    ("get", "/api/v1/billing/balance/", None),
    ("get", "/api/v1/billing/deposits/", None),
    ("get", "/api/v1/billing/charges/", None),
    ("get", "/api/v1/billing/statements/monthly/?month=2026-11", None),
    ("get", "/api/v1/billing/settlements/", None),
    ("get", "/api/v1/billing/wallets/", None),
]
RENTER_OBJECT_ENDPOINTS = [
    ("get", "/api/v1/jobs/{job}/", None),
    ("post", "/api/v1/jobs/{job}/cancel/", None),
    ("get", "/api/v1/jobs/{job}/leases/", None),
    ("get", "/api/v1/jobs/{job}/events/", None),
    ("get", "/api/v1/leases/{lease}/", None),
    ("get", "/api/v1/leases/{lease}/telemetry/", None),
    ("get", "/api/v1/billing/statements/jobs/{job}/", None),
    ("get", "/api/v1/jobs/{job}/budget-authorization/?address=0x" + "ab" * 20, None),
]
# Renter writes whose success needs a signature made for the caller: checked for 401/403/404 only.
RENTER_SIGNED_WRITES = [
    ("post", "/api/v1/billing/wallets/", {"address": "0x" + "ab" * 20, "signature": "0x" + "00" * 65}),
    (
        "put",
        "/api/v1/jobs/{job}/budget-authorization/",
        {"renter_address": "0x" + "ab" * 20, "max_amount": 1, "deadline": 4_000_000_000, "signature": "0x" + "00" * 65},
    ),
]
PROVIDER_COLLECTION_ENDPOINTS = [
    ("get", "/api/v1/machines/", None),
    ("get", "/api/v1/provider/", None),
    ("patch", "/api/v1/provider/", {"display_name": "renamed"}),
    ("get", "/api/v1/availability-windows/", None),
    ("post", "/api/v1/availability-windows/", WINDOW_BODY),
    ("get", "/api/v1/blackouts/", None),
    ("post", "/api/v1/blackouts/", BLACKOUT_BODY),
    ("get", "/api/v1/registration-tokens/", None),
    ("post", "/api/v1/registration-tokens/", {"label": "x"}),
    ("get", "/api/v1/billing/earnings/", None),
]
PROVIDER_OBJECT_ENDPOINTS = [
    ("get", "/api/v1/machines/{machine}/", None),
    ("get", "/api/v1/machines/{machine}/usage/", None),
    ("patch", "/api/v1/machines/{machine}/gpus/{gpu}/", {"price_floor": "0.99"}),
    ("post", "/api/v1/machines/{machine}/credential/rotate/", {}),
    ("post", "/api/v1/machines/{machine}/credential/revoke/", {"reason": "test"}),
    ("get", "/api/v1/availability-windows/{window}/", None),
    ("put", "/api/v1/availability-windows/{window}/", WINDOW_BODY),
    ("patch", "/api/v1/availability-windows/{window}/", {"timezone": "Europe/Paris"}),
    ("delete", "/api/v1/availability-windows/{window}/", None),
    ("get", "/api/v1/blackouts/{blackout}/", None),
    ("delete", "/api/v1/blackouts/{blackout}/", None),
]
RENTER_ENDPOINTS = RENTER_COLLECTION_ENDPOINTS + RENTER_OBJECT_ENDPOINTS
PROVIDER_ENDPOINTS = PROVIDER_COLLECTION_ENDPOINTS + PROVIDER_OBJECT_ENDPOINTS
ALL_ENDPOINTS = ANY_USER_ENDPOINTS + RENTER_ENDPOINTS + PROVIDER_ENDPOINTS


def client_with(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


def client_for(user: Any) -> APIClient:
    return client_with(token_for(user))


Rows = tuple[dict[str, dict[str, int]], dict[str, str]]  # ids by owner, API tokens by owner


@dataclass
class World:
    """Two renters and two providers, each owning one of everything."""

    ids: dict[str, dict[str, int]]
    renter: APIClient
    other_renter: APIClient
    provider: APIClient
    other_provider: APIClient

    def url(self, template: str, owner: str) -> str:
        return template.format(**self.ids[owner])


def _provider_objects() -> tuple[Any, dict[str, int]]:
    provider = ProviderFactory()
    machine = MachineFactory(provider=provider)
    gpu = GPUFactory(machine=machine, index=0)
    window = AvailabilityWindow.objects.create(
        provider=provider, machine=machine, days=1, start_time="20:00", end_time="08:00", timezone="UTC"
    )
    blackout = Blackout.objects.create(
        provider=provider, starts_at=timezone.now() + timedelta(days=1), ends_at=timezone.now() + timedelta(days=2)
    )
    return provider, {"machine": machine.pk, "gpu": gpu.pk, "window": window.pk, "blackout": blackout.pk}


def _renter_objects() -> tuple[Any, dict[str, int]]:
    renter = RenterFactory()
    job = JobFactory(renter=renter)
    lease = placed_lease(job=job)
    return renter, {"job": job.pk, "lease": lease.pk}


@pytest.fixture(autouse=True)
def _escrow_known(settings):  # type: ignore[no-untyped-def]
    """The escrow's domain is configured, so budget offers need no chain node."""
    settings.CHAIN_ID = 31337
    settings.ESCROW_ADDRESS = "0x" + "e5" * 20
    settings.TOKEN_ADDRESS = "0x" + "70" * 20


@pytest.fixture(scope="module")
def world_rows(django_db_setup: Any, django_db_blocker: Any) -> Iterator[Rows]:
    """Two renters and two providers with their objects and API tokens, built once for the
    module: every test reads the same rows, and what a test changes is rolled back after it."""
    with built_once(django_db_blocker):
        ids, tokens = {}, {}
        for owner, build in (
            ("renter", _renter_objects),
            ("other_renter", _renter_objects),
            ("provider", _provider_objects),
            ("other_provider", _provider_objects),
        ):
            user_owner, ids[owner] = build()
            tokens[owner] = token_for(user_owner.user)
        yield ids, tokens


@pytest.fixture
def world(db: Any, world_rows: Rows) -> World:
    ids, tokens = world_rows
    return World(
        ids=ids,
        renter=client_with(tokens["renter"]),
        other_renter=client_with(tokens["other_renter"]),
        provider=client_with(tokens["provider"]),
        other_provider=client_with(tokens["other_provider"]),
    )


def call(client: APIClient, method: str, url: str, body: dict[str, Any] | None) -> Any:
    return getattr(client, method)(url, body, format="json") if body is not None else getattr(client, method)(url)


def _owner_of(template: str) -> str:
    return "provider" if template in {t for _, t, _ in PROVIDER_ENDPOINTS} else "renter"


@pytest.mark.parametrize(("method", "template", "body"), ALL_ENDPOINTS)
def test_anonymous_callers_get_401_with_the_error_shape(world, method, template, body):
    response = call(APIClient(), method, world.url(template, _owner_of(template)), body)

    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
    assert response.json()["detail"]
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize(("method", "template", "body"), ALL_ENDPOINTS)
def test_a_revoked_or_unknown_token_gets_401(world, method, template, body):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token gpg_not-a-real-token")

    response = call(client, method, world.url(template, _owner_of(template)), body)

    assert response.status_code == 401
    assert response.json()["code"] == "authentication_failed"


@pytest.mark.parametrize(("method", "template", "body"), RENTER_ENDPOINTS)
def test_a_provider_only_user_gets_403_on_renter_endpoints(world, method, template, body):
    response = call(world.provider, method, world.url(template, "renter"), body)

    assert response.status_code == 403
    assert response.json()["code"] == "not_a_renter"


@pytest.mark.parametrize(("method", "template", "body"), PROVIDER_ENDPOINTS)
def test_a_renter_only_user_gets_403_on_provider_endpoints(world, method, template, body):
    response = call(world.renter, method, world.url(template, "provider"), body)

    assert response.status_code == 403
    assert response.json()["code"] == "not_a_provider"


@pytest.mark.parametrize(("method", "template", "body"), RENTER_OBJECT_ENDPOINTS)
def test_another_renters_job_or_lease_is_not_found(world, method, template, body):
    response = call(world.renter, method, world.url(template, "other_renter"), body)

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert Job.objects.get(pk=world.ids["other_renter"]["job"]).status == Job.Status.SCHEDULED


@pytest.mark.parametrize(("method", "template", "body"), PROVIDER_OBJECT_ENDPOINTS)
def test_another_providers_objects_are_not_found_and_unchanged(world, method, template, body):
    theirs = world.ids["other_provider"]

    response = call(world.provider, method, world.url(template, "other_provider"), body)

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert AvailabilityWindow.objects.get(pk=theirs["window"]).timezone == "UTC"
    assert Blackout.objects.filter(pk=theirs["blackout"]).exists()
    assert GPU.objects.get(pk=theirs["gpu"]).price_floor is None
    machine = Machine.objects.get(pk=theirs["machine"])
    assert machine.credential_revoked_at is None and not machine.credential_revocations.exists()


@pytest.mark.parametrize(("method", "template", "body"), RENTER_ENDPOINTS)
def test_a_renter_may_use_every_renter_endpoint_on_its_own_objects(world, method, template, body):
    response = call(world.renter, method, world.url(template, "renter"), body)

    assert response.status_code in (200, 201), response.content


@pytest.mark.parametrize(("method", "template", "body"), PROVIDER_ENDPOINTS)
def test_a_provider_may_use_every_provider_endpoint_on_its_own_objects(world, method, template, body):
    response = call(world.provider, method, world.url(template, "provider"), body)

    assert response.status_code in (200, 201, 204), response.content


@pytest.mark.parametrize(("method", "template", "body"), ANY_USER_ENDPOINTS)
def test_any_signed_in_user_may_use_the_shared_endpoints(world, method, template, body):
    for client in (world.renter, world.provider):
        assert call(client, method, template, body).status_code == 200


def test_me_tells_each_user_its_roles(world, db):
    both = ProviderFactory()
    RenterFactory(user=both.user)

    renter_me = world.renter.get("/api/v1/me").json()
    provider_me = world.provider.get("/api/v1/me").json()
    both_me = client_for(both.user).get("/api/v1/me").json()

    assert renter_me["roles"] == ["renter"]
    assert renter_me["provider"] is None
    assert provider_me["roles"] == ["provider"]
    assert provider_me["renter"] is None
    assert both_me["roles"] == ["renter", "provider"]
    assert both_me["provider"]["id"] == both.pk
    assert both_me["username"] == both.user.username


def test_a_user_who_is_both_renter_and_provider_may_use_both_sides(db):
    provider = ProviderFactory(default_price_floor=Decimal("0.30"))
    RenterFactory(user=provider.user)
    client = client_for(provider.user)

    assert client.post("/api/v1/jobs/", JOB_BODY, format="json").status_code == 201
    assert client.get("/api/v1/machines/").status_code == 200
    assert client.get("/api/v1/provider/").json()["default_price_floor"] == "0.300000"


@pytest.mark.parametrize(("method", "template", "body"), RENTER_SIGNED_WRITES)
def test_signed_renter_writes_refuse_strangers_providers_and_other_renters_jobs(world, method, template, body):
    anonymous = call(APIClient(), method, world.url(template, "renter"), body)
    provider = call(world.provider, method, world.url(template, "renter"), body)
    theirs = call(world.renter, method, world.url(template, "other_renter"), body)

    assert anonymous.status_code == 401
    assert (provider.status_code, provider.json()["code"]) == (403, "not_a_renter")
    if "{job}" in template:
        assert (theirs.status_code, theirs.json()["code"]) == (404, "not_found")
