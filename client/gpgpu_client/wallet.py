"""The renter's wallet key on this machine, and what it signs for the marketplace.

A key comes from a file holding a 0x hex private key (refused unless only its owner may read it:
mode 0600 or stricter) or from an encrypted JSON keystore (the Ethereum "V3" format). It signs
what the marketplace hands over to be signed, never a value computed here: a job's budget (the
EIP-712 typed data of GET /api/v1/jobs/ID/budget-authorization/) and the text that links the
wallet to the renter (personal_sign, EIP-191). A hardware wallet is not supported yet.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.signers.local import LocalAccount

from gpgpu_client.errors import ClientError

PASSWORD_ENV = "GPGPU_KEYSTORE_PASSWORD"  # noqa: S105 - the variable's name, not a password


class WalletError(ClientError):
    """A key that cannot be used (unsafe file mode, unreadable, wrong password), or something to
    sign that does not fit the key."""


def key_file_check(path: Path) -> None:
    """Refuse a key file that anyone but its owner may read or write (group or other bits set)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise WalletError(f"cannot read the key file {str(path)!r}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise WalletError(
            f"the key file {str(path)!r} may be read by others (mode {mode:04o}); run `chmod 600 {path}` first"
        )


def key_file_load(path: Path) -> LocalAccount:
    """The account of the 0x hex private key in `path` (mode 0600 or stricter)."""
    key_file_check(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise WalletError(f"cannot read the key file {str(path)!r}: {exc}") from None
    try:
        account: LocalAccount = Account.from_key(text)
    except (ValueError, TypeError):
        # The key itself stays out of the message.
        raise WalletError(f"the key file {str(path)!r} does not hold a private key (0x and 64 hex digits)") from None
    return account


def keystore_load(path: Path, password: str) -> LocalAccount:
    """The account of the encrypted JSON keystore in `path`, opened with `password`."""
    try:
        keystore = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WalletError(f"cannot read the keystore {str(path)!r}: {exc}") from None
    try:
        key = Account.decrypt(keystore, password)
    except ValueError:
        raise WalletError(f"cannot open the keystore {str(path)!r}: wrong password, or not a keystore") from None
    except (KeyError, TypeError):
        raise WalletError(f"the file {str(path)!r} is not an encrypted JSON keystore") from None
    account: LocalAccount = Account.from_key(key)
    return account


def keystore_password(environ: Mapping[str, str] | None = None) -> str | None:
    """The keystore's password from GPGPU_KEYSTORE_PASSWORD, or None (then ask for it)."""
    env = os.environ if environ is None else environ
    return env.get(PASSWORD_ENV)


def budget_signature(account: LocalAccount, typed_data: Mapping[str, Any]) -> str:
    """The EIP-712 signature (0x + 65 bytes hex) of exactly `typed_data`, as the marketplace gave
    it. Refused when it is not a Budget for this key's address."""
    message = typed_data.get("message")
    if typed_data.get("primaryType") != "Budget" or not isinstance(message, Mapping):
        raise WalletError("the marketplace did not offer a Budget to sign")
    if str(message.get("renter", "")).lower() != account.address.lower():
        raise WalletError(
            f"the budget is for wallet {message.get('renter')}, not this key's {account.address}; "
            "name the key's wallet (it must be linked: gpgpu wallet link)"
        )
    signed = account.sign_message(encode_typed_data(full_message=dict(typed_data)))
    return "0x" + bytes(signed.signature).hex()


def wallet_link_message(*, renter_id: int, address: str) -> str:
    """The exact text the marketplace wants signed to link `address` to renter `renter_id`
    (POST /api/v1/billing/wallets/)."""
    return f"Link wallet {address.lower()} to GPGPU renter {renter_id}"


def wallet_link_signature(account: LocalAccount, *, renter_id: int) -> str:
    """personal_sign (EIP-191) of wallet_link_message by `account`, 0x hex."""
    message = wallet_link_message(renter_id=renter_id, address=account.address)
    signed = account.sign_message(encode_defunct(text=message))
    return "0x" + bytes(signed.signature).hex()
