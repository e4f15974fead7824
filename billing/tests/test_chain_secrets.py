"""Issue 8, item 3: hosted node providers put their API key in the RPC URL (path, query, or
user:password). With the node down, no part of it may reach an API body, a stored error the
console shows, a task's result or any log record, whatever the logging level."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak

from billing import tasks
from billing.chain.anvil import free_port
from billing.chain.errors import scrub
from billing.models import BudgetAuthorization, BudgetReservation, RenterWallet
from billing.tests.support import new_job
from tests.factories import ProviderFactory, RenterFactory, token_for

pytestmark = pytest.mark.django_db

SECRETS = ("rpcuser", "rpcpass", "SECRETKEY", "SECRET2", "/v3")
WALLET = Account.from_key(keccak(text="chain secrets tests: renter wallet"))


def _urls() -> list[str]:
    return [
        # A name that does not resolve, as the issue reported it, and a port nothing listens on.
        "https://rpcuser:rpcpass@node.example:8545/v3/SECRETKEY?apikey=SECRET2",
        f"https://rpcuser:rpcpass@127.0.0.1:{free_port()}/v3/SECRETKEY?apikey=SECRET2#SECRET2",
    ]


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


@pytest.fixture(params=_urls(), ids=["unresolvable-host", "refused-port"])
def node_down(request: Any, settings: Any, tmp_path: Any) -> str:
    settings.CHAIN_RPC_URL = request.param
    settings.CHAIN_ID = None  # the API asks the node for the chain id
    settings.CHAIN_RPC_TIMEOUT_S = 2
    settings.CHAIN_OPERATOR_KEY = "0x" + "11" * 32
    settings.VAR_DIR = tmp_path
    return request.param


def test_no_part_of_the_node_urls_secret_reaches_an_api_body_a_stored_error_or_a_log(node_down, caplog):
    from rest_framework.test import APIClient

    caplog.set_level(logging.DEBUG)
    renter = RenterFactory()
    RenterWallet.objects.create(renter=renter, address=WALLET.address.lower())
    job = new_job(renter)
    BudgetAuthorization.objects.create(
        job=job,
        renter_address=WALLET.address.lower(),
        max_amount=2_000_000,
        deadline="2099-01-01T00:00:00Z",
        signature="0x" + "11" * 65,
    )
    as_renter, as_provider = APIClient(), APIClient()
    as_renter.credentials(HTTP_AUTHORIZATION=f"Token {token_for(renter.user)}")
    as_provider.credentials(HTTP_AUTHORIZATION=f"Token {token_for(ProviderFactory().user)}")
    url = f"/api/v1/jobs/{job.pk}/budget-authorization/"
    body = {
        "renter_address": WALLET.address,
        "max_amount": 2_000_000,
        "deadline": 4_000_000_000,
        "signature": "0x" + "22" * 65,
    }

    offer = as_renter.get(url)
    stored = as_renter.put(url, body, format="json")
    earnings = as_provider.get("/api/v1/billing/earnings/")
    results = [tasks.reserve_budgets(), tasks.settle(), tasks.watch_chain(), tasks.release_jobs_on_chain()]

    assert offer.status_code == stored.status_code == 503
    assert offer.json()["code"] == "chain_unavailable" and "unreachable" in offer.json()["detail"]
    assert earnings.status_code == 200 and earnings.json()["on_chain"]["reachable"] is False
    assert earnings.json()["on_chain"]["detail"]
    assert all("error" in result for result in results), results
    texts = {
        "GET budget-authorization": offer.content.decode(),
        "PUT budget-authorization": stored.content.decode(),
        "GET earnings": earnings.content.decode(),
        "task results": repr(results),
        "stored errors": repr(list(BudgetReservation.objects.values_list("last_error", flat=True))),
    }
    formatter = logging.Formatter("%(name)s %(message)s")
    for record in caplog.records:
        texts[f"log {record.name}"] = texts.get(f"log {record.name}", "") + formatter.format(record)
    assert any(name.startswith("log web3") for name in texts), "web3 logged nothing: the check would be empty"
    assert {where: _leaks(text) for where, text in texts.items() if _leaks(text)} == {}
    # What is left still says which node failed.
    host = node_down.split("@")[1].split(":")[0]
    assert host in offer.json()["detail"]


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        (
            "Max retries exceeded with url: /v3/KEY?apikey=SECRET (Caused by x)",
            "Max retries exceeded with url: /[redacted] (Caused by x)",
        ),
        (
            "Could not connect to: https://u:p@node.example:8545/v3/KEY",
            "Could not connect to: https://node.example:8545/[redacted]",
        ),
        ('"POST /v3/KEY?x=1 HTTP/1.1" 200 33', '"POST /[redacted] HTTP/1.1" 200 33'),
        ("the node at http://127.0.0.1:8545/ is down", "the node at http://127.0.0.1:8545 is down"),
        (
            "URI: https://node.example/v3/KEY, Method: eth_chainId",
            "URI: https://node.example/[redacted], Method: eth_chainId",
        ),
        ("no URL in here: chain 31337", "no URL in here: chain 31337"),
    ],
)
def test_scrub_keeps_the_node_and_drops_what_may_hold_a_key(text: str, scrubbed: str) -> None:
    assert scrub(text) == scrubbed
