"""`gpgpu`'s money and provider commands against a live marketplace (pytest-django's
live_server): a provider declares an availability window and reads it back, reads its earnings
and sets a GPU's price floor; a renter links a key's wallet and signs a job's budget with it, and
the marketplace accepts the signature (it verifies it over its own typed data before storing it).

No agent and no chain: the escrow's domain comes from settings (CHAIN_ID, ESCROW_ADDRESS), the
reservation run a stored signature asks for is not dispatched (reserving on chain is billing's
tests' business), and the earnings' chain read meets a node that is not there. The CLI runs
in-process in this thread, so the live server's thread and this one never use the database at
once."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak
from web3 import Web3

from billing import authorizations
from billing import tasks as billing_tasks
from billing.chain import ChainClient
from billing.chain.anvil import free_port
from billing.models import BudgetAuthorization, RenterWallet
from gpgpu_agent.protocol import recover_signer
from gpgpu_client.cli import main
from jobs.models import Job
from providers.models import GPU, AvailabilityWindow
from tests.factories import ProviderFactory, RenterFactory, machine_with_gpus, token_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

KEY = "0x" + keccak(text="client live tests: renter wallet").hex()
WALLET = Account.from_key(KEY)
ESCROW = "0x" + "e5" * 20
FUNDS_MICRO = 50 * 10**6


def unreachable_chain() -> ChainClient:
    web3 = Web3(Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}", exception_retry_configuration=None))
    return ChainClient(web3, operator_account=WALLET)


@pytest.fixture
def market(live_server: Any, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    settings.CHAIN_ID = 31337
    settings.ESCROW_ADDRESS = ESCROW
    settings.TOKEN_ADDRESS = "0x" + "70" * 20
    # The reservation run the signature asks for is not sent: no chain node serves this test.
    monkeypatch.setattr(billing_tasks.reserve_budgets, "apply_async", lambda *args, **kwargs: None)
    monkeypatch.setattr(authorizations, "chain_reader", unreachable_chain)
    monkeypatch.setenv("GPGPU_CONFIG_DIR", str(tmp_path / "gpgpu-config"))
    monkeypatch.setenv("GPGPU_API_URL", live_server.url)
    monkeypatch.delenv("GPGPU_TOKEN", raising=False)
    monkeypatch.delenv("GPGPU_KEYSTORE_PASSWORD", raising=False)
    key_file = tmp_path / "renter.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    return {"url": live_server.url, "key_file": str(key_file)}


def as_user(monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    monkeypatch.setenv("GPGPU_TOKEN", token)


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_a_provider_adds_a_window_lists_it_and_reads_its_earnings(
    market: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a provider signed in with its API token
    provider = ProviderFactory()
    as_user(monkeypatch, token_for(provider.user))

    # When it declares weekday nights in Paris
    added = run_json(["provider", "windows", "add", "mon-fri 20:00-08:00 Europe/Paris"], capsys)

    # Then the marketplace holds that window, and lists it back
    window = AvailabilityWindow.objects.get(provider=provider)
    assert added["id"] == window.pk
    listed = run_json(["provider", "windows", "list"], capsys)
    assert [(w["id"], w["days"], w["start_time"], w["end_time"], w["timezone"], w["machine"]) for w in listed] == [
        (window.pk, ["mon", "tue", "wed", "thu", "fri"], "20:00", "08:00", "Europe/Paris", None)
    ]
    assert main(["provider", "windows", "list"]) == 0
    # Columns are padded to the widest value, and ids grow with the database's sequences.
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [str(window.pk), "all", "mon,tue,wed,thu,fri", "20:00-08:00", "Europe/Paris"] in rows

    # And its earnings answer from the ledger though the chain node is away
    earnings = run_json(["provider", "earnings"], capsys)
    assert earnings["earned"]["micro"] == 0 and earnings["on_chain"]["reachable"] is False
    assert run_json(["provider", "machines"], capsys) == []

    # And it sets a GPU's price floor, the GPU named alone, then goes back to its default
    machine = machine_with_gpus(provider=provider)
    gpu = GPU.objects.get(machine=machine)
    assert [m["id"] for m in run_json(["provider", "machines"], capsys)] == [machine.pk]
    floored = run_json(["provider", "floor", str(gpu.pk), "0.45"], capsys)
    assert floored["price_floor"] == floored["effective_price_floor"] == "0.450000"
    assert GPU.objects.get(pk=gpu.pk).price_floor == Decimal("0.45")
    assert main(["provider", "floor", str(gpu.pk), "default", "--machine", str(machine.pk)]) == 0
    assert "(your default)" in capsys.readouterr().out
    assert GPU.objects.get(pk=gpu.pk).price_floor is None

    # And removing the window removes it
    assert main(["provider", "windows", "rm", str(window.pk)]) == 0
    assert not AvailabilityWindow.objects.filter(provider=provider).exists()


def test_a_renter_links_its_key_and_the_marketplace_accepts_the_budget_it_signs(
    market: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a renter with a job waiting for its budget to be signed
    renter = RenterFactory(funds=FUNDS_MICRO)
    as_user(monkeypatch, token_for(renter.user))
    submit = ["run", "--kind", "process", "--command", "true", "--gpus", "1", "--max-price", "1", "--duration", "5m"]
    assert main(submit) == 0
    job_id = int(capsys.readouterr().out)

    # When it links its key's wallet, then signs the job's budget with the key
    wallets = run_json(["wallet", "--link", "--key-file", market["key_file"]], capsys)
    authorization = run_json(["authorize", str(job_id), "--key-file", market["key_file"], "--yes"], capsys)

    # Then the wallet is linked, and the marketplace stored the signature: it recovers to the key's
    # address over the typed data the marketplace offers for this job
    assert wallets["key_address"] == WALLET.address.lower()
    assert [w["address"] for w in wallets["wallets"]] == [WALLET.address.lower()]
    assert RenterWallet.objects.filter(renter=renter, address=WALLET.address.lower()).exists()
    assert authorization["status"] == "signed"
    assert authorization["renter_address"] == WALLET.address.lower()
    stored = BudgetAuthorization.objects.get(job_id=job_id)
    assert stored.signature == authorization["signature"]
    typed = authorizations.budget_typed_data_for(
        job=Job.objects.get(pk=job_id),
        renter_address=stored.renter_address,
        max_amount=stored.max_amount,
        deadline=int(stored.deadline.timestamp()),
        domain=authorizations.escrow_domain(),
    )
    assert recover_signer(encode_typed_data(full_message=typed), stored.signature) == WALLET.address
    assert stored.max_amount == authorizations.job_budget_to_authorize(job=Job.objects.get(pk=job_id))

    # And the same key from an encrypted keystore, its password from the environment, is the same wallet
    keystore = Path(market["key_file"]).with_name("keystore.json")
    keystore.write_text(json.dumps(Account.encrypt(KEY, "pass phrase", kdf="pbkdf2", iterations=2)))
    monkeypatch.setenv("GPGPU_KEYSTORE_PASSWORD", "pass phrase")
    assert run_json(["wallet", "--keystore", str(keystore)], capsys)["key_address"] == WALLET.address.lower()
    assert main(["wallet", "--keystore", str(keystore)]) == 0
    assert f"Key: {WALLET.address} (linked)" in capsys.readouterr().out

    # And signing again leaves the stored budget as it is
    assert main(["authorize", str(job_id), "--key-file", market["key_file"], "--yes"]) == 0
    assert "is signed by" in capsys.readouterr().out
    assert BudgetAuthorization.objects.get(job_id=job_id).signature == stored.signature


def test_run_authorize_asks_before_signing_and_a_no_leaves_the_budget_unsigned(
    market: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    renter = RenterFactory(funds=FUNDS_MICRO)
    RenterWallet.objects.create(renter=renter, address=WALLET.address.lower())
    as_user(monkeypatch, token_for(renter.user))
    submit = ["run", "--kind", "process", "--command", "true", "--gpus", "1", "--max-price", "1", "--duration", "5m"]
    answers = iter(["n", "y"])
    monkeypatch.setattr("builtins.input", lambda: next(answers))

    # A "no": the job is submitted, its budget not signed, and the CLI says how to sign it
    assert main([*submit, "--authorize", "--key-file", market["key_file"]]) == 1
    out, err = capsys.readouterr()
    refused_id = int(out)
    assert "Sign job" in err and "tokens" in err and f"gpgpu authorize {refused_id}" in err
    assert not BudgetAuthorization.objects.filter(job_id=refused_id).exists()

    # A "yes": signed right after submitting
    assert main([*submit, "--authorize", "--key-file", market["key_file"]]) == 0
    signed_id = int(capsys.readouterr().out)
    assert BudgetAuthorization.objects.get(job_id=signed_id).renter_address == WALLET.address.lower()
    assert Job.objects.filter(renter=renter).count() == 2
