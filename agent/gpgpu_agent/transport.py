"""The agent API over HTTP (docs/agent-api.md), the backoff between retries, and a fake for tests.

HttpTransport maps every way a call can go wrong onto two errors (protocols.Transport):

- TransportUnavailable: a retry may cure it. Connection refused or reset, DNS failure, timeout,
  408, 429 and 5xx answers (with the Retry-After header's wait, when given), a 2xx answer that
  is not a JSON object, and a 4xx answer without the marketplace's `{"code", "detail"}` body (a
  proxy or a wrong base URL answered, not the marketplace: giving up on the message would be
  wrong).
- Rejected(status, code, detail): the marketplace refused this request; sending it again
  unchanged will be refused again.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import queue
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import requests

from gpgpu_agent import __version__
from gpgpu_agent.checkpoint import CheckpointError
from gpgpu_agent.protocol import (
    API_PREFIX,
    AUTH_SCHEME,
    AUTHORIZATION_HEADER,
    CODE_INVALID_TRANSITION,
    EVENT_STARTED,
    RETRY_AFTER_HEADER,
)
from gpgpu_agent.protocols import Rejected, TransportUnavailable
from gpgpu_agent.types import JsonObject

logger = logging.getLogger(__name__)

SHA256_HEADER = "X-Checkpoint-SHA256"
# The headers a store's pre-signed PUT may ask for, besides its own x-amz-* ones.
_DIRECT_UPLOAD_HEADERS = frozenset({"content-type", "content-length", "content-md5"})
# Statuses a retry may cure besides 5xx: request timeout, too many requests.
_RETRYABLE_4XX = frozenset({408, 429})


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date), None when
    absent or unreadable; never negative."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class HttpTransport:
    """protocols.Transport over `requests`.

    `base_url` is the marketplace's address (`https://market.example`); the agent API's prefix
    `/api/agent/v1/` is added (a base URL that already ends with it is used as is). Every call
    but `register` sends `Authorization: Machine <credential>`; set `credential` after
    registering. Thread-safe as far as `requests.Session` is (one call at a time per thread)."""

    def __init__(
        self,
        base_url: str,
        credential: str | None = None,
        timeout_s: float = 10,
        session: requests.Session | None = None,
    ):
        root = base_url.rstrip("/")
        prefix = API_PREFIX.rstrip("/")
        self.api_url = (root if root.endswith(prefix) else root + prefix) + "/"
        self.credential = credential
        self.timeout_s = timeout_s
        self._session = session or requests.Session()

    def close(self) -> None:
        self._session.close()

    # -- the agent API -------------------------------------------------------------------------

    def register(self, body: Mapping[str, object]) -> JsonObject:
        return self._post("register", body, authenticated=False)

    def heartbeat(self, body: Mapping[str, object]) -> JsonObject:
        return self._post("heartbeat", body)

    def lease_event(self, lease_id: int, body: Mapping[str, object]) -> JsonObject:
        return self._post(f"leases/{int(lease_id)}/events", body)

    def lease_usage(self, lease_id: int, body: Mapping[str, object]) -> JsonObject:
        return self._post(f"leases/{int(lease_id)}/usage", body)

    def lease_log(self, lease_id: int, body: Mapping[str, object]) -> JsonObject:
        return self._post(f"leases/{int(lease_id)}/logs", body)

    def rotate_credential(self, body: Mapping[str, object]) -> JsonObject:
        """A new credential for this machine (the current one stops working at once)."""
        return self._post("credential/rotate", body)

    def orders_wait(self, body: Mapping[str, object]) -> JsonObject:
        """The doorbell: held by the marketplace up to body["wait_s"] until there is a new order."""
        held = body.get("wait_s")
        wait_s = float(held) if isinstance(held, int | float) else 0.0
        return self._post("orders/wait", body, timeout_s=self.timeout_s + wait_s)

    # -- checkpoints (protocols.CheckpointTransfer) ----------------------------------------------

    def _checkpoint_target(self, url: str) -> tuple[str, dict[str, str]]:
        """The URL to call and its headers: the agent API's own paths get the credential; a
        store's absolute URL never does (it may be anyone's host)."""
        headers = {"User-Agent": f"gpgpu-agent/{__version__}"}
        parts = urlsplit(url)
        if not parts.scheme and not parts.netloc:
            if url.startswith("/") or ".." in url.split("/") or "\\" in url or "?" in url or "#" in url:
                raise Rejected(400, "bad_checkpoint_url", f"{url[:200]!r} is not a path of the agent API")
            if not self.credential:
                raise Rejected(401, "not_registered", "This agent has no machine credential.")
            headers[AUTHORIZATION_HEADER] = f"{AUTH_SCHEME} {self.credential}"
            return self.api_url + url, headers
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise Rejected(400, "bad_checkpoint_url", f"{url[:200]!r} is not an http(s) URL")
        return url, headers

    def checkpoint_download(self, url: str, dest: Path, *, size: int, sha256: str, max_bytes: int) -> None:
        target, headers = self._checkpoint_target(url)
        if size > max_bytes:
            raise CheckpointError(f"the checkpoint is {size} bytes, over its limit of {max_bytes}")
        try:
            with self._session.get(
                target, headers=headers, stream=True, timeout=self.timeout_s, allow_redirects=False
            ) as response:
                if response.status_code != 200:
                    self._answer(target, response)  # raises for every error status
                    raise TransportUnavailable(f"{target} answered {response.status_code}, not the archive.")
                _receive(response, dest, size=size, sha256=sha256)
        except requests.Timeout:
            raise TransportUnavailable(f"The checkpoint store did not answer {target} in time.") from None
        except requests.RequestException as exc:
            raise TransportUnavailable(f"Cannot fetch the checkpoint: {type(exc).__name__}.") from None

    def checkpoint_upload(self, url: str, path: Path, *, size: int, sha256: str, direct: bool = False) -> None:
        if direct:
            self._checkpoint_upload_direct(url, path, size=size, sha256=sha256)
            return
        target, headers = self._checkpoint_target(url)
        headers |= {"Content-Type": "application/x-tar", "Content-Length": str(size), SHA256_HEADER: sha256}
        response = self._put_archive(target, path, size=size, headers=headers)
        if not 200 <= response.status_code < 300:
            self._answer(target, response)

    def _put_archive(self, target: str, path: Path, *, size: int, headers: dict[str, str]) -> requests.Response:
        """PUT the archive `path` (`size` bytes) to `target` with `headers`; TransportUnavailable
        when it cannot be sent or answered in time."""
        try:
            with open(path, "rb") as body:
                return self._session.put(
                    # An empty file would go chunked (requests), beside the Content-Length: 0.
                    target,
                    data=body if size else b"",
                    headers=headers,
                    timeout=self.timeout_s,
                    allow_redirects=False,
                )
        except requests.Timeout:
            raise TransportUnavailable(f"The checkpoint store did not answer {target} in time.") from None
        except requests.RequestException as exc:
            raise TransportUnavailable(f"Cannot upload the checkpoint: {type(exc).__name__}.") from None

    def _checkpoint_upload_direct(self, url: str, path: Path, *, size: int, sha256: str) -> None:
        """Straight to the store: ask `{url}/upload` for a pre-signed PUT, PUT the archive there
        with exactly the headers it names (its size and SHA-256 are signed: the store refuses
        other bytes), then `{url}/commit`, where the marketplace checks the object."""
        begin, _ = self._checkpoint_target(f"{url}/upload")  # refuses anything but an agent API path
        if not begin.startswith(self.api_url):
            raise Rejected(400, "bad_checkpoint_url", f"{url[:200]!r} is not a path of the agent API")
        answer = self._post(f"{url}/upload", {"size": size, "sha256": sha256})
        put_url, put_headers, token = answer.get("url"), answer.get("headers"), answer.get("token")
        if not isinstance(put_url, str) or not isinstance(token, str) or not isinstance(put_headers, dict):
            raise TransportUnavailable(f"{begin} answered without a URL, headers and a token to upload to.")
        target, headers = self._checkpoint_target(put_url)
        if target.startswith(self.api_url):
            raise Rejected(400, "bad_checkpoint_url", "a direct upload's URL must be the store's, not the agent API")
        for name, value in put_headers.items():
            allowed = name.lower() in _DIRECT_UPLOAD_HEADERS or name.lower().startswith("x-amz-")
            if not allowed or not isinstance(value, str):
                raise Rejected(400, "bad_checkpoint_url", f"a direct upload may not set the header {str(name)[:100]!r}")
            if name.lower() == "content-length":
                if value != str(size):
                    raise Rejected(400, "bad_checkpoint_url", "the store's URL was signed for another size")
                continue
            headers[str(name)] = value
        headers["Content-Length"] = str(size)
        response = self._put_archive(target, path, size=size, headers=headers)
        if not 200 <= response.status_code < 300:
            # The store's own error (XML): a retry asks for a new URL.
            raise TransportUnavailable(f"The checkpoint store answered {response.status_code} to the upload.")
        self._post(f"{url}/commit", {"token": token})

    # -- plumbing ------------------------------------------------------------------------------

    def _post(
        self, path: str, body: Mapping[str, object], *, authenticated: bool = True, timeout_s: float | None = None
    ) -> JsonObject:
        url = self.api_url + path
        timeout = self.timeout_s if timeout_s is None else timeout_s
        headers = {"Accept": "application/json", "User-Agent": f"gpgpu-agent/{__version__}"}
        if authenticated:
            if not self.credential:
                raise Rejected(
                    401, "not_registered", "This agent has no machine credential; run `gpgpu-agent register`."
                )
            headers[AUTHORIZATION_HEADER] = f"{AUTH_SCHEME} {self.credential}"
        try:
            response = self._session.post(url, json=dict(body), headers=headers, timeout=timeout, allow_redirects=False)
        except requests.Timeout:
            raise TransportUnavailable(f"The marketplace did not answer {url} within {timeout:g} s.") from None
        except requests.RequestException as exc:
            raise TransportUnavailable(f"Cannot reach the marketplace at {url}: {type(exc).__name__}.") from None
        return self._answer(url, response)

    @staticmethod
    def _answer(url: str, response: requests.Response) -> JsonObject:
        status = response.status_code
        try:
            payload: object = response.json()
        except ValueError:
            payload = None
        if 200 <= status < 300:
            if not isinstance(payload, dict):
                raise TransportUnavailable(f"{url} answered {status} with a body that is not a JSON object.")
            return payload
        if status >= 500 or status in _RETRYABLE_4XX:
            wait = parse_retry_after(response.headers.get(RETRY_AFTER_HEADER))
            hint = f"; it asks to retry in {wait:g} s" if wait is not None else ""
            raise TransportUnavailable(f"{url} answered {status}{hint}.", retry_after_s=wait)
        if 400 <= status < 500 and isinstance(payload, dict) and isinstance(payload.get("code"), str):
            raise Rejected(status, payload["code"], str(payload.get("detail", "")))
        # A redirect, or a 4xx that is not the marketplace's error body: something between us
        # (a proxy, a wrong base URL) answered; the message itself may be fine.
        where = f" to {response.headers.get('Location')}" if 300 <= status < 400 else ""
        raise TransportUnavailable(
            f"{url} answered {status}{where} without the marketplace's error body; is the marketplace URL right?"
        )


def _receive(response: requests.Response, dest: Path, *, size: int, sha256: str) -> None:
    """Write the response's body to `dest` (0600): exactly `size` bytes of SHA-256 `sha256`, or
    CheckpointError and nothing left at `dest`."""
    digest = hashlib.sha256()
    got = 0
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in response.iter_content(chunk_size=1 << 20):
                got += len(chunk)
                if got > size:
                    raise CheckpointError(f"the checkpoint sent is larger than the {size} bytes announced")
                digest.update(chunk)
                out.write(chunk)
        if got != size:
            raise CheckpointError(f"the checkpoint sent is {got} bytes, not the {size} announced")
        if digest.hexdigest() != sha256:
            raise CheckpointError("the checkpoint sent does not match its SHA-256: it was damaged or replaced")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


class Backoff:
    """Exponential backoff with full jitter: after the n-th failure in a row, wait a uniformly
    random time in [0, min(cap_s, base_s × 2^(n-1))). A Retry-After the marketplace sent is a
    floor (itself capped at the cap, so heartbeats never stop for longer). `reset()` after a
    success. `rand` returns floats in [0, 1): inject one to make delays deterministic."""

    def __init__(self, *, base_s: float = 1.0, cap_s: float = 60.0, rand: Callable[[], float] = random.random):
        if base_s <= 0 or cap_s < base_s:
            raise ValueError("Backoff needs 0 < base_s <= cap_s.")
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._rand = rand

    def next_delay(self, retry_after_s: float | None = None, *, cap_s: float | None = None) -> float:
        """Record one more failure and return the seconds to wait before the next try. `cap_s`
        lowers the cap for this delay (the daemon passes the marketplace's heartbeat interval)."""
        cap = self.cap_s if cap_s is None else max(0.0, min(self.cap_s, cap_s))
        ceiling = min(cap, self.base_s * 2.0 ** min(self.failures, 62))
        self.failures += 1
        delay = self._rand() * ceiling
        if retry_after_s is not None:
            delay = max(delay, min(max(0.0, retry_after_s), cap))
        return delay

    def reset(self) -> None:
        self.failures = 0


# --- a fake for tests ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeCall:
    """One call the fake received, and what became of it: "ok", "duplicate", "unavailable"
    or "rejected"."""

    method: str
    lease_id: int | None
    body: dict[str, object]
    outcome: str


@dataclass
class FakeTransport:
    """protocols.Transport in memory, behaving like the marketplace where the agent can tell.

    - Idempotency as on the server: a repeated event_id, report_id or log seq (per lease) is
      answered like the first time with duplicate=true and is not applied again; `applied` lists
      what took effect, in order, as (kind, lease_id, key).
    - `set_down()` / `set_up()`: every call raises TransportUnavailable while down;
      `fail_next(n)`: the next n calls do.
    - `reject(kind, lease_id, key, …)`: that message is refused for good (Rejected);
      `reject_all(…)`: every call is (for example 403 machine_suspended).
    - `heartbeat_replies`: replies returned in turn before the default (no starts, no stops).
    - `doorbell`: each orders_wait call takes the next answer from it, blocking until there is
      one; without one queued (`doorbell_held` False, the default) it answers at once that the
      marketplace holds no calls, as a marketplace without AGENT_ORDERS_WAIT_S does.
    """

    heartbeat_interval_s: int = 10
    up: bool = True
    retry_after_s: float | None = None
    calls: list[FakeCall] = field(default_factory=list)
    applied: list[tuple[str, int, str]] = field(default_factory=list)
    heartbeat_replies: deque[JsonObject] = field(default_factory=deque)
    record_calls: bool = True
    _failures_left: int = 0
    _rejections: dict[tuple[str, int, str], Rejected] = field(default_factory=dict)
    _reject_all: Rejected | None = None
    _events: dict[tuple[int, str], dict[str, object]] = field(default_factory=dict)
    _usage: dict[tuple[int, str], tuple[int, dict[str, object]]] = field(default_factory=dict)
    logs: dict[tuple[int, int], dict[str, object]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    doorbell_held: bool = False
    doorbell: queue.Queue[JsonObject] = field(default_factory=queue.Queue)
    doorbell_calls: list[dict[str, object]] = field(default_factory=list)

    # -- scripting -----------------------------------------------------------------------------

    def set_down(self, *, retry_after_s: float | None = None) -> None:
        self.up = False
        self.retry_after_s = retry_after_s

    def set_up(self) -> None:
        self.up = True
        self._failures_left = 0

    def fail_next(self, n: int, *, retry_after_s: float | None = None) -> None:
        self._failures_left = n
        self.retry_after_s = retry_after_s

    def reject(
        self,
        kind: str,
        lease_id: int,
        key: str,
        *,
        status: int = 409,
        code: str = CODE_INVALID_TRANSITION,
        detail: str = "The lease's state does not allow this.",
    ) -> None:
        self._rejections[(kind, lease_id, key)] = Rejected(status, code, detail)

    def reject_all(self, status: int, code: str, detail: str = "") -> None:
        self._reject_all = Rejected(status, code, detail)

    def accept_all(self) -> None:
        self._reject_all = None

    def sent(self, kind: str) -> list[tuple[int, str]]:
        """(lease_id, key) of what took effect, of one kind ("event", "usage" or "log"), in order."""
        return [(lease, key) for k, lease, key in self.applied if k == kind]

    # -- protocols.Transport -------------------------------------------------------------------

    def register(self, body: Mapping[str, object]) -> JsonObject:
        self._gate("register", None, body, None)
        self._record("register", None, body, "ok")
        return {"machine_id": 1, "credential": "gpm_fake_credential", "heartbeat_interval_s": self.heartbeat_interval_s}

    def heartbeat(self, body: Mapping[str, object]) -> JsonObject:
        self._gate("heartbeat", None, body, None)
        self._record("heartbeat", None, body, "ok")
        if self.heartbeat_replies:
            return self.heartbeat_replies.popleft()
        return {
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "server_time": datetime.now(UTC).isoformat(),
            "start": [],
            "stop": [],
        }

    def orders_wait(self, body: Mapping[str, object]) -> JsonObject:
        # Neither recorded in `calls` nor taking a fail_next failure: the other calls' scripts stay as they were.
        self.doorbell_calls.append(dict(body))
        if not self.doorbell_held:
            return {"orders": False, "wait_s": 0.0}
        if not self.up:
            raise TransportUnavailable("The marketplace is unreachable (fake).")
        try:
            held = body.get("wait_s")
            return self.doorbell.get(timeout=float(held) if isinstance(held, int | float) else 0.0)
        except queue.Empty:
            return {"orders": False, "wait_s": 25.0}

    def lease_event(self, lease_id: int, body: Mapping[str, object]) -> JsonObject:
        key = str(body.get("event_id", ""))
        self._gate("lease_event", lease_id, body, ("event", lease_id, key))
        with self._lock:
            duplicate = (lease_id, key) in self._events
            if not duplicate:
                self._events[(lease_id, key)] = dict(body)
                self.applied.append(("event", lease_id, key))
            self._record("lease_event", lease_id, body, "duplicate" if duplicate else "ok")
            running = self._events[(lease_id, key)].get("type") == EVENT_STARTED
        return {
            "lease_id": lease_id,
            "lease_status": "running" if running else "ended",
            "job_status": "running" if running else "succeeded",
            "duplicate": duplicate,
        }

    def lease_usage(self, lease_id: int, body: Mapping[str, object]) -> JsonObject:
        key = str(body.get("report_id", ""))
        self._gate("lease_usage", lease_id, body, ("usage", lease_id, key))
        with self._lock:
            duplicate = (lease_id, key) in self._usage
            if not duplicate:
                self._usage[(lease_id, key)] = (len(self._usage) + 1, dict(body))
                self.applied.append(("usage", lease_id, key))
            self._record("lease_usage", lease_id, body, "duplicate" if duplicate else "ok")
            row_id = self._usage[(lease_id, key)][0]
        return {"id": row_id, "lease_id": lease_id, "report_id": key, "duplicate": duplicate}

    def lease_log(self, lease_id: int, body: Mapping[str, object]) -> JsonObject:
        seq = body.get("seq")
        key = str(seq)
        self._gate("lease_log", lease_id, body, ("log", lease_id, key))
        with self._lock:
            duplicate = isinstance(seq, int) and (lease_id, seq) in self.logs
            if isinstance(seq, int) and not duplicate:
                self.logs[(lease_id, seq)] = dict(body)
                self.applied.append(("log", lease_id, key))
            self._record("lease_log", lease_id, body, "duplicate" if duplicate else "ok")
        return {"lease_id": lease_id, "seq": seq, "duplicate": duplicate, "stored": not duplicate}

    def log_text(self, lease_id: int) -> str:
        """The output the lease's chunks carried, in seq order."""
        with self._lock:
            chunks = sorted((seq, body) for (lease, seq), body in self.logs.items() if lease == lease_id)
        return "".join(str(body.get("text", "")) for _, body in chunks)

    # -- plumbing ------------------------------------------------------------------------------

    def _record(self, method: str, lease_id: int | None, body: Mapping[str, object], outcome: str) -> None:
        if self.record_calls:
            self.calls.append(FakeCall(method, lease_id, dict(body), outcome))

    def _gate(
        self, method: str, lease_id: int | None, body: Mapping[str, object], message: tuple[str, int, str] | None
    ) -> None:
        with self._lock:
            if not self.up or self._failures_left > 0:
                self._failures_left = max(0, self._failures_left - 1)
                self._record(method, lease_id, body, "unavailable")
                raise TransportUnavailable("The marketplace is unreachable (fake).", retry_after_s=self.retry_after_s)
            rejection = self._reject_all or (self._rejections.get(message) if message else None)
            if rejection is not None:
                self._record(method, lease_id, body, "rejected")
                raise Rejected(rejection.status, rejection.code, rejection.detail)
