"""The on-disk spool: write-ahead, ordered, exactly-once with the marketplace's dedupe, bounded,
crash-safe."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gpgpu_agent.protocols import Rejected, TransportUnavailable
from gpgpu_agent.spool import Spool, SpoolError, SpoolFull, spool_stats
from gpgpu_agent.transport import FakeTransport

AGENT_DIR = Path(__file__).resolve().parent.parent


def event(lease_id: int, type_: str) -> tuple[str, int, str, dict[str, Any]]:
    key = f"lease-{lease_id}-{type_}"
    return "event", lease_id, key, {"event_id": key, "type": type_, "at": "2026-01-14T12:00:00Z"}


def usage(lease_id: int, n: int) -> tuple[str, int, str, dict[str, Any]]:
    key = f"{lease_id}-{n}"
    return "usage", lease_id, key, {"report_id": key, "gpu_seconds": "60.000", "signature": "0x" + "ab" * 65}


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool.sqlite3", max_items=100)
    yield s
    s.close()


class DownAfter(FakeTransport):
    """Acknowledges `ok` messages, then the marketplace becomes unreachable."""

    def __init__(self, ok: int):
        super().__init__()
        self.ok = ok

    def lease_usage(self, lease_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
        if len(self.applied) >= self.ok:
            self.set_down()
        return super().lease_usage(lease_id, body)

    lease_event = lease_usage  # type: ignore[assignment]


# --- order and idempotency ------------------------------------------------------------------------


def test_replay_sends_everything_in_the_order_it_was_put(spool: Spool) -> None:
    messages = [event(1, "started"), usage(1, 1), event(2, "started"), usage(2, 1), usage(1, 2), event(1, "exited")]
    for m in messages:
        assert spool.put(*m) is True
    fake = FakeTransport()

    result = spool.replay(fake)

    assert (result.sent, result.dead, result.pending, result.stopped) == (6, 0, 0, None)
    assert fake.applied == [(kind, lease, key) for kind, lease, key, _ in messages]
    assert fake.calls[0].body == messages[0][3]


def test_put_is_idempotent_by_key(spool: Spool) -> None:
    assert spool.put(*usage(1, 1)) is True
    assert spool.put(*usage(1, 1)) is False
    assert spool.put(*event(1, "exited")) is True
    fake = FakeTransport()

    spool.replay(fake)

    assert fake.applied == [("usage", 1, "1-1"), ("event", 1, "lease-1-exited")]
    assert len(fake.calls) == 2


def test_put_refuses_a_body_whose_id_is_not_its_key(spool: Spool) -> None:
    kind, lease, _, body = usage(1, 1)

    with pytest.raises(ValueError, match="report_id must equal its key"):
        spool.put(kind, lease, "another-key", body)
    with pytest.raises(ValueError, match="kind"):
        spool.put("heartbeat", 1, "x", {})  # type: ignore[arg-type]
    assert spool.pending() == 0


def test_replay_respects_its_limit(spool: Spool) -> None:
    for n in range(5):
        spool.put(*usage(1, n))
    fake = FakeTransport()

    assert spool.replay(fake, limit=2).sent == 2
    assert spool.replay(fake).sent == 3
    assert [key for _, key in fake.sent("usage")] == [f"1-{n}" for n in range(5)]


# --- the marketplace goes away and comes back --------------------------------------------------


def test_replay_stops_when_the_marketplace_is_unreachable_and_resumes_in_order(spool: Spool) -> None:
    for n in range(6):
        spool.put(*usage(1, n))
    fake = DownAfter(ok=2)

    first = spool.replay(fake)

    assert (first.sent, first.pending) == (2, 4)
    assert isinstance(first.stopped, TransportUnavailable)
    again = spool.replay(fake)
    assert (again.sent, again.pending) == (0, 4)
    fake.ok = 100
    fake.set_up()
    assert spool.replay(fake).sent == 4
    assert [key for _, key in fake.sent("usage")] == [f"1-{n}" for n in range(6)]


def test_a_minute_without_the_marketplace_loses_nothing_and_sends_each_once(spool: Spool) -> None:
    fake = FakeTransport()
    fake.set_down()
    put_order = []
    # A minute of an agent's life: an event and a usage report every few seconds, with the
    # agent retrying the replay after each (as its network loop does).
    for second in range(0, 60, 5):
        for m in (event(second, "started"), usage(second, 1)):
            spool.put(*m)
            put_order.append(m[:3])
        assert spool.replay(fake).sent == 0
    fake.set_up()

    result = spool.replay(fake)

    assert result.sent == len(put_order) == 24
    assert fake.applied == put_order
    assert spool.pending() == 0
    assert spool.stats().oldest_created_at is None


def test_an_acknowledgement_lost_on_the_way_back_is_sent_again_and_deduped(spool: Spool) -> None:
    """The marketplace applied the message but the answer never came: the spool keeps it,
    sends it again, and the marketplace answers duplicate."""
    spool.put(*usage(1, 1))

    class LostAnswer(FakeTransport):
        def lease_usage(self, lease_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
            super().lease_usage(lease_id, body)
            if len(self.calls) == 1:
                raise TransportUnavailable("connection reset after the request was sent")
            return super().lease_usage(lease_id, body)

    fake = LostAnswer()
    assert spool.replay(fake).pending == 1
    assert spool.replay(fake).sent == 1
    assert fake.applied == [("usage", 1, "1-1")]


def test_without_stop_on_unavailable_only_the_failing_lease_is_held_back(spool: Spool) -> None:
    tried: list[str] = []

    class LeaseOneDown(FakeTransport):
        def lease_usage(self, lease_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
            tried.append(body["report_id"])
            if lease_id == 1:
                raise TransportUnavailable("lease 1's request timed out")
            return super().lease_usage(lease_id, body)

    for m in (usage(1, 1), usage(2, 1), usage(1, 2), usage(2, 2)):
        spool.put(*m)
    fake = LeaseOneDown()

    result = spool.replay(fake, stop_on_unavailable=False)

    assert fake.sent("usage") == [(2, "2-1"), (2, "2-2")]
    assert (result.sent, result.pending) == (2, 2)
    assert isinstance(result.stopped, TransportUnavailable)
    # Lease 1's second report was not tried after its first failed: its order is kept.
    assert tried == ["1-1", "2-1", "2-2"]


# --- refusals --------------------------------------------------------------------------------------


def test_a_permanent_refusal_is_dead_lettered_and_does_not_block_the_queue(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    for m in (event(1, "started"), event(1, "exited"), usage(2, 1)):
        spool.put(*m)
    fake = FakeTransport()
    fake.reject("event", 1, "lease-1-exited", status=409, code="invalid_transition", detail="Lease 1 is ended.")

    with caplog.at_level(logging.WARNING, logger="gpgpu_agent.spool"):
        result = spool.replay(fake)

    assert (result.sent, result.dead, result.pending) == (2, 1, 0)
    assert fake.applied == [("event", 1, "lease-1-started"), ("usage", 2, "2-1")]
    [letter] = spool.dead_letters()
    assert (letter.kind, letter.lease_id, letter.key, letter.status, letter.code) == (
        "event",
        1,
        "lease-1-exited",
        409,
        "invalid_transition",
    )
    assert letter.body["type"] == "exited"
    assert "lease-1-exited" in caplog.text and "invalid_transition" in caplog.text
    assert spool.stats().dead == 1
    # Queuing it again does not resurrect it.
    assert spool.put(*event(1, "exited")) is False
    assert spool.pending() == 0


@pytest.mark.parametrize(("status", "code"), [(401, "machine_credential_invalid"), (403, "machine_suspended")])
def test_a_machine_wide_refusal_stops_replay_and_keeps_the_queue(spool: Spool, status: int, code: str) -> None:
    for n in range(3):
        spool.put(*usage(1, n))
    fake = FakeTransport()
    fake.reject_all(status, code, "see your provider dashboard")

    result = spool.replay(fake)

    assert isinstance(result.stopped, Rejected) and result.stopped.code == code
    assert (result.sent, result.dead, result.pending) == (0, 0, 3)
    assert len(fake.calls) == 1
    fake.accept_all()
    assert spool.replay(fake).sent == 3


# --- bounded -----------------------------------------------------------------------------------------


def test_filling_spool_warns_at_80_percent_and_refuses_usage_when_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "s.sqlite3", max_items=10, event_reserve=2)
    with caplog.at_level(logging.WARNING, logger="gpgpu_agent.spool"):
        for n in range(7):
            spool.put(*usage(1, n))
        assert "full" not in caplog.text
        spool.put(*usage(1, 7))  # 8 of 10
        assert caplog.text.count("80% full") == 1

        with pytest.raises(
            SpoolFull, match=r"full \(8 messages waiting.*usage report '1-8' of lease 1 was not recorded"
        ):
            spool.put(*usage(1, 8))

        # Lifecycle events still go in: the reserve, and beyond it.
        for lease in range(5):
            assert spool.put(*event(lease, "exited")) is True
    assert spool.pending() == 13
    assert "over its limit of 10" in caplog.text
    assert spool.stats().usage == 8
    spool.close()


def test_warning_rearms_after_the_spool_drains(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "s.sqlite3", max_items=10, event_reserve=1)
    with caplog.at_level(logging.WARNING, logger="gpgpu_agent.spool"):
        for n in range(8):
            spool.put(*usage(1, n))
        spool.replay(FakeTransport())
        for n in range(8, 16):
            spool.put(*usage(1, n))
    assert caplog.text.count("80% full") == 2
    spool.close()


# --- durability ---------------------------------------------------------------------------------------


def test_spool_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    with Spool(path) as spool:
        for m in (event(1, "started"), usage(1, 1), usage(1, 2)):
            spool.put(*m)
        spool.replay(FakeTransport(), limit=1)

    with Spool(path) as reopened:
        fake = FakeTransport()
        assert reopened.pending() == 2
        reopened.replay(fake)
    assert fake.applied == [("usage", 1, "1-1"), ("usage", 1, "1-2")]


def _run_child(code: str, path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(AGENT_DIR)}
    return subprocess.run(  # noqa: S603 (our own interpreter and code)
        [sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_what_put_acknowledged_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    child = """
