"""The renter's key on this machine: a key file only its owner may read, an encrypted keystore,
and signatures of exactly what the marketplace offers (recovered here with eth-account)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_utils import keccak

from billing.contract import BUDGET_DOMAIN_NAME, BUDGET_DOMAIN_VERSION, BUDGET_TYPES
from gpgpu_client.cli import budget_question, main
from gpgpu_client.wallet import (
    WalletError,
    budget_signature,
    key_file_load,
    keystore_load,
    wallet_link_message,
    wallet_link_signature,
)

KEY = "0x" + keccak(text="client wallet tests").hex()
ADDRESS = Account.from_key(KEY).address


def typed_for(renter: str) -> dict:
    """A budget as the marketplace offers it: the escrow's own EIP-712 types and domain."""
    return {
        "types": BUDGET_TYPES,
        "primaryType": "Budget",
        "domain": {
            "name": BUDGET_DOMAIN_NAME,
            "version": BUDGET_DOMAIN_VERSION,
            "chainId": 31337,
            "verifyingContract": "0x" + "e5" * 20,
        },
        "message": {"jobId": 7, "renter": renter, "maxAmount": 2_500_000, "deadline": 1_900_000_000},
    }


def key_file(tmp_path: Path, mode: int, text: str = KEY) -> Path:
    path = tmp_path / "renter.key"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_key_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(WalletError, match=rf"may be read by others \(mode {mode:04o}\); run `chmod 600"):
        key_file_load(key_file(tmp_path, mode))


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_key_file_only_its_owner_may_read_gives_its_address(tmp_path: Path, mode: int) -> None:
    assert key_file_load(key_file(tmp_path, mode)).address == ADDRESS


def test_a_key_file_without_a_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(WalletError, match="does not hold a private key") as raised:
        key_file_load(key_file(tmp_path, 0o600, text="0xnot-a-key-secret"))
    assert "secret" not in str(raised.value)


def test_a_keystore_opens_with_its_password_and_not_another(tmp_path: Path) -> None:
    path = tmp_path / "keystore.json"
    path.write_text(json.dumps(Account.encrypt(KEY, "right", kdf="pbkdf2", iterations=2)))

    assert keystore_load(path, "right").address == ADDRESS
    with pytest.raises(WalletError, match="wrong password"):
        keystore_load(path, "wrong")


def test_the_budget_signature_recovers_to_the_key_over_the_offered_typed_data() -> None:
    account = Account.from_key(KEY)
    typed = typed_for(ADDRESS)

    signature = budget_signature(account, typed)

    assert Account.recover_message(encode_typed_data(full_message=typed), signature=signature) == ADDRESS


def test_a_budget_offered_for_another_wallet_is_not_signed() -> None:
    with pytest.raises(WalletError, match="not this key's"):
        budget_signature(Account.from_key(KEY), typed_for("0x" + "11" * 20))


def test_the_wallet_link_signature_is_personal_sign_of_the_marketplaces_text() -> None:
    signature = wallet_link_signature(Account.from_key(KEY), renter_id=42)

    message = encode_defunct(text=f"Link wallet {ADDRESS.lower()} to GPGPU renter 42")
    assert wallet_link_message(renter_id=42, address=ADDRESS) == f"Link wallet {ADDRESS.lower()} to GPGPU renter 42"
    assert Account.recover_message(message, signature=signature) == ADDRESS


def test_the_question_before_signing_shows_the_amount_in_tokens_and_the_escrow() -> None:
    question = budget_question(7, typed_for(ADDRESS))

    assert "at most 2.5 tokens (2500000 micro)" in question
    assert f"from wallet {ADDRESS}" in question and "on chain 31337" in question


def test_authorize_with_an_unsafe_key_file_is_one_line_and_exit_2_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An address nothing listens on: a request would be exit 1, not 2.
    monkeypatch.setenv("GPGPU_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("GPGPU_TOKEN", "gpg_x")
    path = key_file(tmp_path, 0o644)

    code = main(["authorize", "3", "--key-file", str(path), "--yes"])

    err = capsys.readouterr().err
    assert code == 2
    assert err == f"gpgpu: the key file {str(path)!r} may be read by others (mode 0644); run `chmod 600 {path}` first\n"
