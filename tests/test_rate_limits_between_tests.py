"""Rate-limit counters do not carry from one test to the next (conftest.py's rate_limits_fresh).

Every request a test process sends comes from 127.0.0.1, and the counters live in the cache,
which outlives a test: without the fixture, the register attempts of a worker's earlier tests
(agents registering through live servers) left a later test's first registration answered 429.
The two tests below run in this order (one module, one process): the first spends the address's
whole register budget, the second must still have its own. Another process's counters, under
its own key prefix in the same Redis, are left alone.
"""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from core import throttling

pytestmark = pytest.mark.django_db

REGISTER = "/api/agent/v1/register"
OTHER_PROCESS_KEY = "gpgpu-test-another-process:1:throttle_register_127.0.0.1:log"


@pytest.fixture(autouse=True)
def documented_register_rate(settings: Any) -> None:
    settings.THROTTLE_ENABLED = True
    settings.THROTTLE_RATES = {**settings.THROTTLE_RATES, "register": "20/min"}
    settings.TRUSTED_PROXIES = 0


def _attempt() -> int:
    body = {"token": "gpreg_guess", "hostname": "rig", "agent_version": "0.1.0"}
    return int(APIClient().post(REGISTER, body, format="json").status_code)


def test_a_test_that_spends_its_addresss_register_budget() -> None:
    assert [_attempt() for _ in range(20)] == [401] * 20
    assert _attempt() == 429
    if (log := throttling.redis_log()) is not None:
        log[0].set(OTHER_PROCESS_KEY, "kept", ex=120)


def test_the_next_test_registers_from_the_same_address_unthrottled() -> None:
    assert _attempt() == 401  # a wrong token, not "too many requests"
    if (log := throttling.redis_log()) is not None:
        assert log[0].get(OTHER_PROCESS_KEY) == b"kept"
        log[0].delete(OTHER_PROCESS_KEY)
