"""The real Redis some tests run against: REDIS_URL, else 127.0.0.1:6379."""

from __future__ import annotations

import os

import pytest
import redis

REDIS = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def live_redis(what: str) -> str:
    """REDIS's URL when it answers; otherwise skip the test, or fail it in CI (which runs `what`
    against a real Redis)."""
    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs {what} against a real Redis, and {REDIS} does not answer")
        pytest.skip(f"no Redis at {REDIS}")
    return REDIS
