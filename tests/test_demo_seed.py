"""manage.py demo_seed: the demo's users and tokens, created once, always usable."""

from __future__ import annotations

import json
import stat
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.test import APIClient

from jobs.models import Renter
from providers.models import Provider

pytestmark = pytest.mark.django_db


def _seed(path: Path) -> tuple[dict, str]:
    out = StringIO()
    call_command("demo_seed", "--credentials-file", str(path), stdout=out)
    return json.loads(path.read_text()), out.getvalue()


def _works(token: str, path: str) -> bool:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client.get(path).status_code == 200


def test_demo_seed_creates_working_accounts_and_a_private_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "demo" / "credentials.json"
    credentials, printed = _seed(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials["renter"]["token"] in printed and credentials["provider"]["token"] in printed
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.check_password(credentials["admin"]["password"])
    assert _works(credentials["renter"]["token"], "/api/v1/jobs/")
    assert _works(credentials["provider"]["token"], "/api/v1/machines/")


def test_running_demo_seed_again_keeps_the_users_and_tokens(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    first, _ = _seed(path)
    second, _ = _seed(path)

    assert second == first
    assert get_user_model().objects.count() == 3
    assert Renter.objects.count() == 1 and Provider.objects.count() == 1


def test_demo_seed_issues_new_tokens_when_the_old_ones_are_lost(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    first, _ = _seed(path)
    path.unlink()

    second, _ = _seed(path)

    assert second["renter"]["token"] != first["renter"]["token"]
    assert _works(second["renter"]["token"], "/api/v1/jobs/")
    assert _works(second["provider"]["token"], "/api/v1/machines/")
    assert get_user_model().objects.count() == 3


def test_demo_admin_password_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "a-demo-password-42")
    credentials, _ = _seed(tmp_path / "credentials.json")
    assert credentials["admin"]["password"] == "a-demo-password-42"
    assert get_user_model().objects.get(username="admin").check_password("a-demo-password-42")


def test_demo_seed_links_the_demo_renters_wallet_so_its_deposits_are_credited(tmp_path: Path) -> None:
    from eth_account import Account

    from billing.chain.client import key_file_create
    from billing.models import RenterWallet

    key_path = tmp_path / "demo" / "renter.key"
    key_path.parent.mkdir(parents=True)
    address = key_file_create(key_path).address.lower()
    path = tmp_path / "demo" / "credentials.json"
    for _ in range(2):  # linking again changes nothing
        out = StringIO()
        call_command("demo_seed", "--credentials-file", str(path), "--renter-key-file", str(key_path), stdout=out)
        assert address in out.getvalue()

    renter = Renter.objects.get(user__username="demo-renter")
    assert list(RenterWallet.objects.filter(renter=renter).values_list("address", flat=True)) == [address]
    assert Account.from_key(key_path.read_text().strip()).address.lower() == address
