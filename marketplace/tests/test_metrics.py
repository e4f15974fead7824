"""/metrics as Prometheus scrapes it: off without a token, refused without the right one, and the
figures an operator's alerts read (GPUs by state, the queue, a failing task, the settlement
backlog, a ledger that differs from the chain), parsed with Prometheus' own parser."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from billing.models import LedgerCheck
from core import prom
from core.models import PeriodicTaskState
from core.tests.outage import default_database, postgres_down_url
from jobs.models import Job
from providers.models import GPU
from tests.factories import GPUFactory, JobFactory, placed_lease

pytestmark = pytest.mark.django_db

TOKEN = "metrics-token-0123456789abcdefghijklmnop"


@pytest.fixture
def metrics_on(settings: Any) -> None:
    settings.METRICS_TOKEN = TOKEN


def _scrape(token: str = TOKEN) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Each sample of a scrape: (name, labels) -> value."""
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _one(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_are_off_without_a_token(settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize(
    "header",
    [None, f"Token {TOKEN}", "Bearer wrong-token", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer ", TOKEN],
)
def test_metrics_refuse_anything_but_the_bearer_token(metrics_on: None, header: str | None) -> None:
    extra = {"HTTP_AUTHORIZATION": header} if header is not None else {}
    response = Client().get("/metrics", **extra)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["code"] == "not_authenticated"
    assert b"gpgpu_" not in response.content


def test_metrics_answer_get_only(metrics_on: None) -> None:
    assert Client().post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405


def test_metrics_count_gpus_by_state_and_the_queue(metrics_on: None) -> None:
    placed_lease()  # one leased GPU, its job running or scheduled
    GPUFactory.create_batch(3, state=GPU.State.IDLE)
    GPUFactory(state=GPU.State.OWNER_BUSY)
    old = JobFactory()
    Job.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(minutes=7))
    JobFactory()

    samples = _scrape()

    assert _one(samples, "gpgpu_database_up") == 1
    assert _one(samples, "gpgpu_gpus", state="idle") == GPU.objects.filter(state=GPU.State.IDLE).count()
    assert _one(samples, "gpgpu_gpus", state="owner_busy") == 1
    assert _one(samples, "gpgpu_gpus", state="leased") == 1
    assert _one(samples, "gpgpu_gpus", state="offline") == GPU.objects.filter(state=GPU.State.OFFLINE).count()
    assert _one(samples, "gpgpu_jobs", status="pending") == 2
    assert 420 <= _one(samples, "gpgpu_oldest_pending_job_age_seconds") < 480
    assert _one(samples, "gpgpu_leases_active") == 1


def test_metrics_show_a_failing_task_and_when_it_last_succeeded(metrics_on: None) -> None:
    now = timezone.now()
    PeriodicTaskState.objects.create(
        name="billing.tasks.settle_leases",
        last_started_at=now,
        last_finished_at=now,
        last_ok=False,
        consecutive_failures=4,
        total_runs=10,
        total_failures=5,
        items_failed=2,
    )
    PeriodicTaskState.objects.create(
        name="jobs.tasks.match_cycle", last_started_at=now, last_finished_at=now, last_ok=True, total_runs=3
    )

    samples = _scrape()

    settle = {"task": "billing.tasks.settle_leases"}
    assert _one(samples, "gpgpu_task_consecutive_failures", **settle) == 4
    assert _one(samples, "gpgpu_task_failures_total", **settle) == 5
    assert _one(samples, "gpgpu_task_runs_total", **settle) == 10
    assert _one(samples, "gpgpu_task_last_items_failed", **settle) == 2
    # A failed last run has no success time to show; a run that went through has.
    assert ("gpgpu_task_last_success_timestamp_seconds", tuple(settle.items())) not in samples
    match = {"task": "jobs.tasks.match_cycle"}
    assert _one(samples, "gpgpu_task_last_success_timestamp_seconds", **match) == pytest.approx(now.timestamp())
    assert _one(samples, "gpgpu_task_consecutive_failures", **match) == 0


def test_metrics_show_a_ledger_that_differs_from_the_chain(metrics_on: None) -> None:
    assert ("gpgpu_ledger_check_ok", ()) not in _scrape()  # never run: no sample, nothing made up
    LedgerCheck.objects.create(ok=True, chain_compared=True, block_number=7)
    assert _one(_scrape(), "gpgpu_ledger_check_ok") == 1
    LedgerCheck.objects.create(
        ok=False,
        chain_compared=True,
        block_number=9,
        differences=[
            {"account": "provider:1", "ledger": 10, "chain": 12},
            {"account": "fees", "ledger": 1, "chain": 0},
        ],
    )

    samples = _scrape()

    assert _one(samples, "gpgpu_ledger_check_ok") == 0
    assert _one(samples, "gpgpu_ledger_check_differences") == 2
    assert _one(samples, "gpgpu_ledger_check_block") == 9
    # Counts, never what differs (accounts name providers).
    body = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode()
    assert "provider:1" not in body


@pytest.fixture
def postgres_down() -> Iterator[str]:
    url = postgres_down_url(password="pw-Sekr1t-DSN")
    with default_database(url, connect_timeout=2):
        yield url


def test_metrics_say_the_database_is_down_instead_of_failing_the_scrape(metrics_on: None, postgres_down: str) -> None:
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")

    assert response.status_code == 200
    body = response.content.decode()
    families = list(text_string_to_metric_families(body))
    # What is counted in memory (core.prom: heartbeats, match cycles) needs no database and stays.
    counted = {metric.name for metric in prom.REGISTRY.collect()}
    assert {f.name for f in families} - counted == {"gpgpu_database_up"}
    samples = {s.name: s.value for f in families if f.name not in counted for s in f.samples}
    assert samples == {"gpgpu_database_up": 0}
    assert "pw-Sekr1t-DSN" not in body
