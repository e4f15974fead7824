"""Request rates for the HTTP API, and the admin login's lockout answer.

Every API view (renter, provider and agent) gets two DRF throttles from
REST_FRAMEWORK["DEFAULT_THROTTLE_CLASSES"]; the views are not touched:

- PrincipalRateThrottle: one budget per credential. A machine credential (`request.auth` is the
  Machine, see providers.auth) counts against scope `machine`, a person's API token (only
  operators issue them) or session against `user`, anything unauthenticated against `anon`, per
  client address. A credential is known by its row and its digest, so a rotated credential (or a
  row id the database hands out again) starts afresh.
  A machine's log chunks (URL name in LOG_URL_NAMES) count against a budget of their own,
  scope `machine_logs`: a chatty job's output never throttles its machine's heartbeats.
- RegisterRateThrottle: the agent's register endpoint (found by URL name, not by view), per client
  address, scope `register`: registration tokens are guessed there.
- RotateRateThrottle: a machine's credential rotation, per machine (its row, whatever its
  credential), scope `machine_rotate`: each rotation starts the machine's other budgets afresh
  (they are per credential), so without a budget of its own a machine rotating every 600
  requests had no rate at all, and each rotation writes a revocation row.

Rates come from settings.THROTTLE_RATES (THROTTLE_USER, THROTTLE_MACHINE, THROTTLE_MACHINE_LOGS,
THROTTLE_ANON, THROTTLE_REGISTER, THROTTLE_MACHINE_ROTATE), read per request;
THROTTLE_ENABLED=false switches them all off (benchmarks).
Counters live in the default cache: Redis when REDIS_URL is set, so every web worker shares
them. There each budget is a Redis list of its requests' times, newest first, kept by one Lua
script (`LOG_SCRIPT`: DRF's sliding log, in one round trip and atomic, where DRF reads a pickled
list and writes it back, and two requests at once could both pass as one); elsewhere (one
process's memory) DRF's own. A request over its rate is refused before the view runs with 429
{"code": "throttled", "detail": …} and a Retry-After header (core.api.exception_handler).

Throttles run after authentication (DRF's order): a request with an invalid credential is
answered 401 without being counted.

The admin login's lockout is django-axes (settings AXES_*); admin_lockout_response is what a
locked-out login is answered.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import redis
from django.conf import settings
from django.core.cache import caches
from django.http import HttpRequest, HttpResponse
from rest_framework.throttling import SimpleRateThrottle

from core.cache import RedisCache
from core.timespans import whole_seconds

if TYPE_CHECKING:
    # For the types only: DRF imports this module (DEFAULT_THROTTLE_CLASSES) while it defines APIView.
    from rest_framework.request import Request
    from rest_framework.views import APIView

logger = logging.getLogger(__name__)

# The URL names (providers/agent_urls.py) of the endpoints RegisterRateThrottle guards.
REGISTER_URL_NAMES = frozenset({"agent-register"})
# The URL names (jobs/agent_urls.py) of the agent's log shipping, which has a budget of its own.
LOG_URL_NAMES = frozenset({"agent-lease-logs"})
# The URL names (providers/agent_urls.py) of the endpoints RotateRateThrottle guards.
ROTATE_URL_NAMES = frozenset({"agent-credential-rotate"})

# What a cache backend raises when its server is unreachable.
_CACHE_ERRORS: tuple[type[BaseException], ...] = (OSError, redis.RedisError)
# One warning per this many seconds while the cache is down, not one per request.
_CACHE_WARNING_EVERY_S = 60.0
_cache_warned_at = -math.inf


def client_ip(request: HttpRequest) -> str:
    """The client's address: the connection's (REMOTE_ADDR), or with TRUSTED_PROXIES = n > 0 the
    n-th address from the right of X-Forwarded-For (each trusted proxy appends the address it
    received the request from, so the entries left of it are whatever the client sent).

    Works on a Django HttpRequest and on a DRF Request; django-axes calls it too
    (AXES_CLIENT_IP_CALLABLE), so the lockout and the rate limits see the same address."""
    remote = str(request.META.get("REMOTE_ADDR") or "")
    proxies = settings.TRUSTED_PROXIES
    if proxies:
        hops = [hop.strip() for hop in str(request.META.get("HTTP_X_FORWARDED_FOR") or "").split(",")]
        hops = [hop for hop in hops if hop]
        if hops:
            return hops[-min(proxies, len(hops))]
    return remote


# A sliding log of request times (epoch seconds), newest first. KEYS[1] the log; ARGV: now,
# duration, the most requests allowed in it. Answers {1 allowed or 0, requests in the window,
# the oldest's time ('' when allowed)}, as DRF's SimpleRateThrottle decides. Also run by
# providers.heartbeat_steady's script, which inlines it.
LOG_SCRIPT_BODY = """
local function throttle_log(key, now, duration, limit)
  local cutoff = now - duration
  while true do
    local oldest = redis.call('LINDEX', key, -1)
    if not oldest or tonumber(oldest) > cutoff then break end
    redis.call('RPOP', key)
  end
  local n = redis.call('LLEN', key)
  if n >= limit then
    return {0, n, redis.call('LINDEX', key, -1)}
  end
  redis.call('LPUSH', key, tostring(now))
  redis.call('EXPIRE', key, math.ceil(duration))
  return {1, n + 1, ''}
