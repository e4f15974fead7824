"""/healthz: is the database reachable, and the Celery broker? Says which failed.

Public (load balancers and container health checks call it), so the answer names the failed
dependency and the kind of error, never its text: a driver's message may hold a host, a port,
a user name or a password. The full error goes to the log.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

if TYPE_CHECKING:
    # For the type only: the Celery app is imported when a probe first needs it (_broker_app).
    from celery import Celery

logger = logging.getLogger(__name__)


def _failure(dependency: str, exc: Exception) -> str:
    """The public description of a failed check (the exception's class name only); the
    exception itself is logged."""
    logger.warning("/healthz: the %s check failed: %s: %s", dependency, type(exc).__name__, exc)
    return type(exc).__name__


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any failure is reported, not raised
        return _failure("database", exc)
    return None


# A probe must answer before the load balancer gives up on it: one retry after a short pause
# (a blip is not an outage), each attempt bounded.
BROKER_CONNECT_TIMEOUT_S = 2.0
BROKER_RETRY_PAUSE_S = 0.2


def _broker_app() -> Celery:
    from marketplace.celery import app

    return app


def _check_broker() -> str | None:
    app = _broker_app()
    try:
        with app.connection_for_write(connect_timeout=BROKER_CONNECT_TIMEOUT_S) as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=BROKER_RETRY_PAUSE_S, timeout=2 * BROKER_CONNECT_TIMEOUT_S
            )
            # A connection that opens is not enough for Redis: ask the server something.
            conn.default_channel  # noqa: B018 - opening the channel talks to the broker
    except Exception as exc:  # any failure is reported, not raised
        return _failure("broker", exc)
    return None


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 {"status": "ok", ...} when the database answers a query and the Celery broker
    accepts a connection; otherwise 503 {"status": "unavailable", "checks": {name: "failed:
    <error class>"}} naming each failed dependency. Unauthenticated: it reveals no data, only
    reachability: no host, port, user name or error text (those are logged)."""
    started = time.monotonic()
    checks = {"database": _check_database(), "broker": _check_broker()}
    failed = {name: err for name, err in checks.items() if err}
    body = {
        "status": "ok" if not failed else "unavailable",
        "checks": {name: ("ok" if err is None else f"failed: {err}") for name, err in checks.items()},
        "database_vendor": connection.vendor,
        # The scheme only: the URL may carry a password.
        "broker": str(_broker_app().conf.broker_url or settings.CELERY_BROKER_URL).split("://", 1)[0],
        "seconds": round(time.monotonic() - started, 3),
    }
    return JsonResponse(body, status=200 if not failed else 503)
