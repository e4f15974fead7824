"""The request-path metrics on /metrics (core.prom): heartbeats counted by outcome with their
latency, the agent API's errors by code, match cycles; and, in prometheus-client's multiprocess
mode, the counts of several processes (the web server's workers, the Celery worker) added up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from marketplace import matching
from marketplace.tests.test_metrics import TOKEN, _scrape
from tests.factories import GPUFactory, JobFactory, MachineFactory, agent_client, gpu_entry, heartbeat

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def metrics_on(settings: Any) -> None:
    settings.METRICS_TOKEN = TOKEN


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_heartbeat_through_the_agent_api_is_counted_ok_with_its_latency() -> None:
    client = agent_client(MachineFactory())
    before = _scrape()

    assert heartbeat(client, [gpu_entry("GPU-metrics-a")]).status_code == 200

    after = _scrape()
    assert (
        value(after, "gpgpu_agent_heartbeats_total", outcome="ok")
        == value(before, "gpgpu_agent_heartbeats_total", outcome="ok") + 1
    )
    assert value(after, "gpgpu_agent_heartbeats_total", outcome="refused") == value(
        before, "gpgpu_agent_heartbeats_total", outcome="refused"
    )
    assert (
        value(after, "gpgpu_agent_heartbeat_seconds_count") == value(before, "gpgpu_agent_heartbeat_seconds_count") + 1
    )
    assert value(after, "gpgpu_agent_heartbeat_seconds_sum") > value(before, "gpgpu_agent_heartbeat_seconds_sum")
    assert value(after, "gpgpu_agent_heartbeat_seconds_bucket", le="+Inf") == value(
        after, "gpgpu_agent_heartbeat_seconds_count"
    )


def test_a_heartbeat_with_a_bad_credential_is_counted_refused_and_as_an_agent_api_error(api_client: Any) -> None:
    api_client.credentials(HTTP_AUTHORIZATION="Machine gpm_not-a-real-one")
    before = _scrape()

    assert heartbeat(api_client, [gpu_entry("GPU-metrics-b")]).status_code == 401

    after = _scrape()
    for outcome, added in (("ok", 0), ("refused", 1), ("error", 0)):
        name = "gpgpu_agent_heartbeats_total"
        assert value(after, name, outcome=outcome) == value(before, name, outcome=outcome) + added, outcome
    code = "machine_credential_invalid"
    name = "gpgpu_agent_api_errors_total"
    assert value(after, name, code=code) == value(before, name, code=code) + 1
    assert (
        value(after, "gpgpu_agent_heartbeat_seconds_count") == value(before, "gpgpu_agent_heartbeat_seconds_count") + 1
    )


def test_an_invalid_heartbeat_is_counted_as_an_error_with_the_invalid_code() -> None:
    client = agent_client(MachineFactory())
    before = _scrape()

    assert heartbeat(client, [gpu_entry("GPU-metrics-c", utilization_pct=-5)]).status_code == 400

    after = _scrape()
    name = "gpgpu_agent_heartbeats_total"
    assert value(after, name, outcome="error") == value(before, name, outcome="error") + 1
    name = "gpgpu_agent_api_errors_total"
    assert value(after, name, code="invalid") == value(before, name, code="invalid") + 1


def test_errors_outside_the_agent_api_are_not_agent_api_errors(renter_client: Any) -> None:
    client, _ = renter_client
    before = _scrape()

    assert client.get("/api/v1/jobs/999999999/").status_code == 404

    after = _scrape()
    assert value(after, "gpgpu_agent_api_errors_total", code="not_found") == value(
        before, "gpgpu_agent_api_errors_total", code="not_found"
    )


def test_a_match_cycle_is_counted_with_its_seconds_and_placements() -> None:
    machine = MachineFactory(accepts_container=True, accepts_process=True)
    GPUFactory(machine=machine, index=0)
    JobFactory(budget_reserved=True)
    before = _scrape()

    result = matching.match_cycle()

    after = _scrape()
    assert result.placed == 1
    assert value(after, "gpgpu_match_cycles_total") == value(before, "gpgpu_match_cycles_total") + 1
    assert value(after, "gpgpu_match_placements_total") == value(before, "gpgpu_match_placements_total") + 1
    assert value(after, "gpgpu_match_cycle_seconds_count") == value(before, "gpgpu_match_cycle_seconds_count") + 1
    assert (
        value(after, "gpgpu_match_cycle_seconds_sum")
        >= value(before, "gpgpu_match_cycle_seconds_sum") + result.seconds * 0.999
    )


# A process that counts into PROMETHEUS_MULTIPROC_DIR (set in its environment before it starts,
# as compose does) and exits, as a respawned web or Celery worker does.
COUNTING_PROCESS = """
import sys
from core import prom
for _ in range(int(sys.argv[1])):
    prom.heartbeat_observe(outcome="ok", seconds=0.02)
