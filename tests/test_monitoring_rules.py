"""The monitoring that ships in deploy/ reads only what /metrics serves: every gpgpu_* name in
an alert rule (deploy/prometheus/alerts.yml) or a dashboard query (deploy/grafana/dashboards/)
is a series a scrape of /metrics has, once there is a little of everything to count. A renamed
or misspelt metric fails here, not silently in production (an alert on a series that never
exists never fires)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from billing.models import LedgerCheck
from core.models import PeriodicTaskState
from marketplace import health, matching
from tests.factories import GPUFactory, JobFactory, MachineFactory, gpu_entry, heartbeat, placed_lease

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
TOKEN = "metrics-token-0123456789abcdefghijklmnop"
# A metric name in PromQL: ours all start with gpgpu_ (label values and strings here never do).
METRIC_NAME = re.compile(r"\bgpgpu_[A-Za-z0-9_]*[A-Za-z0-9]")


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
        yield from dashboard_queries(panel)


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every alert rule and dashboard query."""
    found = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for path in DASHBOARDS:
        found += [(f"{path.name}: {title}", expr) for title, expr in dashboard_queries(json.loads(path.read_text()))]
    return found


def unknown_names(exprs: list[tuple[str, str]], served: set[str]) -> list[tuple[str, str]]:
    """(where, name) for each gpgpu_* name an expression uses that is not a served series name."""
    return [(where, name) for where, expr in exprs for name in METRIC_NAME.findall(expr) if name not in served]


@pytest.fixture
def served_names(settings: Any, api_client: Any) -> set[str]:
    """The series names of a scrape of /metrics after a little of everything happened: a fleet,
    a queue, a lease, a periodic task's runs and the worker's heartbeat, a ledger check, a
    heartbeat answered and one refused, a match cycle."""
    settings.METRICS_TOKEN = TOKEN
    now = timezone.now()
    placed_lease()
    GPUFactory()
    JobFactory()
    PeriodicTaskState.objects.create(
        name="billing.tasks.settle", last_started_at=now, last_finished_at=now, last_ok=True, total_runs=1
    )
    PeriodicTaskState.objects.create(
        name=health.HEARTBEAT_TASK, last_started_at=now, last_finished_at=now, last_ok=True, total_runs=1
    )
    LedgerCheck.objects.create(ok=True, chain_compared=True, block_number=7)
    api_client.credentials(HTTP_AUTHORIZATION="Machine gpm_not-a-real-one")
    assert heartbeat(api_client, [gpu_entry("GPU-rules")]).status_code == 401
    MachineFactory()
    matching.match_cycle()

    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    return {s.name for f in text_string_to_metric_families(response.content.decode()) for s in f.samples}


@pytest.mark.django_db
def test_every_metric_the_alerts_and_dashboards_use_is_one_metrics_serves(served_names: set[str]) -> None:
    exprs = expressions()
    assert DASHBOARDS and len(exprs) > len(alert_rules())  # the dashboards' queries were read

    assert unknown_names(exprs, served_names) == []


@pytest.mark.django_db
def test_a_rule_on_a_metric_that_does_not_exist_is_caught(served_names: set[str]) -> None:
    # A counter's family name, a histogram's, and a plain typo: none is a series Prometheus has.
    exprs = [
        ("typo", "gpgpu_oldest_pending_jobs_age_seconds > 60"),
        ("counter without _total", "rate(gpgpu_agent_heartbeats[5m])"),
        ("histogram without a suffix", "gpgpu_match_cycle_seconds > 1"),
        ("fine", 'sum(rate(gpgpu_agent_heartbeats_total{outcome="ok"}[5m]))'),
    ]

    assert [where for where, _ in unknown_names(exprs, served_names)] == [
        "typo",
        "counter without _total",
        "histogram without a suffix",
    ]


def test_the_alert_rules_cover_what_an_operator_must_hear_about() -> None:
    by_name = {rule["alert"]: rule["expr"] for rule in alert_rules()}

    expected = {
        "GpgpuSettlementStuck": "gpgpu_oldest_open_settlement_age_seconds > 600",
        "GpgpuLedgerCheckFailing": "gpgpu_ledger_check_ok == 0",
        "GpgpuLedgerCheckMissing": "absent(gpgpu_ledger_check_ok)",
        "GpgpuNoHeartbeats": "gpgpu_agent_heartbeats_total",
        "GpgpuQueueGrowing": 'gpgpu_jobs{status="pending"}',
        "GpgpuOldestPendingJobOld": "gpgpu_oldest_pending_job_age_seconds",
        "GpgpuTaskFailing": "gpgpu_task_consecutive_failures >= 3",
        "GpgpuTaskStale": "gpgpu_task_interval_seconds",
        "GpgpuWorkerHeartbeatStale": "gpgpu_worker_heartbeat_age_seconds",
        "GpgpuDatabaseDown": "gpgpu_database_up == 0",
    }
    for alert, fragment in expected.items():
        assert fragment in by_name.get(alert, ""), alert
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
