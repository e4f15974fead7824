"""Fixtures shared by every app's tests."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from rest_framework.test import APIClient
from rest_framework.throttling import SimpleRateThrottle

from tests import db_template
from tests.s3 import S3Store, s3_storage

# Tables a flush leaves as they are: what migrate wrote and every test reads the same (Django's
# post_migrate would write it all again after each flush).
FLUSH_KEEPS = frozenset({"django_content_type", "auth_permission", "django_migrations"})


def _postgresql_flush_by_delete() -> None:
    """Empty the tables after a transactional test (django_db(transaction=True)) with DELETE
    instead of Django's TRUNCATE on PostgreSQL. TRUNCATE gives every table and index a new file,
    written and synced at commit, and the suite flushes after each of several hundred tests. The
    foreign keys Django makes are deferrable, so deleting in any order inside the flush's
    transaction holds. The ledger's append-only tables refuse DELETE (a trigger): those two are
    truncated. Measured on an empty database of this project: 190 ms a flush with TRUNCATE, 14 ms
    this way. A flush that resets sequences or cascades keeps Django's own SQL."""
    from django.db.backends.postgresql.operations import DatabaseOperations

    truncate = DatabaseOperations.sql_flush

    def sql_flush(
        self: DatabaseOperations,
        style: Any,
        tables: list[str],
        *,
        reset_sequences: bool = False,
        allow_cascade: bool = False,
    ) -> list[str]:
        if reset_sequences or allow_cascade:
            return truncate(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
        with self.connection.cursor() as cursor:  # tables whose rows refuse DELETE (the ledger's)
            cursor.execute(
                "SELECT DISTINCT event_object_table FROM information_schema.triggers "
                "WHERE event_manipulation = 'DELETE' AND event_object_schema = current_schema()"
            )
            guarded = {row[0] for row in cursor.fetchall()}
        emptied = [table for table in tables if table not in FLUSH_KEEPS]
        sql = ["SET CONSTRAINTS ALL DEFERRED;"]
        if truncated := [table for table in emptied if table in guarded]:
            sql.append(f"TRUNCATE {', '.join(self.quote_name(table) for table in truncated)} CASCADE;")
        # Table names from Django's own introspection, quoted.
        return sql + [f"DELETE FROM {self.quote_name(table)};" for table in emptied if table not in guarded]  # noqa: S608

    DatabaseOperations.sql_flush = sql_flush  # type: ignore[method-assign]

    # After a flush Django sends post_migrate, whose receivers here (contenttypes', auth's) only
    # write what FLUSH_KEEPS kept: on PostgreSQL it is skipped (about 20 ms of CPU a flush).
    from django.core.management.commands import flush
    from django.db import connections

    post_migrate = flush.emit_post_migrate_signal

    def emit_post_migrate_signal(verbosity: int, interactive: bool, db: str, **kwargs: Any) -> None:
        if connections[db].vendor != "postgresql":
            post_migrate(verbosity, interactive, db, **kwargs)

    flush.emit_post_migrate_signal = emit_post_migrate_signal


_postgresql_flush_by_delete()
db_template.install()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1: moto's server, which speaks S3's REST API (pre-signed URLs,
    HEAD, ranged reads) but checks neither signatures nor a PUT's x-amz-checksum-sha256; AWS S3
    and MinIO check both."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_store(s3_endpoint: str, settings: Any) -> S3Store:
    """The checkpoints' storage a fresh bucket of `s3_endpoint`, configured as production's
    CHECKPOINT_S3_BUCKET does (django-storages, path-style, pre-signed URLs valid 120 s)."""
    import boto3
    from botocore.config import Config

    bucket = f"checkpoints-{secrets.token_hex(6)}"
    key, secret = "gpgpu-test", secrets.token_hex(8)  # moto takes any
    storage = s3_storage(endpoint=s3_endpoint, bucket=bucket, access_key=key, secret_key=secret, region="us-east-1")
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    client.create_bucket(Bucket=bucket)
    settings.STORAGES = {**settings.STORAGES, "checkpoints": storage}
    return S3Store(endpoint=s3_endpoint, bucket=bucket, client=client)


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()


@pytest.fixture(autouse=True)
def matching_requested(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Matching runs asked for (marketplace.matching.matching_request_soon: a job submitted, a
    budget reserved), recorded instead of sent: tests run match_cycle themselves and write no
    broker files. A test that wants the run to happen sets Celery's eager mode and undoes this."""
    from core import soon
    from marketplace import matching, tasks

    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(tasks.match_pending_jobs_soon, "apply_async", lambda *args, **kwargs: sent.append(kwargs))
    soon.marker_delete(matching._QUEUED_KEY)
    return sent


@pytest.fixture(autouse=True)
def fleet_summary_requested(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Fleet summary runs asked for (marketplace.fleet_summary.fleet_summary_request_soon: a late
    rollup, a lease ended back in time), recorded instead of sent, as matching runs are."""
    from core import soon
    from marketplace import fleet_summary, tasks

    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(tasks.summarise_fleet_soon, "apply_async", lambda *args, **kwargs: sent.append(kwargs))
    soon.marker_delete(fleet_summary._QUEUED_KEY)
    return sent


@pytest.fixture(autouse=True)
def node_behind_forgotten() -> None:
    """Each test starts with no node seen behind (billing.rewind.node_behind_wait keeps when it
    first saw one in the coordination cache, which outlives a test)."""
    from django.core.cache import caches

    caches["coordination"].delete_many(
        ["billing.node_behind.operator", "billing.node_behind.watcher", "billing.node_behind.vanished"]
    )


@pytest.fixture(autouse=True)
def rate_limits_fresh() -> None:
    """Each test starts with rate-limit counters of its own, as it starts with an empty database.
    The counters live in the cache (Redis, or this process's memory), which outlives a test, and
    everything a worker's tests send comes from 127.0.0.1: its earlier tests' registrations (an
    agent registering through a live server, a test of the register endpoint) counted against a
    later test's 20 a minute, which then answered 429, depending on which modules the worker drew
    before. In Redis only this process's counters are removed (each test process has a key prefix
    of its own); this process's memory, when there is no Redis, is emptied."""
    from django.core.cache import caches

    from core import throttling

    cache = caches["default"]
    pattern = cache.make_key(SimpleRateThrottle.cache_format % {"scope": "*", "ident": "*"})
    log = throttling.redis_log()
    if log is None:
        cache.clear()
        return
    client = log[0]
    if keys := list(client.scan_iter(match=pattern, count=1000)):
        client.delete(*keys)


@pytest.fixture(autouse=True)
def predicted_idle_uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine's predicted idle time is cached by machine id (providers.services); each test's
    database reuses ids, so tests compute it each time (one test turns the cache back on)."""
    from providers import services

    monkeypatch.setattr(services, "PREDICTED_IDLE_CACHE_S", 0)


@pytest.fixture
def renter_client(db):  # type: ignore[no-untyped-def]
    """(client authenticated as a fresh renter, renter)."""
    from tests.factories import RenterFactory, token_for

    renter = RenterFactory()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(renter.user)}")
    return client, renter


@pytest.fixture
def provider_client(db):  # type: ignore[no-untyped-def]
    """(client authenticated as a fresh provider, provider)."""
    from tests.factories import ProviderFactory, token_for

    provider = ProviderFactory()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(provider.user)}")
    return client, provider


# The long end-to-end and attack modules: `./scripts/test -m "not slow"` is a developer's quick
# run without them; CI runs everything. Each with what makes it slow.
SLOW_MODULES = {
    "tests/test_agent_end_to_end.py": "real agents against a live server, owners coming and going",
    "tests/test_agent_outage.py": "a real agent through a minute-long outage of the marketplace",
    "tests/test_billing_end_to_end.py": "a live server, agents and a chain",
    "client/tests/test_client_live.py": "the renter CLI against a live server and a simulated agent",
    "client/tests/test_client_wallet_live.py": "the wallet and provider commands against a live server",
    "client/tests/test_client_deposit_chain.py": "gpgpu deposit against a real anvil node",
    "tests/browser/test_operator_console.py": "a real browser",
    "tests/browser/test_console_charts.py": "a simulated run, then a real browser",
    "agent/tests/test_container_engine.py": "attacks against real Podman and Docker",
    "agent/tests/test_process_sandbox.py": "attacks against a real bubblewrap sandbox",
    "billing/tests/test_budget_invariant_properties.py": "random interleavings on two EVM backends",
    "billing/tests/test_contract_properties.py": "random operations against the escrow",
    "providers/tests/test_gpu_state_race.py": "heartbeats racing the matcher for rounds",
    "marketplace/tests/test_broker_outage.py": "a real worker through a restart of its own redis-server",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a long end-to-end or attack module (see SLOW_MODULES)")
    db_template.configure(config)
    # Users' passwords hashed in a step, not in production's 1,000,000 PBKDF2 rounds (Django's
    # advice for tests): the fixtures and the demo seed make staff and renters by the hundred
    # (14 s of the suite's CPU before). Servers and commands the tests start run production's.
    from django.conf import settings

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def pytest_unconfigure(config: pytest.Config) -> None:
    db_template.drop(config)


# The longest modules (seconds of a worker each, measured on 2 cores), run first: with tests
# spread over workers a module at a time, one of them drawn last would run on alone at the end.
# scripts/test passes --no-loadscope-reorder, or xdist would order modules by their test count.
LONGEST_MODULES = (
    "agent/tests/test_container_engine.py",  # 78
    "tests/test_agent_outage.py",  # 68
    "tests/test_agent_end_to_end.py",  # 59
    "agent/tests/test_container_runner.py",  # 49
    "billing/tests/test_chain_faults.py",  # 26 (on anvil only: tests/depth.py)
    "agent/tests/test_daemon.py",  # 36
    "billing/tests/test_contract.py",  # 29
    "agent/tests/test_fencing.py",  # 23
    "billing/tests/test_budget_invariant_properties.py",  # 20
    "billing/tests/test_release_on_chain.py",  # 19
    "tests/browser/test_console_charts.py",  # 19
    "tests/browser/test_operator_console.py",  # 16
    "client/tests/test_client_live.py",  # 15
    "providers/tests/test_agent_api.py",  # 15
    "marketplace/tests/test_broker_outage.py",  # 13
    "providers/tests/test_gpu_state_race.py",  # 12
    "marketplace/tests/test_matching_concurrency.py",  # 12
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config: pytest.Config, specs: list[Any]) -> None:
    """Before xdist starts its workers: rewrite the test modules' asserts once, over the cores,
    instead of in every worker at once (a fresh checkout's first run; tests/assert_cache.py)."""
    from tests import assert_cache

    assert_cache.warm(config, assert_cache.test_files(config, config.args), os.cpu_count() or 1)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every module the tests import is loaded by now, and stays: moved out of the cyclic
    garbage collector's reach (`gc.freeze`), so its full collections walk only what the tests
    make. A worker held about 400,000 objects after collection, and its full collections took
    1.2 to 5.6 s of each worker's CPU over a run (11.7 s of the run's 15 s of collecting)."""
    import gc

    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath
    rank = {module: n for n, module in enumerate(LONGEST_MODULES)}
    modules = {id(item): str(item.path.relative_to(root)) for item in items}
    for item in items:
        if modules[id(item)] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    # Stable: within a module, and among the others, the order stays as collected.
    items.sort(key=lambda item: rank.get(modules[id(item)], len(rank)))
