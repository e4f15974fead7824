"""The steady heartbeat (providers.heartbeat_steady): a repeat of a heartbeat that changed
nothing is answered from Redis, and answered the same; anything that could change the answer
sends the next heartbeat through the full path. Against a real Redis (REDIS_URL, else
127.0.0.1:6379): skipped without one, except in CI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.models import Lease
from jobs.services import lease_end, lease_request_stop
from providers import heartbeat_steady, services
from providers.models import GPU, Machine, TelemetrySample
from providers.tasks import fold_idle_stretches
from tests import factories
from tests.factories import (
    MachineFactory,
    capabilities_report,
    gpu_entry,
    heartbeat,
    placed_lease,
)
from tests.live_redis import redis_settings

pytestmark = pytest.mark.django_db

_TRANSACTION_CONTROL = ("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK", "BEGIN", "COMMIT")


_ENTRY: list[str] = ["view"]


@pytest.fixture(autouse=True, params=["view", "front"])
def steady(settings: Any, request: pytest.FixtureRequest) -> Iterator[None]:
    """The steady path on, over a real Redis, every heartbeat of a test in one sample interval;
    every test twice: the steady answer tried by the view (Django's test client, runserver's
    handler) and by the WSGI layer in front of Django (providers.heartbeat_front), as the
    marketplace's WSGI app runs it."""
    redis_settings(settings, "the steady heartbeat")
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_STEADY_PATH": True, "TELEMETRY_SAMPLE_INTERVAL_S": 10**9}
    _ENTRY[0] = request.param
    yield
    _ENTRY[0] = "view"


def agent_client(machine: Machine) -> Any:
    client = factories.agent_client(machine)
    return factories.through_front(client) if _ENTRY[0] == "front" else client


def statements(queries: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if not q["sql"].upper().startswith(_TRANSACTION_CONTROL)]


GPUS = [gpu_entry(f"GPU-{i}", i, utilization_pct=float(i)) for i in range(8)]


def moved(gpus: list[dict[str, Any]], by: float = 1.0) -> list[dict[str, Any]]:
    """The same GPUs, their telemetry a little different (as every real heartbeat's is)."""
    return [{**g, "utilization_pct": g["utilization_pct"] + by, "temperature_c": g["temperature_c"] + by} for g in gpus]


def beaten() -> tuple[Machine, Any]:
    """A machine whose first (full) heartbeat is behind it, and its agent's client."""
    machine = MachineFactory(accepts_process=False)
    client = agent_client(machine)
    away_from_its_turn(machine)
    assert heartbeat(client, GPUS, capabilities=capabilities_report(kinds=("container",))).status_code == 200
    return machine, client


def away_from_its_turn(machine: Machine) -> None:
    """With sample intervals of a second or two, sleep until the machine's turn (when a record
    remembered now runs out: heartbeat_steady.record_ends) is at least three intervals away, so
    that a test's record still answers after its sample interval turns once."""
    if django_settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"] > 2:
        return
    while (machine.pk - heartbeat_steady.bucket(timezone.now(), machine.pk)) % heartbeat_steady.RECORD_INTERVALS < 3:
        time.sleep(0.02)


def beat(client: Any, gpus: list[dict[str, Any]] | None = None, **facts: Any) -> Any:
    facts.setdefault("capabilities", capabilities_report(kinds=("container",)))
    return heartbeat(client, moved(GPUS) if gpus is None else gpus, **facts)


def without_time(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k != "server_time"}


def test_a_repeated_heartbeat_is_answered_without_the_database_and_the_same_way() -> None:
    _, client = beaten()
    full = beat(client, GPUS).json()  # the full path's answer to this very report...

    with CaptureQueriesContext(connection) as queries:
        response = beat(client)  # ...and a repeat, its telemetry moved

    assert response.status_code == 200
    assert statements(queries) == []
    assert without_time(response.json()) == without_time(full)
    assert response.json()["server_time"] >= full["server_time"]


