"""jobs 0015: each kept chunk of a job's output gets what its job had used of its bound up to it,
so that a job whose output began before the migration keeps its bound after it."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from jobs.models import LogChunk
from tests.factories import placed_lease

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _migrate(target: str) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate([("jobs", target)])


def test_the_chunks_kept_before_count_up_per_job_in_order() -> None:
    first, second = placed_lease(started=True), placed_lease(started=True)
    for seq, (lease, size) in enumerate([(first, 1000), (second, 10), (first, 3), (first, 70_000), (second, 300)]):
        LogChunk.objects.create(job_id=lease.job_id, lease=lease, seq=seq, text="x", size=size, at=timezone.now())
    _migrate("0014_lease_checkpoint_uploads")
    try:
        _migrate("0017_logchunk_job_charged_fill")
    finally:
        _migrate(max(n for app, n in MigrationExecutor(connection).loader.graph.leaf_nodes() if app == "jobs"))

    charged = list(LogChunk.objects.order_by("pk").values_list("job_id", "job_charged"))
    assert charged == [
        (first.job_id, 1000),
        (second.job_id, 256),
        (first.job_id, 1256),
        (first.job_id, 71_256),
        (second.job_id, 556),
    ]
