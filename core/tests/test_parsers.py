"""JSON bodies nested without bound: refused with 400 before the decoder recurses (in a web
process the recursion limit is py_ecc's 100,000, so the decoder would overflow the C stack and
kill the process with a segmentation fault first)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from rest_framework.test import APIClient

from core.parsers import MAX_DEPTH, TooDeep, loads, nesting_exceeds
from tests.factories import MachineFactory, agent_client


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_is_measured_outside_strings() -> None:
    assert not nesting_exceeds(nested(MAX_DEPTH))
    assert nesting_exceeds(nested(MAX_DEPTH + 1))
    wide = json.dumps([{"a": [1, 2]} for _ in range(500)])  # many brackets, two levels deep
    assert not nesting_exceeds(wide)
    in_strings = json.dumps({"log": "[" * 100_000, "quoted": 'he said "[[[[" ' * 100})
    assert not nesting_exceeds(in_strings) and loads(in_strings)["log"] == "[" * 100_000
    # An escaped quote does not end a string: the brackets after it are still inside.
    assert not nesting_exceeds('["\\"' + "[" * 200 + '"]')


def test_a_deep_body_is_refused_before_it_is_decoded() -> None:
    assert sys.getrecursionlimit() >= 10_000  # as in a web process: deep enough to crash the decoder
    with pytest.raises(TooDeep):
        loads(nested(200_000))


@pytest.mark.django_db
def test_the_register_endpoint_answers_a_deep_body_400_without_a_credential() -> None:
    response = APIClient().post("/api/agent/v1/register", data=nested(100_000), content_type="application/json")

    assert response.status_code == 400
    assert response.json()["code"] == "parse_error"
    assert f"deeper than {MAX_DEPTH}" in response.json()["detail"]


@pytest.mark.django_db
@pytest.mark.parametrize("steady", [False, True])
def test_a_machines_deep_heartbeat_is_answered_400(settings: Any, steady: bool) -> None:
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_STEADY_PATH": steady}
    client = agent_client(MachineFactory())

    response = client.post("/api/agent/v1/heartbeat", data=nested(100_000), content_type="application/json")

    assert response.status_code == 400 and response.json()["code"] == "parse_error"