def test_a_steady_heartbeat_keeps_its_machine_online_through_the_liveness_sweep() -> None:
    machine, client = beaten()
    long_ago = timezone.now() - timedelta(hours=1)
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=long_ago, capabilities_reported_at=long_ago)
    before = timezone.now()
    assert beat(client).status_code == 200

    swept = services.machines_liveness_sweep()

    machine.refresh_from_db()
    assert swept.offline == 0 and machine.status == Machine.Status.ONLINE
    assert machine.last_heartbeat_at is not None and machine.last_heartbeat_at >= before
    assert machine.capabilities_reported_at is not None and machine.capabilities_reported_at >= before
    # Written once: a later flush leaves a newer row as it is.
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now() + timedelta(minutes=1))
    assert heartbeat_steady.flush() == 0


def test_what_steady_heartbeats_left_is_written_after_the_steady_path_is_switched_off(settings: Any) -> None:
    machine, client = beaten()
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    assert beat(client).status_code == 200
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_STEADY_PATH": False}

    swept = services.machines_liveness_sweep()

    machine.refresh_from_db()
    assert swept.offline == 0 and machine.status == Machine.Status.ONLINE


def test_a_sweep_that_cannot_read_the_steady_heartbeats_takes_no_machine_offline(settings: Any) -> None:
    machine, client = beaten()
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nobody listens there

    swept = services.machines_liveness_sweep()

    machine.refresh_from_db()
    assert swept.blind and swept.offline == 0 and machine.status == Machine.Status.ONLINE
    # The agent meanwhile still gets its answer, from the full heartbeat.
    with CaptureQueriesContext(connection) as queries:
        assert beat(client).status_code == 200
    assert statements(queries)


def test_a_lease_assigned_after_a_steady_heartbeat_is_in_the_next_reply() -> None:
    machine, client = beaten()
    assert beat(client).json()["start"] == []
    gpu = GPU.objects.get(machine=machine, index=0)

    lease = placed_lease(gpus=[gpu], kind="container", image="pytorch:2")  # a kind it accepts

    started = beat(client).json()["start"]
    assert [order["lease_id"] for order in started] == [lease.pk]


def test_a_revoked_credential_is_refused_at_once() -> None:
    machine, client = beaten()
    assert beat(client).status_code == 200

    services.machine_credential_revoke(machine=machine, actor="operator", reason="stolen laptop")

    response = beat(client)
    assert response.status_code == 401 and response.json()["code"] == "credential_revoked"


def test_a_rotated_credential_is_refused_and_the_new_one_answered() -> None:
    machine, client = beaten()
    assert beat(client).status_code == 200

    raw = services.machine_credential_rotate(machine=machine, actor="operator")

    assert beat(client).json()["code"] == "credential_revoked"
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")
    assert beat(client).status_code == 200


def test_a_suspended_machine_is_refused_at_once() -> None:
    machine, client = beaten()
    assert beat(client).status_code == 200

    services.machine_suspend(machine=machine, reason="abuse report", actor="operator")

    response = beat(client)
    assert response.status_code == 403 and response.json()["code"] == "machine_suspended"


def test_a_machine_the_sweep_took_offline_comes_back_with_its_next_heartbeat() -> None:
    machine, client = beaten()
    assert beat(client).status_code == 200
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    heartbeat_steady.flush()  # the steady beat above is older than the row's time now
    Machine.objects.filter(pk=machine.pk).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    assert services.machines_liveness_sweep().offline == 1

    assert beat(client).status_code == 200

    machine.refresh_from_db()
    assert machine.status == Machine.Status.ONLINE
    assert set(GPU.objects.filter(machine=machine).values_list("state", flat=True)) == {GPU.State.IDLE}


def test_a_blackout_declared_by_the_owner_is_in_the_next_reply() -> None:
    machine, client = beaten()
    assert beat(client).json()["schedule"]["available_now"] is True
    now = timezone.now()

    an_hour = timedelta(hours=1)
    services.blackout_create(provider=machine.provider, machine_id=None, starts_at=now - an_hour, ends_at=now + an_hour)

    assert beat(client).json()["schedule"]["available_now"] is False


def test_a_changed_report_takes_the_full_path_and_is_written() -> None:
    machine, client = beaten()
    busy = [{**g, "idle": False, "owner_busy": True, "idle_since": None} if g["index"] == 3 else g for g in GPUS]

    assert beat(client, busy).status_code == 200

    assert GPU.objects.get(machine=machine, index=3).state == GPU.State.OWNER_BUSY


