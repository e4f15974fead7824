"""/livez, /readyz and /healthz: what an orchestrator, a load balancer and an operator see when a
dependency is down. Each outage is real: PostgreSQL, Redis and the chain node at ports nobody
listens on, an SQLite file that cannot be opened, a node that accepts and never answers."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from billing.chain.client import chain_client_eth_tester
from core.models import PeriodicTaskState
from core.tests.outage import default_database, free_port, postgres_down_url, sqlite_unopenable_url
from marketplace import health
from marketplace.celery import app
from marketplace.tasks import worker_heartbeat

pytestmark = pytest.mark.django_db

PASSWORD = "pw-Sekr1t-DSN"
HEARTBEAT_INTERVAL_S = 30.0


@pytest.fixture(autouse=True)
def probes_afresh() -> Iterator[None]:
    """Each test's dependencies are its own: no probe result shared from the test before."""
    health.probes_forget()
    yield
    health.probes_forget()


@pytest.fixture
def point_broker_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Points the Celery app at another broker for one test; the configured one is restored.
    Celery reads CELERY_BROKER_URL from the environment before its own configuration (as CI
    sets it), so both are overridden."""
    configured = app.conf.broker_url

    def point(url: str) -> None:
        for name in ("CELERY_BROKER_URL", "CELERY_BROKER_WRITE_URL"):
            if name in os.environ:
                monkeypatch.setenv(name, url)
        app.conf.broker_url = url
        assert app.conf.broker_url == url

    yield point
    monkeypatch.undo()
    app.conf.broker_url = configured


@pytest.fixture
def chain_up(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A chain node that answers (an in-process EVM), a few blocks in."""
    client = chain_client_eth_tester()
    client.web3.provider.ethereum_tester.mine_blocks(5)  # type: ignore[attr-defined]
    monkeypatch.setattr(health, "_chain_reader", lambda: client)
    return client


@pytest.fixture
def chain_down(settings: Any) -> str:
    """CHAIN_RPC_URL at a port nobody listens on, with an API key in its path and credentials."""
    settings.CHAIN_ID = None
    settings.CHAIN_RPC_URL = f"http://node-user:node-pass@127.0.0.1:{free_port()}/v3/NODEAPIKEY123"
    settings.CHAIN_RPC_TIMEOUT_S = 2
    return str(settings.CHAIN_RPC_URL)


@pytest.fixture
def redis_cache_down(settings: Any) -> str:
    """The rate limits' cache (REDIS_URL) at a port nobody listens on, with a password."""
    url = f"redis://:cache-Pa55@127.0.0.1:{free_port()}/1"
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": url,
            "OPTIONS": {"socket_connect_timeout": 1.0, "socket_timeout": 1.0},
        }
    }
    return url


@pytest.fixture
def postgres_down() -> Iterator[str]:
    url = postgres_down_url(password=PASSWORD)
    with default_database(url, connect_timeout=2):
        yield url


def _fresh(name: str, **fields: Any) -> PeriodicTaskState:
    now = timezone.now()
    values = {"last_started_at": now, "last_finished_at": now, "last_ok": True, **fields}
    state, _ = PeriodicTaskState.objects.update_or_create(name=name, defaults=values)
    return state


@pytest.fixture
def every_task_fresh() -> None:
    """Every task in the beat schedule (the heartbeat included) ran just now and went through."""
    for entry in django_settings.CELERY_BEAT_SCHEDULE.values():
        _fresh(str(entry["task"]))


