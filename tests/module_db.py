"""Rows that every test of a module reads, built once for the module instead of once per test.

    @pytest.fixture(scope="module")
    def world_rows(django_db_setup, django_db_blocker):
        with built_once(django_db_blocker):
            yield build_the_rows()

The rows are written in a transaction left open for the whole module and rolled back after its
last test. Each test (pytest.mark.django_db, not transaction=True) runs in its own savepoint
inside it, as pytest-django nests it, so what one test changes is undone before the next and the
rows every test sees are the same. It is Django's TestCase.setUpTestData for pytest modules. A
module whose tests commit (transaction=True, live_server) cannot use it: their flush would empty
the rows and they would wait on the open transaction's locks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import transaction


@contextmanager
def built_once(django_db_blocker: Any) -> Iterator[None]:
    with django_db_blocker.unblock(), transaction.atomic():
        yield
        transaction.set_rollback(True)
