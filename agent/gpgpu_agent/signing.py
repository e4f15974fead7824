"""The machine's usage-report signing key: creating it, keeping it private, signing with it.

The key is a secp256k1 private key (an Ethereum account); its address is sent at `register`
and the marketplace accepts this machine's usage reports only when signed by it. The key file
is JSON `{"version": 1, "address": "0x…", "private_key": "0x…"}`, created with mode 0600 in a
directory of mode 0700, and a file that group or others may read is refused: anyone who reads
it can sign usage in this machine's name.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

from gpgpu_agent.protocol import DEFAULT_CHAIN_ID, UsageStruct, recover_usage_signer
from gpgpu_agent.protocols import AgentError

__all__ = [
    "KeyFileError",
    "SigningKey",
    "create_key_file",
    "load_key_file",
    "recover_usage_signer",
    "sign_usage",
]

KEY_FILE_VERSION = 1


class KeyFileError(AgentError):
    """The key file is missing, unreadable, malformed or not private; the message says which."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A loaded signing key. repr() never shows the private key."""

    address: str
    account: LocalAccount = field(repr=False)

    @classmethod
    def generate(cls) -> SigningKey:
        account = Account.create()
        return cls(address=account.address, account=account)


def create_key_file(path: str | os.PathLike[str]) -> SigningKey:
    """Create a new key and store it at `path` with mode 0600 (parent directories are created
    with mode 0700). Refuses to replace an existing file: the marketplace knows that key's
    address, and losing it would orphan this machine's signatures. The file appears whole or
    not at all (written beside it, then linked into place)."""
    target = Path(path)
    if target.exists():
        raise KeyFileError(f"Key file {target} already exists; refusing to replace it (delete it first to start over).")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = SigningKey.generate()
    body = json.dumps(
        {"version": KEY_FILE_VERSION, "address": key.address, "private_key": "0x" + key.account.key.hex()}
    ).encode()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, target)  # fails if the file appeared meanwhile: never overwrite a key
    except FileExistsError:
        raise KeyFileError(f"Key file {target} already exists; refusing to replace it.") from None
    finally:
        tmp.unlink(missing_ok=True)
    return key


def load_key_file(path: str | os.PathLike[str]) -> SigningKey:
    """Load the key at `path`. Refuses (KeyFileError, with the fix in the message) a missing
    file, one that group or others may read or write, and one whose content is not a key
    matching its recorded address."""
    target = Path(path)
    try:
        info = target.stat()
    except FileNotFoundError:
        raise KeyFileError(f"Key file {target} does not exist; run `gpgpu-agent register` to create it.") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"Key file {target} is not a regular file.")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"Key file {target} is accessible by group or others (mode {mode:04o}); anyone who can read it can "
            f"sign usage in this machine's name. Run `chmod 600 {target}` and check who has read it."
        )
    try:
        data = json.loads(target.read_text())
        account = Account.from_key(data["private_key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"Key file {target} is not a valid key file ({type(exc).__name__}).") from None
    recorded = data.get("address")
    if not isinstance(recorded, str) or recorded.lower() != account.address.lower():
        raise KeyFileError(f"Key file {target} is damaged: its address does not match its key.")
    return SigningKey(address=account.address, account=account)


def sign_usage(report: UsageStruct, key: SigningKey, *, chain_id: int = DEFAULT_CHAIN_ID) -> str:
    """The EIP-712 signature of `report` by `key`: "0x" and 130 hex digits (r, s, v)."""
    signed = key.account.sign_message(encode_typed_data(full_message=report.typed_data(chain_id=chain_id)))
    return "0x" + bytes(signed.signature).hex()