def _strings(value: object) -> list[str]:
    """Every string in a JSON body, keys and values."""
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in [str(key), *_strings(item)]]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def _assert_reveals_nothing_of(text: str, url: str) -> None:
    """Neither the URL nor its user, password, host, port or path appear in `text` (a path of a
    digit or two, a Redis database number, would match any figure)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    leaks = [url, parts.hostname, f":{parts.port}", parts.username, parts.password, parts.path.strip("/")]
    for leak in [leak for leak in leaks if leak and len(leak) > 2]:
        assert leak not in text, leak


# --- /livez ------------------------------------------------------------------------------------


def test_livez_answers_with_the_database_redis_and_the_chain_all_down(
    postgres_down: str, point_broker_at: Any, redis_cache_down: str, chain_down: str
) -> None:
    point_broker_at(f"redis://127.0.0.1:{free_port()}/0")

    response = Client().get("/livez")

    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


# --- /readyz -----------------------------------------------------------------------------------


def test_readyz_is_ready_when_the_database_answers() -> None:
    response = Client().get("/readyz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["database"]["latency_ms"] >= 0


def test_readyz_is_a_503_when_postgresql_is_down(postgres_down: str) -> None:
    response = Client().get("/readyz")

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    body = response.json()
    assert body["status"] == "unready"
    assert body["checks"]["database"] == {
        "status": "error",
        "error": "OperationalError",
        "vendor": "postgresql",
        "latency_ms": body["checks"]["database"]["latency_ms"],
    }
    _assert_reveals_nothing_of(response.content.decode(), postgres_down)


def test_readyz_is_a_503_when_the_sqlite_file_cannot_be_opened(tmp_path: Any) -> None:
    with default_database(sqlite_unopenable_url(str(tmp_path))):
        response = Client().get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["database"]["error"] == "OperationalError"
    assert str(tmp_path) not in response.content.decode()


def test_readyz_stays_ready_with_redis_and_the_chain_down(
    point_broker_at: Any, redis_cache_down: str, chain_down: str
) -> None:
    point_broker_at(f"redis://127.0.0.1:{free_port()}/0")

    response = Client().get("/readyz")

    assert response.status_code == 200
    assert response.json()["status"] == "ready"


# --- /healthz: ok ------------------------------------------------------------------------------


def test_healthz_is_ok_with_every_dependency_up_and_every_task_fresh(every_task_fresh: None, chain_up: Any) -> None:
    response = Client().get("/healthz")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok", body["problems"]
    assert body["problems"] == []
    checks = body["checks"]
    assert list(checks) == ["database", "broker", "cache", "chain", "worker"]
    assert checks["database"]["status"] == "ok" and checks["database"]["vendor"] in {"sqlite", "postgresql"}
    assert checks["broker"] == {"status": "ok", "transport": app.conf.broker_url.split("://", 1)[0]}
    assert checks["cache"]["status"] == "ok"
    assert checks["chain"] == {
        "status": "ok",
        "chain_id": chain_up.chain_id(),
        "head_block": chain_up.block_number(),
        "lag_blocks": None,
    }
    assert checks["worker"]["status"] == "ok" and checks["worker"]["interval_s"] == HEARTBEAT_INTERVAL_S
    scheduled = {str(e["task"]) for e in django_settings.CELERY_BEAT_SCHEDULE.values()} - {health.HEARTBEAT_TASK}
    assert set(body["tasks"]) == scheduled
    assert {task["status"] for task in body["tasks"].values()} == {"ok"}
    assert body["settlement"] == {
        "unsettled_leases": 0,
        "unsettled_ended_leases": 0,
        "oldest_unsettled_end_age_s": None,
        "open_settlements": 0,
        "oldest_open_settlement_age_s": None,
    }
    assert body["ledger"] == {"status": "never_run"}
    assert body["server_time"].endswith("Z")


def test_a_flood_of_healthz_requests_costs_the_chain_node_one_probe_per_share_window(
    every_task_fresh: None, chain_up: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/healthz is public: a caller sending it in a loop must not turn each request into an RPC
    on the marketplace's node (a paid, rate-limited provider in many deployments)."""
    calls: list[float] = []
    real = health._check_chain

    def counted() -> dict[str, Any]:
        calls.append(time.monotonic())
        return real()

    monkeypatch.setattr(health, "_check_chain", counted)
    monkeypatch.setattr(health, "PROBE_SHARE_S", 60.0)
    client = Client()

    bodies = [client.get("/healthz").json() for _ in range(20)]

    assert len(calls) == 1
    assert all(body["checks"]["chain"]["status"] == "ok" for body in bodies)
    assert {body["checks"]["chain"]["head_block"] for body in bodies} == {chain_up.block_number()}

    monkeypatch.setattr(health, "PROBE_SHARE_S", 0.0)  # the window has passed
    before = len(calls)
    client.get("/healthz")
    assert len(calls) == before + 1  # past the window: probed afresh


