"""Deploying the escrow once, recording where it lives, and development funding."""

from __future__ import annotations

import io
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from eth_account import Account

from billing.chain.anvil import anvil_running
from billing.chain.client import ANVIL_DEV_KEY_0, chain_client_eth_tester, chain_client_from_settings, key_file_read
from billing.chain.deployment import (
    Deployment,
    DeploymentMissing,
    deployment_ensure,
    deployment_load,
    deployment_path,
    deployment_require,
    deployment_save,
)
from billing.chain.errors import ChainConfigurationError
from billing.contract import ESCROW
from billing.tests.support import require_anvil

TREASURY = Account.from_key(b"\x07" * 32).address


@pytest.fixture(autouse=True)
def _no_env_override(settings: Any, tmp_path: Path) -> None:
    settings.ESCROW_ADDRESS = ""
    settings.TOKEN_ADDRESS = ""
    settings.VAR_DIR = tmp_path


def test_deploy_records_the_escrow_and_does_nothing_the_second_time(tmp_path: Path) -> None:
    client = chain_client_eth_tester()
    record = tmp_path / "deployment.json"

    first, created = deployment_ensure(client=client, treasury=TREASURY, fee_bps=700, dev_token=True, path=record)
    nonce_after_deploy = client.web3.eth.get_transaction_count(client.address)
    again, created_again = deployment_ensure(client=client, treasury=TREASURY, fee_bps=700, dev_token=True, path=record)

    assert created and not created_again
    assert (again.escrow, again.token, again.deployment_block) == (first.escrow, first.token, first.deployment_block)
    assert client.web3.eth.get_transaction_count(client.address) == nonce_after_deploy
    escrow = client.contract(ESCROW, first.escrow)
    assert client.call(escrow.functions.token()) == first.token
    assert client.call(escrow.functions.treasury()) == TREASURY
    assert client.call(escrow.functions.feeBps()) == 700
    operator_role = client.call(escrow.functions.OPERATOR_ROLE())
    assert client.call(escrow.functions.hasRole(operator_role, client.address))
    assert json.loads(record.read_text())["escrow"] == first.escrow


def test_a_reset_chain_gets_a_fresh_deployment(tmp_path: Path) -> None:
    record = tmp_path / "deployment.json"
    old, _ = deployment_ensure(
        client=chain_client_eth_tester(), treasury=TREASURY, fee_bps=0, dev_token=True, path=record
    )
    # Same chain id, but none of the recorded contracts exist on the new chain.
    new_client = chain_client_eth_tester(operator_account=Account.create())
    with pytest.raises(DeploymentMissing):
        deployment_require(new_client, path=record)

    new, created = deployment_ensure(client=new_client, treasury=TREASURY, fee_bps=0, dev_token=True, path=record)

    assert created and new.escrow != old.escrow
    assert deployment_require(new_client, path=record).escrow == new.escrow


def _built_elsewhere(record: Path, **changes: Any) -> None:
    """Make the recorded deployment look deployed from another version of the contract."""
    data = json.loads(record.read_text())
    data.update(escrow_build="0" * 64, **changes)
    record.write_text(json.dumps(data))


def test_a_dev_escrow_deployed_from_another_contract_version_is_replaced(tmp_path: Path) -> None:
    client = chain_client_eth_tester()
    record = tmp_path / "deployment.json"
    old, _ = deployment_ensure(client=client, treasury=TREASURY, fee_bps=0, dev_token=True, path=record)
    _built_elsewhere(record)

    with pytest.raises(DeploymentMissing, match=r"another version of contracts/GpgpuEscrow\.sol.*chain_deploy"):
        deployment_require(client, path=record)
    new, created = deployment_ensure(client=client, treasury=TREASURY, fee_bps=0, dev_token=True, path=record)

    assert created and new.escrow != old.escrow
    assert deployment_require(client, path=record).escrow == new.escrow


def test_an_escrow_on_a_real_token_deployed_from_another_contract_version_is_refused_not_replaced(
    tmp_path: Path,
) -> None:
    client = chain_client_eth_tester()
    record = tmp_path / "deployment.json"
    deployment_ensure(client=client, treasury=TREASURY, fee_bps=0, dev_token=True, path=record)
    _built_elsewhere(record, dev_token=False)
    nonce = client.web3.eth.get_transaction_count(client.address)

    with pytest.raises(ChainConfigurationError, match="real token: settle and release everything on it"):
        deployment_ensure(client=client, treasury=TREASURY, fee_bps=0, token=TREASURY, path=record)

    assert client.web3.eth.get_transaction_count(client.address) == nonce


def test_deploy_without_a_token_or_dev_token_is_refused_and_sends_nothing(tmp_path: Path) -> None:
    client = chain_client_eth_tester()
    nonce = client.web3.eth.get_transaction_count(client.address)

    with pytest.raises(ChainConfigurationError, match="--dev-token"):
        deployment_ensure(client=client, treasury=TREASURY, fee_bps=0, path=tmp_path / "d.json")
    with pytest.raises(ChainConfigurationError, match="no contract code at token"):
        deployment_ensure(client=client, treasury=TREASURY, fee_bps=0, token=TREASURY, path=tmp_path / "d.json")

    assert client.web3.eth.get_transaction_count(client.address) == nonce
    assert not (tmp_path / "d.json").exists()


# ---------------------------------------------------------------------------- the deployment record


