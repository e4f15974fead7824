"""Periodic tasks (core.periodic): every beat task runs under its lock, never waits for it,
commits item by item, and keeps a failure count an operator can read."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import Retry
from django.conf import settings
from django.db import connection, connections

from billing import tasks as billing_tasks
from billing.settlement import LOCK_NAME as SETTLEMENT_LOCK_NAME
from core import periodic
from core.locks import lock_key, try_lock
from core.models import PeriodicTaskState
from marketplace.celery import app

pytestmark = pytest.mark.django_db

PROBE = "marketplace.tests.periodic_probe"
# What the probe task does on its next run (set by each test).
behaviour: dict[str, Any] = {}


@periodic.periodic_task(name=PROBE, time_limit=30)
def probe() -> Any:
    """Writes one row per item (a PeriodicTaskState named "thing-<n>"), failing the items listed
    in behaviour["fail"] after their write, then raises or returns as told."""
    for n in behaviour.get("items", []):
        with periodic.item("thing", n):
            if n == behaviour.get("session_ends_at"):
                behaviour["session_end"]()
            PeriodicTaskState.objects.create(name=f"thing-{n}")
            if n in behaviour.get("fail", ()):
                raise ValueError(f"thing {n} is bad")
    if "raise" in behaviour:
        raise behaviour["raise"]
    return behaviour.get("result", {"done": 1})


@pytest.fixture(autouse=True)
def _clean_behaviour() -> Any:
    behaviour.clear()
    yield
    behaviour.clear()


def state(name: str = PROBE) -> PeriodicTaskState:
    return PeriodicTaskState.objects.get(name=name)


def things() -> list[str]:
    return list(PeriodicTaskState.objects.filter(name__startswith="thing-").values_list("name", flat=True))


def test_every_beat_task_runs_under_a_periodic_lock() -> None:
    app.loader.import_default_modules()
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        assert getattr(app.tasks[entry["task"]], "periodic_lock", None), name
    # The tasks that send the operator's transactions share one lock, which the admin's retry takes too.
    shared = {t.periodic_lock for t in (billing_tasks.settle, billing_tasks.reserve_budgets)}
    assert shared == {billing_tasks.SETTLEMENT_LOCK} == {SETTLEMENT_LOCK_NAME}
    assert billing_tasks.meter_leases.periodic_lock == "billing.tasks.meter_leases"


def test_a_failing_item_is_skipped_and_reported_and_the_others_are_kept() -> None:
    behaviour.update(items=[1, 2, 3], fail={2})

    result = probe()

    assert result == {"done": 1, "items_failed": 1, "failed_items": ["thing 2: ValueError: thing 2 is bad"]}
    assert sorted(things()) == ["thing-1", "thing-3"]  # the failing item's own write is rolled back
    row = state()
    assert (row.last_ok, row.items_ok, row.items_failed) == (False, 2, 1)
    assert (row.consecutive_failures, row.total_failures, row.total_runs) == (1, 1, 1)
    assert row.last_error == "thing 2: ValueError: thing 2 is bad"
    assert row.last_started_at is not None and row.last_finished_at >= row.last_started_at


def test_consecutive_failures_count_until_a_clean_run() -> None:
    behaviour.update(items=[1], fail={1})
    probe()
    probe()
    assert (state().consecutive_failures, state().total_failures) == (2, 2)

    behaviour.update(fail=set(), items=[])
    assert probe() == {"done": 1}

    row = state()
    assert (row.last_ok, row.consecutive_failures, row.total_failures, row.total_runs) == (True, 0, 2, 3)
    assert (row.items_ok, row.items_failed) == (0, 0)
    assert row.last_error.startswith("thing 1")  # what went wrong last is still there


def test_a_run_that_raises_is_recorded_without_the_nodes_secret_and_raised() -> None:
    behaviour["raise"] = RuntimeError("cannot reach https://user:SECRETPW@node.example:8545/v3/SECRETKEY")

    with pytest.raises(RuntimeError):
        probe()

    row = state()
    assert row.last_ok is False and row.consecutive_failures == 1
    assert "node.example" in row.last_error and "SECRET" not in row.last_error
    with try_lock(PROBE) as acquired:  # released although the run raised
        assert acquired


def test_a_result_that_reports_an_unreachable_node_counts_as_a_failure() -> None:
    behaviour["result"] = {"sent": 0, "node_unavailable": "node.example:8545 refused the connection"}

    assert probe() == behaviour["result"]

    row = state()
    assert row.last_ok is False and row.last_error.startswith("node_unavailable: node.example")


def test_a_failure_reported_inside_a_nested_result_fails_the_run_and_is_logged_as_an_error(caplog) -> None:
    # A settlement run reports its reservation run's node outage under "reservations".
    behaviour["result"] = {"sent": 0, "reservations": {"sent": 0, "node_unavailable": "connection refused"}}

    with caplog.at_level("INFO", logger="core.periodic"):
        assert probe() == behaviour["result"]

    row = state()
    assert (row.last_ok, row.consecutive_failures) == (False, 1)
    assert row.last_error == "reservations.node_unavailable: connection refused"
    levels = {record.levelname for record in caplog.records if "finished" in record.getMessage()}
    assert levels == set(), "a failed run must not be logged as finished"
    assert any(r.levelname == "ERROR" and "failed after" in r.getMessage() for r in caplog.records)


def test_a_check_whose_result_is_not_ok_fails_the_run() -> None:
    behaviour["result"] = {"ok": False, "block": 12, "differences": ["fees: escrow 100, expected 90"]}

    probe()
    probe()

    row = state()
    assert (row.last_ok, row.consecutive_failures, row.total_failures) == (False, 2, 2)
    assert "fees: escrow 100, expected 90" in row.last_error

    behaviour["result"] = {"ok": True, "block": 13, "differences": []}
    probe()
    assert (state().last_ok, state().consecutive_failures) == (True, 0)


def test_billing_tasks_report_an_unreachable_node_the_same_way(monkeypatch) -> None:
    """Every chain task reports an unreachable node under "node_unavailable" (and "error"),
    counted as a failure of the run (the deposit watcher used to report it as a bare "error",
    unlike the settlement run)."""
    from eth_account import Account
    from web3 import Web3

    import billing.chain
    from billing.chain import ChainClient

    down = ChainClient(
        Web3(Web3.HTTPProvider("http://127.0.0.1:9", exception_retry_configuration=None)),
        operator_account=Account.create(),
    )
    monkeypatch.setattr(billing.chain, "chain_client_from_settings", lambda: down)
    tasks = {
        "billing.tasks.watch_chain": billing_tasks.watch_chain,
        "billing.tasks.settle": billing_tasks.settle,
        "billing.tasks.reconcile_settlements": billing_tasks.reconcile_settlements,
        "billing.tasks.release_jobs_on_chain": billing_tasks.release_jobs_on_chain,
    }
    for name, task in tasks.items():
        result = task()
        assert set(result) == {"error", "node_unavailable"}, name
        assert result["node_unavailable"].startswith("chain node unreachable"), name
        row = state(name)
        assert (row.last_ok, row.consecutive_failures) == (False, 1), name
        assert "chain node unreachable" in row.last_error, name


def test_a_run_that_finds_the_lock_held_returns_at_once_as_skipped() -> None:
    behaviour.update(items=[1])
    with try_lock(PROBE) as acquired:
        assert acquired
        started = time.monotonic()
        result = probe()
        took = time.monotonic() - started

    assert result == {"skipped": "locked"} and took < 1
    assert things() == []
    row = state()
    assert (row.total_skipped, row.total_runs, row.last_started_at) == (1, 0, None)
    assert row.last_skipped_at is not None
    assert probe() == {"done": 1} and things() == ["thing-1"]  # the lock was released


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the file lock is SQLite's")
def test_on_sqlite_a_run_skips_while_another_process_holds_the_lock_file(monkeypatch, settings, tmp_path) -> None:
    # The tests' database is in memory (one process); a database file is shared between processes,
    # which the lock file then guards.
    monkeypatch.setattr(connections["default"], "is_in_memory_db", lambda: False)
    settings.VAR_DIR = tmp_path
    behaviour.update(items=[1])
    path = Path(tmp_path) / "locks" / f"{PROBE}.lock"
    path.parent.mkdir(parents=True)
    with path.open("a") as other:  # another open file: to flock, another process
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.monotonic()
        assert probe() == {"skipped": "locked"}
        assert time.monotonic() - started < 1
        fcntl.flock(other, fcntl.LOCK_UN)

    assert probe() == {"done": 1} and things() == ["thing-1"]


@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor != "postgresql", reason="advisory locks are PostgreSQL's")
def test_on_postgres_a_run_skips_while_another_connection_holds_the_advisory_lock() -> None:
    behaviour.update(items=[1])
    held, release = threading.Event(), threading.Event()

    def other_worker() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_lock(%s)", [lock_key(PROBE)])
                held.set()
                release.wait(10)
                cursor.execute("SELECT pg_advisory_unlock(%s)", [lock_key(PROBE)])
        finally:
            connection.close()

    worker = threading.Thread(target=other_worker)
    worker.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        assert probe() == {"skipped": "locked"}
        assert time.monotonic() - started < 1
    finally:
        release.set()
        worker.join()

    assert probe() == {"done": 1} and things() == ["thing-1"]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_whose_database_session_ends_stops_rather_than_go_on_without_its_lock() -> None:
    """The server ends the run's session (a failover, a restart): its advisory lock goes with it.
    The failed item was swallowed, Django opened a new session for the next one, and the run went
    on without the lock, while the next beat's run took it: two settlement runs sent the same
    batch."""
    from core.locks import LockLost

    def end_the_session() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
        other = connections.create_connection("default")
        try:
            with other.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        finally:
            other.close()

    behaviour.update(items=[1, 2, 3], session_ends_at=2, session_end=end_the_session)

    with pytest.raises(LockLost):
        probe()

    assert things() == ["thing-1"]  # nothing more was done without the lock
    assert state().last_ok is False
    with try_lock(PROBE) as acquired:  # and the lock is free for the next run
        assert acquired


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_no_operator_transaction_goes_out_once_the_session_holding_the_settlement_lock_ended() -> None:
    """Checked again just before each send (billing.rewind.rewound_before_send): a session that
    ended within an item (between the run's rewind and its send) took the lock with it."""
    from django.db import OperationalError

    from billing.rewind import rewound_before_send
    from core.locks import LockLost

    with try_lock(SETTLEMENT_LOCK_NAME) as acquired:
        assert acquired
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
        other = connections.create_connection("default")
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        other.close()
        with pytest.raises(OperationalError), connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        connection.close()  # as Django does after a failed rollback; the next query opens a new session

        with pytest.raises(LockLost):
            rewound_before_send(client=None, what="settlement 1")  # type: ignore[arg-type]


def test_a_lock_is_not_taken_twice_in_one_process() -> None:
    with try_lock("tests.reentry") as first:
        with try_lock("tests.reentry") as second:
            assert (first, second) == (True, False)
        with try_lock("tests.other") as other:
            assert other
    with try_lock("tests.reentry") as again:
        assert again


SETTLEMENT_LOCK_TASKS = [
    (billing_tasks.reserve_budgets, billing_tasks.RESERVE_LOCK_TRIES, billing_tasks.RESERVE_LOCK_RETRY_S),
    (billing_tasks.settle, billing_tasks.CHAIN_LOCK_TRIES, billing_tasks.CHAIN_LOCK_RETRY_S),
    (billing_tasks.release_jobs_on_chain, billing_tasks.CHAIN_LOCK_TRIES, billing_tasks.CHAIN_LOCK_RETRY_S),
    (
        billing_tasks.reconcile_settlements,
        billing_tasks.CHAIN_LOCK_TRIES,
        billing_tasks.CHAIN_LOCK_RETRY_S,
    ),
]


def test_every_run_sharing_the_settlement_lock_is_listed_here() -> None:
    """A task added under the settlement lock without a retry could lose the race at each of its
    beats to the others (they fire at common instants) and never run."""
    from celery import current_app

    sharing = {
        name
        for name, task in current_app.tasks.items()
        if getattr(task, "periodic_lock", None) == billing_tasks.SETTLEMENT_LOCK
    }
    assert sharing == {task.name for task, _tries, _countdown in SETTLEMENT_LOCK_TASKS}


@pytest.mark.parametrize("task, tries, countdown", SETTLEMENT_LOCK_TASKS, ids=lambda v: getattr(v, "name", ""))
def test_a_locked_chain_run_is_sent_again_later_instead_of_skipping_or_sleeping(
    monkeypatch, task, tries, countdown
) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(task, "apply_async", lambda *args, **kwargs: sent.append(kwargs))
    monkeypatch.setattr(time, "sleep", lambda _s: pytest.fail("a worker slept waiting for the lock"))

    with try_lock(billing_tasks.SETTLEMENT_LOCK):
        task.push_request(id="first", called_directly=False, is_eager=False, retries=0)
        try:
            with pytest.raises(Retry):
                task.run()
        finally:
            task.pop_request()
        task.push_request(id="last", called_directly=False, is_eager=False, retries=tries)
        try:
            assert task.run() == {"skipped": "locked"}  # out of tries: the next beat runs it
        finally:
            task.pop_request()

    assert [kwargs["countdown"] for kwargs in sent] == [countdown]
    assert state(task.name).total_skipped == 2


def test_a_settlement_run_is_not_starved_by_reservation_runs_beat_fires_with_it(monkeypatch) -> None:
    """Beat fires `settle` and `reserve_budgets` at the same instant every 15 s; the reservation
    run takes the lock first. The settlement run must still run, a moment later."""
    ran: list[str] = []
    monkeypatch.setattr("billing.tasks._chain_run", lambda run: ran.append("settle") or {"sent": 0})
    retried: list[float] = []
    monkeypatch.setattr(
        billing_tasks.settle, "apply_async", lambda *args, **kwargs: retried.append(kwargs["countdown"])
    )

    with try_lock(billing_tasks.SETTLEMENT_LOCK):  # the reservation run, holding it
        billing_tasks.settle.push_request(id="beat", called_directly=False, is_eager=False, retries=0)
        try:
            with pytest.raises(Retry):
                billing_tasks.settle.run()
        finally:
            billing_tasks.settle.pop_request()
    assert ran == [] and retried == [billing_tasks.CHAIN_LOCK_RETRY_S]

    billing_tasks.settle.push_request(id="beat", called_directly=False, is_eager=False, retries=1)  # the retry
    try:
        assert billing_tasks.settle.run() == {"sent": 0}
    finally:
        billing_tasks.settle.pop_request()
    assert ran == ["settle"]


def test_the_console_shows_each_tasks_state_view_only() -> None:
    from django.test import Client
    from django.urls import reverse

    from tests.factories import UserFactory

    behaviour.update(items=[1], fail={1})
    probe()
    console = Client()
    console.force_login(UserFactory(is_staff=True, is_superuser=True))

    listing = console.get(reverse("admin:core_periodictaskstate_changelist"))
    detail = console.get(reverse("admin:core_periodictaskstate_change", args=[state().pk]))

    assert listing.status_code == detail.status_code == 200
    assert PROBE in listing.content.decode() and "ValueError: thing 1 is bad" in listing.content.decode()
    assert console.get(reverse("admin:core_periodictaskstate_add")).status_code == 403
