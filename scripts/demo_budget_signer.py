"""The demo renter's wallet, as a small client: signs the escrow budget of each of its jobs.

A job's charges are settled on chain only once the renter has signed its budget (EIP-712, see
docs/billing.md "Settlement"). A real renter signs in its wallet; in the demo this helper does it
with the demo renter's local development key. Every --interval seconds it lists the renter's jobs
(GET /api/v1/jobs/?status=…), and for each job whose budget is not signed yet (or whose signature
the escrow refused) it fetches the typed data (GET /api/v1/jobs/{id}/budget-authorization/), signs
exactly that, and stores the signature (PUT the same URL).

It talks to the marketplace only over HTTP with the renter's API token and imports nothing from
the Django apps. scripts/run_demo.py starts and supervises it:

    python scripts/demo_budget_signer.py --url http://127.0.0.1:8000 \\
        --credentials-file var/demo/credentials.json --key-file var/demo/renter.key
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

# Jobs in these states may be charged (or already were), so their budgets need a signature.
STATUSES = "pending,scheduled,running,succeeded,failed,cancelled"
PAGE = 100
HTTP_TIMEOUT_S = 10.0


class ApiError(Exception):
    """The marketplace answered with an error body ({"code", "detail"}) or not at all."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"HTTP {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class Marketplace:
    """The few renter endpoints the signer needs, with the renter's API token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - the marketplace URL we were given
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            try:
                payload = json.loads(error.read() or b"{}")
            except ValueError:
                payload = {}
            raise ApiError(error.code, str(payload.get("code", "error")), str(payload.get("detail", ""))) from None
        except (urllib.error.URLError, OSError) as error:
            raise ApiError(0, "unreachable", str(error)) from None

    def job_ids(self) -> list[int]:
        """Every job of the renter (newest first, as the API lists them)."""
        ids: list[int] = []
        offset = 0
        while True:
            page = self.request("GET", f"/api/v1/jobs/?status={STATUSES}&limit={PAGE}&offset={offset}")
            results = page.get("results", []) if isinstance(page, dict) else []
            ids.extend(int(job["id"]) for job in results)
            if not (isinstance(page, dict) and page.get("next")) or not results:
                return ids
            offset += len(results)


def budget_signature(account: LocalAccount, typed_data: dict[str, Any]) -> str:
    """The EIP-712 signature (0x + 65 bytes hex) of exactly `typed_data` by `account`."""
    signed = account.sign_message(encode_typed_data(full_message=typed_data))
    return "0x" + bytes(signed.signature).hex()


def job_authorize(api: Marketplace, account: LocalAccount, job_id: int) -> str:
    """Make sure job `job_id` has a budget signed by `account`. Returns "signed", "present" (a
    usable signature is stored already) or "other_wallet" (the offer is for another address)."""
    path = f"/api/v1/jobs/{job_id}/budget-authorization/?address={account.address.lower()}"
    offer = api.request("GET", path)
    stored = offer.get("authorization")
    if stored and not stored.get("rejected_reason"):
        return "present"
    typed = offer["typed_data"]
    message = typed["message"]
    if str(message["renter"]).lower() != account.address.lower():
        return "other_wallet"
    api.request(
        "PUT",
        f"/api/v1/jobs/{job_id}/budget-authorization/",
        {
            "renter_address": account.address.lower(),
            "max_amount": int(message["maxAmount"]),
            "deadline": int(message["deadline"]),
            "signature": budget_signature(account, typed),
        },
    )
    return "signed"


def sign_pending(api: Marketplace, account: LocalAccount, done: set[int]) -> int:
    """One pass: authorize every job not in `done` (updated in place). Returns how many it signed."""
    signed = 0
    for job_id in api.job_ids():
        if job_id in done:
            continue
        try:
            outcome = job_authorize(api, account, job_id)
        except ApiError as error:
            if error.code == "unreachable" or error.status >= 500:
                raise
            # A job this wallet cannot sign for (e.g. 409 wallet_not_linked): say so once per pass.
            print(f"[signer] job {job_id}: {error}", flush=True)
            continue
        if outcome == "signed":
            signed += 1
            print(f"[signer] signed the budget of job {job_id}", flush=True)
        done.add(job_id)
    return signed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo_budget_signer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the marketplace, e.g. http://127.0.0.1:8000")
    parser.add_argument("--credentials-file", type=Path, required=True, help="demo_seed's credentials.json")
    parser.add_argument("--key-file", type=Path, required=True, help="the renter's hex key (0600)")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between passes (default 3)")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    if not 0.1 <= args.interval <= 3600:
        parser.error("--interval must be 0.1-3600 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        token = json.loads(args.credentials_file.read_text())["renter"]["token"]
        account = Account.from_key(args.key_file.read_text().strip())
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"[signer] cannot read the renter's credentials or key: {error}", file=sys.stderr)
        return 2
    api = Marketplace(args.url, token)
    done: set[int] = set()
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"[signer] signing job budgets as {account.address} every {args.interval:g} s", flush=True)
    while not stopping:
        try:
            sign_pending(api, account, done)
        except ApiError as error:
            # The web server restarting or busy: try again next pass.
            print(f"[signer] the marketplace did not answer: {error}", flush=True)
        if args.once:
            break
        deadline = time.monotonic() + args.interval
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, args.interval))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
