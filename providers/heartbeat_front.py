"""Steady heartbeats answered in front of Django: a WSGI layer around the marketplace's app.

A steady heartbeat (providers.heartbeat_steady) is answered by one Redis script; going through
Django's handler and its twelve middlewares first (the request object, URL resolution, sessions,
CSRF, the messages, django-axes, DRF's dispatch) cost more than the answer itself: in one
process, 0.39 of the 1.07 ms of CPU a steady heartbeat took. This layer sees a POST to the
heartbeat's path before Django does and tries `agent_apis.steady_reply` on it, with what the
middlewares would have done to it first:

- the host checked against ALLOWED_HOSTS (Django answers 400 for another), and a request that
  SECURE_SSL_REDIRECT, PREPEND_WWW or DISALLOWED_USER_AGENTS would redirect or refuse left to
  Django;
- a body longer than DATA_UPLOAD_MAX_MEMORY_SIZE, or without a length, not read (Django answers
  413 or 400);
- the answer's headers those of Django's answer: Content-Type, Content-Length, X-Request-ID (the
  caller's when it is a plain token, as core.middleware echoes it) and whatever Django's
  SecurityMiddleware and XFrameOptionsMiddleware add to it (run on the answer, as Django runs
  them);
- the heartbeat counted in /metrics (core.prom) as the view counts it.

Anything else, any heartbeat the steady answer declines, and one whose steady answer failed
(logged), goes to Django unchanged, its body re-readable, marked so that the view does not try
the steady answer a second time.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.handlers.wsgi import WSGIRequest
from django.http import HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import get_resolver

from core import logcontext, prom
from providers.agent_apis import STEADY_TRIED, steady_enabled, steady_reply, steady_response

logger = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _unused(request: Any) -> HttpResponse:
    raise AssertionError("the front runs only the middlewares' process_response")


class SteadyHeartbeats:
    """A WSGI app: `app` with steady heartbeats answered before it (see the module's docstring)."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        # The heartbeat's PATH_INFO: its URL without the script prefix (SCRIPT_NAME), which Django
        # strips the same way. Resolved here, as the process starts, not by its first requests:
        # Django builds its URL resolver's reverse index lazily and without a lock, so every
        # thread of a worker's first burst (hundreds of held orders/wait calls) built it again,
        # seconds of CPU each time a worker started (benchmarks/doorbell.py).
        self.path = "/" + get_resolver().reverse("agent-heartbeat")
        # Built once, as Django's handler builds its middlewares (they read their settings then).
        self._security = SecurityMiddleware(_unused)
        self._x_frame_options = XFrameOptionsMiddleware(_unused)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") != self.path:
            return self.app(environ, start_response)
        started = time.perf_counter()
        try:
            response = self._answer(environ)
        except Exception:  # a fault here must not cost the agent its answer: Django's handler gives it
            logger.exception("steady heartbeat: the front failed, Django answers")
            response = None
        if response is None:
            environ[STEADY_TRIED] = True
            return self.app(environ, start_response)
        start_response(f"200 {response.reason_phrase}", list(response.items()))
        prom.heartbeat_observe(outcome=prom.heartbeat_outcome(200), seconds=time.perf_counter() - started)
        return [response.content]

    def _answer(self, environ: dict[str, Any]) -> HttpResponse | None:
        if settings.PREPEND_WWW or settings.DISALLOWED_USER_AGENTS or not steady_enabled():
            return None
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return None
        if not 0 < length <= settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            return None
        # Read once (within the limit), and put back for Django should the steady answer decline.
        body = environ["wsgi.input"] = io.BytesIO(environ["wsgi.input"].read(length))
        try:
            return self._steady(WSGIRequest(environ))
        finally:
            body.seek(0)

    def _steady(self, request: WSGIRequest) -> HttpResponse | None:
        try:
            request.get_host()
        except DisallowedHost:
            return None  # Django answers 400 (and logs it)
        if settings.SECURE_SSL_REDIRECT and not request.is_secure():
            return None
        reply = steady_reply(request)
        if reply is None:
            return None
        response = steady_response(reply)
        response["Content-Length"] = str(len(reply))  # as CommonMiddleware sets it
        response = self._security.process_response(request, response)
        response = self._x_frame_options.process_response(request, response)
        response["X-Request-ID"] = logcontext.request_id_from(request.META.get("HTTP_X_REQUEST_ID"))
        return response
