"""What a renter searching the market sees of the risk on each GPU: how long its owner is likely
to stay away (predicted_idle_s) and, for a job of a given length, the chance it finishes
(p_finish), from each machine's idle forecast (providers.idle_history)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from providers.models import GPU, AvailabilityWindow, Machine
from tests.factories import GPUFactory, MachineFactory, fickle_owner_history, nightly_owner_history

pytestmark = pytest.mark.django_db

TUESDAY_NIGHT = datetime(2026, 11, 24, 22, 5, tzinfo=UTC)
TUESDAY_AFTERNOON = datetime(2026, 11, 24, 14, 5, tzinfo=UTC)


def at(when: datetime):  # type: ignore[no-untyped-def]
    return mock.patch("django.utils.timezone.now", return_value=when)


def idle_machine(*, idle_for: timedelta, now: datetime, **machine: object) -> Machine:
    m = MachineFactory(last_heartbeat_at=now, **machine)
    GPUFactory(machine=m, index=0, state=GPU.State.IDLE, idle_since=now - idle_for)
    return m


def search(client, **params):  # type: ignore[no-untyped-def]
    response = client.get("/api/v1/gpus/", params)
    assert response.status_code == 200, response.content
    return {row["machine"]: row for row in response.json()["results"]}


def test_an_owner_away_all_night_shows_a_likelier_finish_at_night_than_one_back_every_few_minutes(renter_client):
    client, _ = renter_client
    night_owl = idle_machine(idle_for=timedelta(minutes=1), now=TUESDAY_NIGHT)
    fickle = idle_machine(idle_for=timedelta(minutes=1), now=TUESDAY_NIGHT)
    nightly_owner_history(night_owl, until=TUESDAY_NIGHT)
    fickle_owner_history(fickle, until=TUESDAY_NIGHT)

    with at(TUESDAY_NIGHT):
        rows = search(client, duration_s=7200)

    assert rows[night_owl.pk]["p_finish"] > 0.5
    assert rows[fickle.pk]["p_finish"] < 0.1
    assert rows[night_owl.pk]["predicted_idle_s"] > 4 * 3600
    assert rows[fickle.pk]["predicted_idle_s"] < 15 * 60


def test_the_same_owner_is_a_worse_bet_in_the_afternoon(renter_client):
    client, _ = renter_client
    night_owl = idle_machine(idle_for=timedelta(minutes=1), now=TUESDAY_AFTERNOON)
    nightly_owner_history(night_owl, until=TUESDAY_AFTERNOON)

    with at(TUESDAY_AFTERNOON):
        afternoon = search(client, duration_s=7200)[night_owl.pk]
    GPU.objects.filter(machine=night_owl).update(idle_since=TUESDAY_NIGHT - timedelta(minutes=1))
    Machine.objects.filter(pk=night_owl.pk).update(last_heartbeat_at=TUESDAY_NIGHT)
    with at(TUESDAY_NIGHT):
        night = search(client, duration_s=7200)[night_owl.pk]

    assert afternoon["p_finish"] < 0.1 < 0.5 < night["p_finish"]


def test_without_a_duration_there_is_no_p_finish_and_a_busy_owner_has_no_prediction(renter_client):
    client, _ = renter_client
    idle = idle_machine(idle_for=timedelta(minutes=10), now=TUESDAY_NIGHT)
    busy = MachineFactory(last_heartbeat_at=TUESDAY_NIGHT)
    GPUFactory(machine=busy, index=0, state=GPU.State.OWNER_BUSY, idle_since=None)

    with at(TUESDAY_NIGHT):
        rows = search(client)
        with_duration = search(client, duration_s=600)

    assert rows[idle.pk]["p_finish"] is None
    # No history anywhere: forecast by the default (about an hour on average).
    assert rows[idle.pk]["predicted_idle_s"] > 0
    assert rows[busy.pk]["predicted_idle_s"] is None
    assert with_duration[busy.pk]["p_finish"] is None
    assert 0 < with_duration[idle.pk]["p_finish"] < 1


def test_a_job_longer_than_the_owners_window_has_no_chance_to_finish(renter_client):
    client, _ = renter_client
    machine = idle_machine(idle_for=timedelta(minutes=1), now=TUESDAY_NIGHT)
    nightly_owner_history(machine, until=TUESDAY_NIGHT)
    # Available every day 20:00 to 23:00 UTC: the window ends 55 minutes from now.
    AvailabilityWindow.objects.create(
        provider=machine.provider, machine=machine, days=127, start_time=time(20), end_time=time(23)
    )

    with at(TUESDAY_NIGHT):
        rows = search(client, duration_s=7200)
        short = search(client, duration_s=1800)

    assert rows[machine.pk]["p_finish"] == 0
    assert short[machine.pk]["p_finish"] > 0.5


@pytest.mark.parametrize("duration", ["0", "-5", "soon", str(30 * 24 * 3600 + 1)])
def test_a_bad_duration_is_refused(renter_client, duration):
    client, _ = renter_client

    response = client.get("/api/v1/gpus/", {"duration_s": duration})

    assert response.status_code == 400
    assert "duration_s" in response.json()["fields"]


def test_the_risk_of_a_page_costs_the_same_queries_whatever_its_machines(renter_client):
    client, _ = renter_client

    def queries_for_a_page() -> int:
        with at(TUESDAY_NIGHT), CaptureQueriesContext(connection) as queries:
            search(client, duration_s=3600)
        return len(queries.captured_queries)

    first = idle_machine(idle_for=timedelta(minutes=1), now=TUESDAY_NIGHT)
    nightly_owner_history(first, until=TUESDAY_NIGHT)
    queries_for_a_page()  # the token's last use is written once, on the first
    few = queries_for_a_page()
    for _ in range(6):
        idle_machine(idle_for=timedelta(minutes=5), now=TUESDAY_NIGHT)
    many = queries_for_a_page()

    assert many == few
