"""Rate limits and the admin lockout, as an attacker (and an honest client next to one) sees them:
429 with Retry-After in the error shape, budgets per machine, per account and per address, and
a login that stays shut after too many wrong passwords."""

from __future__ import annotations

import itertools
import logging
import uuid
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from providers import services
from providers.models import Machine
from tests.factories import MachineFactory, ProviderFactory, RenterFactory, agent_client, placed_lease, token_for

pytestmark = pytest.mark.django_db

REGISTER = "/api/agent/v1/register"
HEARTBEAT = "/api/agent/v1/heartbeat"
_addresses = (f"198.51.100.{n}" for n in itertools.count(1))


def fresh_address() -> str:
    """A client address no other test has used: counters live in the cache, not the database."""
    return next(_addresses)


GUESS = "gpreg_guess"


def register_attempt(client: APIClient, token: str = GUESS, **extra: str) -> Any:
    body = {"token": token, "hostname": "rig", "agent_version": "0.1.0"}
    return client.post(REGISTER, body, format="json", **extra)


def heartbeat(client: APIClient) -> Any:
    body = {
        "agent_version": "0.1.0",
        "driver_version": "550.54",
        "cuda_version": "12.4",
        "cpu_cores": 16,
        "ram_mb": 64000,
        "disk_gb": 900,
        "region": "eu-west",
        "gpus": [],
        "leases": [],
    }
    return client.post(HEARTBEAT, body, format="json")


def assert_throttled(response: Any, *, within_s: int = 60) -> None:
    assert response.status_code == 429, response.content
    body = response.json()
    assert body["code"] == "throttled"
    assert body["detail"]
    assert set(body) == {"code", "detail"}
    assert 1 <= int(response["Retry-After"]) <= within_s


@pytest.fixture(autouse=True)
def documented_defaults(settings):  # type: ignore[no-untyped-def]
    """The defaults the README documents (tests/test_production_settings.py checks that the
    settings have them), whatever this shell's environment overrides."""
    settings.THROTTLE_ENABLED = True
    settings.THROTTLE_RATES = {
        "user": "600/min",
        "machine": "600/min",
        "machine_logs": "600/min",
        "anon": "60/min",
        "register": "20/min",
        "machine_rotate": "6/h",
    }
    settings.TRUSTED_PROXIES = 0
    settings.AXES_ENABLED = True
    settings.AXES_FAILURE_LIMIT = 5
    settings.AXES_COOLOFF_TIME = timedelta(minutes=15)
    settings.AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
    # Counters of its own: earlier tests' requests must not count against this one's.
    settings.CACHES = {"default": {**settings.CACHES["default"], "KEY_PREFIX": f"throttle-test-{uuid.uuid4().hex}"}}


@pytest.fixture
def rates(settings):  # type: ignore[no-untyped-def]
    """Change some rates for one test: rates(machine="5/min")."""

    def change(**overrides: str | None) -> None:
        settings.THROTTLE_RATES = {**settings.THROTTLE_RATES, **overrides}

    return change


# --- the agent's register endpoint ----------------------------------------------------------


def test_the_21st_register_attempt_from_one_address_in_a_minute_is_429_with_retry_after() -> None:
    attacker = APIClient(REMOTE_ADDR=fresh_address())
    _, good_token = services.registration_token_create(provider=ProviderFactory())

    guesses = [register_attempt(attacker).status_code for _ in range(20)]
    refused = register_attempt(attacker, good_token)

    assert guesses == [401] * 20
    assert_throttled(refused)
    assert not Machine.objects.exists(), "the throttle answers before the token is looked at"
    # Another address registers with the same token at once.
    assert register_attempt(APIClient(REMOTE_ADDR=fresh_address()), good_token).status_code == 201


def test_a_forged_x_forwarded_for_buys_no_new_register_attempts() -> None:
    attacker = APIClient(REMOTE_ADDR=fresh_address())

    for n in range(20):
        assert register_attempt(attacker, HTTP_X_FORWARDED_FOR=f"203.0.113.{n}").status_code == 401

    assert_throttled(attacker.post(REGISTER, {}, format="json", HTTP_X_FORWARDED_FOR="203.0.113.99"))


