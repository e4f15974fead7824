"""Rows another transaction holds, for the tests of what must not wait for them (PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connections, transaction
from django.db.models import QuerySet


@contextmanager
def held_elsewhere(rows: QuerySet[Any], *, seconds: float = 30) -> Iterator[None]:
    """The rows of `rows` locked FOR UPDATE, for the block's length, by a transaction on another
    connection (a thread of its own, its connection closed after)."""
    locked, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def hold() -> None:
        try:
            with transaction.atomic():
                list(rows.select_for_update())
                locked.set()
                release.wait(timeout=seconds)
        except BaseException as error:  # reported by the test
            failed.append(error)
            locked.set()
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(timeout=seconds) and not failed, failed
        yield
    finally:
        release.set()
        holder.join(timeout=seconds)