def until_the_interval_turns(machine: Machine) -> None:
    """Sleep until the machine's sample interval (a second long here) turns."""
    first = heartbeat_steady.bucket(timezone.now(), machine.pk)
    while heartbeat_steady.bucket(timezone.now(), machine.pk) == first:
        time.sleep(0.02)


def test_a_new_sample_interval_is_sampled_without_the_database_and_written_by_the_sweep(settings: Any) -> None:
    settings.GPGPU = {**settings.GPGPU, "TELEMETRY_SAMPLE_INTERVAL_S": 1}
    machine, client = beaten()
    busy = [{**g, "idle": False, "owner_busy": True, "idle_since": None} if g["index"] == 3 else g for g in GPUS]
    assert beat(client, busy).status_code == 200  # a change: the full path, which samples
    samples = TelemetrySample.objects.filter(gpu__machine=machine).count()
    until_the_interval_turns(machine)

    with CaptureQueriesContext(connection) as queries:
        assert beat(client, moved(busy, by=7.0)).status_code == 200
        assert beat(client, moved(busy, by=8.0)).status_code == 200  # the same interval: no second sample

    assert statements(queries) == []
    assert TelemetrySample.objects.filter(gpu__machine=machine).count() == samples
    services.machines_liveness_sweep()
    sampled = TelemetrySample.objects.filter(gpu__machine=machine).order_by("-at", "gpu__index")[:8]
    assert [(s.gpu.index, s.utilization_pct, s.temperature_c, s.state) for s in sampled] == [
        (i, i + 7.0, 48.0, GPU.State.OWNER_BUSY if i == 3 else GPU.State.IDLE) for i in range(8)
    ]
    assert TelemetrySample.objects.filter(gpu__machine=machine).count() == samples + 8
    # Each GPU row holds the sample's telemetry, as after a full heartbeat that sampled.
    row = GPU.objects.get(machine=machine, index=2)
    assert (row.utilization_pct, row.temperature_c, row.last_telemetry_at) == (9.0, 48.0, sampled[0].at)
    assert heartbeat_steady.flush() == 0  # nothing left queued, nothing written twice
    assert TelemetrySample.objects.filter(gpu__machine=machine).count() == samples + 8


def test_a_sample_of_a_gpu_deleted_meanwhile_is_left_out_and_the_rest_written(settings: Any) -> None:
    settings.GPGPU = {**settings.GPGPU, "TELEMETRY_SAMPLE_INTERVAL_S": 1}
    machine, client = beaten()
    assert beat(client).status_code == 200
    until_the_interval_turns(machine)
    assert beat(client, moved(GPUS, by=3.0)).status_code == 200  # its sample queued
    GPU.objects.filter(machine=machine, index=7).delete()
    before = TelemetrySample.objects.filter(gpu__machine=machine).count()

    services.machines_liveness_sweep()

    newest = TelemetrySample.objects.filter(gpu__machine=machine).order_by("-at", "gpu__index")[:7]
    assert TelemetrySample.objects.filter(gpu__machine=machine).count() == before + 7
    assert [(s.gpu.index, s.utilization_pct) for s in newest] == [(i, i + 3.0) for i in range(7)]
    assert heartbeat_steady.flush() == 0


def test_a_record_lasts_a_bounded_number_of_intervals_however_its_machine_beats(settings: Any) -> None:
    settings.GPGPU = {**settings.GPGPU, "TELEMETRY_SAMPLE_INTERVAL_S": 1}
    machine, client = beaten()
    assert beat(client).status_code == 200
    key = heartbeat_steady._key("cred", Machine.objects.get(pk=machine.pk).credential_digest)
    ttl = heartbeat_steady._redis().ttl(key)
    until_the_interval_turns(machine)

    assert beat(client).status_code == 200  # sampled: the record moves on, its expiry does not

    assert 0 < heartbeat_steady._redis().ttl(key) <= ttl <= heartbeat_steady.RECORD_INTERVALS


