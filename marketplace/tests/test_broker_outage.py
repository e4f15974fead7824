"""A restart of Redis under a running worker: the project's worker (`celery -A marketplace
worker`, as docker-compose runs it) against a real redis-server of its own, stopped and started
again while the worker holds a message it has not acknowledged (a task retried with a
countdown, as every task whose lock is held is)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Connection

from core.tests.outage import free_port

ROOT = Path(__file__).resolve().parents[2]


class Redis:
    """A redis-server of the test's own on a free port, nothing persisted."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server is not None
        self.process = subprocess.Popen(  # noqa: S603 - the installed redis-server, our arguments
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
            except redis.ConnectionError:
                time.sleep(0.05)
            else:
                client.close()
                return
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI")
        pytest.skip("redis-server is not installed")
    server = Redis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _wait(
    worker: subprocess.Popen[bytes], log: Path, check: Callable[[str], bool], what: str, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check(log.read_text(errors="replace")):
            return
        status = worker.poll()
        assert status is None, f"the worker exited ({status}):\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"the worker's log never showed {what}:\n{log.read_text(errors='replace')[-4000:]}")


def test_a_worker_holding_a_retried_task_rides_out_a_redis_restart_and_takes_tasks_again(
    redis_server: Redis, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        "DEBUG": "true",
        "CELERY_BROKER_URL": redis_server.url,
        "REDIS_URL": redis_server.url,
        # Nothing in this test reaches the database: the tasks sent wait out their countdowns.
        "DATABASE_URL": f"sqlite:///{tmp_path / 'unused.sqlite3'}",
        "GPGPU_VAR_DIR": str(tmp_path / "var"),
    }
    celery = [sys.executable, "-m", "celery", "-A", "marketplace", "worker", "--concurrency", "1", "-l", "info"]
    with log.open("wb") as out:
        worker = subprocess.Popen(  # noqa: S603 - our own interpreter and app
            celery, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    # Sent through a connection of its own: CELERY_BROKER_URL (CI's Redis) would win over a
    # Celery app's broker argument.
    sender = Celery("test-broker-outage", set_as_current=False)
    broker = Connection(redis_server.url)
    try:
        _wait(worker, log, lambda text: " ready." in text, "that it was ready")
        held = str(uuid.uuid4())
        sender.send_task("marketplace.tasks.worker_heartbeat", task_id=held, countdown=600, connection=broker)
        _wait(worker, log, lambda text: f"[{held}] received" in text, "the held task received")

        redis_server.stop()
        _wait(worker, log, lambda text: "Connection to broker lost" in text, "the lost connection")
        time.sleep(2)  # down for a while: the worker retries meanwhile
        redis_server.start()

        # It connects again, and is still the same process.
        _wait(worker, log, lambda text: text.count("Connected to redis://") >= 2, "a second connection")
        assert worker.poll() is None, log.read_text(errors="replace")[-4000:]
        after = str(uuid.uuid4())
        sender.send_task("marketplace.tasks.worker_heartbeat", task_id=after, countdown=600, connection=broker)
        _wait(worker, log, lambda text: f"[{after}] received" in text, "a task sent after the restart received")
        assert worker.poll() is None
        assert "Unrecoverable error" not in log.read_text(errors="replace")
    finally:
        broker.release()
        sender.close()
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A port whose SYNs go unanswered, as a broker host that is down or cut off: a listener
    that never accepts, its queue full (Linux then drops further SYNs, and a connect waits for
    the kernel's SYN retries, about two minutes)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for sock in [*fillers, server]:
            sock.close()


_SEND = """
import django, time
django.setup()
from marketplace.celery import app
started = time.monotonic()
try:
    app.send_task("marketplace.tasks.worker_heartbeat", countdown=600)
except Exception as exc:
    print("refused", type(exc).__name__, round(time.monotonic() - started, 1))
else:
    print("sent")
"""


def test_a_publish_to_a_broker_that_does_not_answer_gives_up_within_seconds(tmp_path: Path) -> None:
    """A web request queues its task after its commit (a submitted job's matching run). With
    the broker's host down, each try of the publish waited for the kernel's SYN retries: the
    request was held over two minutes (135 s measured) though the database and the cache
    answered. The project's Celery app, as web configures it from the environment, gives up
    in seconds, and the beat schedule does the work."""
    with _silent_listener() as port:
        env = {
            **os.environ,
            "DEBUG": "true",
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'unused.sqlite3'}",
            "GPGPU_VAR_DIR": str(tmp_path / "var"),
        }
        started = time.monotonic()
        sent = subprocess.run(  # noqa: S603 - our own interpreter and app
            [sys.executable, "-c", _SEND], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        took = time.monotonic() - started
    assert sent.returncode == 0, sent.stderr[-4000:]
    assert sent.stdout.split()[:2] == ["refused", "OperationalError"], sent.stdout + sent.stderr[-2000:]
    assert took < 30, f"the publish was held {took:.0f} s"
