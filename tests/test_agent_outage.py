"""The marketplace goes away for a minute under a running rental: the real agent (simulation
mode, the real process sandbox) keeps the job running, and what it reported meanwhile arrives
once, whole and in order, when the marketplace is back (tests/agent_market.py).

A module of its own: the outage is a minute of waiting, which runs beside the other end-to-end
tests (tests/test_agent_end_to_end.py) on another test worker instead of after them.
"""

from __future__ import annotations

import itertools
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from jobs.models import Event, Lease, LogChunk, UsageReport
from tests.agent_market import SANDBOX_PYTHON, Market, Outage, alive, host_pid, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]


def test_reports_made_during_a_minute_long_outage_arrive_exactly_once(
    market: Market, live_server: Any, tmp_path: Path
) -> None:
    proxy = Outage(int(live_server.url.rsplit(":", 1)[1]))
    try:
        market.register(proxy.url)
        market.start_agent(proxy.url)
        # It prints a line a second for 20 s: most of its output is made during the outage.
        ticks = "import time\nfor n in range(20):\n    print(f'tick {n}', flush=True); time.sleep(1)\n"
        job = market.submit([SANDBOX_PYTHON, "-c", ticks, "agent-e2e-outage"], key="agent-e2e-outage")
        market.wait_for(job["id"], lambda j: j["status"] == "running" and host_pid("agent-e2e-outage") is not None)
        pid = host_pid("agent-e2e-outage")
        assert pid is not None

        proxy.down()
        outage_started = time.monotonic()
        # The job keeps running through the outage, and ends during it.
        wait_until(lambda: not alive(pid), 40, "the job finishing")
        assert proxy.is_down
        time.sleep(max(0.0, 60 - (time.monotonic() - outage_started)))
        assert market.lease_of(job["id"]).status == Lease.Status.RUNNING  # nothing got through
        proxy.up()

        job = market.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), deadline_s=30)
        assert job["status"] == "succeeded", job
        market.stop_agent()
    finally:
        proxy.close()

    lease = market.lease_of(job["id"])
    kinds = list(Event.objects.filter(lease=lease).values_list("kind", flat=True))
    assert kinds.count("lease.started") == 1
    assert kinds.count("lease.ended") == 1
    reports = sorted(UsageReport.objects.filter(lease=lease), key=lambda r: r.period_start)
    # Every report the agent made arrived, once (report ids are unique per lease) …
    assert {r.report_id for r in reports} == market.transport.usage_ids_sent  # type: ignore[union-attr]
    # … and together they cover the lease without a gap or an overlap, outage included.
    for before, after in itertools.pairwise(reports):
        assert before.period_end == after.period_start
    assert abs((reports[0].period_start - lease.started_at).total_seconds()) <= 1.5
    assert abs((reports[-1].period_end - lease.ended_at).total_seconds()) <= 1.5
    assert lease.ended_at - lease.started_at >= timedelta(seconds=19)
    # Its output arrived whole, each chunk once and in order, the outage's included.
    chunks = list(LogChunk.objects.filter(lease=lease).order_by("pk"))
    assert "".join(c.text for c in chunks) == "".join(f"tick {n}\n" for n in range(20))
    assert [c.seq for c in chunks] == list(range(len(chunks)))
