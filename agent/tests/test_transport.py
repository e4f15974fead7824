"""HttpTransport against a small HTTP server on 127.0.0.1, the backoff, and the FakeTransport."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gpgpu_agent.protocols import Rejected, TransportUnavailable
from gpgpu_agent.transport import Backoff, FakeTransport, HttpTransport, parse_retry_after


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=dict)  # dict → JSON; str → sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class Marketplace:
    """A stand-in marketplace: answers each POST with the next queued Reply (200 {} when none)."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.seen: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                outer.seen.append(Seen("POST", self.path, dict(self.headers), json.loads(raw) if raw else None))
                reply = outer.replies.popleft() if outer.replies else Reply()
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                payload = data.encode()
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def reply(self, **kw: Any) -> None:
        self.replies.append(Reply(**kw))


@pytest.fixture
def market() -> Iterator[Marketplace]:
    m = Marketplace()
    m.thread.start()
    yield m
    m.server.shutdown()
    m.server.server_close()


@pytest.fixture
def transport(market: Marketplace) -> Iterator[HttpTransport]:
    t = HttpTransport(market.url, credential="gpm_secret", timeout_s=2)
    yield t
    t.close()


# --- HttpTransport ----------------------------------------------------------------------------


def test_calls_post_json_to_the_agent_api_with_the_machine_credential(
    market: Marketplace, transport: HttpTransport
) -> None:
    market.reply(body={"heartbeat_interval_s": 10, "start": [], "stop": []})
    market.reply(status=201, body={"id": 1, "lease_id": 7, "report_id": "r", "duplicate": False})

    reply = transport.heartbeat({"gpus": []})
    usage = transport.lease_usage(7, {"report_id": "r"})

    assert reply == {"heartbeat_interval_s": 10, "start": [], "stop": []}
    assert usage["duplicate"] is False
    first, second = market.seen
    assert (first.path, first.body) == ("/api/agent/v1/heartbeat", {"gpus": []})
    assert first.headers["Authorization"] == "Machine gpm_secret"
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"].startswith("gpgpu-agent/")
    assert second.path == "/api/agent/v1/leases/7/usage"


def test_register_sends_no_credential(market: Marketplace) -> None:
    market.reply(status=201, body={"machine_id": 3, "credential": "gpm_x", "heartbeat_interval_s": 10})
    t = HttpTransport(market.url + "/")

    assert t.register({"token": "gpreg_x"})["machine_id"] == 3
    assert "Authorization" not in market.seen[0].headers
    assert market.seen[0].path == "/api/agent/v1/register"


def test_base_url_that_already_names_the_api_is_not_doubled(market: Marketplace) -> None:
    HttpTransport(market.url + "/api/agent/v1/", credential="c").lease_event(5, {"event_id": "e"})

    assert market.seen[0].path == "/api/agent/v1/leases/5/events"


def test_a_call_without_credential_is_refused_before_sending(market: Marketplace) -> None:
    with pytest.raises(Rejected) as caught:
        HttpTransport(market.url).heartbeat({})

    assert caught.value.code == "not_registered"
    assert market.seen == []


def test_marketplace_refusal_is_rejected_with_its_code_and_detail(
    market: Marketplace, transport: HttpTransport
) -> None:
    market.reply(status=409, body={"code": "invalid_transition", "detail": "Lease 7 is ended."})

    with pytest.raises(Rejected) as caught:
        transport.lease_event(7, {"event_id": "e", "type": "started"})

    assert (caught.value.status, caught.value.code, caught.value.detail) == (
        409,
        "invalid_transition",
        "Lease 7 is ended.",
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_server_errors_and_throttling_are_worth_a_retry(
    market: Marketplace, transport: HttpTransport, status: int
) -> None:
    market.reply(status=status, body={"code": "busy", "detail": "later"})

    with pytest.raises(TransportUnavailable) as caught:
        transport.heartbeat({})

    assert str(status) in str(caught.value)
    assert caught.value.retry_after_s is None


def test_retry_after_header_is_passed_on(market: Marketplace, transport: HttpTransport) -> None:
    market.reply(status=429, body={"code": "throttled", "detail": "slow down"}, headers={"Retry-After": "7"})

    with pytest.raises(TransportUnavailable) as caught:
        transport.lease_usage(1, {"report_id": "r"})

    assert caught.value.retry_after_s == 7.0
    assert "retry in 7 s" in str(caught.value)


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (Reply(status=404, body="<html>Not Found</html>"), "without the marketplace's error body"),
        (Reply(status=400, body={"error": "from a proxy"}), "without the marketplace's error body"),
        (Reply(status=302, body="", headers={"Location": "https://elsewhere/"}), "https://elsewhere/"),
        (Reply(status=200, body="<html>captive portal</html>"), "not a JSON object"),
        (Reply(status=200, body="[1, 2]"), "not a JSON object"),
    ],
)
def test_answers_not_from_the_marketplace_are_not_taken_as_refusals(
    market: Marketplace, transport: HttpTransport, reply: Reply, words: str
) -> None:
    """A proxy or a wrong URL must not make the agent give up on a message for good."""
    market.replies.append(reply)

    with pytest.raises(TransportUnavailable, match=words):
        transport.lease_event(1, {"event_id": "e"})


