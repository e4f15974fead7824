"""The WSGI layer in front of Django (providers.heartbeat_front): a steady heartbeat answered
there gets what Django would have answered, headers included; what Django's middlewares would
refuse or redirect, and every heartbeat the steady answer declines, reaches Django intact and
tries the steady answer once. Against a real Redis (REDIS_URL, else 127.0.0.1:6379): skipped
without one, except in CI. (Every test of test_heartbeat_steady runs through this layer too.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from core import prom
from providers import heartbeat_front, heartbeat_steady
from providers.agent_apis import HeartbeatApi
from tests.factories import (
    AGENT_API,
    MachineFactory,
    agent_client,
    capabilities_report,
    gpu_entry,
    through_front,
)
from tests.live_redis import redis_settings

pytestmark = pytest.mark.django_db

GPUS = [gpu_entry(f"GPU-{i}", i, utilization_pct=float(i)) for i in range(4)]
CAPABILITIES = capabilities_report(kinds=("container",))


@pytest.fixture(autouse=True)
def steady(settings: Any) -> Iterator[None]:
    redis_settings(settings, "the steady heartbeat")
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_STEADY_PATH": True, "TELEMETRY_SAMPLE_INTERVAL_S": 10**9}
    yield


@pytest.fixture
def steady_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The steady script's answers' codes, one per call."""
    calls: list[int] = []
    real = heartbeat_steady.steady

    def counted(**kwargs: Any) -> heartbeat_steady.Answer:
        answer = real(**kwargs)
        calls.append(answer.code)
        return answer

    monkeypatch.setattr(heartbeat_steady, "steady", counted)
    return calls


def moved(by: float = 1.0) -> list[dict[str, Any]]:
    return [{**g, "utilization_pct": g["utilization_pct"] + by} for g in GPUS]


def beat(client: Any, gpus: list[dict[str, Any]] | None = None, **request: Any) -> Any:
    """POST a heartbeat of these GPUs (GPUS, their telemetry moved, by default); `request`: the
    test client's (secure, HTTP_ headers)."""
    body = {"agent_version": "0.1.0", "region": "eu-west", "capabilities": CAPABILITIES, "leases": []}
    return client.post(
        AGENT_API + "heartbeat", {**body, "gpus": moved() if gpus is None else gpus}, format="json", **request
    )


def beaten(**request: Any) -> Any:
    """A front client of a machine whose full heartbeat is behind it (its repeat is steady)."""
    client = through_front(agent_client(MachineFactory(accepts_process=False)))
    assert beat(client, GPUS, **request).status_code == 200
    return client


def django_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the heartbeat reached Django's view")

    monkeypatch.setattr(HeartbeatApi, "dispatch", refuse)


def test_a_steady_heartbeat_is_answered_in_front_of_django_with_djangos_headers(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.SECURE_HSTS_SECONDS = 3600  # sent on secure requests only: the front must add it as Django does
    client = beaten()
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_STEADY_PATH": False}
    through_django = beat(client, secure=True)  # the full path answers a repeat...
    assert through_django.status_code == 200
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_STEADY_PATH": True}
    django_never_runs(monkeypatch)

    steady = beat(client, moved(2.0), secure=True, HTTP_X_REQUEST_ID="agent-7f3a")  # ...the front its repeat

    assert steady.status_code == 200
    expected = {k: v for k, v in through_django.headers.items() if k != "X-Request-ID"}
    assert {k: v for k, v in steady.headers.items() if k != "X-Request-ID"} == expected
    assert "Strict-Transport-Security" in steady.headers
    assert steady.headers["X-Request-ID"] == "agent-7f3a"  # the caller's id echoed, as Django does
    assert {k: v for k, v in steady.json().items() if k != "server_time"} == {
        k: v for k, v in through_django.json().items() if k != "server_time"
    }


def test_a_host_django_refuses_is_refused_however_steady_the_heartbeat(settings: Any, steady_calls: list[int]) -> None:
    client = beaten()
    assert beat(client).status_code == 200 and steady_calls[-1] == heartbeat_steady.STEADY
    steady_calls.clear()
    settings.ALLOWED_HOSTS = ["api.gpgpu.example"]

    response = beat(client, HTTP_HOST="evil.example")

    assert response.status_code == 400
    assert steady_calls == []  # not answered, not even tried


def test_an_insecure_heartbeat_is_redirected_when_tls_is_required(settings: Any, steady_calls: list[int]) -> None:
    settings.SECURE_SSL_REDIRECT = True  # read when Django's middlewares are loaded: before the first request
    client = beaten(secure=True)
    steady_calls.clear()

    response = beat(client)  # plain http

    assert response.status_code == 301 and response["Location"].startswith("https://")
    assert steady_calls == []


def test_a_body_over_the_limit_is_refused_unread(settings: Any, steady_calls: list[int]) -> None:
    client = beaten()
    steady_calls.clear()
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000  # a heartbeat of four GPUs is longer

    response = beat(client)

    assert response.status_code == 413
    assert steady_calls == []


def test_a_heartbeat_the_steady_answer_declines_reaches_django_whole_and_is_tried_once(
    steady_calls: list[int],
) -> None:
    client = beaten()
    steady_calls.clear()
    changed = [*moved(), gpu_entry("GPU-new", 4)]  # a fifth GPU: not the report recorded

    response = beat(client, changed)

    assert response.status_code == 200
    assert steady_calls == [heartbeat_steady.NOT_STEADY]  # tried in front only, not again in the view
    assert beat(client, changed).status_code == 200  # the full path recorded the new report...
    assert steady_calls[-1] == heartbeat_steady.STEADY  # ...and its repeat is steady


def test_a_heartbeat_answered_in_front_is_counted_in_the_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    client = beaten()
    assert beat(client).status_code == 200
    django_never_runs(monkeypatch)

    def count(name: str, **labels: str) -> float:
        return prom.REGISTRY.get_sample_value(name, labels) or 0.0

    ok, timed = count("gpgpu_agent_heartbeats_total", outcome="ok"), count("gpgpu_agent_heartbeat_seconds_count")

    assert beat(client, moved(3.0)).status_code == 200

    assert count("gpgpu_agent_heartbeats_total", outcome="ok") == ok + 1
    assert count("gpgpu_agent_heartbeat_seconds_count") == timed + 1


def test_a_fault_in_front_of_django_costs_the_agent_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = beaten()

    def broken(**kwargs: Any) -> int:
        raise RuntimeError("a bug in the steady path")

    monkeypatch.setattr(heartbeat_steady, "steady", broken)

    response = beat(client)

    assert response.status_code == 200  # the full heartbeat answered it
    assert "the front failed" in caplog.text


def test_the_heartbeats_path_is_resolved_when_the_app_is_built_not_by_its_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Django's URL resolver builds its reverse index lazily and without a lock: resolved per
    # request, every thread of a worker's first burst built it again (seconds of CPU).
    reached: list[str] = []

    def django(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        reached.append(environ["PATH_INFO"])
        start_response("204 No Content", [])
        return []

    front = heartbeat_front.SteadyHeartbeats(django)
    assert front.path == AGENT_API + "heartbeat"

    def resolver_again() -> Any:
        raise AssertionError("the URL resolver was asked again by a request")

    monkeypatch.setattr(heartbeat_front, "get_resolver", resolver_again)
    for method, path in (("POST", front.path), ("GET", front.path), ("POST", "/livez")):
        body = front({"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.input": None}, lambda *a: None)
        assert list(body) == []
    assert reached == [front.path, front.path, "/livez"]
