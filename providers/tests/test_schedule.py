"""What the heartbeat reply tells the agent about its owner's schedule."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from providers.models import AvailabilityWindow, Blackout, Machine, Provider
from providers.services import machine_schedule
from tests.factories import MachineFactory, agent_client, gpu_entry, heartbeat

pytestmark = pytest.mark.django_db

MONDAY_NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_machine_without_windows_is_available_indefinitely():
    schedule = machine_schedule(machine=MachineFactory(), now=MONDAY_NOON)
    assert (schedule.available_now, schedule.available_until, schedule.indefinitely) == (True, None, True)


def test_machine_inside_a_window_is_told_when_it_closes():
    machine = MachineFactory()
    AvailabilityWindow.objects.create(
        provider=machine.provider, days=0b0000001, start_time=time(9), end_time=time(17), timezone="UTC"
    )
    schedule = machine_schedule(machine=machine, now=MONDAY_NOON)
    assert schedule.available_now and not schedule.indefinitely
    assert schedule.available_until == MONDAY_NOON.replace(hour=17)


def test_machine_outside_its_windows_is_not_available():
    machine = MachineFactory()
    AvailabilityWindow.objects.create(
        provider=machine.provider, days=0b0000001, start_time=time(20), end_time=time(8), timezone="Europe/Paris"
    )
    schedule = machine_schedule(machine=machine, now=MONDAY_NOON)
    assert (schedule.available_now, schedule.available_until) == (False, None)


def test_blackout_closes_an_open_ended_machine():
    machine = MachineFactory()
    Blackout.objects.create(
        provider=machine.provider,
        machine=machine,
        starts_at=MONDAY_NOON - timedelta(hours=1),
        ends_at=MONDAY_NOON + timedelta(hours=1),
    )
    assert not machine_schedule(machine=machine, now=MONDAY_NOON).available_now
    assert machine_schedule(machine=machine, now=MONDAY_NOON + timedelta(hours=2)).indefinitely


# --- the schedule in the heartbeat's reply ------------------------------------------------------
# The heartbeat's own statement says whether the machine has a window or a blackout still to
# end; without either it answers "indefinitely" without reading those tables.


def _reply_schedule(machine: Machine) -> tuple[dict, list[str]]:
    client = agent_client(machine)
    with CaptureQueriesContext(connection) as queries:
        resp = heartbeat(client, [gpu_entry("GPU-s", 0)])
    assert resp.status_code == 200, resp.json()
    return resp.json()["schedule"], [q["sql"] for q in queries.captured_queries]


def _reads(sqls: list[str], model: type) -> bool:
    table = f'FROM "{model._meta.db_table}"'
    return any(sql.startswith("SELECT") and table in sql for sql in sqls)


def _blackout(machine: Machine | None, provider: Provider, start_h: float, end_h: float) -> None:
    now = timezone.now()
    Blackout.objects.create(
        provider=provider,
        machine=machine,
        starts_at=now + timedelta(hours=start_h),
        ends_at=now + timedelta(hours=end_h),
    )


def test_a_heartbeat_of_a_machine_without_windows_or_blackouts_reads_neither() -> None:
    machine = MachineFactory()

    schedule, sqls = _reply_schedule(machine)

    assert schedule == {"available_now": True, "available_until": None, "indefinitely": True}
    assert not _reads(sqls, AvailabilityWindow) and not _reads(sqls, Blackout)


@pytest.mark.parametrize("whose", ["machine", "provider"])
def test_a_blackout_now_closes_the_machine_in_the_heartbeats_reply(whose: str) -> None:
    machine = MachineFactory()
    _blackout(machine if whose == "machine" else None, machine.provider, -1, 1)

    schedule, sqls = _reply_schedule(machine)

    assert schedule["available_now"] is False
    assert _reads(sqls, Blackout)


def test_a_blackout_to_come_ends_the_stretch_in_the_heartbeats_reply() -> None:
    machine = MachineFactory()
    _blackout(machine, machine.provider, 2, 3)

    schedule, _ = _reply_schedule(machine)

    assert schedule["available_now"] is True and schedule["indefinitely"] is False
    assert schedule["available_until"] is not None


@pytest.mark.parametrize("whose", ["machine", "provider"])
def test_a_window_that_excludes_now_closes_the_machine_in_the_heartbeats_reply(whose: str) -> None:
    machine = MachineFactory()
    later = timezone.now().astimezone(UTC) + timedelta(hours=2)
    AvailabilityWindow.objects.create(
        provider=machine.provider,
        machine=machine if whose == "machine" else None,
        days=0b1111111,
        start_time=time(later.hour),
        end_time=time((later.hour + 1) % 24),
        timezone="UTC",
    )

    schedule, sqls = _reply_schedule(machine)

    assert schedule == {"available_now": False, "available_until": None, "indefinitely": False}
    assert _reads(sqls, AvailabilityWindow)


def test_others_windows_and_blackouts_and_ended_blackouts_leave_the_machine_available() -> None:
    machine = MachineFactory()
    sibling = MachineFactory(provider=machine.provider)
    stranger = MachineFactory()
    _blackout(sibling, machine.provider, -1, 1)  # the same owner's other machine
    _blackout(stranger, stranger.provider, -1, 1)  # another owner's machine
    _blackout(None, stranger.provider, -1, 1)  # another owner's every machine
    _blackout(machine, machine.provider, -3, -1)  # over an hour ago
    AvailabilityWindow.objects.create(
        provider=machine.provider, machine=sibling, days=0b1, start_time=time(1), end_time=time(2), timezone="UTC"
    )
    AvailabilityWindow.objects.create(
        provider=stranger.provider, days=0b1, start_time=time(1), end_time=time(2), timezone="UTC"
    )

    schedule, sqls = _reply_schedule(machine)

    assert schedule == {"available_now": True, "available_until": None, "indefinitely": True}
    assert not _reads(sqls, AvailabilityWindow) and not _reads(sqls, Blackout)