def test_deployment_file_round_trips_under_the_var_dir(tmp_path: Path) -> None:
    deployment = Deployment(
        chain_id=31337,
        escrow=Account.create().address,
        token=Account.create().address,
        deployment_block=12,
        dev_token=True,
        treasury=TREASURY,
        fee_bps=1000,
    )

    path = deployment_save(deployment)

    assert path == tmp_path / "chain" / "deployment-31337.json" == deployment_path(31337)
    loaded = deployment_load(31337)
    assert loaded is not None and loaded.as_json() == deployment.as_json()
    assert deployment_load(1) is None


def test_env_addresses_override_the_deployment_file(settings: Any) -> None:
    deployment_save(Deployment(chain_id=5, escrow=TREASURY, token=TREASURY, deployment_block=1))
    escrow, token = Account.create().address, Account.create().address
    settings.ESCROW_ADDRESS = escrow.lower()
    settings.TOKEN_ADDRESS = token
    settings.ESCROW_DEPLOYMENT_BLOCK = 4242

    loaded = deployment_load(5)

    assert loaded is not None
    assert (loaded.escrow, loaded.token, loaded.deployment_block, loaded.source) == (escrow, token, 4242, "env")


@pytest.mark.parametrize(
    ("escrow", "token", "named"),
    [("0x" + "ab" * 20, "", "TOKEN_ADDRESS"), ("not-an-address", "0x" + "ab" * 20, "ESCROW_ADDRESS")],
)
def test_incomplete_or_malformed_env_addresses_are_refused(settings: Any, escrow: str, token: str, named: str) -> None:
    settings.ESCROW_ADDRESS = escrow
    settings.TOKEN_ADDRESS = token

    with pytest.raises(ChainConfigurationError, match=named):
        deployment_load(31337)


def test_token_address_alone_is_not_a_deployment(settings: Any) -> None:
    settings.TOKEN_ADDRESS = TREASURY

    assert deployment_load(31337) is None


def test_malformed_deployment_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = deployment_path(31337)
    path.parent.mkdir(parents=True)
    path.write_text('{"chain_id": 31337, "escrow": "0x12"}')

    with pytest.raises(ChainConfigurationError, match=str(path)):
        deployment_load(31337)


# ---------------------------------------------------------------------------- the commands, on anvil


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    require_anvil()
    with anvil_running() as w3:
        yield w3.provider.endpoint_uri


def _run(command: str, *args: str) -> str:
    out = io.StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


def test_chain_deploy_command_is_idempotent(settings: Any, anvil_url: str) -> None:
    settings.DEBUG = True
    settings.CHAIN_RPC_URL = anvil_url
    settings.CHAIN_OPERATOR_KEY = ""
    settings.CHAIN_OPERATOR_KEY_FILE = ""

    first = json.loads(_run("chain_deploy", "--json"))
    second = json.loads(_run("chain_deploy", "--json"))
    text = _run("chain_deploy")

    assert first["created"] and not second["created"]
    assert (second["escrow"], second["token"]) == (first["escrow"], first["token"])
    assert first["dev_token"] and first["chain_id"] == 31337
    assert f"Already deployed on chain 31337:\n  escrow  {first['escrow']}" in text


def test_chain_deploy_outside_debug_needs_the_operator_key(settings: Any, anvil_url: str) -> None:
    settings.DEBUG = False
    settings.CHAIN_RPC_URL = anvil_url
    settings.CHAIN_OPERATOR_KEY = ""
    settings.CHAIN_OPERATOR_KEY_FILE = ""

    with pytest.raises(CommandError, match="CHAIN_OPERATOR_KEY"):
        _run("chain_deploy", "--dev-token")


def test_dev_fund_creates_a_renter_key_and_tops_up_its_escrow_balance(
    settings: Any, anvil_url: str, tmp_path: Path
) -> None:
    settings.DEBUG = True
    settings.CHAIN_RPC_URL = anvil_url
    settings.CHAIN_OPERATOR_KEY = ANVIL_DEV_KEY_0
    _run("chain_deploy")
    key_path = tmp_path / "demo" / "renter.key"

    _run("chain_dev_fund", "--renter-key-file", str(key_path), "--create-key", "--amount", "250.5")
    output = _run("chain_dev_fund", "--renter-key-file", str(key_path), "--amount", "250.5")

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    renter = key_file_read(key_path).address
    client = chain_client_from_settings()
    escrow = client.contract(ESCROW, deployment_require(client).escrow)
    assert client.call(escrow.functions.availableBalance(renter)) == 250_500_000
    assert f"Renter {renter} has 250500000 units available" in output


@pytest.mark.parametrize("amount", ["0", "-5", "1.0000001", "abc", "1e20"])
def test_dev_fund_refuses_bad_amounts(settings: Any, anvil_url: str, amount: str) -> None:
    settings.DEBUG = True
    settings.CHAIN_RPC_URL = anvil_url
    settings.CHAIN_OPERATOR_KEY = ANVIL_DEV_KEY_0
    _run("chain_deploy")

    with pytest.raises(CommandError, match="--amount"):
        _run("chain_dev_fund", "--to", TREASURY, "--amount", amount)


def test_dev_fund_is_refused_outside_debug(settings: Any) -> None:
    settings.DEBUG = False

    with pytest.raises(CommandError, match="DEBUG"):
        _run("chain_dev_fund", "--to", TREASURY)
