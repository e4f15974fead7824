"""The agent's doorbell (POST /api/agent/v1/orders/wait): held open until the machine has a new
order, answered at once when it has one, never ringing twice for the same one.

Then the doorbell over Redis pub/sub (jobs.doorbell): a held call sleeps without asking the
database and answers as soon as a commit gives its machine an order; when the subscription is
down it looks at the database every 0.25 s, as without Redis. Those tests need a real Redis
(REDIS_URL, else 127.0.0.1:6379): skipped without one, except in CI."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from jobs import doorbell, selectors
from jobs.models import Lease
from jobs.services import job_cancel
from providers.models import Machine
from tests.factories import GPUFactory, JobFactory, MachineFactory, agent_client, placed_lease
from tests.live_redis import live_redis

API = "/api/agent/v1/"


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
    client = agent_client(MachineFactory())
    answer, took = wait(client, 0.6)
    assert answer == {"orders": False, "wait_s": 25.0}
    assert 0.5 <= took < 3


@pytest.mark.django_db
def test_a_lease_not_yet_handed_over_rings_at_once_and_not_after_its_heartbeat(held: None) -> None:
    lease = placed_lease(job=JobFactory())
    client = agent_client(Machine.objects.get(pk=lease.machine_id))
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
    client = agent_client(Machine.objects.get(pk=lease.machine_id))
    last_heartbeat = timezone.now()
    assert wait(client, 0.3, since=last_heartbeat)[0]["orders"] is False

    job_cancel(job=job, actor="renter")  # the start was sent: the agent is asked to stop it

    answer, took = wait(client, 10, since=last_heartbeat)
    assert answer["orders"] is True and took < 2


@pytest.mark.django_db(transaction=True)
def test_a_held_call_answers_as_soon_as_a_lease_is_placed(held: None) -> None:
    machine = MachineFactory(accepts_process=True)
    gpu = GPUFactory(machine=machine, index=0)
    client = agent_client(machine)
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


@pytest.mark.django_db(transaction=True)
def test_a_machine_holds_one_call_at_a_time_and_a_newer_one_ends_the_older(held: None) -> None:
    """Each held call keeps a web thread: one machine sending many at once would hold them all."""
    machine = MachineFactory()
    results: list[tuple[dict[str, Any], float]] = []

    def hold() -> None:
        try:
            results.append(wait(agent_client(machine), 20))
        finally:
            connection.close()

    older = threading.Thread(target=hold)
    older.start()
    deadline = time.monotonic() + 10
    while doorbell.held_calls() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert doorbell.held_calls() == 1
    newer_answer, newer_took = wait(agent_client(machine), 1.0)  # the older returns as this one starts
    older.join(timeout=5)

    assert not older.is_alive()
    ((older_answer, older_took),) = results
    assert older_answer["orders"] is False and older_took < 5  # ended early, not held its 20 s
    assert newer_answer["orders"] is False and newer_took >= 0.9  # held its own wait
    assert doorbell.held_calls() == 0


@pytest.mark.django_db
def test_a_marketplace_that_does_not_hold_calls_answers_at_once() -> None:
    client = agent_client(MachineFactory())
    answer, took = wait(client, 20)
    assert answer == {"orders": False, "wait_s": 0.0} and took < 2


# --- the doorbell over Redis pub/sub ----------------------------------------------------------


@pytest.fixture
def live_bell(settings: Any) -> Iterator[str]:
    """The marketplace holds calls and rings them through this Redis."""
    settings.REDIS_URL = live_redis("the doorbell")
    settings.GPGPU = {**settings.GPGPU, "AGENT_ORDERS_WAIT_S": 25}
    with doorbell.waiter(0) as bell:  # starts this process's listener; wait until it has subscribed
        deadline = time.monotonic() + 5
        while not bell.live and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bell.live, "the doorbell's listener did not subscribe"
    yield settings.REDIS_URL


@pytest.fixture
def looks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each held call's look at the database, by machine id."""
    seen: list[int] = []
    real = selectors.machine_has_new_orders

    def counted(*, machine_id: int, since: Any) -> bool:
        seen.append(machine_id)
        return real(machine_id=machine_id, since=since)

    monkeypatch.setattr(selectors, "machine_has_new_orders", counted)
    return seen


