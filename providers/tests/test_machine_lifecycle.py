"""A rig registered again, and a machine its provider removes (issue 8, item 7).

Registering a rig again with the same GPUs used to lock it out: every heartbeat answered 409
`gpu_uuid_taken` and no one could remove the old machine."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Job, Lease
from providers import services
from providers.models import GPU, Machine, Provider
from tests.factories import ProviderFactory, placed_lease, token_for

pytestmark = pytest.mark.django_db

API = "/api/agent/v1/"
UUIDS = ("GPU-rig-aaaa", "GPU-rig-bbbb")


def register(provider: Provider, hostname: str = "rig") -> tuple[Machine, APIClient]:
    """A machine registered with a fresh token, and a client holding its credential."""
    _, token = services.registration_token_create(provider=provider)
    machine, credential = services.machine_register(raw_token=token, hostname=hostname, agent_version="0.2.0")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {credential}")
    return machine, client


def beat(client: APIClient, uuids: tuple[str, ...] = UUIDS) -> Any:
    gpus = [
        {"uuid": uuid, "index": i, "model": "NVIDIA L4", "vram_mb": 23034, "idle": True} for i, uuid in enumerate(uuids)
    ]
    return client.post(API + "heartbeat", {"gpus": gpus, "leases": []}, format="json")


def test_a_rig_registered_again_takes_its_gpus_and_the_old_machine_is_retired() -> None:
    provider = ProviderFactory()
    old, old_client = register(provider, "rig-before-reinstall")
    assert beat(old_client).status_code == 200
    lease = placed_lease(machine=old, started=True)
    old_gpu_ids = set(GPU.objects.filter(machine=old).values_list("pk", flat=True))

    new, new_client = register(provider, "rig-after-reinstall")
    response = beat(new_client)

    assert response.status_code == 200, response.json()
    # The same GPU rows, with their history, now belong to the new machine.
    assert set(GPU.objects.filter(machine=new).values_list("pk", flat=True)) == old_gpu_ids
    assert sorted(GPU.objects.filter(machine=new).values_list("index", flat=True)) == [0, 1]
    old.refresh_from_db()
    assert old.credential_revoked_at is not None and old.status == Machine.Status.OFFLINE
    lease.refresh_from_db()
    assert (lease.status, lease.end_reason) == (Lease.Status.ENDED, "lost")
    # Nothing after its last sign of life is billed (here it started after that: no time at all).
    assert lease.ended_at == max(old.last_heartbeat_at, lease.started_at)
    assert Job.objects.get(pk=lease.job_id).status == Job.Status.PENDING
    refused = beat(old_client)
    assert refused.status_code == 401 and refused.json()["code"] == "credential_revoked"
    assert f"machine {new.pk}" in refused.json()["detail"]


def test_another_providers_rig_in_service_keeps_its_gpus() -> None:
    _, owner_client = register(ProviderFactory())
    assert beat(owner_client).status_code == 200

    _, intruder_client = register(ProviderFactory())
    response = beat(intruder_client)

    assert response.status_code == 409
    assert response.json()["code"] == "gpu_uuid_taken"
    assert "must remove the machine first" in response.json()["detail"]
    assert beat(owner_client).status_code == 200  # the owner's machine is untouched


def test_a_removed_machines_gpus_can_be_registered_by_their_next_owner() -> None:
    seller = ProviderFactory()
    sold, sold_client = register(seller)
    assert beat(sold_client).status_code == 200
    services.machine_remove(machine=sold, actor="provider:test")

    bought, buyer_client = register(ProviderFactory())
    response = beat(buyer_client)

    assert response.status_code == 200, response.json()
    assert GPU.objects.filter(machine=bought).count() == 2
    assert beat(sold_client).status_code == 401


def provider_client(provider: Provider) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(provider.user)}")
    return client


def test_a_provider_removes_an_idle_machine_and_it_leaves_their_fleet() -> None:
    provider = ProviderFactory()
    machine, agent = register(provider)
    assert beat(agent).status_code == 200
    client = provider_client(provider)

    response = client.delete(f"/api/v1/machines/{machine.pk}/")

    assert response.status_code == 204
    listed = client.get("/api/v1/machines/").json()["results"]
    assert machine.pk not in [m["id"] for m in listed]
    assert client.get(f"/api/v1/machines/{machine.pk}/").status_code == 404
    assert client.delete(f"/api/v1/machines/{machine.pk}/").status_code == 404
    assert beat(agent).json()["code"] == "credential_revoked"


def test_a_machine_running_a_lease_cannot_be_removed() -> None:
    provider = ProviderFactory()
    machine, agent = register(provider)
    assert beat(agent).status_code == 200
    lease = placed_lease(machine=machine, started=True)

    response = provider_client(provider).delete(f"/api/v1/machines/{machine.pk}/")

    assert response.status_code == 409
    assert response.json()["code"] == "machine_busy"
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RUNNING
    assert beat(agent).status_code == 200


def test_another_provider_cannot_remove_my_machine() -> None:
    machine, agent = register(ProviderFactory())
    assert beat(agent).status_code == 200

    response = provider_client(ProviderFactory()).delete(f"/api/v1/machines/{machine.pk}/")

    assert response.status_code == 404
    machine.refresh_from_db()
    assert machine.removed_at is None and beat(agent).status_code == 200


def test_the_operator_removes_machines_from_the_console_except_busy_ones(admin_client: Any) -> None:
    provider = ProviderFactory()
    idle, idle_agent = register(provider, "idle")
    assert beat(idle_agent, ("GPU-idle",)).status_code == 200
    busy, busy_agent = register(provider, "busy")
    assert beat(busy_agent, ("GPU-busy",)).status_code == 200
    placed_lease(machine=busy, started=True)

    response = admin_client.post(
        "/admin/providers/machine/",
        {"action": "remove", "_selected_action": [idle.pk, busy.pk]},
        follow=True,
    )

    assert response.status_code == 200
    idle.refresh_from_db()
    busy.refresh_from_db()
    assert idle.removed_at is not None and busy.removed_at is None
    text = response.content.decode()
    assert "Removed 1 machine(s)" in text and "machine_busy" not in text and "running 1 lease(s)" in text
    assert timezone.now() >= idle.removed_at
