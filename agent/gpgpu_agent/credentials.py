"""The machine credential `register` returns, stored 0600 beside the signing key.

The file is JSON `{"version": 1, "machine_id": 7, "credential": "gpm_…", "marketplace_url":
"https://…", "registered_at": "…"}`. Like the key, a file that group or others may read is
refused: the credential lets anyone heartbeat and report in this machine's name.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gpgpu_agent.protocols import AgentError

CREDENTIAL_FILE_VERSION = 1


class CredentialError(AgentError):
    """The credential file is missing, unreadable, malformed or not private."""


@dataclass(frozen=True, slots=True)
class MachineCredential:
    machine_id: int
    credential: str
    marketplace_url: str
    registered_at: str = ""

    def __repr__(self) -> str:  # never print the secret
        return f"MachineCredential(machine_id={self.machine_id}, marketplace_url={self.marketplace_url!r})"


def save_credential(path: Path, cred: MachineCredential) -> None:
    """Write the credential with mode 0600 (parents 0700), atomically, replacing an old one."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = json.dumps(
        {
            "version": CREDENTIAL_FILE_VERSION,
            "machine_id": cred.machine_id,
            "credential": cred.credential,
            "marketplace_url": cred.marketplace_url,
            "registered_at": cred.registered_at or datetime.now(UTC).isoformat(),
        }
    ).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def file_is_private(path: Path) -> bool:
    """True when neither group nor others have any access to `path`."""
    return not stat.S_IMODE(Path(path).stat().st_mode) & 0o077


def load_credential(path: Path) -> MachineCredential:
    """Read the credential; CredentialError (with the fix) when missing, public or malformed."""
    path = Path(path)
    try:
        if not file_is_private(path):
            raise CredentialError(f"Credential file {path} is accessible by group or others; run `chmod 600 {path}`.")
        data = json.loads(path.read_text())
        return MachineCredential(
            machine_id=int(data["machine_id"]),
            credential=str(data["credential"]),
            marketplace_url=str(data.get("marketplace_url", "")),
            registered_at=str(data.get("registered_at", "")),
        )
    except FileNotFoundError:
        raise CredentialError(
            f"Credential file {path} does not exist; run `gpgpu-agent register --url … --token …` first."
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CredentialError(
            f"Credential file {path} is not a valid credential file ({type(exc).__name__})."
        ) from None


# `gpgpu-agent rotate-credential` marks a rotation under way next to the credential file: between
# the marketplace answering with the new credential (from then on it refuses the old one) and the
# file holding it, a running daemon's heartbeat is refused, and must wait rather than exit.
ROTATION_MARK_SUFFIX = ".rotating"
# A mark older than this is left over from a rotation that died: it no longer holds the daemon.
ROTATION_MARK_MAX_AGE_S = 120.0


def rotation_mark_path(credential_path: Path) -> Path:
    return credential_path.with_name(credential_path.name + ROTATION_MARK_SUFFIX)


def rotation_pending(credential_path: Path) -> bool:
    """Whether a rotation of this credential started less than ROTATION_MARK_MAX_AGE_S ago and has
    not finished."""
    try:
        age = time.time() - rotation_mark_path(credential_path).stat().st_mtime
    except OSError:
        return False
    return 0 <= age < ROTATION_MARK_MAX_AGE_S