def _in_a_second(work: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(1.0)
        try:
            work()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_a_held_call_is_rung_by_the_placement_and_asks_the_database_only_then(live_bell: str, looks: list[int]) -> None:
    machine = MachineFactory(accepts_process=True)
    gpu = GPUFactory(machine=machine, index=0)
    client = agent_client(machine)
    since = timezone.now()

    placer = _in_a_second(lambda: placed_lease(job=JobFactory(), gpus=[gpu]))
    answer, took = wait(client, 20, since=since)
    placer.join()

    assert answer["orders"] is True and 0.9 <= took < 3
    # One look when the call came, one when the bell rang: none while it slept (polling every
    # 0.25 s would have made four or more).
    assert looks.count(machine.pk) == 2


@pytest.mark.django_db(transaction=True)
def test_a_stop_request_rings_the_leases_machine_and_no_other(live_bell: str, looks: list[int]) -> None:
    job = JobFactory()
    lease = placed_lease(job=job)
    Lease.objects.filter(pk=lease.pk).update(start_sent_at=timezone.now())
    machine = Machine.objects.get(pk=lease.machine_id)
    other = MachineFactory()
    since = timezone.now()

    results: dict[str, tuple[dict[str, Any], float]] = {}

    def hold_other() -> None:
        try:
            results["other"] = wait(agent_client(other), 2.5, since=since)
        finally:
            connection.close()

    bystander = threading.Thread(target=hold_other)
    bystander.start()
    canceller = _in_a_second(lambda: job_cancel(job=job, actor="renter"))
    answer, took = wait(agent_client(machine), 20, since=since)
    canceller.join()
    bystander.join()

    assert answer["orders"] is True and 0.9 <= took < 3
    other_answer, other_took = results["other"]
    assert other_answer["orders"] is False and other_took >= 2.4  # held to its end, not woken
    assert looks.count(other.pk) <= 2


@pytest.mark.django_db(transaction=True)
def test_noise_on_the_channel_rings_no_one_and_the_listener_goes_on(live_bell: str, looks: list[int]) -> None:
    machine = MachineFactory(accepts_process=True)
    gpu = GPUFactory(machine=machine, index=0)
    client = agent_client(machine)
    since = timezone.now()
    publisher = redis.Redis.from_url(live_bell)

    def noise_then_a_lease() -> None:
        for junk in (b"\xff\xfe", b"", b"abc,-1,../../x", b"9" * 40, str(machine.pk + 10_000).encode()):
            publisher.publish(doorbell.channel(), junk)
        placed_lease(job=JobFactory(), gpus=[gpu])

    placer = _in_a_second(noise_then_a_lease)
    answer, took = wait(client, 20, since=since)
    placer.join()

    assert answer["orders"] is True and 0.9 <= took < 3
    assert looks.count(machine.pk) == 2  # the noise woke nobody


@pytest.mark.django_db(transaction=True)
def test_without_a_subscription_a_held_call_looks_every_quarter_second(
    settings: Any, looks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Redis nobody listens on: the listener never subscribes, so the bell is not live.
    monkeypatch.setattr(doorbell, "_RECONNECT_S", (0.2,))
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    settings.GPGPU = {**settings.GPGPU, "AGENT_ORDERS_WAIT_S": 25}
    machine = MachineFactory(accepts_process=True)
    gpu = GPUFactory(machine=machine, index=0)
    client = agent_client(machine)
    since = timezone.now()

    placed_at: list[float] = []
    placer = _in_a_second(lambda: (placed_lease(job=JobFactory(), gpus=[gpu]), placed_at.append(time.monotonic())))
    answer, took = wait(client, 20, since=since)
    answered_at = time.monotonic()
    placer.join()

    assert answer["orders"] is True and took >= 0.9
    # Seen within a few quarter-second looks of the placement's commit, however long the
    # placement itself took on a busy machine.
    assert answered_at - placed_at[0] < 1.0
    assert looks.count(machine.pk) >= 4  # it polled, as without Redis


def test_a_message_names_machine_ids_and_nothing_else() -> None:
    assert doorbell._decode(b"3,1,2") == {1, 2, 3}
    assert doorbell._decode("7") == {7}
    assert doorbell._decode(b"x,-4,5 ,,9" + b"9" * 30) == set()
    assert doorbell._decode(None) == set()
    assert doorbell._encode([3, 1, 3]) == "1,3"