def test_behind_a_trusted_proxy_each_client_address_has_its_own_budget(settings, rates) -> None:  # type: ignore[no-untyped-def]
    settings.TRUSTED_PROXIES = 1
    rates(register="2/min")
    proxy = fresh_address()
    alice, bob = fresh_address(), fresh_address()

    def attempt(client_address: str, claimed: str = "10.9.9.9") -> int:
        # What the client sent first, then what the proxy appended: the address it saw.
        forwarded = f"{claimed}, {client_address}"
        return (
            APIClient(REMOTE_ADDR=proxy).post(REGISTER, {}, format="json", HTTP_X_FORWARDED_FOR=forwarded).status_code
        )

    assert [attempt(alice, claimed=f"10.0.0.{n}") for n in range(3)] == [400, 400, 429]
    assert attempt(bob) == 400


# --- per machine, per account, per address --------------------------------------------------


def test_a_machine_hammering_heartbeats_gets_429_and_another_machine_does_not(rates) -> None:  # type: ignore[no-untyped-def]
    rates(machine="5/min")
    hammering, neighbour = agent_client(MachineFactory()), agent_client(MachineFactory())

    answers = [heartbeat(hammering).status_code for _ in range(5)]
    refused = heartbeat(hammering)

    assert answers == [200] * 5
    assert_throttled(refused)
    # Same address (both from the test client), another credential: its own budget.
    assert heartbeat(neighbour).status_code == 200


def test_a_machine_over_its_log_chunk_rate_gets_429_for_them_and_its_heartbeats_still_pass(rates) -> None:  # type: ignore[no-untyped-def]
    rates(machine="5/min", machine_logs="3/min")
    lease = placed_lease(started=True)
    client = agent_client(lease.machine)

    def ship(seq: int) -> Any:
        body = {"seq": seq, "at": timezone.now().isoformat(), "text": "x\n"}
        return client.post(f"/api/agent/v1/leases/{lease.pk}/logs", body, format="json")

    answers = [ship(seq).status_code for seq in range(3)]
    refused = ship(3)

    assert answers == [201] * 3
    assert_throttled(refused)
    assert [heartbeat(client).status_code for _ in range(5)] == [200] * 5  # a budget apart
    assert_throttled(heartbeat(client))


def test_a_renters_token_over_its_rate_gets_429_and_other_tokens_do_not(rates) -> None:  # type: ignore[no-untyped-def]
    rates(user="3/min")
    renter, other = RenterFactory(), RenterFactory()
    hammering, neighbour = APIClient(), APIClient()
    hammering.credentials(HTTP_AUTHORIZATION=f"Token {token_for(renter.user)}")
    neighbour.credentials(HTTP_AUTHORIZATION=f"Token {token_for(other.user)}")

    assert [hammering.get("/api/v1/jobs/").status_code for _ in range(3)] == [200] * 3

    assert_throttled(hammering.get("/api/v1/jobs/"))
    assert neighbour.get("/api/v1/jobs/").status_code == 200


def test_a_rotated_machine_credential_is_a_new_budget_and_a_bad_one_is_401_not_counted(rates) -> None:  # type: ignore[no-untyped-def]
    rates(machine="2/min")
    machine = MachineFactory()
    old = agent_client(machine)
    assert [heartbeat(old).status_code for _ in range(2)] == [200, 200]
    assert_throttled(heartbeat(old))

    rotated = agent_client(machine)

    assert heartbeat(old).status_code == 401
    assert heartbeat(rotated).status_code == 200


def test_rotating_its_credential_buys_a_machine_no_more_than_its_rotation_budget(rates) -> None:  # type: ignore[no-untyped-def]
    """Each rotation starts the per-credential budgets afresh: a machine rotating every few
    requests went on at any rate it liked. Rotations have a budget of their own, per machine."""
    rates(machine="2/min", machine_rotate="3/h")
    client = agent_client(MachineFactory())
    codes: list[int] = []
    for _ in range(4):
        codes.append(heartbeat(client).status_code)  # the rotation is the budget's second request
        rotated = client.post("/api/agent/v1/credential/rotate", {}, format="json")
        codes.append(rotated.status_code)
        if rotated.status_code != 200:
            assert_throttled(rotated, within_s=3600)
            break
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Machine {rotated.json()['credential']}")

    assert codes == [200, 200] * 3 + [200, 429]
    assert_throttled(heartbeat(client))  # and the last credential's budget is spent as any


