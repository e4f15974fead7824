"""The HTTP client of the renter API (/api/v1/). One `Client` per marketplace and token.

- Every error answer is raised as a typed ApiError (gpgpu_client.errors).
- 429 and 503 are retried after the server's Retry-After (seconds or an HTTP date), capped, at
  most `max_retries` times; a connection that fails is retried with exponential backoff. Only
  requests that are safe to repeat are retried: reads, a job submission (it carries an
  Idempotency-Key, so a repeat returns the job created the first time) and a cancel (harmless
  twice).
- Lists are iterators that page through limit/offset as they are consumed.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from gpgpu_client import __version__
from gpgpu_client.errors import ApiError, ClientError, error_for
from gpgpu_client.models import JSON, Balance, Job, JobLogs, Lease, Me, Offer, Statement

RETRY_STATUSES = frozenset({429, 503})
# The longest wait one Retry-After may impose before the client gives up waiting for it.
MAX_RETRY_AFTER_S = 60.0
PAGE_SIZE = 100
CHECKPOINT_SHA256_HEADER = "X-Checkpoint-SHA256"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None when absent
    or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class Client:
    """The renter API at `url` (the marketplace's root, e.g. https://market.example), signed in
    with `token` (`Authorization: Token …`)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        session: requests.Session | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ClientError(f"the API URL must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.session = session or requests.Session()
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.sleep = sleep

    # --- transport --------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> Any:
        """Send one request (retrying as the module says when `retry`) and return the parsed JSON
        answer; raise ApiError for an error answer, ClientError when the server cannot be reached."""
        return self._json(self._send(method, path, params=params, body=body, headers=headers, retry=retry))

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
        stream: bool = False,
        follow_redirects: bool = True,
    ) -> requests.Response:
        """request's transport: the answer under 400 as it came (with `stream`, its body not read
        yet)."""
        all_headers = {"Accept": "application/json", "User-Agent": f"gpgpu-client/{__version__}"}
        if self.token:
            all_headers["Authorization"] = f"Token {self.token}"
        all_headers.update(headers or {})
        target = urljoin(self.url, path.lstrip("/"))
        attempt = 0
        while True:
            try:
                response = self.session.request(
                    method,
                    target,
                    params=params,
                    json=body,
                    headers=all_headers,
                    timeout=self.timeout_s,
                    stream=stream,
                    allow_redirects=follow_redirects,
                )
            except requests.RequestException as exc:
                if not retry or attempt >= self.max_retries:
                    raise ClientError(f"cannot reach {self.url}: {exc}") from exc
                self.sleep(self._backoff(attempt))
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry and response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                wait = retry_after if retry_after is not None else self._backoff(attempt)
                if wait <= MAX_RETRY_AFTER_S:
                    self.sleep(wait)
                    attempt += 1
                    continue
            raise self._error(response, retry_after)

    def _backoff(self, attempt: int) -> float:
        return float(self.backoff_s * 2**attempt * (1 + random.random() / 2))

    @staticmethod
    def _json(response: requests.Response) -> Any:
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ClientError(f"the server answered {response.status_code} with something that is not JSON") from exc

    @staticmethod
    def _error(response: requests.Response, retry_after: float | None) -> ApiError:
        try:
            body: object = response.json()
        except ValueError:
            body = None
        fallback = f"HTTP {response.status_code} {response.reason or ''}".strip()
        return error_for(response.status_code, body, retry_after_s=retry_after, fallback_detail=fallback)

    def paginate(self, path: str, params: Mapping[str, str | int] | None = None) -> Iterator[JSON]:
        """Every row of a limit/offset list, fetched a page at a time as the iterator is consumed."""
        offset = 0
        while True:
            page = self.request("GET", path, params={**(params or {}), "limit": PAGE_SIZE, "offset": offset})
            results = page.get("results", []) if isinstance(page, Mapping) else []
            yield from results
            offset += len(results)
            if not results or not page.get("next"):
                return

    # --- the renter API ---------------------------------------------------------------------

    def me(self) -> Me:
        return Me.from_json(self.request("GET", "api/v1/me"))

    def gpus(self, **filters: str | int) -> Iterator[Offer]:
        """The GPUs on the market (GET /api/v1/gpus/); `filters` are its query parameters: model,
        min_vram_mb, max_price, region, available_now ("true"/"false"), duration_s."""
        for row in self.paginate("api/v1/gpus/", filters):
            yield Offer.from_json(row)

    def job_submit(self, spec: Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Submit a job (the body of POST /api/v1/jobs/). A fresh Idempotency-Key is made unless
        one is given; retries reuse it, so a retried submission cannot create a second job."""
        key = idempotency_key or f"gpgpu-client-{uuid.uuid4()}"
        data = self.request("POST", "api/v1/jobs/", body=spec, headers={"Idempotency-Key": key})
        return Job.from_json(data)

    def jobs(self, *, status: str | None = None) -> Iterator[Job]:
        params: dict[str, str | int] = {"status": status} if status else {}
        for row in self.paginate("api/v1/jobs/", params):
            yield Job.from_json(row)

    def job(self, job_id: int) -> Job:
        return Job.from_json(self.request("GET", f"api/v1/jobs/{int(job_id)}/"))

    def job_cancel(self, job_id: int, *, keep_checkpoint: bool = False) -> Job:
        """Cancel a job. keep_checkpoint: its agent saves its checkpoint_dir as it stops it, and the
        checkpoint is kept for a while after (job_checkpoint_download); only for a job with a
        checkpoint_dir."""
        body = {"keep_checkpoint": True} if keep_checkpoint else None
        return Job.from_json(self.request("POST", f"api/v1/jobs/{int(job_id)}/cancel/", body=body))

    def job_checkpoint_download(self, job_id: int, dest: str | os.PathLike[str]) -> tuple[int, str]:
        """Save the job's checkpoint archive (a tar, GET /api/v1/jobs/ID/checkpoint/) as `dest`.
        The bytes go to a temporary file beside it, their SHA-256 is checked against the one the
        marketplace stored (X-Checkpoint-SHA256), and only then is it renamed to `dest`: `dest` is
        the whole archive or is left as it was. A pre-signed URL the marketplace redirects to is
        fetched without the token. Returns (bytes, sha256); raises ApiError (NotFound when the
        job has no checkpoint) or ClientError (a damaged or cut download)."""
        response = self._send("GET", f"api/v1/jobs/{int(job_id)}/checkpoint/", stream=True, follow_redirects=False)
        expected = response.headers.get(CHECKPOINT_SHA256_HEADER, "").strip().lower()
        if response.is_redirect:
            location = response.headers.get("Location", "")
            response.close()
            try:
                response = self.session.get(location, stream=True, timeout=self.timeout_s)
            except requests.RequestException as exc:
                raise ClientError(f"cannot fetch the checkpoint from its store: {exc}") from exc
            if response.status_code >= 400:
                response.close()
                raise ClientError(f"the checkpoint's store answered HTTP {response.status_code}")
        if len(expected) != 64:
            response.close()
            raise ClientError("the marketplace did not say the checkpoint's SHA-256")
        target = Path(dest)
        digest = hashlib.sha256()
        size = 0
        handle, part = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with response, os.fdopen(handle, "wb") as out:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != expected:
                raise ClientError(
                    f"the checkpoint's bytes do not match its SHA-256 {expected} (got {digest.hexdigest()}): "
                    "damaged on the way; nothing was saved"
                )
            os.replace(part, target)
        except requests.RequestException as exc:
            Path(part).unlink(missing_ok=True)
            raise ClientError(f"the checkpoint's download was cut: {exc}") from exc
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
        return size, expected

    def job_logs(self, job_id: int, *, cursor: int = 0, limit: int | None = None) -> JobLogs:
        """The job's output after `cursor` (0: from the start); pass the answer's next_cursor
        to read on."""
        params: dict[str, str | int] = {"cursor": int(cursor)}
        if limit is not None:
            params["limit"] = int(limit)
        return JobLogs.from_json(self.request("GET", f"api/v1/jobs/{int(job_id)}/logs/", params=params))

    def job_leases(self, job_id: int) -> Iterator[Lease]:
        for row in self.paginate(f"api/v1/jobs/{int(job_id)}/leases/"):
            yield Lease.from_json(row)

    def balance(self) -> Balance:
        return Balance.from_json(self.request("GET", "api/v1/billing/balance/"))

    def statement(self, month: str) -> Statement:
        """The monthly statement for `month` (YYYY-MM)."""
        return Statement.from_json(self.request("GET", "api/v1/billing/statements/monthly/", params={"month": month}))

    # --- the renter's wallet and budgets ----------------------------------------------------

    def wallets(self) -> Iterator[JSON]:
        """My linked wallets (GET /api/v1/billing/wallets/): {address, created_at}."""
        yield from self.paginate("api/v1/billing/wallets/")

    def wallet_link(self, *, address: str, signature: str) -> JSON:
        """Link `address`, with its personal_sign of the text gpgpu_client.wallet.wallet_link_message
        names (harmless when it is linked to me already)."""
        data: JSON = self.request(
            "POST", "api/v1/billing/wallets/", body={"address": address, "signature": signature}, retry=False
        )
        return data

    def budget_offer(self, job_id: int, *, address: str | None = None) -> JSON:
        """What to sign for a job's budget (GET /api/v1/jobs/ID/budget-authorization/):
        {typed_data, authorization}; `address` the wallet that will sign (default: my latest linked)."""
        params: dict[str, str | int] = {"address": address} if address else {}
        data: JSON = self.request("GET", f"api/v1/jobs/{int(job_id)}/budget-authorization/", params=params)
        return data

    def budget_authorize(
        self, job_id: int, *, renter_address: str, max_amount: int, deadline: int, signature: str
    ) -> JSON:
        """Store a signed budget (PUT /api/v1/jobs/ID/budget-authorization/); the same body again
        is harmless, so it is retried like a read."""
        body = {
            "renter_address": renter_address,
            "max_amount": max_amount,
            "deadline": deadline,
            "signature": signature,
        }
        data: JSON = self.request("PUT", f"api/v1/jobs/{int(job_id)}/budget-authorization/", body=body)
        return data

    # --- the provider API -------------------------------------------------------------------

    def earnings(self) -> JSON:
        """A provider's earnings and how to withdraw them (GET /api/v1/billing/earnings/)."""
        data: JSON = self.request("GET", "api/v1/billing/earnings/")
        return data

    def machines(self) -> Iterator[JSON]:
        """A provider's machines (GET /api/v1/machines/)."""
        yield from self.paginate("api/v1/machines/")

    def machine(self, machine_id: int) -> JSON:
        """One machine with its GPUs (GET /api/v1/machines/ID/)."""
        data: JSON = self.request("GET", f"api/v1/machines/{int(machine_id)}/")
        return data

    def gpu_price_floor_set(self, machine_id: int, gpu_id: int, price_floor: str | None) -> JSON:
        """Set a GPU's price floor per GPU-hour (None: the provider's default)."""
        data: JSON = self.request(
            "PATCH", f"api/v1/machines/{int(machine_id)}/gpus/{int(gpu_id)}/", body={"price_floor": price_floor}
        )
        return data

    def windows(self) -> Iterator[JSON]:
        """A provider's availability windows (GET /api/v1/availability-windows/)."""
        yield from self.paginate("api/v1/availability-windows/")

    def window_create(self, window: Mapping[str, Any]) -> JSON:
        """Declare a window: {machine?, days, start_time, end_time, timezone}. Not retried: a
        repeat would declare it twice."""
        data: JSON = self.request("POST", "api/v1/availability-windows/", body=window, retry=False)
        return data

    def window_delete(self, window_id: int) -> None:
        self.request("DELETE", f"api/v1/availability-windows/{int(window_id)}/")
