"""Idle history (providers.idle_history): stretches of owners' absence recorded by heartbeats,
folded into per-machine forecasts and the fleet prior, and read back."""

from __future__ import annotations

import random
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from providers import idle_history, services
from providers.forecasting import BIN_EDGES_S, HOURS_OF_WEEK, Forecast, StretchCounts
from providers.models import GPU, FleetIdleProfile, IdleStretch, Machine, MachineIdleProfile
from providers.tasks import fold_idle_stretches
from tests.factories import GPUFactory, MachineFactory, machine_with_gpus, placed_lease

pytestmark = pytest.mark.django_db

HEARTBEAT = "/api/agent/v1/heartbeat"


def agent_client(machine: Machine) -> APIClient:
    raw = "gpm_" + secrets.token_urlsafe(16)
    Machine.objects.filter(pk=machine.pk).update(credential_digest=services.secret_digest(raw))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")
    return client


def report(gpu: GPU, *, idle: bool, idle_since: datetime | None = None, owner_busy: bool = False) -> dict[str, Any]:
    return {
        "uuid": gpu.uuid,
        "index": gpu.index,
        "model": gpu.model,
        "vram_mb": gpu.vram_mb,
        "idle": idle,
        "idle_since": idle_since.isoformat() if idle_since else None,
        "owner_busy": owner_busy,
    }


def beat(client: APIClient, *gpus: dict[str, Any], leases: list[dict[str, Any]] | None = None) -> None:
    resp = client.post(HEARTBEAT, {"gpus": list(gpus), "leases": leases or []}, format="json")
    assert resp.status_code == 200, resp.content


def idle_gpu(**kwargs: Any) -> GPU:
    """An idle GPU whose machine has heartbeated; its idle_since as the agent reported it."""
    return GPUFactory(machine=MachineFactory(), index=0, state=GPU.State.IDLE, **kwargs)


# --- recording --------------------------------------------------------------------------------


def test_owner_coming_back_records_an_ended_stretch_from_the_reported_idle_since() -> None:
    gpu = idle_gpu(idle_since=None)
    client = agent_client(gpu.machine)
    began = timezone.now() - timedelta(hours=2)
    beat(client, report(gpu, idle=True, idle_since=began))
    assert not IdleStretch.objects.exists()

    beat(client, report(gpu, idle=False, owner_busy=True))

    stretch = IdleStretch.objects.get()
    assert (stretch.machine_id, stretch.gpu_id, stretch.began_at, stretch.ended) == (
        gpu.machine_id,
        gpu.pk,
        began,
        True,
    )
    assert stretch.length_s == pytest.approx(7200, abs=30)


def test_a_lease_on_the_gpu_does_not_break_the_owners_stretch() -> None:
    gpu = idle_gpu(idle_since=None)
    client = agent_client(gpu.machine)
    began = timezone.now() - timedelta(hours=1)
    beat(client, report(gpu, idle=True, idle_since=began))
    lease = placed_lease(gpus=[gpu], started=True)

    # The agent reports the rented GPU idle with the same idle_since (gpgpu_agent.idle).
    beat(client, report(gpu, idle=True, idle_since=began), leases=[{"lease_id": lease.pk, "state": "running"}])

    gpu.refresh_from_db()
    assert gpu.state == GPU.State.LEASED
    assert gpu.idle_since == began
    assert not IdleStretch.objects.exists()


def test_a_gpu_idle_for_another_reason_or_gone_censors_its_stretch() -> None:
    machine = machine_with_gpus(count=2, idle_since=None)
    first, second = machine.gpus.order_by("index")
    client = agent_client(machine)
    began = timezone.now() - timedelta(minutes=30)
    beat(client, report(first, idle=True, idle_since=began), report(second, idle=True, idle_since=began))

    # The first is outside the owner's schedule (not idle, owner not back); the second is gone.
    beat(client, report(first, idle=False))

    stretches = {s.gpu_id: s for s in IdleStretch.objects.all()}
    assert set(stretches) == {first.pk, second.pk}
    assert not stretches[first.pk].ended and not stretches[second.pk].ended
    assert stretches[second.pk].length_s == pytest.approx(1800, abs=30)


