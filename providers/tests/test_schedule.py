"""What the heartbeat reply tells the agent about its owner's schedule."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from providers.models import AvailabilityWindow, Blackout
from providers.services import machine_schedule
from tests.factories import MachineFactory

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