import os, signal, sys
from gpgpu_agent.spool import Spool
spool = Spool(sys.argv[1])
for n in range(50):
    spool.put("usage", 1, f"1-{n}", {"report_id": f"1-{n}"})
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush: a crash
"""
    result = _run_child(child, path)
    assert result.returncode == -signal.SIGKILL, result.stderr

    with Spool(path) as spool:
        fake = FakeTransport()
        spool.replay(fake)
    assert [key for _, key in fake.sent("usage")] == [f"1-{n}" for n in range(50)]


def test_a_crash_in_the_middle_of_replay_neither_loses_nor_reorders(tmp_path: Path) -> None:
    """The agent is killed right after the marketplace acknowledged message 20 (before the
    spool could delete it). After the restart message 20 is sent again (the marketplace
    answers duplicate) and the rest follows, in order."""
    path = tmp_path / "spool.sqlite3"
    acked = tmp_path / "acked.txt"
    with Spool(path) as spool:
        for n in range(40):
            spool.put(*usage(1, n))
    child = f"""
import os, signal, sys
from gpgpu_agent.spool import Spool
from gpgpu_agent.transport import FakeTransport

class Crashing(FakeTransport):
    def lease_usage(self, lease_id, body):
        reply = super().lease_usage(lease_id, body)
        with open({str(acked)!r}, "a") as f:
            f.write(body["report_id"] + "\\n")
        if len(self.applied) == 21:
            os.kill(os.getpid(), signal.SIGKILL)
        return reply