def test_healthz_shows_a_ledger_that_differs_from_the_chain_as_a_problem(every_task_fresh: None) -> None:
    from billing.models import LedgerCheck

    LedgerCheck.objects.create(ok=True, chain_compared=True, block_number=7)
    assert Client().get("/healthz").json()["ledger"]["status"] == "ok"
    LedgerCheck.objects.create(
        ok=False, chain_compared=True, block_number=9, differences=["provider 0xabc: chain 10, ledger 12"]
    )

    body = Client().get("/healthz").json()

    assert body["ledger"]["status"] == "differs"
    assert (body["ledger"]["block_number"], body["ledger"]["differences"]) == (9, 1)
    assert "ledger" in body["problems"] and body["status"] == "degraded"
    assert "0xabc" not in str(body)  # what differs names accounts: the console shows it, not this page


@pytest.mark.skipif(not str(app.conf.broker_url).startswith("redis"), reason="the configured broker is not Redis")
def test_healthz_really_connects_to_a_redis_broker() -> None:
    import redis

    server = redis.Redis.from_url(app.conf.broker_url)
    before = server.info("stats")["total_connections_received"]

    response = Client().get("/healthz")

    assert response.json()["checks"]["broker"]["status"] == "ok"
    assert server.info("stats")["total_connections_received"] > before


def test_the_chain_lag_is_how_far_the_deposit_watcher_is_behind_the_head(every_task_fresh: None, chain_up: Any) -> None:
    from billing.deposits import CURSOR_NAME
    from billing.models import ChainCursor

    ChainCursor.objects.create(name=CURSOR_NAME, last_block=chain_up.block_number() - 2)

    chain = Client().get("/healthz").json()["checks"]["chain"]

    assert chain["lag_blocks"] == 2


# --- /healthz: degraded (200) ------------------------------------------------------------------


