"""Schemathesis against a live server: the OpenAPI schema is the contract.

Every operation of the renter, provider and agent APIs is fuzzed from the schema the server
serves, with positive and negative cases, at least CASES_PER_OPERATION each:

- with its own credential (a renter's API token, a provider's API token, or a registered
  machine's credential, `Authorization: Machine …`), chain node up (anvil, the escrow deployed):
  schemathesis's examples, coverage (boundary values, each rule broken in turn, missing and
  unknown parameters, other methods) and fuzzing phases;
- the same, chain node down (nothing listens at CHAIN_RPC_URL): the fuzzing phase;
- with each of the other two credentials: REFUSED_CASES fuzzed cases.

Every response must pass: no 5xx (but 503 chain_unavailable, declared, with the node down), a
status the schema declares for the operation, the declared content type and headers, and a body
that matches the declared schema (every error in the one error shape).

Why a pytest module against a live server in this process, not a script against granian: the
fixtures are the project's factories and services (a renter with funds and a linked wallet, a
provider with machines, windows and blackouts, a machine registered through the agent API's
service, with GPUs and a lease), the database is the one the suite sets up on SQLite or
PostgreSQL, and nothing outlives the run. The server is Django's threaded WSGI server; what it
runs (URL routing, the 404/500 handlers, middleware, DRF) is what granian runs in production.

The server and the world it serves are set up once for the module (its rows are committed, and
flushed at the end), so the fuzzer's own writes accumulate as they would on a real server.

Slow (minutes): skipped unless GPGPU_API_FUZZ=1; CI runs it in a step of its own. The seed is
printed: GPGPU_API_FUZZ_SEED=<seed> replays a run; GPGPU_API_FUZZ_CASES=<n> changes the cases
per operation; GPGPU_API_FUZZ_REPORT=<file> writes the responses by status of every operation as
JSON. The run ends by printing its counts: operations, cases, responses by status and failures,
per chain state and credential, and the cases valid by the schema that the server refused.
"""

from __future__ import annotations

import json
import os
import random
import socket
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone
from eth_account import Account
from eth_utils import keccak
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st

ENABLED = os.environ.get("GPGPU_API_FUZZ") == "1"
if not ENABLED:
    # Before schemathesis is imported: the README's test command loads neither it nor its plugin.
    pytest.skip("API fuzzing takes minutes: set GPGPU_API_FUZZ=1 (CI does)", allow_module_level=True)

import schemathesis  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CASES_PER_OPERATION = int(os.environ.get("GPGPU_API_FUZZ_CASES", "50"))
SEED = int(os.environ.get("GPGPU_API_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
# Besides these, no 5xx (see _no_server_error).
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
CREDENTIALS = ("renter", "provider", "machine")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Its tallies live in this process and its last test reads them all.
    pytest.fail("Run the API fuzzing in one process: ./scripts/test tests/test_api_fuzz.py -n 0", pytrace=False)

# The test database; the world is committed once for the module (see `world`).
pytestmark = pytest.mark.django_db


def _served_schema() -> dict[str, Any]:
    """The OpenAPI document /api/schema/ serves, as JSON (made without a request)."""
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    return json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))


_RAW_SCHEMA = _served_schema()
# The operations each kind of credential is for.
AGENT_PATHS = r"^/api/agent/"
PROVIDER_PATHS = r"^/api/v1/(machines|provider|availability-windows|blackouts|registration-tokens|billing/earnings)/"


# The agent's checkpoint upload takes a tar archive as its raw body; schemathesis sends the bytes
# it draws as they are, as it does for application/octet-stream.
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


def _schema(*, cases: int, coverage: bool) -> Any:
    phases = {} if coverage else {"phases": {"examples": {"enabled": False}, "coverage": {"enabled": False}}}
    config = schemathesis.Config.from_dict({"generation": {"max-examples": cases}, **phases})
    return schemathesis.openapi.from_dict(_RAW_SCHEMA, config=config)


