"""Where a chunk of a job's output may end (gpgpu_agent.logship.cut_output) and the spool's side
of shipping it: a chunk and the read position after it in one transaction."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gpgpu_agent import logship
from gpgpu_agent.leases import REDACTED, LeaseTracker, TrackedLease, scrub_secrets
from gpgpu_agent.logship import cut_output
from gpgpu_agent.runners.state import read_from
from gpgpu_agent.spool import LogCursor, Spool, SpoolFull
from gpgpu_agent.transport import FakeTransport
from gpgpu_agent.types import OutputRead

SECRET = "gpm_" + "s" * 40
SECRETS = (SECRET,)


def _chunk(seq: int) -> dict[str, Any]:
    return {"seq": seq, "at": "2026-01-14T12:00:00Z", "text": "x", "truncated": False}


def _ship(pieces: list[bytes]) -> list[str]:
    """The chunks an agent ships when it reads `pieces` one poll after another, then the end."""
    chunks, carry = [], b""
    for n, piece in enumerate(pieces):
        text, carry = cut_output(carry + piece, secrets=SECRETS, final=n == len(pieces) - 1)
        chunks.append(scrub_secrets(text, SECRETS))
    return chunks


def test_a_secret_split_across_any_two_reads_is_redacted_whole() -> None:
    output = f"before {SECRET} after\n".encode()
    for split in range(1, len(output)):
        chunks = _ship([output[:split], output[split:], b""])

        assert "".join(chunks) == f"before {REDACTED} after\n", split
        assert all(SECRET[:6] not in chunk and SECRET[-6:] not in chunk for chunk in chunks), split


def test_a_secret_in_another_letter_case_across_three_reads_is_redacted() -> None:
    output = f"x{SECRET.upper()}y".encode()

    assert "".join(_ship([output[:10], output[10:30], output[30:], b""])) == f"x{REDACTED}y"


def test_a_character_split_across_two_reads_is_shipped_whole() -> None:
    output = "é€😀\n".encode()
    for split in range(1, len(output)):
        chunks = _ship([output[:split], output[split:], b""])

        assert "".join(chunks) == "é€😀\n"
        assert "\ufffd" not in "".join(chunks)


def test_undecodable_bytes_and_nuls_are_replaced_and_dropped() -> None:
    assert _ship([b"a\xffb\x00c\n"]) == ["a\ufffdbc\n"]


def test_while_the_job_runs_only_what_could_start_a_secret_is_held_back() -> None:
    assert cut_output(b"epoch 1 done\n", secrets=SECRETS, final=False) == ("epoch 1 done\n", b"")
    assert cut_output(b"token: GPM_sss", secrets=SECRETS, final=False) == ("token: ", b"GPM_sss")
    assert cut_output(b"token: GPM_sss", secrets=SECRETS, final=True) == ("token: GPM_sss", b"")


def test_a_chunk_and_the_read_position_after_it_are_recorded_together(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_items=10)
    body = {"seq": 0, "at": "2026-01-14T12:00:00Z", "text": "hi\n", "truncated": False}
    after = LogCursor(offset=3, seq=1, shipped=3, carry=b"")

    assert spool.put_log(9, body, cursor=after) is True
    assert spool.put_log(9, body, cursor=after) is False  # the same seq again: queued once
    spool.close()
    spool = Spool(tmp_path / "spool.sqlite3", max_items=10)  # the agent restarted

    assert spool.log_cursor(9) == after
    assert spool.log_cursor(10) == LogCursor()
    fake = FakeTransport()
    assert spool.replay(fake).sent == 1
    assert fake.sent("log") == [(9, "0")] and fake.log_text(9) == "hi\n"
    spool.close()


def test_log_chunks_never_take_the_room_usage_reports_need(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_items=10, event_reserve=2)  # usage may fill 8, logs 4
    for seq in range(4):
        spool.put_log(1, _chunk(seq), cursor=LogCursor(seq=seq + 1))

    with pytest.raises(SpoolFull, match="log chunks may fill 4 of its 10"):
        spool.put_log(1, _chunk(4), cursor=LogCursor(seq=5))
    assert spool.log_cursor(1) == LogCursor(seq=4)  # nothing recorded for the refused one
    assert spool.put("usage", 1, "1-1", {"report_id": "1-1"}) is True
    spool.close()


def test_a_spool_written_before_log_chunks_takes_them_and_keeps_its_queue(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL CHECK (kind IN ('event', 'usage')),
            lease_id INTEGER NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
            UNIQUE (kind, lease_id, key)
        );
        INSERT INTO outbox (kind, lease_id, key, body, created_at)
            VALUES ('event', 1, 'lease-1-started', '{"event_id":"lease-1-started","type":"started"}', 0);
        """
    )
    db.commit()
    db.close()

    spool = Spool(path, max_items=10)
    spool.put_log(1, {"seq": 0, "at": "2026-01-14T12:00:00Z", "text": "x", "truncated": False}, cursor=LogCursor())
    fake = FakeTransport()
    spool.replay(fake)

    assert fake.applied == [("event", 1, "lease-1-started"), ("log", 1, "0")]
    spool.close()


