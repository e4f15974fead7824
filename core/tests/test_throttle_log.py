"""The rate limits' log in Redis (core.throttling): DRF's sliding log, decided in one Lua script,
so requests arriving at once never pass beyond the limit (DRF reads a pickled list and writes it
back: two requests at once both pass as one). Against a real Redis (REDIS_URL, else
127.0.0.1:6379): skipped without one, except in CI."""

from __future__ import annotations

import threading
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from core.throttling import PrincipalRateThrottle
from tests.live_redis import live_redis


@pytest.fixture(autouse=True)
def redis_cache(settings: Any) -> None:
    url = live_redis("the rate limits' log")
    settings.CACHES = {
        **settings.CACHES,
        "default": {
            "BACKEND": "core.cache.RedisCache",
            "LOCATION": url,
            "KEY_PREFIX": f"throttle-log-{uuid.uuid4().hex}",
        },
    }
    settings.THROTTLE_ENABLED = True
    settings.THROTTLE_RATES = {**settings.THROTTLE_RATES, "anon": "10/min"}


def request_from(address: str) -> Any:  # what the throttle reads of a request
    return SimpleNamespace(auth=None, user=None, META={"REMOTE_ADDR": address}, resolver_match=None)


def test_fifty_requests_at_once_let_exactly_the_limit_through() -> None:
    start = threading.Barrier(50)
    allowed: list[bool] = []

    def one() -> None:
        throttle = PrincipalRateThrottle()
        start.wait()
        allowed.append(throttle.allow_request(request_from("203.0.113.9"), None))  # type: ignore[arg-type]  # the view is not read

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert allowed.count(True) == 10
    assert PrincipalRateThrottle().allow_request(request_from("203.0.113.10"), None)  # type: ignore[arg-type]  # another budget


def test_a_refused_request_is_told_how_long_to_wait_as_drf_says() -> None:
    clock = [1000.0]
    throttles = []
    for i in range(11):
        throttle = PrincipalRateThrottle()
        throttle.timer = lambda: clock[0]  # type: ignore[method-assign]  # a clock of the test's
        clock[0] = 1000.0 + i
        throttles.append(throttle.allow_request(request_from("198.51.100.7"), None))  # type: ignore[arg-type]  # the view is not read
    assert throttles == [True] * 10 + [False]
    # DRF: (duration - (now - oldest)) / (limit - count + 1) = (60 - 10) / 1.
    assert throttle.wait() == pytest.approx(50.0)

    clock[0] = 1060.5  # the first two have left the window
    again = PrincipalRateThrottle()
    again.timer = lambda: clock[0]  # type: ignore[method-assign]  # a clock of the test's
    assert again.allow_request(request_from("198.51.100.7"), None)  # type: ignore[arg-type]  # the view is not read
