"""The real Redis some tests run against: REDIS_URL, else 127.0.0.1:6379."""

from __future__ import annotations

import os
from typing import Any

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


def redis_settings(settings: Any, what: str) -> str:
    """`settings` (pytest-django's fixture) as the marketplace's own with REDIS_URL set at the
    live Redis (else skip, or fail in CI, as `live_redis`): REDIS_URL, and the default cache in
    that Redis, where the rate limits keep their counters (marketplace/settings.py). A run on
    SQLite without REDIS_URL has the cache in memory otherwise. Returns the URL."""
    url = live_redis(what)
    settings.REDIS_URL = url
    if settings.CACHES["default"]["BACKEND"] != "core.cache.RedisCache":
        settings.CACHES = {
            **settings.CACHES,
            "default": {
                "BACKEND": "core.cache.RedisCache",
                "LOCATION": url,
                "KEY_PREFIX": settings.CACHE_KEY_PREFIX,
                "OPTIONS": {"socket_connect_timeout": 1.0, "socket_timeout": 1.0},
            },
        }
    return url