def _by_credential(whole: Any) -> dict[str, Any]:
    """The operations each kind of credential is for."""
    return {
        "renter": whole.exclude(path_regex=AGENT_PATHS).exclude(path_regex=PROVIDER_PATHS),
        "provider": whole.include(path_regex=PROVIDER_PATHS),
        "machine": whole.include(path_regex=AGENT_PATHS),
    }


def _elsewhere(whole: Any) -> dict[str, Any]:
    """The operations each kind of credential is not for."""
    return {
        "renter": whole.include(path_regex=f"{AGENT_PATHS}|{PROVIDER_PATHS}"),
        "provider": whole.exclude(path_regex=PROVIDER_PATHS),
        "machine": whole.exclude(path_regex=AGENT_PATHS),
    }


# Chain up, each operation with its own credential: every phase (examples; coverage: boundary
# values, each rule broken in turn, missing and unexpected parameters, other methods) and
# CASES_PER_OPERATION fuzzed cases.
schema = _schema(cases=CASES_PER_OPERATION, coverage=True)
OWN = _by_credential(schema)
# Chain down: the coverage cases would be the same again, so fuzzed cases only.
OWN_CHAIN_DOWN = _by_credential(_schema(cases=CASES_PER_OPERATION, coverage=False))
# Each operation with the other credentials: refused before the input is read (401 or 403, but
# /gpus/ and /me take any person), so REFUSED_CASES fuzzed cases.
REFUSED_CASES = 10
ELSEWHERE = _elsewhere(_schema(cases=REFUSED_CASES, coverage=False))


# --- the world the fuzzer meets -------------------------------------------------------------


@dataclass
class World:
    url: str
    anvil_url: str
    credentials: dict[str, str]
    # Ids of rows the fixtures made, by path parameter name: generated path parameters use them
    # half the time, so that operations get past their 404.
    ids: dict[str, list[int]]
    machine_id: int


_WORLD: list[World] = []


def _account(label: str) -> Any:
    return Account.from_key(keccak(text=f"gpgpu api fuzz: {label}"))