def test_a_fleet_that_took_the_full_path_at_once_takes_it_next_spread_over_the_records_life(
    settings: Any,
) -> None:
    """A hundred machines' records remembered in the same second (the steady records lost, every
    machine's next heartbeat a full one) run out spread over RECORD_INTERVALS sample intervals,
    not all in one; one remembered as its last ran out lasts RECORD_INTERVALS intervals."""
    settings.GPGPU = {**settings.GPGPU, "TELEMETRY_SAMPLE_INTERVAL_S": 60}
    intervals = heartbeat_steady.RECORD_INTERVALS
    at = timezone.now()
    client = heartbeat_steady._redis()
    runs_out: dict[int, int] = {}
    for machine_id in range(1, 101):
        record = {
            "digest": f"fleet-{machine_id}",
            "machine_id": machine_id,
            "fp": "ab" * 16,
            "capabilities": False,
            "gpus": [],
            "generation_before": heartbeat_steady.generation(machine_id),
        }
        assert heartbeat_steady.remember(**record, at=at)
        ttl = client.ttl(heartbeat_steady._key("cred", f"fleet-{machine_id}"))
        assert 0 < ttl <= intervals * 60
        runs_out[ttl // 60] = runs_out.get(ttl // 60, 0) + 1

        if machine_id == 1:  # remembered again as it runs out: a whole life
            again = at + timedelta(seconds=ttl + 1)
            assert heartbeat_steady.remember(**record, at=again)
            assert client.ttl(heartbeat_steady._key("cred", "fleet-1")) > (intervals - 1) * 60
            client.delete(heartbeat_steady._key("cred", "fleet-1"))
            assert heartbeat_steady.remember(**record, at=at)

    assert len(runs_out) >= intervals
    assert max(runs_out.values()) <= 2 * 100 // intervals


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("utilization_pct", 150.0),
        ("utilization_pct", "55"),
        ("utilization_pct", True),
        ("temperature_c", -1),
        ("memory_used_mb", 1.5),
        ("power_w", 10**30),
    ],
)
def test_bad_telemetry_in_a_repeated_heartbeat_is_refused_as_ever(field: str, value: Any) -> None:
    _, client = beaten()
    assert beat(client).status_code == 200
    bad = [{**g, field: value} if g["index"] == 5 else g for g in moved(GPUS)]

    response = beat(client, bad)

    # The full heartbeat judged it: DRF coerces "55" and true, and refuses what is out of range.
    if value in ("55", True):
        assert response.status_code == 200
    else:
        assert response.status_code == 400, response.json()
        assert response.json()["code"] == "invalid"


def test_another_machines_report_gets_nothing_from_its_record() -> None:
    """A credential answers for its own machine only: B sending A's (steady) report goes the full
    way as B, whose GPUs it cannot take (another provider's machine in service)."""
    _, client_a = beaten()
    assert beat(client_a).status_code == 200
    client_b = agent_client(MachineFactory(accepts_process=False))

    response = beat(client_b)

    assert response.status_code == 409 and response.json()["code"] == "gpu_uuid_taken"


def test_an_unknown_credential_is_refused_whatever_the_body() -> None:
    _, client = beaten()
    assert beat(client).status_code == 200
    client.credentials(HTTP_AUTHORIZATION="Machine gpm_nobody_holds_this")

    response = beat(client)

    assert response.status_code == 401 and response.json()["code"] == "machine_credential_invalid"


def test_steady_heartbeats_count_against_the_machines_rate_limit(settings: Any) -> None:
    settings.THROTTLE_ENABLED = True
    settings.THROTTLE_RATES = {**settings.THROTTLE_RATES, "machine": "4/min"}
    _, client = beaten()  # the first of four

    codes = [beat(client).status_code for _ in range(4)]

    assert codes == [200, 200, 200, 429]


def test_an_assignment_committed_while_a_full_heartbeat_ran_is_not_forgotten() -> None:
    """The generation is read before the full heartbeat reads anything; a bump meanwhile (a
    lease assigned) stops the heartbeat's record, whose reply did not have the lease."""
    machine = MachineFactory()
    generation = heartbeat_steady.generation(machine.pk)
    assert generation is not None
    heartbeat_steady.forget([machine.pk])  # the matcher's commit, meanwhile

    remembered = heartbeat_steady.remember(
        digest=machine.credential_digest,
        machine_id=machine.pk,
        fp="0" * 32,
        at=timezone.now(),
        capabilities=False,
        gpus=[],
        generation_before=generation,
    )

    assert remembered is False
    answer = heartbeat_steady.steady(
        digest=machine.credential_digest, fp="0" * 32, at=timezone.now(), gpus=[], rate_limit=None
    )
    assert answer.code == heartbeat_steady.NOT_STEADY


