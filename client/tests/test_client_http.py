"""The SDK's HTTP client against a tiny local HTTP server: Retry-After on 429/503, the error
shape as typed exceptions, the Idempotency-Key on a submission, pagination."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gpgpu_client import Client, ClientError, NotFound, RateLimited, Unavailable, ValidationFailed
from gpgpu_client.client import parse_retry_after

Reply = tuple[int, dict[str, str], Any]


class Server:
    """A local HTTP server answering each request with the next of `replies` (the last one again
    once they run out), recording what it was asked."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.answer: Callable[[dict[str, Any]], Reply] | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                parts = urlsplit(self.path)
                seen = {
                    "method": self.command,
                    "path": parts.path,
                    "query": {k: v[0] for k, v in parse_qs(parts.query).items()},
                    "headers": dict(self.headers),
                    "body": json.loads(self.rfile.read(length)) if length else None,
                }
                server.requests.append(seen)
                if server.answer is not None:
                    status, headers, body = server.answer(seen)
                else:
                    status, headers, body = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                # Bytes are sent as they are (an archive); anything else as JSON.
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def client(server: Server, waits: list[float]) -> Client:
    return Client(server.url, "tok", sleep=waits.append, max_retries=3, backoff_s=0.01)


ME = {"id": 1, "username": "ada", "email": "", "roles": ["renter"], "renter": None, "provider": None}


def test_a_429_is_retried_after_the_servers_retry_after(server: Server, client: Client, waits: list[float]) -> None:
    server.replies = [
        (429, {"Retry-After": "7"}, {"code": "throttled", "detail": "Slow down."}),
        (200, {}, ME),
    ]

    me = client.me()

    assert me.username == "ada"
    assert waits == [7.0]
    assert len(server.requests) == 2
    assert server.requests[0]["headers"]["Authorization"] == "Token tok"


def test_a_503_with_an_http_date_waits_until_then(server: Server, client: Client, waits: list[float]) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    server.replies = [
        (503, {"Retry-After": later}, {"code": "database_unavailable", "detail": "Try again."}),
        (200, {}, ME),
    ]

    client.me()

    assert len(waits) == 1
    assert 25 <= waits[0] <= 30


def test_retries_end_with_the_typed_error_and_its_retry_after(
    server: Server, client: Client, waits: list[float]
) -> None:
    server.replies = [(429, {"Retry-After": "2"}, {"code": "throttled", "detail": "Slow down."})]

    with pytest.raises(RateLimited) as caught:
        client.me()

    assert caught.value.code == "throttled"
    assert caught.value.retry_after_s == 2.0
    assert waits == [2.0, 2.0, 2.0]
    assert len(server.requests) == 4


def test_a_retry_after_too_long_to_wait_is_not_waited_for(server: Server, client: Client, waits: list[float]) -> None:
    server.replies = [(503, {"Retry-After": "3600"}, {"code": "maintenance", "detail": "Back in an hour."})]

    with pytest.raises(Unavailable, match="Back in an hour"):
        client.me()

    assert waits == []


def test_a_retried_submission_carries_the_same_idempotency_key(server: Server, client: Client) -> None:
    job = {"id": 5, "status": "pending", "name": "", "kind": "process"}
    server.replies = [(503, {"Retry-After": "0"}, {"code": "database_unavailable", "detail": "x"}), (201, {}, job)]

    submitted = client.job_submit({"gpu_count": 1})

    assert submitted.id == 5
    keys = [r["headers"]["Idempotency-Key"] for r in server.requests]
    assert len(keys) == 2
    assert keys[0] == keys[1] and keys[0].startswith("gpgpu-client-")


def test_error_bodies_become_typed_exceptions(server: Server, client: Client) -> None:
    server.replies = [
        (
            400,
            {},
            {"code": "invalid", "detail": "gpu_count: too many", "fields": {"gpu_count": ["too many"], "env": ["bad"]}},
        ),
        (404, {}, {"code": "not_found", "detail": "Not found."}),
    ]

    with pytest.raises(ValidationFailed) as invalid:
        client.job_submit({"gpu_count": 99})
    with pytest.raises(NotFound) as missing:
        client.job(12)

    assert invalid.value.fields == {"gpu_count": ["too many"], "env": ["bad"]}
    assert invalid.value.status == 400
    assert missing.value.code == "not_found"


def test_lists_page_through_limit_and_offset(server: Server, client: Client) -> None:
    total = 230

    def answer(request: dict[str, Any]) -> Reply:
        limit, offset = int(request["query"]["limit"]), int(request["query"]["offset"])
        rows = [{"id": i, "status": "pending"} for i in range(offset, min(offset + limit, total))]
        more = offset + limit < total
        return 200, {}, {"count": total, "next": "more" if more else None, "previous": None, "results": rows}

    server.answer = answer

    ids = [job.id for job in client.jobs(status="pending")]

    assert ids == list(range(total))
    assert [r["query"]["offset"] for r in server.requests] == ["0", "100", "200"]
    assert all(r["query"]["status"] == "pending" for r in server.requests)


def test_retry_after_readings() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)

    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:10 GMT", now=now) == 10.0
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_a_server_that_cannot_be_reached_is_retried_with_backoff_then_a_client_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    waits: list[float] = []
    client = Client(f"http://127.0.0.1:{port}", "tok", sleep=waits.append, max_retries=3, backoff_s=0.5)

    with pytest.raises(ClientError, match="cannot reach"):
        client.me()

    assert len(waits) == 3
    assert waits[0] < waits[1] < waits[2]
    assert 0.5 <= waits[0] <= 0.75