def test_unreachable_marketplace_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now.
    with pytest.raises(TransportUnavailable, match="Cannot reach the marketplace"):
        HttpTransport(f"http://127.0.0.1:{port}", credential="c", timeout_s=1).heartbeat({})


def test_slow_marketplace_times_out_as_unavailable(market: Marketplace) -> None:
    market.reply(delay_s=1.0)
    t = HttpTransport(market.url, credential="c", timeout_s=0.2)

    started = time.monotonic()
    with pytest.raises(TransportUnavailable, match=r"within 0\.2 s"):
        t.heartbeat({})

    assert time.monotonic() - started < 0.9


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 1, 14, 12, 0, tzinfo=UTC)

    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# --- Backoff --------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_full_jitter() -> None:
    highest = Backoff(base_s=1, cap_s=60, rand=lambda: 0.999999)
    lowest = Backoff(base_s=1, cap_s=60, rand=lambda: 0.0)

    ceilings = [round(highest.next_delay()) for _ in range(9)]

    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert {lowest.next_delay() for _ in range(9)} == {0.0}


def test_backoff_is_deterministic_with_an_injected_random_and_resets_on_success() -> None:
    draws = iter([0.5, 0.25, 0.5])
    backoff = Backoff(base_s=2, cap_s=60, rand=lambda: next(draws))

    assert backoff.next_delay() == 1.0  # 0.5 × 2
    assert backoff.next_delay() == 1.0  # 0.25 × 4
    backoff.reset()
    assert backoff.next_delay() == 1.0  # 0.5 × 2 again
    assert backoff.failures == 1


def test_backoff_waits_at_least_what_the_marketplace_asked_but_never_past_the_cap() -> None:
    backoff = Backoff(base_s=1, cap_s=60, rand=lambda: 0.0)

    assert backoff.next_delay(retry_after_s=7) == 7
    assert backoff.next_delay(retry_after_s=3600) == 60


def test_a_lower_cap_for_one_delay_bounds_its_jitter_and_the_retry_after() -> None:
    backoff = Backoff(base_s=1, cap_s=60, rand=lambda: 0.999999)
    for _ in range(10):
        backoff.next_delay()

    assert 3.9 < backoff.next_delay(cap_s=4) <= 4
    assert backoff.next_delay(retry_after_s=3600, cap_s=4) == 4
    assert backoff.next_delay() > 59  # the backoff's own cap is untouched


def test_backoff_survives_a_very_long_outage() -> None:
    backoff = Backoff(rand=lambda: 0.999)
    for _ in range(10_000):
        delay = backoff.next_delay()
    assert 0 <= delay < 60


# --- FakeTransport ----------------------------------------------------------------------------


def test_fake_dedupes_like_the_marketplace() -> None:
    fake = FakeTransport()
    body = {"event_id": "lease-1-started", "type": "started"}

    first = fake.lease_event(1, body)
    again = fake.lease_event(1, body)
    other_lease = fake.lease_event(2, body)

    assert (first["duplicate"], again["duplicate"], other_lease["duplicate"]) == (False, True, False)
    assert fake.applied == [("event", 1, "lease-1-started"), ("event", 2, "lease-1-started")]
    assert [c.outcome for c in fake.calls] == ["ok", "duplicate", "ok"]


def test_fake_goes_down_fails_n_times_and_rejects_on_request() -> None:
    fake = FakeTransport()
    fake.set_down(retry_after_s=5)
    with pytest.raises(TransportUnavailable) as caught:
        fake.heartbeat({})
    assert caught.value.retry_after_s == 5

    fake.set_up()
    fake.fail_next(2)
    outcomes = []
    for _ in range(3):
        try:
            fake.lease_usage(1, {"report_id": "r"})
            outcomes.append("ok")
        except TransportUnavailable:
            outcomes.append("down")
    assert outcomes == ["down", "down", "ok"]

    fake.reject("usage", 1, "bad", status=400, code="usage_signature_invalid")
    with pytest.raises(Rejected) as refused:
        fake.lease_usage(1, {"report_id": "bad"})
    assert refused.value.code == "usage_signature_invalid"
    assert fake.sent("usage") == [(1, "r")]