def test_a_machine_running_a_lease_takes_the_full_path_while_its_prediction_is_not_cached() -> None:
    machine, client = beaten()  # the tests' settings: services.PREDICTED_IDLE_CACHE_S = 0
    gpu = GPU.objects.get(machine=machine, index=0)
    lease = placed_lease(gpus=[gpu], started=True, kind="container", image="pytorch:2")
    listed = [{"lease_id": lease.pk, "state": "running"}]
    assert beat(client, leases=listed).status_code == 200

    with CaptureQueriesContext(connection) as queries:
        response = beat(client, leases=listed)

    assert response.status_code == 200 and statements(queries)
    assert Lease.objects.get(pk=lease.pk).status == Lease.Status.RUNNING


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch) -> tuple[Machine, Any, Lease, list[dict[str, Any]]]:
    """A machine running a lease on one of its GPUs (the prediction cached, as in production), its
    client, the lease and the agent's list of it; the machine's full heartbeat listing the
    lease is behind it."""
    # An interval long enough that the prediction is not due while the test runs.
    monkeypatch.setattr(services, "PREDICTED_IDLE_CACHE_S", 10**6)
    machine, client = beaten()
    gpu = GPU.objects.get(machine=machine, index=0)
    lease = placed_lease(gpus=[gpu], started=True, kind="container", image="pytorch:2")
    listed = [{"lease_id": lease.pk, "state": "running"}]
    full = beat(client, leases=listed)
    assert full.status_code == 200 and full.json()["stop"] == [] and full.json()["predicted_idle_s"] is not None
    return machine, client, lease, listed


def test_a_machine_running_a_lease_is_answered_steady_with_its_prediction_counted_down(
    running: tuple[Machine, Any, Lease, list[dict[str, Any]]],
) -> None:
    machine, client, lease, listed = running
    full = beat(client, leases=listed).json()
    predicted, computed_at, _ = cache.get(services.predicted_idle_cache_key(machine.pk))

    with CaptureQueriesContext(connection) as queries:
        response = beat(client, leases=listed)

    assert response.status_code == 200 and statements(queries) == []
    reply = response.json()
    now = datetime.fromisoformat(reply["server_time"]).timestamp()
    assert reply["predicted_idle_s"] == max(0, int(predicted - (now - computed_at)))
    assert {**without_time(reply), "predicted_idle_s": None} == {**without_time(full), "predicted_idle_s": None}
    assert GPU.objects.get(pk=lease.lease_gpus.get().gpu_id).state == GPU.State.LEASED


def _stop_asked(lease: Lease) -> bool:
    return lease_request_stop(lease_id=lease.pk, reason="cancelled", actor="renter")


def _ended(lease: Lease) -> bool:
    return lease_end(lease_id=lease.pk, reason="max_duration", actor="sweep")


@pytest.mark.parametrize(
    ("change", "reason"), [(_stop_asked, "cancelled"), (_ended, "max_duration")], ids=["stop asked", "ended"]
)
def test_a_running_lease_stopped_by_the_marketplace_is_in_the_next_reply(
    running: tuple[Machine, Any, Lease, list[dict[str, Any]]], change: Callable[[Lease], bool], reason: str
) -> None:
    """A stop asked (a renter's cancel, billing's budget, the sweeps' max duration) or the lease
    ended by the marketplace: the machine's next heartbeat carries the stop order, though its
    report is the same as the steady one before."""
    _, client, lease, listed = running
    with CaptureQueriesContext(connection) as queries:
        assert beat(client, leases=listed).json()["stop"] == []
    assert statements(queries) == []  # steady

    assert change(lease)

    stops = beat(client, leases=listed).json()["stop"]
    assert [(order["lease_id"], order["reason"]) for order in stops] == [(lease.pk, reason)]


