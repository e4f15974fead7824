"""The Celery application: tasks are discovered in each app's tasks.py."""

import os
from contextvars import Token

from celery import Celery
from celery.signals import task_postrun, task_prerun

from core import logcontext

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")

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
