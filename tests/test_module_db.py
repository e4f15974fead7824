"""tests.module_db: rows built once for a module, each test's changes undone before the next."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, connections

from jobs.models import Renter
from tests.factories import RenterFactory
from tests.module_db import built_once

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def renter_id(django_db_setup: Any, django_db_blocker: Any) -> Iterator[int]:
    with built_once(django_db_blocker):
        yield RenterFactory(display_name="built once").pk


# The two tests below run in this order (pytest keeps a module's order): the second sees the row
# as it was built, not as the first left it.


def test_a_test_changes_and_adds_rows(renter_id: int) -> None:
    Renter.objects.filter(pk=renter_id).update(display_name="changed by a test")
    RenterFactory(display_name="added by a test")
    assert Renter.objects.get(pk=renter_id).display_name == "changed by a test"


def test_the_next_test_sees_the_rows_as_built(renter_id: int) -> None:
    assert Renter.objects.get(pk=renter_id).display_name == "built once"
    assert not Renter.objects.filter(display_name="added by a test").exists()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite's in-memory test database is one connection's")
def test_nothing_built_is_committed_so_nothing_outlives_the_module(renter_id: int) -> None:
    """Another connection (another thread's) does not see the rows: the module's transaction
    is rolled back at its end, and the next module starts from an empty database."""
    seen: list[bool] = []

    def look() -> None:
        try:
            seen.append(Renter.objects.filter(pk=renter_id).exists())
        finally:
            connections.close_all()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join(10)
    assert Renter.objects.filter(pk=renter_id).exists()
    assert seen == [False]
