"""A database that cannot be reached is a 503 the client may retry, never a crash page.

When PostgreSQL is down (or drops the connection, or SQLite's file cannot be opened) the driver
raises OperationalError or InterfaceError wherever the first query happens: in a view (DRF's
authentication looks up the API token; the admin loads the session), or before the view, in a
middleware that resolves the user, or after it, when the session middleware saves the session.
Every one of those requests is answered by `database_unavailable_response`:

- under /api/ (renter, provider and agent APIs): 503 in the API's one error shape,
  {"code": "database_unavailable", "detail": "…"}, as application/json;
- elsewhere (the admin): 503 as plain text;
- both with `Retry-After: RETRY_AFTER_S`.

Two hooks reach it, because Django turns an exception into a response inside each middleware
layer, before any outer middleware could see it:

- `DatabaseUnavailableMiddleware.process_exception` for an exception a view raised (DRF re-raises
  what its exception handler does not answer, so API views come here too);
- `core.api.server_error` (handler500) for one raised by a middleware: Django calls it while that
  exception is being handled (WSGI), so it finds it in `sys.exc_info()`.

The failure is logged once per request at ERROR: the method, the path and the error's class and
message, scrubbed of URLs' credentials and of any `password=`; never the DSN. Django's own
"Service Unavailable" log line (with the traceback) is suppressed: the one line says it all.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any, TypeGuard

import psycopg
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse

from core import logcontext, prom
from core.errors import DatabaseUnavailable
from core.scrub import scrub

logger = logging.getLogger(__name__)

# Django wraps the driver's errors in its own classes; psycopg's are listed for a driver call made
# outside Django's wrapper. OperationalError covers the outage (connection refused or lost, the
# server shutting down, the file that cannot be opened) and also a cancelled statement or a lock
# timeout: each is worth retrying, which is what 503 with Retry-After says.
DATABASE_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
# How long a client is asked to wait before trying again: long enough for a restarting database
# or a failover, short enough that an agent's report is not held back long.
RETRY_AFTER_S = 5
DETAIL = "The database is unavailable; try again after Retry-After seconds."
_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
_LOGGED = "_gpgpu_database_unavailable_logged"


def is_database_unavailable(exc: BaseException | None) -> TypeGuard[Exception]:
    """Whether `exc` says the database cannot serve the request now (DATABASE_UNAVAILABLE_ERRORS)."""
    return isinstance(exc, DATABASE_UNAVAILABLE_ERRORS)


def describe_database_error(exc: BaseException) -> str:
    """The error's class and its first line, without credentials: fit for the log."""
    lines = str(exc).strip().splitlines()
    text = _PASSWORD.sub(r"\1[redacted]", scrub(lines[0] if lines else ""))
    return f"{type(exc).__name__}: {text}"[:300]


def database_unavailable_response(request: HttpRequest, exc: BaseException) -> HttpResponse:
    """The 503 for a request the database failed (see the module docstring), logged once."""
    if not getattr(request, _LOGGED, False):
        setattr(request, _LOGGED, True)
        logger.error(
            "database unavailable: %s %s answered 503 (%s)", request.method, request.path, describe_database_error(exc)
        )
    response: HttpResponse
    if request.path_info.startswith("/api/"):
        response = JsonResponse({"code": DatabaseUnavailable.default_code, "detail": DETAIL}, status=503)
    else:
        response = HttpResponse(
            "503 Service Unavailable: the database cannot be reached. Try again shortly.\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    response["Retry-After"] = str(RETRY_AFTER_S)
    # Logged above, in one line: Django's request logger would add the traceback, whose text
    # names the database's host and user.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


class DatabaseUnavailableMiddleware:
    """Answers a database connection error raised by a view with `database_unavailable_response`;
    other exceptions go on to Django's handling. First in MIDDLEWARE (after
    AgentApiErrorsMiddleware, which only counts answers): it only has process_exception, which
    Django calls innermost first, so no other middleware's answer is pre-empted."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if is_database_unavailable(exception):
            return database_unavailable_response(request, exception)
        return None


AGENT_API_PREFIX = "/api/agent/"
# The longest error body read back for its code: the error shape is a few hundred bytes.
_ERROR_BODY_MAX = 64 * 1024


def _error_code(response: HttpResponse) -> str:
    """The `code` of an error answer in the API's one shape; `http_<status>` when it has none."""
    data = getattr(response, "data", None)  # a DRF Response: its body before rendering
    if data is None and response.get("Content-Type", "").startswith("application/json"):
        content = getattr(response, "content", b"")
        if len(content) <= _ERROR_BODY_MAX:
            try:
                data = json.loads(content)
            except ValueError:
                data = None
    code = data.get("code") if isinstance(data, dict) else None
    return code if isinstance(code, str) and code else f"http_{response.status_code}"


class AgentApiErrorsMiddleware:
    """Counts every error answer (4xx, 5xx) under /api/agent/ by its code, for /metrics
    (core.prom): the views' refusals, the throttle's 429, an unknown URL's 404, the database's 503
    and a crash's 500 alike. Before the others in MIDDLEWARE (after RequestContextMiddleware), so
    the answers of the other middleware (the database's 503 included) pass through it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code >= 400 and request.path_info.startswith(AGENT_API_PREFIX):
            prom.agent_api_error_count(code=_error_code(response))
        return response


class RequestContextMiddleware:
    """Binds the request's log ids (core.logcontext) for everything the request logs: its id (the
    caller's `X-Request-ID` when it is a plain token, else a new one; echoed in the answer's
    `X-Request-ID`), then the `job_id`, `lease_id` and `machine_id` of its URL. The agent's
    machine is bound by its authentication (providers.auth). Cleared at request_finished."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = logcontext.request_id_from(request.headers.get("X-Request-ID"))
        # Bound until request_finished (core.apps), not only while the middleware runs: Django
        # logs a 4xx or 5xx answer after the middleware has returned it.
        logcontext.start(request_id=request_id)
        response = self.get_response(request)
        response["X-Request-ID"] = request_id
        return response

    def process_view(
        self, request: HttpRequest, view_func: Callable[..., Any], view_args: Any, view_kwargs: dict[str, Any]
    ) -> None:
        ids = {name: view_kwargs[name] for name in ("job_id", "lease_id", "machine_id") if name in view_kwargs}
        if ids:
            logcontext.bind(**ids)