prom.match_cycle_observe(seconds=0.3, placed=int(sys.argv[2]))
"""


def count_in_another_process(directory: Path, heartbeats: int, placed: int) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", COUNTING_PROCESS, str(heartbeats), str(placed)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
    )


def test_in_multiprocess_mode_metrics_add_up_every_process_of_every_listed_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two web workers counting into web's directory and the Celery worker into its own
    web, worker = tmp_path / "web", tmp_path / "worker"
    web.mkdir()
    worker.mkdir()
    count_in_another_process(web, heartbeats=2, placed=0)
    count_in_another_process(web, heartbeats=3, placed=0)
    count_in_another_process(worker, heartbeats=0, placed=4)
    # when web (in multiprocess mode, reading both directories) is scraped
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(web))
    monkeypatch.setenv("METRICS_MULTIPROC_DIRS", f"{web},{worker}")

    samples = _scrape()

    # then the scrape has every process's counts, and none of this process's own memory
    assert value(samples, "gpgpu_agent_heartbeats_total", outcome="ok") == 5
    assert value(samples, "gpgpu_agent_heartbeats_total", outcome="refused") == 0
    assert value(samples, "gpgpu_agent_heartbeat_seconds_count") == 5
    assert value(samples, "gpgpu_agent_heartbeat_seconds_bucket", le="0.025") == 5
    assert value(samples, "gpgpu_match_cycles_total") == 3
    assert value(samples, "gpgpu_match_placements_total") == 4
    assert value(samples, "gpgpu_match_cycle_seconds_bucket", le="0.5") == 3
    assert value(samples, "gpgpu_database_up") == 1


def test_replicas_of_a_scaled_service_count_in_their_own_subdirectories_and_all_are_added_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two web replicas (containers) whose web workers had the same pid, each counting
    # into its own hostname's directory under web's, and a worker replica under the worker's
    web, worker = tmp_path / "web", tmp_path / "worker"
    for replica, heartbeats in (("c0ffee000001", 2), ("c0ffee000002", 5)):
        (web / replica).mkdir(parents=True)
        count_in_another_process(web / replica, heartbeats=heartbeats, placed=0)
    (worker / "c0ffee000003").mkdir(parents=True)
    count_in_another_process(worker / "c0ffee000003", heartbeats=0, placed=4)
    # (the second's files renamed to the first's pid: what two containers' pid namespaces give)
    first = {f.name.split("_")[0]: f.name for f in (web / "c0ffee000001").glob("*.db")}
    for f in (web / "c0ffee000002").glob("*.db"):
        f.rename(f.with_name(first[f.name.split("_")[0]]))
    # when any replica of web is scraped
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(web / "c0ffee000001"))
    monkeypatch.setenv("METRICS_MULTIPROC_DIRS", f"{web},{worker}")

    samples = _scrape()

    # then it has every replica's counts
    assert value(samples, "gpgpu_agent_heartbeats_total", outcome="ok") == 7
    assert value(samples, "gpgpu_match_placements_total") == 4


def test_in_multiprocess_mode_web_alone_reads_its_own_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count_in_another_process(tmp_path, heartbeats=2, placed=1)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("METRICS_MULTIPROC_DIRS", raising=False)

    samples = _scrape()

    assert value(samples, "gpgpu_agent_heartbeats_total", outcome="ok") == 2
    assert value(samples, "gpgpu_match_placements_total") == 1


def test_a_process_started_with_a_missing_multiprocess_directory_makes_it(tmp_path: Path) -> None:
    """A one-off `manage.py` run with web's environment outside its container (CI's `check
    --deploy` does) stopped at import with a bare FileNotFoundError; now the directory is made."""
    missing = tmp_path / "metrics" / "web"

    count_in_another_process(missing, heartbeats=1, placed=0)

    assert missing.is_dir()
    assert list(missing.glob("*.db")), "the counting process wrote no file there"