end
"""
LOG_SCRIPT = LOG_SCRIPT_BODY + "return throttle_log(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))"
# The suffix of a budget's list: not the key DRF's pickled history would be under.
LOG_SUFFIX = ":log"

_log_scripts: dict[int, Any] = {}  # id of a redis.Redis -> its registered script


def redis_log() -> tuple[Any, Any] | None:
    """(redis.Redis, its registered LOG_SCRIPT) when the default cache is the project's Redis
    cache; None otherwise (DRF's own log is used)."""
    backend = caches["default"]
    if not isinstance(backend, RedisCache):
        return None
    client = backend._cache.get_client(write=True)
    script = _log_scripts.get(id(client))
    if script is None:
        script = _log_scripts[id(client)] = client.register_script(LOG_SCRIPT)
    return client, script


def log_key(key: str) -> str:
    """The Redis key of the budget DRF would keep under cache key `key`."""
    return caches["default"].make_key(key) + LOG_SUFFIX


def _cache_key(scope: str, ident: str) -> str:
    """The cache key of the budget (scope, ident), as DRF's SimpleRateThrottle names it."""
    return SimpleRateThrottle.cache_format % {"scope": scope, "ident": ident}


@functools.cache
def _parsed_rate(rate: str) -> tuple[int, int]:
    """(requests, seconds) of a rate as settings write it ("600/min"), as DRF parses it."""
    count, duration = SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]  # parse_rate reads no state
    return int(count or 0), int(duration or 0)


def budget(scope: str, ident: str) -> tuple[str, float, int] | None:
    """The Redis log of the budget (scope, ident) as the throttles below keep it: (its key,
    duration in seconds, requests allowed in it); None when no limit applies (throttles off, or
    no rate for the scope). For code that counts a request against it without DRF's throttles
    (providers.heartbeat_steady's script)."""
    if not settings.THROTTLE_ENABLED or (rate := settings.THROTTLE_RATES.get(scope)) is None:
        return None
    count, duration = _parsed_rate(rate)
    return log_key(_cache_key(scope, ident)), float(duration), count


def _warn_cache_down(scope: str) -> None:
    global _cache_warned_at
    now = time.monotonic()
    if now - _cache_warned_at >= _CACHE_WARNING_EVERY_S:
        _cache_warned_at = now
        logger.warning(
            "the rate-limit cache is unreachable: requests are let through unthrottled (scope %s)",
            scope,
            exc_info=True,
        )