def test_an_agent_starting_the_stretch_afresh_censors_the_old_one_at_the_new_start() -> None:
    gpu = idle_gpu(idle_since=None)
    client = agent_client(gpu.machine)
    began = timezone.now() - timedelta(hours=3)
    beat(client, report(gpu, idle=True, idle_since=began))

    restarted = began + timedelta(hours=2)
    beat(client, report(gpu, idle=True, idle_since=restarted))

    stretch = IdleStretch.objects.get()
    assert (stretch.ended, stretch.length_s) == (False, 7200)


def test_a_silent_machine_censors_its_stretches_at_its_last_heartbeat() -> None:
    began = timezone.now() - timedelta(hours=2)
    machine = machine_with_gpus(count=1, idle_since=began)
    last = timezone.now() - timedelta(hours=1)
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=last)

    services.machines_liveness_sweep()

    stretch = IdleStretch.objects.get()
    assert not stretch.ended
    assert stretch.length_s == pytest.approx(3600, abs=1)


def test_heartbeats_with_no_stretch_over_write_no_stretch_row() -> None:
    gpu = idle_gpu(idle_since=None)
    client = agent_client(gpu.machine)
    began = timezone.now() - timedelta(hours=1)
    beat(client, report(gpu, idle=True, idle_since=began))

    with CaptureQueriesContext(connection) as queries:
        beat(client, report(gpu, idle=True, idle_since=began))

    assert not [q for q in queries.captured_queries if "idlestretch" in q["sql"].lower()]


def test_one_insert_for_all_the_stretches_a_heartbeat_ends() -> None:
    machine = machine_with_gpus(count=4, idle_since=None)
    gpus = list(machine.gpus.order_by("index"))
    client = agent_client(machine)
    began = timezone.now() - timedelta(hours=1)
    beat(client, *(report(g, idle=True, idle_since=began) for g in gpus))

    with CaptureQueriesContext(connection) as queries:
        beat(client, *(report(g, idle=False, owner_busy=True) for g in gpus))

    sqls = [q["sql"].lower() for q in queries.captured_queries]
    inserts = [sql for sql in sqls if sql.startswith('insert into "providers_idlestretch"')]
    assert len(inserts) == 1
    assert IdleStretch.objects.filter(ended=True).count() == 4


@pytest.mark.parametrize(
    "stored_idle_since",
    [
        timedelta(hours=5),  # in the future: a clock far ahead
        -timedelta(days=400),  # a year ago and more: a clock far behind
    ],
    ids=["future", "absurdly-old"],
)
def test_a_stretch_of_absurd_length_is_refused_and_the_heartbeat_goes_through(stored_idle_since: timedelta) -> None:
    gpu = idle_gpu(idle_since=timezone.now() + stored_idle_since)
    client = agent_client(gpu.machine)

    beat(client, report(gpu, idle=False, owner_busy=True))

    gpu.refresh_from_db()
    assert gpu.state == GPU.State.OWNER_BUSY
    assert not IdleStretch.objects.exists()


# --- folding ----------------------------------------------------------------------------------


def stretch(machine: Machine, *, began_at: datetime, length_s: float, ended: bool = True) -> IdleStretch:
    gpu = machine.gpus.first() or GPUFactory(machine=machine)
    return IdleStretch.objects.create(machine=machine, gpu=gpu, began_at=began_at, length_s=length_s, ended=ended)


def test_folding_counts_each_stretch_once_and_deletes_it() -> None:
    machine = machine_with_gpus(count=1)
    monday_9 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    stretch(machine, began_at=monday_9, length_s=600)
    stretch(machine, began_at=monday_9, length_s=90, ended=False)

    first = fold_idle_stretches()
    second = fold_idle_stretches()

    assert (first["fleet"], first["stretches"]) == (2, 2)
    assert (second["fleet"], second["stretches"]) == (0, 0)
    assert not IdleStretch.objects.exists()
    profile = MachineIdleProfile.objects.get(machine=machine)
    counts = StretchCounts.from_json(profile.counts)
    assert counts.total(hour=9) == pytest.approx(2)
    assert profile.stretches == 2
    assert StretchCounts.from_json(FleetIdleProfile.objects.get().counts).total() == pytest.approx(2)