Spool(sys.argv[1]).replay(Crashing())
"""
    result = _run_child(child, path)
    assert result.returncode == -signal.SIGKILL, result.stderr
    before = acked.read_text().split()

    with Spool(path) as spool:
        fake = FakeTransport()
        spool.replay(fake)
    after = [key for _, key in fake.sent("usage")]

    assert before == [f"1-{n}" for n in range(21)]
    assert after == [f"1-{n}" for n in range(20, 40)]


def test_a_second_agent_cannot_open_a_spool_in_use(spool: Spool, tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="in use by another agent"):
        Spool(tmp_path / "spool.sqlite3")


def test_status_can_read_a_spool_the_agent_holds(spool: Spool, tmp_path: Path) -> None:
    spool.put(*event(1, "started"))
    spool.put(*usage(1, 1))

    stats = spool_stats(tmp_path / "spool.sqlite3")

    assert stats is not None and (stats.events, stats.usage, stats.dead, stats.pending) == (1, 1, 0, 2)
    assert spool_stats(tmp_path / "none.sqlite3") is None


def test_puts_during_a_replay_are_all_sent(spool: Spool) -> None:
    fake = FakeTransport()
    stop = threading.Event()

    def replayer() -> None:
        while not stop.is_set():
            spool.replay(fake)

    thread = threading.Thread(target=replayer)
    thread.start()
    for n in range(60):
        spool.put(*usage(1, n))
    stop.set()
    thread.join()
    spool.replay(fake)

    assert [key for _, key in fake.sent("usage")] == [f"1-{n}" for n in range(60)]
    assert len(fake.calls) == 60


def test_body_is_sent_exactly_as_put(spool: Spool) -> None:
    body = {"report_id": "r", "gpu_seconds": "57.345", "mean_utilization_pct": 93.57, "nested": {"a": [1, None]}}
    spool.put("usage", 3, "r", body)
    fake = FakeTransport()

    spool.replay(fake)

    assert json.dumps(fake.calls[0].body, sort_keys=True) == json.dumps(body, sort_keys=True)
