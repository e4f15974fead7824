"""The Redis cache backend (core.cache) keeps one client per connection pool, and still works as
Django's does, from several threads. Against a real Redis (REDIS_URL, else 127.0.0.1:6379):
skipped without one, except in CI."""

from __future__ import annotations

import os
import threading

import pytest

from core.cache import RedisCache
from tests.live_redis import live_redis


@pytest.fixture
def cache() -> RedisCache:
    url = live_redis("the cache")
    return RedisCache(url, {"KEY_PREFIX": f"test-core-cache-{os.getpid()}", "TIMEOUT": 60})


def test_one_client_serves_every_operation(cache: RedisCache) -> None:
    client = cache._cache.get_client(write=True)

    cache.set("a", [1.5, 2.5])

    assert cache.get("a") == [1.5, 2.5]
    assert cache._cache.get_client() is client and cache._cache.get_client(write=True) is client


def test_threads_share_it_and_see_each_others_writes(cache: RedisCache) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                cache.set(f"t{n}", i)
                assert cache.get(f"t{n}") == i
        except BaseException as exc:  # a failure in a thread is reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert cache.get_many([f"t{n}" for n in range(8)]) == {f"t{n}": 49 for n in range(8)}
    cache.delete_many([f"t{n}" for n in range(8)] + ["a"])
