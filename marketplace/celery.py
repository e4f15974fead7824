"""The Celery application: tasks are discovered in each app's tasks.py."""

import os
from contextvars import Token
from typing import Any

import redis.exceptions
from celery import Celery
from celery.signals import task_postrun, task_prerun
from kombu.transport import redis as kombu_redis

from core import logcontext

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")


def _detached_channel_raises_a_connection_error() -> None:
    """A worker holding a message it has not acknowledged (a task retried with a countdown, as
    every task whose lock is held is) must ride out a restart of Redis, not exit.

    On a lost broker connection, Celery 5.7's consumer collects the connection, which detaches
    its transport (`transport.client = None`), then closes it; closing the channel puts the
    unacknowledged messages back, which needs a Redis client, whose parameters kombu 5.7 reads
    from the detached transport: AttributeError, not one of the connection errors the close
    ignores, and the worker stops ("Unrecoverable error", exit status 1) instead of
    reconnecting. A detached channel now raises a connection error there, which the close
    ignores as it would a refused connection; the messages stay in Redis's unacknowledged set
    (when Redis kept them), which hands them out again after the visibility timeout, as after a
    worker's crash; beat's next runs do not wait for that
    (marketplace/tests/test_broker_outage.py; the fault suite's redis-restart phase).
    """
    connparams = kombu_redis.Channel._connparams

    def _connparams(self: kombu_redis.Channel, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection was closed")
        return connparams(self, *args, **kwargs)

    # A method replaced on kombu's class: the one place the parameters are read.
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


_detached_channel_raises_a_connection_error()

app = Celery("marketplace")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


# Every log line a task writes carries its task id as its request id (core.logcontext).
_task_log_ids: dict[str, Token[dict[str, object]]] = {}


@task_prerun.connect
def _bind_task_log_ids(task_id: str | None = None, **_: object) -> None:
    if task_id:
        _task_log_ids[task_id] = logcontext.bind(request_id=task_id)


@task_postrun.connect
def _reset_task_log_ids(task_id: str | None = None, **_: object) -> None:
    token = _task_log_ids.pop(task_id or "", None)
    if token is not None:
        logcontext.reset(token)
