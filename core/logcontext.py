"""The ids a log line is about: the request (or Celery task), the machine, the lease and the job.

A request binds, until Django's request_finished, its id (core.middleware.RequestContextMiddleware:
the caller's `X-Request-ID` when it is a plain token, else a new one, echoed in the answer), the ids in its URL
(`job_id`, `lease_id`, `machine_id`) and, once authenticated, the agent's machine; a Celery task
binds its task id. `ContextFilter`, on the console handler, copies them onto every record, so
`LOG_FORMAT=json` writes them as fields of each line (null where they do not apply), and
`logging` calls anywhere say which request, machine, lease and job they were made for without
passing the ids along. Context variables: threads (granian's, runserver's) and tasks keep their own.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

IDS = ("request_id", "machine_id", "lease_id", "job_id")
# A caller's X-Request-ID is kept only when it is a plain token (no spaces, quotes or control
# characters to forge log fields with), else a new one is made.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

_bound: ContextVar[dict[str, object]] = ContextVar("gpgpu_log_ids", default={})  # noqa: B039 - never mutated


def current() -> dict[str, object]:
    """The ids bound now."""
    return dict(_bound.get())


def bind(**ids: object) -> Token[dict[str, object]]:
    """Bind these ids (added to those bound); `reset(token)` puts back what was bound before."""
    unknown = set(ids) - set(IDS)
    if unknown:
        raise ValueError(f"not a log id: {', '.join(sorted(unknown))}")
    return _bound.set({**_bound.get(), **{k: v for k, v in ids.items() if v is not None}})


def reset(token: Token[dict[str, object]]) -> None:
    _bound.reset(token)


@contextmanager
def bound(**ids: object) -> Iterator[None]:
    token = bind(**ids)
    try:
        yield
    finally:
        reset(token)


def start(**ids: object) -> None:
    """Begin a unit of work (a request): these ids, and nothing left from an earlier one."""
    _bound.set({})
    bind(**ids)


def clear(**_: object) -> None:
    """End it (Django's request_finished: after the request's own 4xx/5xx log line)."""
    _bound.set({})


def request_id_from(header: str | None) -> str:
    """The caller's request id when it is a plain token, else a new one."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class ContextFilter(logging.Filter):
    """Puts the bound ids on each record (None where unbound), unless the call gave its own
    (`logger.info(..., extra={"lease_id": 7})`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _bound.get()
        for name in IDS:
            if not hasattr(record, name):
                setattr(record, name, ids.get(name))
        return True


__all__ = ["IDS", "ContextFilter", "bind", "bound", "clear", "current", "request_id_from", "reset", "start"]