def test_a_profile_stays_bounded_however_many_stretches_it_folds() -> None:
    machine = machine_with_gpus(count=1)
    start = datetime(2026, 11, 23, tzinfo=UTC)
    for week in range(3):
        IdleStretch.objects.bulk_create(
            IdleStretch(
                machine=machine,
                gpu=machine.gpus.get(),
                began_at=start + timedelta(hours=h),
                length_s=float(60 * (1 + (h * 7 + week) % 2000)),
                ended=True,
            )
            for h in range(HOURS_OF_WEEK)
        )
        fold_idle_stretches()

    counts = MachineIdleProfile.objects.get(machine=machine).counts
    entries = sum(len(row) for table in counts.values() for row in table.values())
    assert entries <= HOURS_OF_WEEK * len(BIN_EDGES_S) * 2
    assert MachineIdleProfile.objects.get(machine=machine).stretches == 3 * HOURS_OF_WEEK


def test_old_counts_decay_with_the_half_life() -> None:
    machine = machine_with_gpus(count=1)
    t0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    stretch(machine, began_at=t0, length_s=600)
    idle_history.idle_stretches_fold(now=t0 + timedelta(hours=1))
    stretch(machine, began_at=t0 + timedelta(days=28), length_s=600)

    idle_history.idle_stretches_fold(now=t0 + timedelta(days=28, hours=1))

    counts = StretchCounts.from_json(MachineIdleProfile.objects.get(machine=machine).counts)
    assert counts.total(hour=9) == pytest.approx(1.5, abs=0.01)  # the first one counts half


def test_a_removed_machines_profile_and_rows_are_dropped() -> None:
    machine = machine_with_gpus(count=1)
    stretch(machine, began_at=timezone.now() - timedelta(hours=1), length_s=600)
    fold_idle_stretches()
    stretch(machine, began_at=timezone.now() - timedelta(minutes=5), length_s=60)
    fold_idle_stretches()  # into the fleet, not yet deleted if the machine is gone: see below
    stretch(machine, began_at=timezone.now() - timedelta(minutes=2), length_s=60)
    Machine.objects.filter(pk=machine.pk).update(removed_at=timezone.now())

    fold_idle_stretches()
    fold_idle_stretches()

    assert not MachineIdleProfile.objects.filter(machine=machine).exists()
    assert not IdleStretch.objects.filter(machine=machine).exists()


# --- forecasts --------------------------------------------------------------------------------


def nightly_history(machine: Machine, *, weeks: int = 4) -> None:
    """An owner away every night 22:00 to 07:00 UTC, and only for a few minutes at a time by day."""
    start = datetime(2026, 10, 26, tzinfo=UTC)  # a Monday
    for day in range(7 * weeks):
        midnight = start + timedelta(days=day)
        stretch(machine, began_at=midnight + timedelta(hours=22), length_s=9 * 3600)
        for hour in range(8, 21):
            stretch(machine, began_at=midnight + timedelta(hours=hour), length_s=240)


def test_an_owner_away_every_night_gets_a_longer_forecast_at_night_than_by_day() -> None:
    machine = machine_with_gpus(count=1)
    nightly_history(machine)
    fold_idle_stretches()

    forecast = idle_history.machine_forecasts(machine_ids=[machine.pk])[machine.pk]
    night = datetime(2026, 11, 24, 22, 5, tzinfo=UTC).timestamp()
    day = datetime(2026, 11, 24, 14, 5, tzinfo=UTC).timestamp()

    # Both idle for a minute now.
    at_night = forecast.median_more(idle_since=night, now=night + 60)
    by_day = forecast.median_more(idle_since=day, now=day + 60)
    assert at_night > 4 * 3600
    assert by_day < 15 * 60
    # Four weeks of one hour of the week are four stretches, blended with the machine's other
    # hours (providers.forecasting): still most likely away two more hours at night, not by day.
    assert forecast.survival(idle_since=night, now=night + 60, more_s=7200) > 0.5
    assert forecast.survival(idle_since=day, now=day + 60, more_s=7200) < 0.1


