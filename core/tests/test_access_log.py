"""web's access log as docker-compose's web configures granian's (core/access_log.json): the
agents' answered heartbeats left out, every other request logged in granian's own format."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.urls import reverse
from granian.log import DEFAULT_ACCESSLOG_FMT, LogLevels, configure_logging, log_request_builder

from core import access_log as access_log_module
from tests.faults import harness

CONFIG = Path(__file__).resolve().parents[1] / "access_log.json"


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """granian's logging as configured from core/access_log.json, its access lines written here."""
    logger = logging.getLogger("granian.access")
    saved = (logger.handlers[:], logger.filters[:], logger.level, logger.propagate)
    configure_logging(LogLevels.info, json.loads(CONFIG.read_text()))
    (handler,) = logger.handlers
    assert isinstance(handler, logging.StreamHandler)
    out = io.StringIO()
    handler.setStream(out)
    try:
        yield out
    finally:
        logger.handlers[:], logger.filters[:], logger.level, logger.propagate = saved


def request(method: str, path: str) -> dict[str, object]:
    """The request's fields as granian hands them to its access log."""
    fields = {"addr_remote": "10.0.0.7", "path": path, "qs": "", "method": method}
    return {**fields, "scheme": "http", "protocol": "HTTP/1.1"}


def test_the_filter_names_the_heartbeats_path() -> None:
    assert reverse("agent-heartbeat") == access_log_module.HEARTBEAT_PATH


def test_answered_heartbeats_are_left_out_and_refused_ones_and_everything_else_logged(access_log: io.StringIO) -> None:
    log_request = log_request_builder(DEFAULT_ACCESSLOG_FMT)  # what granian calls for each request
    now = time.time()
    for method, path, status in [
        ("POST", "/api/agent/v1/heartbeat", 200),
        ("POST", "/api/agent/v1/heartbeat", 401),
        ("POST", "/api/agent/v1/heartbeat", 429),
        ("POST", "/api/agent/v1/heartbeat", 500),
        ("GET", "/api/agent/v1/heartbeat", 405),
        ("POST", "/api/agent/v1/leases/7/usage", 200),
        ("POST", "/api/agent/v1/leases/7/usage", 409),
        ("GET", "/livez", 200),
        ("POST", "/api/agent/v1/heartbeat", 200),
    ]:
        log_request(now, time.perf_counter(), request(method, path), status)

    lines = access_log.getvalue().splitlines()
    assert [(line.split('"')[1], line.split('"')[2].split()[0]) for line in lines] == [
        ("POST /api/agent/v1/heartbeat HTTP/1.1", "401"),
        ("POST /api/agent/v1/heartbeat HTTP/1.1", "429"),
        ("POST /api/agent/v1/heartbeat HTTP/1.1", "500"),
        ("GET /api/agent/v1/heartbeat HTTP/1.1", "405"),
        ("POST /api/agent/v1/leases/7/usage HTTP/1.1", "200"),
        ("POST /api/agent/v1/leases/7/usage HTTP/1.1", "409"),
        ("GET /livez HTTP/1.1", "200"),
    ]
    # Still the format the fault suite reads a refused usage report from.
    refusals = [r for line in lines if (r := harness.usage_refusal(line))]
    assert [(lease, status) for _, lease, status in refusals] == [(7, 409)]
