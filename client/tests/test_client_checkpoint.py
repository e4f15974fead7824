"""Cancelling a job keeping its checkpoint, and downloading it (Client.job_cancel,
Client.job_checkpoint_download, `gpgpu cancel --keep-checkpoint`, `gpgpu checkpoint`), against
the tiny local server of test_client_http."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_client_http import Server

from gpgpu_client import Client, ClientError, NotFound
from gpgpu_client.cli import main

ARCHIVE = b"the job's state, packed" * 1000
DIGEST = hashlib.sha256(ARCHIVE).hexdigest()
TAR = {"Content-Type": "application/x-tar", "X-Checkpoint-SHA256": DIGEST}
JOB = {"id": 7, "status": "cancelled", "keep_checkpoint": True, "checkpoint": None}


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def client(server: Server) -> Client:
    return Client(server.url, "tok", sleep=lambda _: None, max_retries=1, backoff_s=0.01)


@pytest.fixture
def logged_in(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPGPU_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("GPGPU_API_URL", server.url)
    monkeypatch.setenv("GPGPU_TOKEN", "tok")


def test_a_cancel_asks_to_keep_the_checkpoint_only_when_told(server: Server, client: Client) -> None:
    server.replies = [(200, {}, JOB)]

    client.job_cancel(7)
    client.job_cancel(7, keep_checkpoint=True)

    plain, keeping = server.requests
    assert (plain["method"], plain["path"], plain["body"]) == ("POST", "/api/v1/jobs/7/cancel/", None)
    assert keeping["body"] == {"keep_checkpoint": True}


def test_the_checkpoint_is_saved_whole_and_checked(server: Server, client: Client, tmp_path: Path) -> None:
    server.replies = [(200, TAR, ARCHIVE)]
    dest = tmp_path / "state.tar"

    assert client.job_checkpoint_download(7, dest) == (len(ARCHIVE), DIGEST)

    assert dest.read_bytes() == ARCHIVE
    assert server.requests[0]["path"] == "/api/v1/jobs/7/checkpoint/"
    assert server.requests[0]["headers"]["Authorization"] == "Token tok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.tar"]


def test_a_damaged_download_leaves_the_file_as_it_was(server: Server, client: Client, tmp_path: Path) -> None:
    server.replies = [(200, {**TAR, "X-Checkpoint-SHA256": "0" * 64}, ARCHIVE)]
    dest = tmp_path / "state.tar"
    dest.write_bytes(b"yesterday's state")

    with pytest.raises(ClientError, match="do not match"):
        client.job_checkpoint_download(7, dest)

    assert dest.read_bytes() == b"yesterday's state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.tar"]


def test_a_redirect_to_the_store_is_followed_without_the_token(server: Server, client: Client, tmp_path: Path) -> None:
    def answer(seen: dict[str, Any]) -> tuple[int, dict[str, str], object]:
        if seen["path"] == "/api/v1/jobs/7/checkpoint/":
            return (
                302,
                {"Location": f"{server.url}/bucket/job-7/a.tar?X-Amz-Signature=s", "X-Checkpoint-SHA256": DIGEST},
                b"",
            )
        return 200, {"Content-Type": "application/x-tar"}, ARCHIVE

    server.answer = answer
    dest = tmp_path / "state.tar"

    client.job_checkpoint_download(7, dest)

    assert dest.read_bytes() == ARCHIVE
    _, store = server.requests
    assert store["path"] == "/bucket/job-7/a.tar"
    assert "Authorization" not in store["headers"]


def test_a_job_without_a_checkpoint_is_a_not_found(server: Server, client: Client, tmp_path: Path) -> None:
    server.replies = [(404, {}, {"code": "no_checkpoint", "detail": "Job 7 has no checkpoint."})]
    with pytest.raises(NotFound) as missing:
        client.job_checkpoint_download(7, tmp_path / "state.tar")
    assert missing.value.code == "no_checkpoint"
    assert list(tmp_path.iterdir()) == []


def test_gpgpu_cancel_keep_checkpoint_says_how_to_download_it(
    server: Server, logged_in: None, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = {**JOB, "checkpoint": {"kept_until": "2026-12-10T04:00:00Z"}}
    server.replies = [(200, {}, kept)]

    assert main(["cancel", "7", "--keep-checkpoint"]) == 0

    assert server.requests[0]["body"] == {"keep_checkpoint": True}
    assert capsys.readouterr().out == (
        "Job 7 cancelled\nits checkpoint is kept until 2026-12-10T04:00:00Z: gpgpu checkpoint 7 -o FILE downloads it\n"
    )


def test_gpgpu_cancel_keep_checkpoint_of_a_job_without_one_is_the_servers_refusal(
    server: Server, logged_in: None, capsys: pytest.CaptureFixture[str]
) -> None:
    refusal = {"code": "no_checkpoint_dir", "detail": "Job 7 declares no checkpoint_dir: it has no checkpoint to keep."}
    server.replies = [(400, {}, refusal)]

    assert main(["cancel", "7", "--keep-checkpoint"]) == 1

    assert "declares no checkpoint_dir" in capsys.readouterr().err


def test_gpgpu_checkpoint_writes_the_file_and_says_what_it_wrote(
    server: Server, logged_in: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.replies = [(200, TAR, ARCHIVE)]
    dest = tmp_path / "out.tar"

    assert main(["checkpoint", "7", "-o", str(dest), "--json"]) == 0

    assert dest.read_bytes() == ARCHIVE
    assert json.loads(capsys.readouterr().out) == {"job": 7, "path": str(dest), "size": len(ARCHIVE), "sha256": DIGEST}
