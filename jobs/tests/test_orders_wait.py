"""The agent's doorbell (POST /api/agent/v1/orders/wait): held open until the machine has a new
order, answered at once when it has one, never ringing twice for the same one."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Lease
from jobs.services import job_cancel
from providers import services
from providers.models import Machine
from tests.factories import GPUFactory, JobFactory, MachineFactory, placed_lease

API = "/api/agent/v1/"


def agent(machine: Machine) -> APIClient:
    raw = f"gpm_test_{secrets.token_urlsafe(16)}"
    Machine.objects.filter(pk=machine.pk).update(credential_digest=services.secret_digest(raw))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")
    return client


def wait(client: APIClient, wait_s: float, since: Any = None) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    body = {"wait_s": wait_s, "since": since.isoformat() if since else None}
    resp = client.post(API + "orders/wait", body, format="json")
    assert resp.status_code == 200, resp.content
    return resp.json(), time.monotonic() - started


@pytest.fixture
def held(settings: Any) -> None:
    settings.GPGPU = {**settings.GPGPU, "AGENT_ORDERS_WAIT_S": 25}


@pytest.mark.django_db
def test_a_machine_with_nothing_new_is_answered_empty_after_the_wait(held: None) -> None:
    client = agent(MachineFactory())
    answer, took = wait(client, 0.6)
    assert answer == {"orders": False, "wait_s": 25.0}
    assert 0.5 <= took < 3


@pytest.mark.django_db
def test_a_lease_not_yet_handed_over_rings_at_once_and_not_after_its_heartbeat(held: None) -> None:
    lease = placed_lease(job=JobFactory())
    client = agent(Machine.objects.get(pk=lease.machine_id))
    before = lease.created_at - timezone.timedelta(seconds=1)

    answer, took = wait(client, 10, since=before)
    assert answer["orders"] is True and took < 2

    # The heartbeat hands it over; later doorbells (since that heartbeat) stay quiet.
    Lease.objects.filter(pk=lease.pk).update(start_sent_at=timezone.now())
    assert wait(client, 0.3, since=timezone.now())[0]["orders"] is False


@pytest.mark.django_db
def test_a_cancel_after_the_last_heartbeat_rings(held: None) -> None:
    job = JobFactory()
    lease = placed_lease(job=job)
    Lease.objects.filter(pk=lease.pk).update(start_sent_at=timezone.now())
    client = agent(Machine.objects.get(pk=lease.machine_id))
    last_heartbeat = timezone.now()
    assert wait(client, 0.3, since=last_heartbeat)[0]["orders"] is False

    job_cancel(job=job, actor="renter")  # the start was sent: the agent is asked to stop it

    answer, took = wait(client, 10, since=last_heartbeat)
    assert answer["orders"] is True and took < 2


@pytest.mark.django_db(transaction=True)
def test_a_held_call_answers_as_soon_as_a_lease_is_placed(held: None) -> None:
    machine = MachineFactory(accepts_process=True)
    gpu = GPUFactory(machine=machine, index=0)
    client = agent(machine)
    since = timezone.now()

    def place() -> None:
        time.sleep(1.0)
        try:
            placed_lease(job=JobFactory(), gpus=[gpu])
        finally:
            connection.close()

    placer = threading.Thread(target=place)
    placer.start()
    answer, took = wait(client, 20, since=since)
    placer.join()
    assert answer["orders"] is True and 0.9 <= took < 4


@pytest.mark.django_db
def test_a_marketplace_that_does_not_hold_calls_answers_at_once() -> None:
    client = agent(MachineFactory())
    answer, took = wait(client, 20)
    assert answer == {"orders": False, "wait_s": 0.0} and took < 2