def _make_world(url: str, anvil_url: str) -> World:
    """A renter with funds, a linked wallet and two jobs (one leased); a provider with two
    machines (one registered through the agent API's service, with GPUs and the lease), a
    window, a blackout and a registration token."""
    from billing.deposits import wallet_link
    from jobs.models import Job
    from jobs.services import JobSpec
    from marketplace.submit import job_submit
    from providers import services as provider_services
    from providers.models import AvailabilityWindow
    from tests.factories import GPUFactory, MachineFactory, ProviderFactory, RenterFactory, placed_lease, token_for

    renter = RenterFactory()
    wallet_link(renter=renter, address=_account("wallet").address.lower())
    provider = ProviderFactory(payout_address=_account("payout").address)
    _token, raw_registration = provider_services.registration_token_create(provider=provider, label="fuzz")
    machine, machine_credential = provider_services.machine_register(
        raw_token=raw_registration, hostname="fuzz-host", agent_version="1.0.0", region="eu-west"
    )
    gpus = [GPUFactory(machine=machine, index=i, model="NVIDIA L4", vram_mb=23034) for i in range(2)]
    other_machine = MachineFactory(provider=provider)
    other_gpu = GPUFactory(machine=other_machine, index=0)
    window = provider_services.availability_window_create(
        provider=provider,
        machine_id=None,
        days=["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        start_time=time(0, 0),
        end_time=time(0, 0),
        timezone_name="UTC",
    )
    blackout = provider_services.blackout_create(
        provider=provider,
        machine_id=other_machine.pk,
        starts_at=timezone.now() + timedelta(days=1),
        ends_at=timezone.now() + timedelta(days=2),
        reason="fuzz",
    )
    spec = JobSpec(
        gpu_count=1,
        max_price_per_gpu_hour=Decimal("1.00"),
        expected_duration_s=600,
        max_duration_s=1200,
        kind=Job.Kind.PROCESS,
        command=["python3", "-c", "print('fuzz')"],
    )
    leased, _ = job_submit(renter=renter, spec=spec)
    pending, _ = job_submit(renter=renter, spec=spec)
    lease = placed_lease(job=leased, gpus=gpus[:1])
    assert isinstance(window, AvailabilityWindow)
    return World(
        url=url,
        anvil_url=anvil_url,
        credentials={
            "renter": f"Token {token_for(renter.user)}",
            "provider": f"Token {token_for(provider.user)}",
            "machine": f"Machine {machine_credential}",
        },
        ids={
            "job_id": [leased.pk, pending.pk],
            "lease_id": [lease.pk],
            "machine_id": [machine.pk, other_machine.pk],
            "gpu_id": [gpu.pk for gpu in gpus] + [other_gpu.pk],
            "window_id": [window.pk],
            "blackout_id": [blackout.pk],
        },
        machine_id=machine.pk,
    )


def _deploy_escrow(anvil_url: str) -> None:
    from web3 import Web3

    from billing.chain import ChainClient
    from billing.chain.client import ANVIL_DEV_KEY_0
    from billing.chain.deployment import deployment_ensure

    operator = ChainClient(
        Web3(Web3.HTTPProvider(anvil_url, request_kwargs={"timeout": 30})),
        operator_account=Account.from_key(ANVIL_DEV_KEY_0),
        poll_interval_s=0.05,
        receipt_timeout_s=30,
    )
    deployment_ensure(client=operator, treasury=operator.address, fee_bps=1000, dev_token=True)


@pytest.fixture(scope="module")
def world(django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The live server, the anvil node with the escrow, and the world, for the whole module."""
    from pytest_django.live_server_helper import LiveServer

    from billing.chain.anvil import anvil_binary, anvil_running

    if anvil_binary() is None:
        message = "anvil binary missing (run `npm ci`): the API fuzz run needs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    var_dir: Path = tmp_path_factory.mktemp("fuzz-var")
    with (
        django_db_blocker.unblock(),
        override_settings(THROTTLE_ENABLED=False, VAR_DIR=var_dir, CHAIN_ID=None),
        anvil_running() as w3,
    ):
        anvil_url = w3.provider.endpoint_uri
        server = LiveServer("localhost")
        # Django's test server writes a response in pieces: without TCP_NODELAY each kept-alive
        # request waits out the client's delayed ACK (40 ms). Accepted sockets inherit it.
        server.thread.httpd.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with override_settings(CHAIN_RPC_URL=anvil_url):
                _deploy_escrow(anvil_url)
            made = _make_world(server.url, anvil_url)
            _WORLD.append(made)
            yield made
        finally:
            _WORLD.clear()
            server.stop()
            call_command("flush", interactive=False, verbosity=0)


@pytest.fixture
def chain_up(world: World) -> Iterator[World]:
    with override_settings(CHAIN_RPC_URL=world.anvil_url):
        yield world


@pytest.fixture
def chain_down(world: World) -> Iterator[World]:
    from billing.chain.anvil import free_port

    with override_settings(CHAIN_RPC_URL=f"http://127.0.0.1:{free_port()}", CHAIN_RPC_TIMEOUT_S=2):
        yield world


@schemathesis.hook
def before_generate_path_parameters(context: Any, strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Half the time, ids of rows the world holds instead of arbitrary ones. The agent's own
    machine is never offered to the provider's revoke or remove (the agent runs would then
    only ever meet 401)."""
    operation = context.operation
    names = [parameter.name for parameter in operation.path_parameters]
    if not names or not _WORLD:
        return strategy
    ends_machine = operation.path.endswith("/credential/revoke/") or (
        operation.method.upper() == "DELETE" and operation.path == "/api/v1/machines/{machine_id}/"
    )

    def known(name: str) -> st.SearchStrategy[int]:
        spared = _WORLD[0].machine_id if ends_machine and name == "machine_id" else None
        ids = [i for i in _WORLD[0].ids.get(name, []) if i != spared] or [1]
        return st.sampled_from(ids)

    return st.one_of(strategy, st.fixed_dictionaries({name: known(name) for name in names}))


# --- the run --------------------------------------------------------------------------------


@dataclass
class Tally:
    cases: Counter = field(default_factory=Counter)
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[str] = field(default_factory=list)
    # Cases valid by the schema that the server refused with 400, by operation and reason: a
    # rule the schema does not state (most are cross-field rules OpenAPI 3.0 cannot state).
    refused_valid: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    # 401s that refused the credential itself (revoked or unknown), by operation.
    refused_credential: Counter = field(default_factory=Counter)


TALLIES: dict[tuple[str, str], Tally] = {}
FUZZ_SETTINGS = hypothesis.settings(
    max_examples=CASES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)


def _exchange(case: Any, world: World, chain: str, credential: str, *, elsewhere: bool = False) -> None:
    tally = TALLIES.setdefault((f"chain {chain}", credential + (" elsewhere" if elsewhere else "")), Tally())
    label = case.operation.label
    tally.cases[label] += 1
    response = case.call(base_url=world.url, headers={"Authorization": world.credentials[credential]})
    tally.statuses[label][response.status_code] += 1
    if response.status_code == 401 and response.json().get("code") != "not_authenticated":
        # The credential was sent and refused (a case without it is a negative case, not this).
        tally.refused_credential[label] += 1
    if response.status_code == 400 and case.meta is not None and case.meta.generation.mode.is_positive:
        tally.refused_valid[label][str(response.json().get("detail"))[:100]] += 1
    if (case.method.upper(), case.path, response.status_code) == ("POST", "/api/agent/v1/credential/rotate", 200):
        # The agent installs its new credential, as the real one does.
        world.credentials["machine"] = f"Machine {response.json()['credential']}"
    try:
        _no_server_error(case, response, chain)
        case.validate_response(response, checks=CHECKS)
    except Exception as failure:
        tally.failures.append(f"{label}: {str(failure)[:2000]}")
        raise


def _no_server_error(case: Any, response: Any, chain: str) -> None:
    """No 5xx, but for the one a down chain node calls for: 503 chain_unavailable, from an
    operation that declares it (schemathesis's not_a_server_error refuses every 5xx)."""
    if response.status_code < 500:
        return
    declared = str(response.status_code) in case.operation.definition.raw.get("responses", {})
    expected = chain == "down" and response.status_code == 503 and declared
    if not (expected and response.json().get("code") == "chain_unavailable"):
        raise AssertionError(
            f"Server error {response.status_code} (chain {chain}): {response.text[:500]}\n"
            f"Reproduce with: {case.as_curl_command()}"
        )


REFUSED_SETTINGS = hypothesis.settings(FUZZ_SETTINGS, max_examples=REFUSED_CASES)


# The order matters: the agent's operations run before the provider's, whose fuzzed calls may
# revoke the agent's credential or remove its machine (schemathesis's boundary cases try id 1).
@OWN["renter"].parametrize()
@FUZZ_SETTINGS
@hypothesis.seed(SEED)
def test_renter_operations_with_the_chain_up(case: Any, chain_up: World) -> None:
    _exchange(case, chain_up, "up", "renter")


@OWN["machine"].parametrize()
@FUZZ_SETTINGS
@hypothesis.seed(SEED)
def test_agent_operations_with_the_chain_up(case: Any, chain_up: World) -> None:
    _exchange(case, chain_up, "up", "machine")


@OWN_CHAIN_DOWN["renter"].parametrize()
@FUZZ_SETTINGS
@hypothesis.seed(SEED)
def test_renter_operations_with_the_chain_down(case: Any, chain_down: World) -> None:
    _exchange(case, chain_down, "down", "renter")


@OWN_CHAIN_DOWN["machine"].parametrize()
@FUZZ_SETTINGS
@hypothesis.seed(SEED)
def test_agent_operations_with_the_chain_down(case: Any, chain_down: World) -> None:
    _exchange(case, chain_down, "down", "machine")


@OWN["provider"].parametrize()
@FUZZ_SETTINGS
@hypothesis.seed(SEED)
def test_provider_operations_with_the_chain_up(case: Any, chain_up: World) -> None:
    _exchange(case, chain_up, "up", "provider")


@OWN_CHAIN_DOWN["provider"].parametrize()
@FUZZ_SETTINGS
@hypothesis.seed(SEED)
def test_provider_operations_with_the_chain_down(case: Any, chain_down: World) -> None:
    _exchange(case, chain_down, "down", "provider")


@ELSEWHERE["renter"].parametrize()
@REFUSED_SETTINGS
@hypothesis.seed(SEED)
def test_other_operations_with_a_renter_token(case: Any, chain_up: World) -> None:
    _exchange(case, chain_up, "up", "renter", elsewhere=True)


@ELSEWHERE["provider"].parametrize()
@REFUSED_SETTINGS
@hypothesis.seed(SEED)
def test_other_operations_with_a_provider_token(case: Any, chain_up: World) -> None:
    _exchange(case, chain_up, "up", "provider", elsewhere=True)


@ELSEWHERE["machine"].parametrize()
@REFUSED_SETTINGS
@hypothesis.seed(SEED)
def test_other_operations_with_a_machine_credential(case: Any, chain_up: World) -> None:
    _exchange(case, chain_up, "up", "machine", elsewhere=True)


def test_every_operation_got_its_cases_and_the_counts_are_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last: prints the counts, and checks that every operation got CASES_PER_OPERATION
    cases with its own credential, chain up and down, and was tried with the other two."""
    lines = [f"API fuzz (seed {SEED}): {CASES_PER_OPERATION} cases per operation asked, {REFUSED_CASES} elsewhere"]
    for (chain, run), tally in sorted(TALLIES.items()):
        counts = tally.cases.values()
        statuses = sum(tally.statuses.values(), Counter())
        lines.append(
            f"  {chain}, {run}: {len(tally.cases)} operations, {sum(counts)} cases "
            f"(fewest for one operation: {min(counts, default=0)}), {len(tally.failures)} failures; "
            f"responses by status {dict(sorted(statuses.items()))}"
        )
        lines += [f"    FAILED {failure.splitlines()[0]}" for failure in tally.failures]
        refused = sum(sum(reasons.values()) for reasons in tally.refused_valid.values())
        if refused:
            lines.append(f"    {refused} cases valid by the schema refused with 400 (rules it cannot state):")
            lines += [
                f"      {n} x {label}: {reason}"
                for label, reasons in sorted(tally.refused_valid.items())
                for reason, n in reasons.most_common(2)
            ]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    if os.environ.get("GPGPU_API_FUZZ_REPORT"):
        report = {
            f"{chain}, {run}": {
                label: {"cases": tally.cases[label], "statuses": dict(tally.statuses[label])} for label in tally.cases
            }
            for (chain, run), tally in TALLIES.items()
        }
        Path(os.environ["GPGPU_API_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1, sort_keys=True))

    operations = {operation.ok().label for operation in schema.get_all_operations()}
    for chain in ("chain up", "chain down"):
        own = Counter()
        for credential in CREDENTIALS:
            own.update(TALLIES.get((chain, credential), Tally()).cases)
        assert set(own) == operations, (chain, operations - set(own))
        assert min(own.values()) >= CASES_PER_OPERATION, (chain, [o for o, n in own.items() if n < CASES_PER_OPERATION])
    for chain in ("chain up", "chain down"):
        # Each credential stayed valid through its own run: no fuzzed call revoked it. (A case the
        # fuzzer sends without it is answered 401 not_authenticated, as it should be; the agent's
        # register takes a registration token in its body, which the fuzzer does not know.)
        for credential in CREDENTIALS:
            tally = TALLIES.get((chain, credential), Tally())
            refused = {label: n for label, n in tally.refused_credential.items() if not label.endswith("/register")}
            assert refused == {}, (chain, credential, "the credential was refused", refused)
    tried = Counter()
    for credential in CREDENTIALS:
        tried.update(TALLIES.get(("chain up", f"{credential} elsewhere"), Tally()).cases.keys())
    assert all(tried[operation] >= 2 for operation in operations), [o for o in operations if tried[o] < 2]