class FileRunner:
    """A runner whose one lease's output is a file the test appends to (read_output only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read_output(self, lease_id: int, *, offset: int, limit: int) -> OutputRead | None:
        data, next_offset = read_from(self.path, offset, limit)
        return OutputRead(data=data, next_offset=next_offset)


def _tracker(tmp_path: Path, spool: Spool, **options: Any) -> LeaseTracker:
    tracker = LeaseTracker(
        runner=FileRunner(tmp_path / "out.log"),  # type: ignore[arg-type]
        outbox=spool,
        sign=lambda struct: "",
        state_dir=tmp_path,
        secrets=SECRETS,
        **options,
    )
    now = datetime.now(UTC)
    tracker.leases[1] = TrackedLease(lease_id=1, gpu_uuids=(), max_duration_s=3600, started_at=now, usage_from=now)
    return tracker


def test_a_trickle_of_output_is_gathered_into_one_chunk_per_interval(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3")
    tracker = _tracker(tmp_path, spool)
    out = tmp_path / "out.log"
    out.write_text("")

    for n in range(20):  # twenty polls, a line each, well within MIN_INTERVAL_S
        with out.open("a") as f:
            f.write(f"line {n}\n")
        tracker.ship_output()
    fake = FakeTransport()
    spool.replay(fake)

    assert fake.log_text(1) == "line 0\n"  # the first at once; the rest waits for the interval
    assert len(fake.logs) == 1
    spool.close()


def test_an_agent_restarted_between_reads_ships_on_from_where_the_last_chunk_ended(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    out.write_text("before the restart\n")
    spool = Spool(tmp_path / "spool.sqlite3")
    _tracker(tmp_path, spool).ship_output()
    spool.close()
    with out.open("a") as f:
        f.write("after it\n")

    spool = Spool(tmp_path / "spool.sqlite3")  # a new agent process
    _tracker(tmp_path, spool).ship_output()
    fake = FakeTransport()
    spool.replay(fake)

    assert fake.log_text(1) == "before the restart\nafter it\n"
    assert fake.sent("log") == [(1, "0"), (1, "1")]
    spool.close()


def test_the_cap_never_ships_the_start_of_a_secret_it_cuts_through(tmp_path: Path) -> None:
    (tmp_path / "out.log").write_text("x" * 10 + SECRET + " more\n")
    spool = Spool(tmp_path / "spool.sqlite3")
    tracker = _tracker(tmp_path, spool, log_max_bytes=20)  # the cap falls inside the secret

    tracker.ship_output()
    tracker.ship_output()
    fake = FakeTransport()
    spool.replay(fake)

    text = fake.log_text(1)
    assert text.startswith("x" * 10 + "\n[gpgpu-agent: this lease's output passed 20 bytes")
    assert "gpm_" not in text and [body["truncated"] for body in fake.logs.values()] == [True]
    spool.close()


def test_log_chunks_refused_for_good_are_dropped_with_one_warning_per_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_items=100)
    for seq in range(3):
        spool.put_log(1, _chunk(seq), cursor=LogCursor(seq=seq + 1))
    spool.put("event", 1, "lease-1-exited", {"event_id": "lease-1-exited", "type": "exited"})
    fake = FakeTransport()
    for seq in range(3):  # an older marketplace, without the logs endpoint
        fake.reject("log", 1, str(seq), status=404, code="not_found", detail="No such page.")

    with caplog.at_level(logging.WARNING, logger="gpgpu_agent.spool"):
        result = spool.replay(fake)

    assert (result.sent, result.dead, result.pending) == (1, 3, 0)
    assert fake.applied == [("event", 1, "lease-1-exited")]
    assert spool.dead_letters() == []
    assert len([r for r in caplog.records if "log chunk" in r.getMessage()]) == 1
    spool.close()


def test_a_burst_of_output_as_the_job_ends_ships_at_most_final_bytes_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logship, "FINAL_BYTES", 100)
    (tmp_path / "out.log").write_text("a" * 30)
    spool = Spool(tmp_path / "spool.sqlite3")
    tracker = _tracker(tmp_path, spool)
    tracker.ship_output()
    with (tmp_path / "out.log").open("a") as f:
        f.write("b" * 500)  # its last moments

    tracker._ship_output(tracker.leases[1], final=True)  # as LeaseTracker._finish does
    fake = FakeTransport()
    spool.replay(fake)

    text = fake.log_text(1)
    assert text.startswith("a" * 30 + "b" * 100 + "\n[gpgpu-agent: the job wrote more than 100 bytes as it ended")
    assert [body["truncated"] for _, body in sorted(fake.logs.items())] == [False, True]
    spool.close()
