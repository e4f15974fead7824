"""/healthz: is the database reachable, and the Celery broker? Says which failed."""

from __future__ import annotations

import time

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_broker() -> str | None:
    from marketplace.celery import app

    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            # A connection that opens is not enough for Redis: ask the server something.
            conn.default_channel  # noqa: B018 - opening the channel talks to the broker
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


@require_GET
def healthz(request):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    checks = {"database": _check_database(), "broker": _check_broker()}
    failed = {name: err for name, err in checks.items() if err}
    body = {
        "status": "ok" if not failed else "unavailable",
        "checks": {name: ("ok" if err is None else f"failed: {err}") for name, err in checks.items()},
        "database_vendor": connection.vendor,
        "broker": settings.CELERY_BROKER_URL.split("://", 1)[0],
        "seconds": round(time.monotonic() - started, 3),
    }
    return JsonResponse(body, status=200 if not failed else 503)
