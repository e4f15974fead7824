"""Where a chunk of a job's output may end (gpgpu_agent.logship.cut_output) and the spool's side
of shipping it: a chunk and the read position after it in one transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gpgpu_agent.leases import REDACTED, scrub_secrets
from gpgpu_agent.logship import cut_output
from gpgpu_agent.spool import LogCursor, Spool, SpoolFull
from gpgpu_agent.transport import FakeTransport

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