class _SettingsRateThrottle(SimpleRateThrottle):
    """A SimpleRateThrottle whose scope and identity a subclass picks per request
    (scope_and_ident) and whose rate is read from settings.THROTTLE_RATES at that moment, so a
    test or an operator's override applies without re-importing anything.

    When the cache cannot be reached the request is let through (and a warning logged): the
    rate limits are a guard, and a Redis outage must not take the API down with it."""

    def __init__(self) -> None:
        # SimpleRateThrottle reads a fixed rate here; ours depends on the request.
        self.rate: str | None = None
        self.ident = ""
        # What the Redis log answered: (requests in the window, the oldest's time), for wait().
        self._logged: tuple[int, float | None] | None = None

    def scope_and_ident(self, request: Request) -> tuple[str, str] | None:
        """(scope, identity) the request counts against, or None when this throttle does not apply."""
        raise NotImplementedError

    def allow_request(self, request: Request, view: APIView) -> bool:
        if not settings.THROTTLE_ENABLED:
            return True
        found = self.scope_and_ident(request)
        if found is None:
            return True
        self.scope, self.ident = found
        self.rate = settings.THROTTLE_RATES.get(self.scope)
        if self.rate is None:
            return True
        self.num_requests, self.duration = self.parse_rate(self.rate)
        self._logged = None
        try:
            log = redis_log()
            if log is None:
                return super().allow_request(request, view)
            _client, script = log
            self.now = self.timer()
            key = log_key(self.get_cache_key(request, view))
            allowed, count, oldest = script(keys=[key], args=[repr(self.now), self.duration, self.num_requests])
            self._logged = (int(count), float(oldest) if oldest else None)
            return bool(allowed)
        except _CACHE_ERRORS:
            _warn_cache_down(self.scope)
            return True

    def wait(self) -> float | None:
        """Seconds until a request would be allowed again, as DRF's SimpleRateThrottle.wait
        computes it (from the Redis log when that decided)."""
        if self._logged is None:
            return super().wait()
        count, oldest = self._logged
        duration, limit = float(self.duration or 0), int(self.num_requests or 0)  # set by allow_request
        remaining = duration - (self.now - oldest) if oldest is not None else duration
        available = limit - count + 1
        if available <= 0:
            return None
        return remaining / float(available)

    def get_cache_key(self, request: Request, view: APIView) -> str:
        return _cache_key(str(self.scope), self.ident)  # the scope is set by allow_request


class PrincipalRateThrottle(_SettingsRateThrottle):
    """Per machine credential (scope machine), per person's API token or session (user), else
    per client address (anon). A credential that has its own limit (a machine's, a person's API
    token) says so with a `throttle_key()` method answering (scope, key)."""

    def scope_and_ident(self, request: Request) -> tuple[str, str]:
        throttle_key = getattr(request.auth, "throttle_key", None)
        if callable(throttle_key):
            scope, key = throttle_key()
            match = getattr(request, "resolver_match", None)
            if scope == "machine" and match is not None and match.url_name in LOG_URL_NAMES:
                return "machine_logs", key
            return scope, key
        user = request.user
        if user is not None and user.is_authenticated:
            return "user", f"session{user.pk}"
        return "anon", client_ip(request)


class RegisterRateThrottle(_SettingsRateThrottle):
    """The agent's register endpoint, per client address (scope register)."""

    def scope_and_ident(self, request: Request) -> tuple[str, str] | None:
        match = getattr(request, "resolver_match", None)
        if match is None or match.url_name not in REGISTER_URL_NAMES:
            return None
        return "register", client_ip(request)


class RotateRateThrottle(_SettingsRateThrottle):
    """A machine's credential rotation, per machine row (scope machine_rotate)."""

    def scope_and_ident(self, request: Request) -> tuple[str, str] | None:
        match = getattr(request, "resolver_match", None)
        machine_id = getattr(request.auth, "pk", None)
        if match is None or match.url_name not in ROTATE_URL_NAMES or machine_id is None:
            return None
        return "machine_rotate", f"machine{machine_id}"


def admin_lockout_response(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: dict | None = None
) -> HttpResponse:
    """django-axes' answer to a login refused because of too many failures
    (AXES_LOCKOUT_CALLABLE): 429, Retry-After, and a sentence that says so. Every attempt during
    the lockout starts the cool-off again, so the wait is always the whole cool-off."""
    seconds = whole_seconds(settings.AXES_COOLOFF_TIME)
    minutes = max(1, math.ceil(seconds / 60))
    response = HttpResponse(
        f"Too many failed logins: logging in is locked for {minutes} minutes, even with the right "
        "password, and every attempt meanwhile starts the wait again. An operator can lift the lock sooner.\n",
        status=settings.AXES_HTTP_RESPONSE_CODE,
        content_type="text/plain; charset=utf-8",
    )
    response["Retry-After"] = str(seconds)
    return response
