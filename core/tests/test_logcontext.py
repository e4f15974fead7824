"""Log lines fit for a fleet: with LOG_FORMAT=json each line is one JSON object carrying the
request (or Celery task), machine, lease and job it was written for."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from core import logcontext
from marketplace.celery import app
from tests.factories import JobFactory, MachineFactory, agent_client, placed_lease


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the console handler of settings.LOGGING would write with LOG_FORMAT=json: its
    formatter and filter, as configured, on a handler of django.request (which logs every 4xx)."""
    formatter_config = dict(settings.LOGGING["formatters"]["json"])
    factory = formatter_config.pop("()")
    module, _, name = factory.rpartition(".")
    formatter = getattr(__import__(module, fromlist=[name]), name)(**formatter_config)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(logcontext.ContextFilter())
    logger = logging.getLogger("django.request")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


@pytest.mark.django_db
def test_an_agents_refused_call_logs_one_json_line_naming_its_request_machine_and_lease(
    json_lines: io.StringIO,
) -> None:
    machine = MachineFactory()
    others = placed_lease(job=JobFactory())  # a lease on another machine
    client = agent_client(machine)

    resp = client.post(
        f"/api/agent/v1/leases/{others.pk}/events",
        {"event_id": "e-1", "kind": "started", "at": "2026-12-02T10:00:00Z"},
        format="json",
        HTTP_X_REQUEST_ID="agent-7f3a.42",
    )

    assert resp.status_code in (400, 404)  # refused, whichever check comes first
    assert resp["X-Request-ID"] == "agent-7f3a.42"
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["level"] == "WARNING" and line["logger"] == "django.request"
    assert line["request_id"] == "agent-7f3a.42"
    assert line["machine_id"] == machine.pk
    assert line["lease_id"] == others.pk
    assert line["job_id"] is None
    assert "time" in line and str(others.pk) in line["message"]
    assert logcontext.current() == {}  # nothing stays bound after the request


@pytest.mark.django_db
@pytest.mark.parametrize("forged", ['x" level="CRITICAL', "a b", "line\nbreak", "é", "x" * 65])
def test_a_request_id_that_could_forge_log_fields_is_replaced_by_a_fresh_one(
    forged: str, json_lines: io.StringIO
) -> None:
    resp = APIClient().get("/api/v1/jobs/999999/", HTTP_X_REQUEST_ID=forged)

    assert resp.status_code in (401, 403)
    fresh = resp["X-Request-ID"]
    assert fresh != forged and len(fresh) == 32 and int(fresh, 16) >= 0
    line = json.loads(json_lines.getvalue().splitlines()[-1])
    assert line["request_id"] == fresh


@pytest.mark.django_db
def test_a_renters_request_for_a_job_carries_the_job_id(json_lines: io.StringIO) -> None:
    resp = APIClient().get("/api/v1/jobs/4242/")

    assert resp.status_code in (401, 403)
    line = json.loads(json_lines.getvalue().splitlines()[-1])
    assert line["job_id"] == 4242 and line["machine_id"] is None
    assert line["request_id"] == resp["X-Request-ID"]


@app.task(name="tests.logcontext_probe")
def _probe() -> dict[str, Any]:
    return logcontext.current()


def test_a_celery_task_logs_under_its_task_id_and_leaves_nothing_bound() -> None:
    result = _probe.apply()

    assert result.get() == {"request_id": result.id}
    assert logcontext.current() == {}


def test_an_explicit_id_in_the_call_wins_over_the_bound_one() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.lease_id = 9
    with logcontext.bound(lease_id=3, job_id=5):
        logcontext.ContextFilter().filter(record)
    assert (record.lease_id, record.job_id, record.request_id) == (9, 5, None)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not a log id"):
        logcontext.bind(user="x")
