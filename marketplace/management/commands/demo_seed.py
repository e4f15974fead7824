"""manage.py demo_seed: the demo's admin, renter and provider, with API tokens.

Idempotent: a second run keeps the same users and prints tokens that work. Tokens are kept in
the credentials file (mode 0600); a token not found there (or revoked) is replaced by a new one,
since only token digests are stored in the database.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from accounts.models import ApiToken
from accounts.services import api_token_create, token_digest
from billing.chain import ChainError
from jobs.models import Renter
from jobs.services import renter_create
from providers.models import Provider
from providers.services import provider_create

ADMIN_USERNAME = "admin"
RENTER_USERNAME = "demo-renter"
PROVIDER_USERNAME = "demo-provider"
TOKEN_NAME = "demo"  # noqa: S105 - the token's label, not a secret
# A recognisable demo payout address (not a real wallet).
DEMO_PAYOUT_ADDRESS = "0x" + "de" * 20


def default_credentials_path() -> Path:
    return Path(settings.VAR_DIR) / "demo" / "credentials.json"


class Command(BaseCommand):
    help = "Create (once) the demo admin, renter and provider, and print their credentials."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--credentials-file",
            type=Path,
            default=None,
            help="where to keep the credentials (default: $GPGPU_VAR_DIR/demo/credentials.json)",
        )
        parser.add_argument(
            "--renter-key-file",
            type=Path,
            default=None,
            help="link the address of this key (a 0600 hex key file, e.g. var/demo/renter.key) to the demo "
            "renter, so its deposits in the escrow are credited to it",
        )
        parser.add_argument(
            "--watch-chain",
            action="store_true",
            help="then read the escrow's deposits once (what the beat task billing.tasks.watch_chain does)",
        )

    def handle(self, *args: Any, **options: Any) -> None:  # BaseCommand.handle's signature
        path: Path = options["credentials_file"] or default_credentials_path()
        previous = _read(path)
        with transaction.atomic():
            admin_password = _admin_ensure(previous.get("admin", {}).get("password"))
            renter_user = _user_ensure(RENTER_USERNAME)
            if not Renter.objects.filter(user=renter_user).exists():
                renter_create(user=renter_user, display_name="Demo renter")
            provider_user = _user_ensure(PROVIDER_USERNAME)
            if not Provider.objects.filter(user=provider_user).exists():
                provider_create(user=provider_user, display_name="Demo provider", payout_address=DEMO_PAYOUT_ADDRESS)
            renter_token = _token_ensure(renter_user, previous.get("renter", {}).get("token"))
            provider_token = _token_ensure(provider_user, previous.get("provider", {}).get("token"))
        credentials = {
            "admin": {"username": ADMIN_USERNAME, "password": admin_password},
            "renter": {"username": RENTER_USERNAME, "token": renter_token},
            "provider": {"username": PROVIDER_USERNAME, "token": provider_token},
        }
        _write_private(path, json.dumps(credentials, indent=2) + "\n")
        self.stdout.write(f"Demo credentials (also in {path}):")
        self.stdout.write(f"  admin     {ADMIN_USERNAME} / {admin_password}")
        self.stdout.write(f"  renter    {RENTER_USERNAME}: Authorization: Token {renter_token}")
        self.stdout.write(f"  provider  {PROVIDER_USERNAME}: Authorization: Token {provider_token}")
        renter = Renter.objects.get(user=renter_user)
        if options["renter_key_file"]:
            self._wallet_link(renter, options["renter_key_file"])
        if options["watch_chain"]:
            self._watch_chain(renter)

    def _wallet_link(self, renter: Renter, key_path: Path) -> None:
        """Link the key's address to the demo renter (idempotent: billing.deposits.wallet_link)."""
        from billing.chain.client import key_file_read
        from billing.deposits import wallet_link
        from billing.errors import ValidationFailed

        try:
            address = key_file_read(key_path, setting="--renter-key-file").address
            wallet_link(renter=renter, address=address)
        except (ChainError, ValidationFailed) as error:
            raise CommandError(f"cannot link the demo renter's wallet: {error}") from error
        self.stdout.write(f"  wallet    {address.lower()} linked to {RENTER_USERNAME}")

    def _watch_chain(self, renter: Renter) -> None:
        """Credit the escrow's deposits now, so the renter's balance is there before the first job."""
        from billing.chain import chain_client_from_settings
        from billing.deposits import chain_watch
        from billing.selectors import renter_available_micro

        try:
            result = chain_watch(client=chain_client_from_settings())
        except ChainError as error:
            raise CommandError(f"cannot read the escrow's deposits: {error}") from error
        available = renter_available_micro(renter_id=renter.pk)
        self.stdout.write(
            f"  balance   {RENTER_USERNAME} has {available} micro available "
            f"({result.credited} chain event(s) credited now)"
        )


def _read(path: Path) -> dict[str, Any]:  # the credentials file's JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _admin_ensure(previous_password: str | None) -> str:
    """The superuser "admin". Its password is DEMO_ADMIN_PASSWORD when set, else the one kept
    in the credentials file, else a new random one."""
    user_model = get_user_model()
    password = os.environ.get("DEMO_ADMIN_PASSWORD") or previous_password or secrets.token_urlsafe(12)
    user = user_model.objects.filter(username=ADMIN_USERNAME).first()
    if user is None:
        user_model.objects.create_superuser(username=ADMIN_USERNAME, email="admin@example.org", password=password)
    elif not user.check_password(password) or not user.is_superuser:
        user.set_password(password)
        user.is_staff = user.is_superuser = user.is_active = True
        user.save()
    return password


def _user_ensure(username: str) -> User:
    user, _ = get_user_model().objects.get_or_create(username=username, defaults={"email": f"{username}@example.org"})
    return user


def _token_ensure(user: User, previous_raw: str | None) -> str:
    """The raw token kept from last time if it still works, else a new one."""
    if (
        previous_raw
        and ApiToken.objects.filter(user=user, key_digest=token_digest(previous_raw), revoked_at__isnull=True).exists()
    ):
        return previous_raw
    _, raw = api_token_create(user=user, name=TOKEN_NAME)
    return raw


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