def test_healthz_is_degraded_not_down_when_the_broker_is_unreachable(
    every_task_fresh: None, chain_up: Any, point_broker_at: Any
) -> None:
    url = f"redis://broker-user:broker-Pa55@127.0.0.1:{free_port()}/0"
    point_broker_at(url)

    response = Client().get("/healthz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["problems"] == ["broker"]
    assert body["checks"]["broker"]["status"] == "error"
    assert body["checks"]["broker"]["transport"] == "redis"
    assert body["checks"]["broker"]["error"].isidentifier()  # an exception's class name, no text
    _assert_reveals_nothing_of(response.content.decode(), url)


def test_healthz_is_degraded_when_the_rate_limit_cache_is_unreachable(
    every_task_fresh: None, chain_up: Any, redis_cache_down: str
) -> None:
    response = Client().get("/healthz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded" and body["problems"] == ["cache"]
    assert body["checks"]["cache"] == {"status": "error", "error": "ConnectionError", "backend": "RedisCache"}
    _assert_reveals_nothing_of(response.content.decode(), redis_cache_down)


def test_healthz_is_degraded_when_the_chain_node_is_unreachable(every_task_fresh: None, chain_down: str) -> None:
    response = Client().get("/healthz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded" and body["problems"] == ["chain"]
    assert body["checks"]["chain"] == {"status": "error", "error": "NodeUnavailable"}
    _assert_reveals_nothing_of(response.content.decode(), chain_down)
    assert "NODEAPIKEY123" not in response.content.decode()


@pytest.fixture
def silent_node(settings: Any) -> Iterator[None]:
    """A chain node that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        settings.CHAIN_ID = None
        settings.CHAIN_RPC_URL = f"http://127.0.0.1:{server.getsockname()[1]}"
        settings.CHAIN_RPC_TIMEOUT_S = 10
        yield


def test_a_chain_node_that_never_answers_does_not_hold_healthz_past_the_probe_deadline(
    every_task_fresh: None, silent_node: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "PROBE_DEADLINE_S", 0.5)
    started = time.monotonic()

    response = Client().get("/healthz")

    assert time.monotonic() - started < 5
    assert response.status_code == 200
    assert response.json()["checks"]["chain"] == {"status": "error", "error": "Timeout"}


def test_healthz_reports_a_missing_worker_heartbeat_as_degraded(chain_up: Any) -> None:
    for entry in django_settings.CELERY_BEAT_SCHEDULE.values():
        if entry["task"] != health.HEARTBEAT_TASK:
            _fresh(str(entry["task"]))

    body = Client().get("/healthz").json()

    assert body["status"] == "degraded" and body["problems"] == ["worker"]
    assert body["checks"]["worker"] == {
        "status": "missing",
        "interval_s": HEARTBEAT_INTERVAL_S,
        "last_beat_at": None,
        "age_s": None,
    }


def test_the_heartbeat_task_makes_the_worker_ok(chain_up: Any) -> None:
    for entry in django_settings.CELERY_BEAT_SCHEDULE.values():
        if entry["task"] != health.HEARTBEAT_TASK:
            _fresh(str(entry["task"]))

    worker_heartbeat()
    body = Client().get("/healthz").json()

    assert body["status"] == "ok", body["problems"]
    assert body["checks"]["worker"]["status"] == "ok"
    assert body["checks"]["worker"]["age_s"] < 60
    state = PeriodicTaskState.objects.get(name=health.HEARTBEAT_TASK)
    assert state.last_ok is True and state.total_runs == 1


def test_a_heartbeat_older_than_three_intervals_is_stale(every_task_fresh: None, chain_up: Any) -> None:
    beat = timezone.now() - timedelta(seconds=3 * HEARTBEAT_INTERVAL_S + 10)
    _fresh(health.HEARTBEAT_TASK, last_started_at=beat, last_finished_at=beat)

    response = Client().get("/healthz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded" and body["problems"] == ["worker"]
    assert body["checks"]["worker"]["status"] == "stale"
    assert body["checks"]["worker"]["age_s"] >= 3 * HEARTBEAT_INTERVAL_S + 10


def test_a_heartbeat_within_three_intervals_is_ok(every_task_fresh: None, chain_up: Any) -> None:
    beat = timezone.now() - timedelta(seconds=3 * HEARTBEAT_INTERVAL_S - 10)
    _fresh(health.HEARTBEAT_TASK, last_started_at=beat, last_finished_at=beat)

    assert Client().get("/healthz").json()["checks"]["worker"]["status"] == "ok"


def test_a_task_not_run_for_three_intervals_is_stale(every_task_fresh: None, chain_up: Any) -> None:
    settle = "billing.tasks.settle"
    long_ago = timezone.now() - timedelta(seconds=3 * 15 + 5)
    _fresh(settle, last_started_at=long_ago, last_finished_at=long_ago)

    body = Client().get("/healthz").json()

    assert body["status"] == "degraded" and body["problems"] == [f"task:{settle}"]
    assert body["tasks"][settle]["status"] == "stale"
    assert body["tasks"][settle]["interval_s"] == 15.0


def test_a_task_skipped_because_its_last_run_still_holds_the_lock_is_not_stale(
    every_task_fresh: None, chain_up: Any
) -> None:
    settle = "billing.tasks.settle"
    long_ago = timezone.now() - timedelta(minutes=5)
    _fresh(settle, last_started_at=long_ago, last_finished_at=long_ago, last_skipped_at=timezone.now())

    assert Client().get("/healthz").json()["tasks"][settle]["status"] == "ok"


def test_a_task_failing_three_runs_in_a_row_degrades_and_shows_when_it_last_succeeded(
    every_task_fresh: None, chain_up: Any
) -> None:
    meter, match = "billing.tasks.meter_leases", "marketplace.tasks.match_pending_jobs"
    _fresh(meter, last_ok=False, consecutive_failures=3, last_error="NodeUnavailable: http://10.0.0.9:8545")
    match_state = _fresh(match, consecutive_failures=0)

    body = Client().get("/healthz").json()

    assert body["status"] == "degraded" and body["problems"] == [f"task:{meter}"]
    assert body["tasks"][meter]["status"] == "failing"
    assert body["tasks"][meter]["consecutive_failures"] == 3
    assert body["tasks"][meter]["last_success_at"] is None
    assert body["tasks"][match]["status"] == "ok"
    assert body["tasks"][match]["last_success_at"] == match_state.last_finished_at.isoformat().replace("+00:00", "Z")
    # The task's last error may name a node's host: it stays in the console.
    assert "10.0.0.9" not in str(body)


def test_one_failed_run_is_shown_but_does_not_degrade(every_task_fresh: None, chain_up: Any) -> None:
    _fresh("billing.tasks.meter_leases", last_ok=False, consecutive_failures=1)

    body = Client().get("/healthz").json()

    assert body["status"] == "ok"
    assert body["tasks"]["billing.tasks.meter_leases"]["consecutive_failures"] == 1


def test_a_task_that_never_ran_yet_does_not_degrade(every_task_fresh: None, chain_up: Any) -> None:
    PeriodicTaskState.objects.filter(name="providers.tasks.prune_telemetry").delete()

    body = Client().get("/healthz").json()

    assert body["status"] == "ok"
    assert body["tasks"]["providers.tasks.prune_telemetry"]["status"] == "never_run"


# --- /healthz: the settlement backlog ----------------------------------------------------------


def test_healthz_counts_the_settlement_backlog_and_the_age_of_its_oldest(every_task_fresh: None, chain_up: Any) -> None:
    from billing.models import LedgerEntry, Settlement
    from billing.services import Leg, job_budget_reserve, job_reserved, lease_unsettled, ledger_post
    from jobs.models import Lease
    from jobs.services import lease_end
    from tests.factories import placed_lease

    now = timezone.now()

    def charged(micro: int) -> Lease:
        lease = placed_lease(started=now - timedelta(hours=1))
        job_budget_reserve(job=lease.job)
        ledger_post(
            kind=LedgerEntry.Kind.CHARGE,
            idempotency_key=f"charge:{lease.pk}:{micro}",
            legs=[Leg(job_reserved(lease.job_id), -micro), Leg(lease_unsettled(lease.pk), micro)],
            job_id=lease.job_id,
            lease_id=lease.pk,
        )
        return lease

    charged(1000)  # still running
    for minutes in (10, 3):
        ended = charged(2000)
        lease_end(
            lease_id=ended.pk, reason=Lease.EndReason.SUCCEEDED, actor="test", at=now - timedelta(minutes=minutes)
        )
    batch = Settlement.objects.create(status=Settlement.Status.SUBMITTED)
    Settlement.objects.filter(pk=batch.pk).update(created_at=now - timedelta(minutes=2))
    Settlement.objects.create(status=Settlement.Status.CONFIRMED)

    backlog = Client().get("/healthz").json()["settlement"]

    assert backlog["unsettled_leases"] == 3
    assert backlog["unsettled_ended_leases"] == 2
    assert 600 <= backlog["oldest_unsettled_end_age_s"] < 660
    assert backlog["open_settlements"] == 1
    assert 120 <= backlog["oldest_open_settlement_age_s"] < 180


# --- /healthz: down (503) ----------------------------------------------------------------------


def test_healthz_is_down_and_a_503_when_postgresql_is_down(postgres_down: str, chain_up: Any) -> None:
    response = Client().get("/healthz")

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    body = response.json()
    assert body["status"] == "down"
    assert body["problems"][0] == "database"
    assert body["checks"]["database"]["status"] == "error"
    assert body["checks"]["database"]["error"] == "OperationalError"
    # What only the database knows is unknown, not made up.
    assert body["checks"]["worker"]["status"] == "unknown"
    assert {task["status"] for task in body["tasks"].values()} == {"unknown"}
    assert body["settlement"] is None
    # The other dependencies are still probed.
    assert body["checks"]["chain"]["status"] == "ok"
    _assert_reveals_nothing_of(response.content.decode(), postgres_down)


def test_no_endpoint_reveals_a_host_port_user_password_or_key_with_everything_down(
    postgres_down: str, point_broker_at: Any, redis_cache_down: str, chain_down: str
) -> None:
    broker = f"redis://broker-user:broker-Pa55@127.0.0.1:{free_port()}/0"
    point_broker_at(broker)

    for path in ("/livez", "/readyz", "/healthz"):
        response = Client().get(path)
        text = response.content.decode()
        for url in (postgres_down, broker, redis_cache_down, chain_down):
            _assert_reveals_nothing_of(text, url)
        assert "127.0.0.1" not in text and "NODEAPIKEY123" not in text
        # No string in the body is an error's text: an error is a class name.
        assert not [s for s in _strings(response.json()) if " " in s], path


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz"])
def test_the_probes_answer_get_only(path: str) -> None:
    assert Client().post(path).status_code == 405


def test_the_heartbeat_runs_from_the_beat_schedule_every_30_seconds() -> None:
    entries = [e for e in django_settings.CELERY_BEAT_SCHEDULE.values() if e["task"] == health.HEARTBEAT_TASK]

    assert entries == [
        {
            "task": health.HEARTBEAT_TASK,
            "schedule": HEARTBEAT_INTERVAL_S,
            "options": {"expires": HEARTBEAT_INTERVAL_S},
        }
    ]
