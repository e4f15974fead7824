"""/healthz: what a load balancer or an operator sees when a dependency is down."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
from django.db import OperationalError
from django.db.backends.base.base import BaseDatabaseWrapper

from marketplace.celery import app

pytestmark = pytest.mark.django_db

UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"


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


def test_healthz_is_ok_when_database_and_broker_answer(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/healthz")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"] == {"database": "ok", "broker": "ok"}
    assert body["broker"] == app.conf.broker_url.split("://", 1)[0]


@pytest.mark.skipif(not str(app.conf.broker_url).startswith("redis"), reason="the configured broker is not Redis")
def test_healthz_really_connects_to_a_redis_broker(client) -> None:  # type: ignore[no-untyped-def]
    import redis

    server = redis.Redis.from_url(app.conf.broker_url)
    before = server.info("stats")["total_connections_received"]

    response = client.get("/healthz")

    assert response.status_code == 200, response.content
    assert server.info("stats")["total_connections_received"] > before


def _strings(value: object) -> list[str]:
    """Every string in a JSON body, keys and values."""
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in [str(key), *_strings(item)]]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_healthz_names_the_database_but_not_its_error_text_when_it_cannot_be_queried(client, caplog) -> None:  # type: ignore[no-untyped-def]
    error = OperationalError('connection to server at "db.internal" (10.1.2.3), port 6543 failed: password for gpgpu')
    with mock.patch.object(BaseDatabaseWrapper, "cursor", side_effect=error):
        response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"] == {"database": "failed: OperationalError", "broker": "ok"}
    for leak in ("db.internal", "10.1.2.3", "6543", "password", "gpgpu"):
        assert leak not in response.content.decode(), leak
    # The operator finds the whole error in the log.
    assert "db.internal" in caplog.text


def test_healthz_names_the_broker_when_it_is_unreachable(client, point_broker_at) -> None:  # type: ignore[no-untyped-def]
    point_broker_at(UNREACHABLE_BROKER)

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("failed:")


def test_healthz_shows_no_credentials_host_or_port_of_an_unreachable_broker(client, point_broker_at) -> None:  # type: ignore[no-untyped-def]
    point_broker_at("redis://user:secret@127.0.0.1:1/0")

    response = client.get("/healthz")

    assert response.status_code == 503
    text = response.content.decode()
    body = response.json()
    assert body["checks"]["broker"].startswith("failed:")
    assert body["broker"] == "redis"
    for leak in ("user", "secret", "127.0.0.1", ":1"):
        assert leak not in text, leak
    # The port is 1: no string in the body carries a digit (seconds is a number, not a string).
    assert not [s for s in _strings(body) if any(c.isdigit() for c in s)], body


def test_healthz_answers_get_only(client) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/healthz").status_code == 405