def test_machines_are_forecast_in_two_queries_and_a_profile_read_again_only_after_a_fold() -> None:
    known = machine_with_gpus(count=1)
    nightly_history(known, weeks=1)
    fold_idle_stretches()
    new = [MachineFactory() for _ in range(5)]
    ids = [known.pk, *(m.pk for m in new)]

    with CaptureQueriesContext(connection) as queries:
        forecasts = idle_history.machine_forecasts(machine_ids=ids)

    # The known machine's profile is read in a third query, then again only after a fold.
    assert len(queries.captured_queries) == 3
    day = datetime(2026, 11, 24, 14, 5, tzinfo=UTC).timestamp()
    fleet = StretchCounts.from_json(FleetIdleProfile.objects.get().counts)
    as_the_fleet = Forecast(StretchCounts(), fleet).survival(idle_since=day, now=day + 60, more_s=600)
    unknown = Forecast(StretchCounts(), StretchCounts()).survival(idle_since=day, now=day + 60, more_s=600)
    assert forecasts[new[0].pk].survival(idle_since=day, now=day + 60, more_s=600) == pytest.approx(as_the_fleet)
    assert as_the_fleet != pytest.approx(unknown)
    assert set(forecasts) == set(ids)

    with CaptureQueriesContext(connection) as queries:
        again = idle_history.machine_forecasts(machine_ids=ids)
    assert len(queries.captured_queries) == 2
    assert again[known.pk].machine is forecasts[known.pk].machine
    # Nothing folded: the same forecasts, curves and all (a matcher keeping its pool sees them unchanged).
    assert all(again[machine_id] is forecasts[machine_id] for machine_id in ids)
    stretch(known, began_at=datetime(2026, 11, 10, 3, 0, tzinfo=UTC), length_s=600)
    fold_idle_stretches()
    with CaptureQueriesContext(connection) as queries:
        folded = idle_history.machine_forecasts(machine_ids=ids)
    assert len(queries.captured_queries) == 3
    assert folded[known.pk].machine.total() == pytest.approx(forecasts[known.pk].machine.total() + 1, abs=0.01)
    assert folded[known.pk] is not forecasts[known.pk]
    FleetIdleProfile.objects.update(counts={})
    prior_gone = idle_history.machine_forecasts(machine_ids=ids)
    assert prior_gone[new[0].pk] is not folded[new[0].pk]
    assert prior_gone[new[0].pk].fleet.total() == 0


def test_machines_idle_since_is_the_youngest_stretch_among_its_idle_or_leased_gpus() -> None:
    now = timezone.now()
    machine = MachineFactory()
    GPUFactory(machine=machine, index=0, state=GPU.State.IDLE, idle_since=now - timedelta(hours=3))
    GPUFactory(machine=machine, index=1, state=GPU.State.LEASED, idle_since=now - timedelta(hours=1))
    GPUFactory(machine=machine, index=2, state=GPU.State.OWNER_BUSY, idle_since=None)
    busy = MachineFactory()
    GPUFactory(machine=busy, index=0, state=GPU.State.OWNER_BUSY, idle_since=None)

    since = idle_history.machines_idle_since(machine_ids=[machine.pk, busy.pk])

    assert since == {machine.pk: pytest.approx((now - timedelta(hours=1)).timestamp()), busy.pk: None}


def test_a_profile_that_cannot_be_read_starts_afresh_and_stops_nothing() -> None:
    machine = machine_with_gpus(count=1)
    FleetIdleProfile.objects.create(pk=1, counts={"e": {"999": {"0": 1}}}, decayed_at=timezone.now())
    MachineIdleProfile.objects.create(machine=machine, counts={"e": {"3": {"0": "many"}}}, decayed_at=timezone.now())
    stretch(machine, began_at=datetime(2026, 11, 23, 9, 0, tzinfo=UTC), length_s=600)

    assert idle_history.machine_forecasts(machine_ids=[machine.pk])[machine.pk] is not None
    result = fold_idle_stretches()

    assert (result["fleet"], result["stretches"]) == (1, 1)
    assert StretchCounts.from_json(MachineIdleProfile.objects.get(machine=machine).counts).total() == 1


