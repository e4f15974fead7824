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


def test_healthz_names_the_database_when_it_cannot_be_queried(client) -> None:  # type: ignore[no-untyped-def]
    with mock.patch.object(BaseDatabaseWrapper, "cursor", side_effect=OperationalError("server closed the connection")):
        response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"].startswith("failed:")
    assert "server closed the connection" in body["checks"]["database"]
    assert body["checks"]["broker"] == "ok"


def test_healthz_names_the_broker_when_it_is_unreachable(client, point_broker_at) -> None:  # type: ignore[no-untyped-def]
    point_broker_at(UNREACHABLE_BROKER)

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("failed:")
    assert "127.0.0.1:1" in body["checks"]["broker"]


def test_healthz_answers_get_only(client) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/healthz").status_code == 405