def test_each_machines_prediction_is_due_at_an_instant_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machines of leases one matching cycle placed compute their predictions (and take the
    full heartbeat) spread over the interval, each at most one interval after the last."""
    monkeypatch.setattr(services, "PREDICTED_IDLE_CACHE_S", 300)
    t0 = timezone.now().timestamp()
    dues = [services.predicted_idle_due(machine_id=m, computed_at=t0) for m in range(1, 201)]
    assert all(t0 < due <= t0 + 300 for due in dues)
    assert len({int((due - t0) // 30) for due in dues}) == 10  # every tenth of the interval has some
    # Computed again at its due instant, it is due one interval later.
    assert services.predicted_idle_due(machine_id=7, computed_at=dues[6]) == pytest.approx(dues[6] + 300)


def remembered_running(fp: str) -> tuple[dict[str, Any], dict[str, Any], datetime, float]:
    """A running machine's record, remembered now with a prediction of 900 s computed 20 s
    before and due 40 s from now: `remember`'s arguments (but the prediction), `steady`'s (but
    the time), now, and when the prediction was computed."""
    machine = MachineFactory()
    generation = heartbeat_steady.generation(machine.pk)
    assert generation is not None
    t0 = timezone.now()
    computed = t0.timestamp() - 20  # the cached prediction the full heartbeat counted down
    record: dict[str, Any] = {
        "digest": machine.credential_digest,
        "machine_id": machine.pk,
        "fp": fp,
        "at": t0,
        "capabilities": False,
        "gpus": [],
        "generation_before": generation,
    }
    assert heartbeat_steady.remember(**record, predicted=heartbeat_steady.Prediction(900, computed, computed + 60))
    return record, {"digest": machine.credential_digest, "fp": fp, "gpus": [], "rate_limit": None}, t0, computed


def test_a_running_machines_record_stops_answering_when_its_prediction_is_due() -> None:
    record, at, t0, computed = remembered_running("cd" * 16)

    answer = heartbeat_steady.steady(**at, at=t0 + timedelta(seconds=39))
    assert answer.code == heartbeat_steady.STEADY and answer.predicted is not None
    assert answer.predicted[0] == 900 and abs(answer.predicted[1] - computed) < 0.001
    assert heartbeat_steady.steady(**at, at=t0 + timedelta(seconds=41)).code == heartbeat_steady.NOT_STEADY
    # One due within the second is not recorded at all.
    assert not heartbeat_steady.remember(
        **record, predicted=heartbeat_steady.Prediction(None, computed, t0.timestamp() + 0.5)
    )


def test_a_running_machines_record_answers_with_a_later_stored_prediction_until_that_is_due() -> None:
    record, at, t0, computed = remembered_running("ef" * 16)
    machine_id = record["machine_id"]
    stored_at = t0.timestamp() + 30
    stored = {machine_id: heartbeat_steady.Prediction(700, stored_at, t0.timestamp() + 400)}
    assert heartbeat_steady.predictions_store(stored, now=t0.timestamp()) == 1

    answer = heartbeat_steady.steady(**at, at=t0 + timedelta(seconds=41))  # past the record's own due
    assert answer.code == heartbeat_steady.STEADY and answer.predicted is not None
    assert answer.predicted[0] == 700 and abs(answer.predicted[1] - stored_at) < 0.001
    assert heartbeat_steady.steady(**at, at=t0 + timedelta(seconds=401)).code == heartbeat_steady.NOT_STEADY

    # A stored prediction due before the record's does not replace it; one of no stretch is null.
    earlier = {machine_id: heartbeat_steady.Prediction(None, stored_at, computed + 50)}
    heartbeat_steady.predictions_store(earlier, now=t0.timestamp())
    answer = heartbeat_steady.steady(**at, at=t0 + timedelta(seconds=29))
    assert answer.code == heartbeat_steady.STEADY and answer.predicted == (900, pytest.approx(computed))
    later = {machine_id: heartbeat_steady.Prediction(None, stored_at, t0.timestamp() + 500)}
    heartbeat_steady.predictions_store(later, now=t0.timestamp())
    answer = heartbeat_steady.steady(**at, at=t0 + timedelta(seconds=450))
    assert answer.code == heartbeat_steady.STEADY and answer.predicted is None


def test_predictions_computed_off_the_heartbeat_are_what_running_machines_are_told(
    running: tuple[Machine, Any, Lease, list[dict[str, Any]]],
) -> None:
    machine, client, _lease, listed = running
    idle = MachineFactory()  # runs no lease: nothing is stored for it
    assert fold_idle_stretches()["predicted"] == 1  # the forecasts folded, then the predictions
    now = timezone.now().timestamp()
    stored = heartbeat_steady.prediction(machine.pk, now=now)
    assert stored is not None and heartbeat_steady.prediction(idle.pk, now=now) is None
    assert stored.seconds == services.idle_history.machine_predicted_idle_s(machine_id=machine.pk, now=stored.at)
    assert stored.due > now + services.PREDICTED_IDLE_CACHE_S - 1  # not due before the next refresh

    # What is stored is what the machine's heartbeats count down, the steady and the full one
    # (stored due after the record's prediction, which the fixture's interval puts far off).
    told = {machine.pk: heartbeat_steady.Prediction(12_345, now, now + 2 * services.PREDICTED_IDLE_CACHE_S)}
    heartbeat_steady.predictions_store(told, now=now)
    for report in ({}, {"agent_version": "0.1.1"}):  # a repeat, then a changed report: the full path
        with CaptureQueriesContext(connection) as queries:
            reply = beat(client, leases=listed, **report).json()
        assert bool(statements(queries)) == bool(report)
        elapsed = datetime.fromisoformat(reply["server_time"]).timestamp() - now
        assert reply["predicted_idle_s"] == int(12_345 - elapsed)


def test_a_running_machines_prediction_is_made_again_when_one_of_its_idle_stretches_moves(
    running: tuple[Machine, Any, Lease, list[dict[str, Any]]],
) -> None:
    machine, client, _lease, listed = running
    now = timezone.now().timestamp()
    stale = {machine.pk: heartbeat_steady.Prediction(12_345, now, now + 2 * services.PREDICTED_IDLE_CACHE_S)}
    heartbeat_steady.predictions_store(stale, now=now)
    gpus = moved(GPUS)
    # The owner was back at GPU 3 and left again 30 s ago: a younger stretch on the machine.
    gpus[3] = {**gpus[3], "idle_since": (timezone.now() - timedelta(seconds=30)).isoformat().replace("+00:00", "Z")}

    reply = beat(client, gpus, leases=listed).json()

    at = datetime.fromisoformat(reply["server_time"]).timestamp()
    expected = services.idle_history.machine_predicted_idle_s(machine_id=machine.pk, now=at)
    assert expected is not None and abs(expected - 12_345) > 100
    assert abs(reply["predicted_idle_s"] - expected) <= 1
    assert heartbeat_steady.prediction(machine.pk, now=at) is None  # the stale one is gone


def test_each_machines_sample_interval_turns_at_an_instant_of_its_own(settings: Any) -> None:
    """A fleet's intervals do not all turn at once (each turn queues a sample): the turns of a
    hundred machines' intervals are spread over the interval, and a record's heartbeats are
    sampled from its machine's turn on, not before."""
    settings.GPGPU = {**settings.GPGPU, "TELEMETRY_SAMPLE_INTERVAL_S": 60}
    t0 = timezone.now()
    turns = set()
    for machine_id in range(1, 101):
        b = heartbeat_steady.bucket(t0, machine_id)
        turn = next(s for s in range(61) if heartbeat_steady.bucket(t0 + timedelta(seconds=s), machine_id) != b)
        turns.add(turn)
    assert len(turns) > 30

    machine = MachineFactory()
    first = heartbeat_steady.bucket(t0, machine.pk)
    turn = next(
        t0 + timedelta(seconds=s / 10)
        for s in range(601)
        if heartbeat_steady.bucket(t0 + timedelta(seconds=s / 10), machine.pk) != first
    )
    fp = "ab" * 16
    generation = heartbeat_steady.generation(machine.pk)
    assert generation is not None
    assert heartbeat_steady.remember(
        digest=machine.credential_digest,
        fp=fp,
        machine_id=machine.pk,
        at=turn - timedelta(seconds=0.2),
        capabilities=False,
        gpus=[],
        generation_before=generation,
    )
    at = {"digest": machine.credential_digest, "fp": fp, "gpus": [], "rate_limit": None}
    assert heartbeat_steady.steady(**at, at=turn - timedelta(seconds=0.1)).code == heartbeat_steady.STEADY
    assert heartbeat_steady.steady(**at, at=turn + timedelta(seconds=0.1)).code == heartbeat_steady.SAMPLED
    # Sampled once:
    assert heartbeat_steady.steady(**at, at=turn + timedelta(seconds=0.2)).code == heartbeat_steady.STEADY
    assert heartbeat_steady.steady(**at, at=turn - timedelta(seconds=61)).code == heartbeat_steady.NOT_STEADY