# --- analogs: the days before -------------------------------------------------------------------


def test_the_fold_keeps_the_owners_days_and_the_forecast_reads_tonight_from_the_nights_before() -> None:
    machine = machine_with_gpus(count=1)
    nightly_history(machine, weeks=1)
    stretch(machine, began_at=datetime(2026, 11, 1, 3, 0, tzinfo=UTC), length_s=50_000, ended=False)  # censored
    fold_idle_stretches()

    analogs = MachineIdleProfile.objects.get(machine=machine).analogs
    # The nights (9 h) and the days' 4-minute stretches of the last four days (ANALOG_KEEP_S), each
    # ended; not the censored one.
    assert len(analogs["stretches"]) == 4 + 4 * 13
    assert all(length in (240, 9 * 3600) for _, length in analogs["stretches"])
    assert analogs["factor"] == pytest.approx(1.0)
    forecast = idle_history.machine_forecasts(machine_ids=[machine.pk])[machine.pk]
    assert forecast.analogs is not None
    # The day after the history: away since 22:00, two minutes in: away until 07:00.
    tonight = datetime(2026, 11, 2, 22, 0, tzinfo=UTC).timestamp()
    assert forecast.analogs.safe_until(tonight, tonight + 120) == pytest.approx(tonight + 9 * 3600)
    by_day = datetime(2026, 11, 2, 14, 0, tzinfo=UTC).timestamp()
    assert forecast.analogs.safe_until(by_day, by_day + 120) == pytest.approx(by_day + 240)


def test_a_machine_whose_stretches_follow_no_days_gets_analogs_it_trusts_less() -> None:
    machine = machine_with_gpus(count=1)
    start = datetime(2026, 10, 26, tzinfo=UTC)
    rng = random.Random(5)
    # Away at the same hours every day, for anything from 10 minutes to 5 hours.
    for day in range(8):
        for hour in (2, 10, 18):
            stretch(machine, began_at=start + timedelta(days=day, hours=hour), length_s=rng.uniform(600, 5 * 3600))
    fold_idle_stretches()

    # The days before overpromised about a quarter of the times (today shorter than each of
    # the three before): their readings are scaled down to keep the promise.
    factor = MachineIdleProfile.objects.get(machine=machine).analogs["factor"]
    assert factor is not None
    assert 0 < factor < 0.9


def test_analogs_that_cannot_be_read_start_afresh_and_stop_nothing() -> None:
    machine = machine_with_gpus(count=1)
    MachineIdleProfile.objects.create(
        machine=machine, counts={}, analogs={"stretches": [["noon", 5]]}, decayed_at=timezone.now()
    )
    stretch(machine, began_at=datetime(2026, 11, 23, 9, 0, tzinfo=UTC), length_s=600)

    assert idle_history.machine_forecasts(machine_ids=[machine.pk])[machine.pk].analogs is None
    result = fold_idle_stretches()

    assert (result["fleet"], result["stretches"]) == (1, 1)
    stored = MachineIdleProfile.objects.get(machine=machine).analogs
    assert [length for _, length in stored["stretches"]] == [600]


def test_a_full_cache_emptied_midway_still_forecasts_every_known_machine_as_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    machines = [machine_with_gpus(count=1) for _ in range(2)]
    for machine in machines:
        nightly_history(machine, weeks=1)
    fold_idle_stretches()
    ids = [m.pk for m in machines]
    idle_history.machine_forecasts(machine_ids=ids)
    stretch(machines[0], began_at=datetime(2026, 11, 10, 3, 0, tzinfo=UTC), length_s=600)
    fold_idle_stretches()
    monkeypatch.setattr(idle_history, "_READ_MAX", 2)  # the changed profile does not fit: emptied

    forecasts = idle_history.machine_forecasts(machine_ids=ids)

    for machine in machines:
        own = StretchCounts.from_json(MachineIdleProfile.objects.get(machine=machine).counts)
        assert forecasts[machine.pk].machine.total() == pytest.approx(own.total(), abs=0.01)
        assert forecasts[machine.pk].analogs is not None
