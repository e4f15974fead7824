"""Fixtures of the providers app's tests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone


@pytest.fixture
def telemetry_partitions_restored(transactional_db: None) -> Iterator[None]:
    """For a test that commits partitions (transaction=True) far from now, or drops them by
    pruning at a far `now`: afterwards the raw telemetry table has, as the migration left it, range
    partitions around the real now and none far ahead, so that the worker's later tests find
    samples of today in a range partition and samples of years ahead in the DEFAULT one."""
    yield
    from providers import telemetry_partitions as tp

    if connection.vendor != "postgresql":
        return
    horizon = timezone.now() + tp.AHEAD + timedelta(days=1)
    with connection.cursor() as cursor:
        for part in tp.partitions(cursor):
            if part.start is not None and part.start >= horizon:
                cursor.execute(f'DROP TABLE "{part.name}"')
    tp.ensure(now=timezone.now())


@pytest.fixture
def full_heartbeats(settings: Any) -> None:
    """Every heartbeat takes the full path, as without Redis: for a test of what the full
    heartbeat writes (a steady repeat, providers.heartbeat_steady, writes none of it)."""
    settings.GPGPU = {**settings.GPGPU, "HEARTBEAT_STEADY_PATH": False}