def test_unauthenticated_requests_are_limited_per_address(rates) -> None:  # type: ignore[no-untyped-def]
    rates(anon="3/min", register=None)
    stranger = APIClient(REMOTE_ADDR=fresh_address())

    assert [register_attempt(stranger).status_code for _ in range(3)] == [401] * 3

    assert_throttled(register_attempt(stranger))
    assert register_attempt(APIClient(REMOTE_ADDR=fresh_address())).status_code == 401


def test_throttle_enabled_false_switches_every_limit_off(settings) -> None:  # type: ignore[no-untyped-def]
    settings.THROTTLE_ENABLED = False
    client = APIClient(REMOTE_ADDR=fresh_address())

    assert {register_attempt(client).status_code for _ in range(25)} == {401}


def test_an_unreachable_rate_limit_cache_lets_requests_through_and_says_so(settings, caplog) -> None:  # type: ignore[no-untyped-def]
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
    from core import throttling

    throttling._cache_warned_at = float("-inf")

    with caplog.at_level(logging.WARNING, logger="core.throttling"):
        answer = register_attempt(APIClient(REMOTE_ADDR=fresh_address()))

    assert answer.status_code == 401
    assert "rate-limit cache is unreachable" in caplog.text


# --- the admin login ------------------------------------------------------------------------

PASSWORD = "the-right-password-42"


@pytest.fixture
def operator(settings):  # type: ignore[no-untyped-def]
    """A staff superuser with a known password (a fast hasher: the login is tried many times)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return get_user_model().objects.create_user(
        username="operator", password=PASSWORD, email="operator@example.org", is_staff=True, is_superuser=True
    )


def log_in(password: str, *, address: str = "192.0.2.10") -> Any:
    client = Client(REMOTE_ADDR=address)
    response = client.post("/admin/login/?next=/admin/", {"username": "operator", "password": password})
    response.client = client
    return response


def logged_in(response: Any) -> bool:
    return response.status_code == 302 and response.client.get("/admin/").status_code == 200


def test_the_admin_login_locks_after_5_failures_even_for_the_right_password_and_says_so(operator, settings) -> None:  # type: ignore[no-untyped-def]
    wrong = [log_in(f"guess-{n}") for n in range(4)]
    fifth = log_in("guess-5")
    right = log_in(PASSWORD)

    assert [r.status_code for r in wrong] == [200] * 4  # the form again, "enter the correct password"
    assert fifth.status_code == 429
    assert right.status_code == 429
    assert not logged_in(right)
    text = right.content.decode()
    assert "Too many failed logins" in text and "locked for 15 minutes" in text
    assert right["Retry-After"] == str(int(settings.AXES_COOLOFF_TIME.total_seconds()))


def test_the_admin_login_unlocks_after_the_cool_off(operator, settings) -> None:  # type: ignore[no-untyped-def]
    for n in range(5):
        log_in(f"guess-{n}")
    assert log_in(PASSWORD).status_code == 429

    AccessAttempt.objects.update(attempt_time=timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(seconds=1))

    assert logged_in(log_in(PASSWORD))


def test_an_operator_command_lifts_the_lock(operator) -> None:  # type: ignore[no-untyped-def]
    for n in range(5):
        log_in(f"guess-{n}")
    assert log_in(PASSWORD).status_code == 429

    out = StringIO()
    call_command("axes_reset_username", "operator", stdout=out)
    assert "removed" in out.getvalue()

    assert logged_in(log_in(PASSWORD))


def test_a_lock_from_one_address_does_not_shut_the_operator_out_elsewhere(operator) -> None:  # type: ignore[no-untyped-def]
    for n in range(5):
        log_in(f"guess-{n}", address="192.0.2.66")

    assert log_in(PASSWORD, address="192.0.2.66").status_code == 429
    assert logged_in(log_in(PASSWORD, address="192.0.2.10"))


def test_a_successful_login_forgets_earlier_failures(operator) -> None:  # type: ignore[no-untyped-def]
    for n in range(4):
        log_in(f"guess-{n}")
    assert logged_in(log_in(PASSWORD))

    assert [log_in(f"again-{n}").status_code for n in range(4)] == [200] * 4
