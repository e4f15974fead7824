"""The console's availability windows and blackouts go through providers.services: the same
checks, the same per-provider caps, and a refusal shows on the form with nothing saved."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from providers import services
from providers.models import AvailabilityWindow, Blackout
from tests.factories import MachineFactory, ProviderFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def console() -> Client:
    client = Client()
    client.force_login(UserFactory(username="olga", is_staff=True, is_superuser=True))
    return client


def window_form(provider, machine=None, **fields):  # type: ignore[no-untyped-def]
    data = {
        "provider": provider.pk,
        "machine": machine.pk if machine is not None else "",
        "days": 0b0011111,
        "start_time": "20:00",
        "end_time": "08:00",
        "timezone": "Europe/Paris",
    }
    data.update(fields)
    return data


def blackout_form(provider, **fields):  # type: ignore[no-untyped-def]
    now = timezone.localtime()
    data = {
        "provider": provider.pk,
        "machine": "",
        "starts_at_0": now.strftime("%Y-%m-%d"),
        "starts_at_1": "10:00:00",
        "ends_at_0": (now + timedelta(days=1)).strftime("%Y-%m-%d"),
        "ends_at_1": "10:00:00",
        "reason": "maintenance",
    }
    data.update(fields)
    return data


def form_errors(response) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, "the form came back (a redirect means it was saved)"
    return str(response.context["adminform"].form.errors)


def test_a_window_added_in_the_console_is_the_services_window(console):
    provider = ProviderFactory()
    machine = MachineFactory(provider=provider)
    response = console.post(reverse("admin:providers_availabilitywindow_add"), window_form(provider, machine))
    assert response.status_code == 302
    window = AvailabilityWindow.objects.get()
    assert (window.provider, window.machine, window.days, window.timezone) == (provider, machine, 31, "Europe/Paris")


def test_the_console_cannot_go_past_the_providers_window_cap(console):
    provider = ProviderFactory()
    for _ in range(services.MAX_WINDOWS_PER_PROVIDER):
        AvailabilityWindow.objects.create(provider=provider, days=1, start_time="01:00", end_time="02:00")
    response = console.post(reverse("admin:providers_availabilitywindow_add"), window_form(provider))
    assert f"at most {services.MAX_WINDOWS_PER_PROVIDER} windows" in form_errors(response)
    assert AvailabilityWindow.objects.filter(provider=provider).count() == services.MAX_WINDOWS_PER_PROVIDER


def test_another_providers_machine_and_an_unknown_zone_are_refused_with_nothing_saved(console):
    provider = ProviderFactory()
    stranger = MachineFactory()
    response = console.post(reverse("admin:providers_availabilitywindow_add"), window_form(provider, stranger))
    assert f"you have no machine {stranger.pk}" in form_errors(response)
    response = console.post(
        reverse("admin:providers_availabilitywindow_add"), window_form(provider, timezone="Mars/Olympus")
    )
    assert "not an IANA time zone" in form_errors(response)
    assert not AvailabilityWindow.objects.exists()


def test_editing_a_window_goes_through_the_service_and_a_bad_edit_changes_nothing(console):
    provider = ProviderFactory()
    window = services.availability_window_create(
        provider=provider,
        machine_id=None,
        days=["mon"],
        start_time=timezone.datetime(2026, 1, 1, 20).time(),
        end_time=timezone.datetime(2026, 1, 1, 8).time(),
        timezone_name="UTC",
    )
    url = reverse("admin:providers_availabilitywindow_change", args=[window.pk])
    stranger = MachineFactory()
    response = console.post(url, window_form(provider, stranger, timezone="Asia/Tokyo"))
    assert f"you have no machine {stranger.pk}" in form_errors(response)
    window.refresh_from_db()
    assert (window.timezone, window.machine) == ("UTC", None)

    response = console.post(url, window_form(provider, timezone="Asia/Tokyo", days=0b1100000))
    assert response.status_code == 302
    window.refresh_from_db()
    assert (window.timezone, window.days) == ("Asia/Tokyo", 0b1100000)


def test_a_blackout_added_in_the_console_keeps_the_services_rules(console):
    provider = ProviderFactory()
    url = reverse("admin:providers_blackout_add")
    today = timezone.localtime().strftime("%Y-%m-%d")
    response = console.post(url, blackout_form(provider, ends_at_0=today, ends_at_1="09:00:00"))
    assert "must be after starts_at" in form_errors(response)
    assert not Blackout.objects.exists()

    response = console.post(url, blackout_form(provider))
    assert response.status_code == 302
    blackout = Blackout.objects.get()
    assert (blackout.ends_at - blackout.starts_at, blackout.reason) == (timedelta(days=1), "maintenance")

    Blackout.objects.bulk_create(
        Blackout(provider=provider, starts_at=blackout.starts_at, ends_at=blackout.ends_at)
        for _ in range(services.MAX_BLACKOUTS_PER_PROVIDER - 1)
    )
    response = console.post(url, blackout_form(provider))
    assert f"at most {services.MAX_BLACKOUTS_PER_PROVIDER} blackouts" in form_errors(response)
    assert Blackout.objects.count() == services.MAX_BLACKOUTS_PER_PROVIDER


def test_a_blackout_is_not_edited_in_the_console(console):
    provider = ProviderFactory()
    now = timezone.now()
    blackout = services.blackout_create(
        provider=provider, machine_id=None, starts_at=now, ends_at=now + timedelta(hours=1)
    )
    url = reverse("admin:providers_blackout_change", args=[blackout.pk])
    response = console.post(url, blackout_form(provider, reason="changed"))
    assert response.status_code == 403
    blackout.refresh_from_db()
    assert blackout.reason == ""
