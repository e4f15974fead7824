"""Settings for the GPGPU marketplace.

Every setting comes from the environment, with an embedded default that runs the whole
system on a laptop with no servers: SQLite, a filesystem Celery broker and (for billing) a
local chain. The README's settings table lists each variable.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("GPGPU_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use true/false)")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}")
    return value


def env_divisor(name: str, default: int, *, of: int) -> int:
    value = env_int(name, default, minimum=1)
    if of % value:
        raise ImproperlyConfigured(f"{name}={value} must divide {of}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (os.environ.get(name) or default).strip()
    if raw not in choices:
        raise ImproperlyConfigured(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_rate(name: str, default: str) -> str | None:
    """A request rate "<count>/<period>" (period: s, min, h or day, as DRF's throttles read
    them), or None for "off" (no limit)."""
    raw = (os.environ.get(name) or default).strip().lower()
    if raw in {"off", "none"}:
        return None
    if not re.fullmatch(r"[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)", raw):
        raise ImproperlyConfigured(f"{name}={raw!r} is not a rate (use e.g. 600/min, 20/minute, 5000/hour or off)")
    return raw


def env_lockout_parameters(name: str, default: str) -> list[str | list[str]]:
    """django-axes' AXES_LOCKOUT_PARAMETERS from "username+ip_address,ip_address": commas
    separate alternatives (each counted on its own), "+" joins a combination."""
    parameters: list[str | list[str]] = []
    for item in env_list(name, []) or [default]:
        parts = [part.strip() for part in item.split("+")]
        if any(part not in {"username", "ip_address", "user_agent"} for part in parts):
            raise ImproperlyConfigured(
                f"{name}={item!r}: use username, ip_address or user_agent, joined by + for a combination "
                "and by commas for alternatives"
            )
        parameters.append(parts[0] if len(parts) == 1 else parts)
    return parameters


DEBUG = env_bool("DEBUG", False)
# pytest-django imports these settings inside pytest, before any conftest could set the
# environment. A test run is no deployment: it gets a random key (below) and a cache namespace
# of its own, so that two runs on one Redis never share rate-limit counters. No server process
# imports pytest.
RUNNING_TESTS = "pytest" in sys.modules
DEV_SECRET_KEY = "dev-insecure-gpgpu-secret-key-change-me-0123456789abcdef"  # noqa: S105 - DEBUG only
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not DEBUG and SECRET_KEY == DEV_SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY is the public development key; set a long random one (DEBUG is off)")
if not SECRET_KEY:
    if DEBUG:
        # Development (./scripts/demo sets DEBUG=true) only.
        SECRET_KEY = DEV_SECRET_KEY
    elif RUNNING_TESTS:
        SECRET_KEY = secrets.token_urlsafe(50)
    else:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set and DEBUG is off: set SECRET_KEY to a long random value, e.g. "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(50))' (or DEBUG=true for development)"
        )

# /metrics (marketplace.metrics) answers only `Authorization: Bearer <METRICS_TOKEN>`; unset, it is off.
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "").strip()
if METRICS_TOKEN and len(METRICS_TOKEN) < 32:
    raise ImproperlyConfigured(
        "METRICS_TOKEN is shorter than 32 characters: use a long random value, e.g. "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    "core",
    "accounts",
    "providers",
    "jobs",
    "billing",
    "marketplace",
]

MIDDLEWARE = [
    # The request's id (X-Request-ID) and the ids in its URL on every log line it makes.
    "core.middleware.RequestContextMiddleware",
    # Counts the agent API's error answers for /metrics, whichever layer below gave them.
    "core.middleware.AgentApiErrorsMiddleware",
    # A database connection error raised by a view answers 503 (JSON under /api/), not a crash.
    "core.middleware.DatabaseUnavailableMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # WhiteNoise, its static files found once per process (core/staticfiles.py).
    "core.staticfiles.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out login into core.throttling's answer.
    "axes.middleware.AxesMiddleware",
]

# django-axes first: it refuses a locked-out login before the password is even checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "marketplace.urls"
WSGI_APPLICATION = "marketplace.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # The console's base template (its stylesheet on every admin page): looked up before the
        # apps' templates, where django.contrib.admin's own would win.
        "DIRS": [BASE_DIR / "marketplace" / "console_templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: DATABASE_URL (postgres://user:pass@host:5432/name) or SQLite under var/.
VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'gpgpu.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (web, worker, beat) share the file: wait for locks instead of failing,
    # and take the write lock at BEGIN so a read-then-write transaction cannot deadlock.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A PostgreSQL that drops packets answers the request with a quick 503 (core.middleware),
    # not after the operating system's minutes-long TCP timeout.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env_int("DATABASE_CONNECT_TIMEOUT_S", 5, minimum=1)
    )
    # DATABASE_POOL_MAX_SIZE > 0: each process keeps a pool of at most that many connections
    # (psycopg_pool), which its threads borrow per request. A threaded web server (granian's
    # blocking threads, hundreds of them, most of them holding agents' orders/wait calls) then
    # opens a bounded number of connections instead of one per thread; a request waits up to
    # DATABASE_POOL_TIMEOUT_S for one (then 503). Connections are not kept per thread with a pool.
    DATABASE_POOL_MAX_SIZE = env_int("DATABASE_POOL_MAX_SIZE", 0, minimum=0)
    if DATABASE_POOL_MAX_SIZE:
        DATABASES["default"]["OPTIONS"]["pool"] = {
            "min_size": min(2, DATABASE_POOL_MAX_SIZE),
            "max_size": DATABASE_POOL_MAX_SIZE,
            "timeout": env_int("DATABASE_POOL_TIMEOUT_S", 10, minimum=1),
        }
        DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
# Times to the second with the zone in the console (marketplace/formats).
FORMAT_MODULE_PATH = ["marketplace.formats"]
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "staticfiles"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    # Jobs' checkpoints (jobs.checkpoints): local files by default (the demo, one server); an
    # S3-compatible bucket when CHECKPOINT_S3_BUCKET is set (below).
    "checkpoints": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": os.environ.get("CHECKPOINT_ROOT", str(BASE_DIR / "var" / "checkpoints")),
            "file_permissions_mode": 0o600,
            "directory_permissions_mode": 0o700,
        },
    },
}
if os.environ.get("CHECKPOINT_S3_BUCKET"):
    # django-storages' S3Storage (boto3): AWS S3, MinIO (docker-compose), any S3-compatible store.
    # Private objects; the agents read and write them by pre-signed URLs valid CHECKPOINT_URL_TTL_S:
    # the agent of the job's next lease fetches the archive straight from the store, and an agent
    # saving one PUTs it there with its size and SHA-256 signed into the URL (the store refuses
    # other bytes), then the marketplace checks the object before it becomes the job's checkpoint
    # (jobs.checkpoints; CHECKPOINT_DIRECT_UPLOAD=false sends uploads through the marketplace).
    STORAGES["checkpoints"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": os.environ["CHECKPOINT_S3_BUCKET"],
            # Empty: AWS. For MinIO, its address as the agents reach it (pre-signed URLs name it).
            "endpoint_url": os.environ.get("CHECKPOINT_S3_ENDPOINT_URL") or None,
            "region_name": os.environ.get("CHECKPOINT_S3_REGION") or None,
            # Empty: boto3's own chain (instance role, AWS_* variables, ~/.aws).
            "access_key": os.environ.get("CHECKPOINT_S3_ACCESS_KEY_ID") or None,
            "secret_key": os.environ.get("CHECKPOINT_S3_SECRET_ACCESS_KEY") or None,
            "addressing_style": os.environ.get("CHECKPOINT_S3_ADDRESSING_STYLE") or None,
            "signature_version": "s3v4",
            "default_acl": None,
            "querystring_auth": True,
            "querystring_expire": env_int("CHECKPOINT_URL_TTL_S", 120, minimum=10),
            "file_overwrite": False,
        },
    }
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# Serve app static files straight from their apps when collectstatic has not run (dev, tests).
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Raw tokens are shown once in an admin message: keep messages server-side, not in a cookie.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

# TLS=true declares that clients reach the marketplace over HTTPS (directly or through a TLS
# proxy): plain HTTP is redirected, browsers are told to use HTTPS only (HSTS) and cookies are
# sent over HTTPS only. /livez, /readyz, /healthz and /metrics are exempt from the redirect: probes
# and Prometheus inside the network speak plain HTTP.
TLS = env_bool("TLS", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", TLS)
SECURE_REDIRECT_EXEMPT = [r"^(livez|readyz|healthz|metrics)$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600 if TLS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", TLS)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", TLS)
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", TLS)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# X-Forwarded-Proto says "this came in over HTTPS" only when a proxy we trust sets it: a client
# reaching the web server directly could send it too.
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# How many proxies in front of the web server append to X-Forwarded-For. 0: the client's address
# is the connection's (REMOTE_ADDR) and X-Forwarded-For, which anyone can send, is ignored.
# Rate limits per address and the admin lockout use it (core.throttling.client_ip).
TRUSTED_PROXIES = env_int("TRUSTED_PROXIES", 0)

# The caches: Redis when REDIS_URL is set (shared by every web worker: the rate limits' counters
# live there), else this process's memory. A short socket timeout, so that a Redis outage slows
# no request down for long (the throttles then let requests through).
# "coordination" holds what the web and the worker must both see: core.soon's "a run is queued"
# markers, which a request sets and the worker's task clears. Redis with Redis; without it, files
# under VAR_DIR (a process's memory there kept each web process's marker for QUEUED_TTL_S, so a
# job's runs waited for beat).
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    # Refused here: the cache's client would refuse it on every request (a 500 each, while the
    # health checks said ready), where a Redis that is down only lets requests through.
    raise ImproperlyConfigured(
        f"REDIS_URL={REDIS_URL!r} is not a Redis URL (redis://host:6379/0, rediss://…, unix:///path)"
    )
CACHE_KEY_PREFIX = f"gpgpu-test-{secrets.token_hex(4)}" if RUNNING_TESTS else "gpgpu"
if REDIS_URL:
    _redis_cache = {
        "BACKEND": "core.cache.RedisCache",  # Django's, with one client per connection pool
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": CACHE_KEY_PREFIX,
        "OPTIONS": {"socket_connect_timeout": 1.0, "socket_timeout": 1.0},
    }
    CACHES = {"default": _redis_cache, "coordination": dict(_redis_cache)}
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "gpgpu",
            "KEY_PREFIX": CACHE_KEY_PREFIX,
        },
        "coordination": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache" / "coordination"),
            "KEY_PREFIX": CACHE_KEY_PREFIX,
        },
    }

# Request rates (core/throttling.py): per API token or session of a person
# (user), per machine credential (machine), per client address for unauthenticated requests
# (anon), and per address on the agent's register endpoint (register). 429 with Retry-After
# beyond them. Generous defaults: an agent heartbeats every 10 s and reports usage every
# minute; a renter polling its job every second uses a tenth of its rate.
THROTTLE_ENABLED = env_bool("THROTTLE_ENABLED", True)
THROTTLE_RATES: dict[str, str | None] = {
    "user": env_rate("THROTTLE_USER", "600/min"),
    "machine": env_rate("THROTTLE_MACHINE", "600/min"),
    "machine_logs": env_rate("THROTTLE_MACHINE_LOGS", "600/min"),
    "anon": env_rate("THROTTLE_ANON", "60/min"),
    "register": env_rate("THROTTLE_REGISTER", "20/min"),
    "machine_rotate": env_rate("THROTTLE_MACHINE_ROTATE", "6/h"),
}

# The admin login's lockout (django-axes, its attempts in the database): after
# ADMIN_LOCKOUT_FAILURES failed logins the login is refused, even with the right password, for
# ADMIN_LOCKOUT_COOLOFF_MIN minutes, and every attempt meanwhile starts the wait again. What is
# locked: ADMIN_LOCKOUT_BY, a comma-separated list of what to count failures by, "+" joining a
# combination (username, ip_address, user_agent). An operator lifts a lock with
# `manage.py axes_reset_username <name>` (or axes_reset_ip, axes_reset).
AXES_ENABLED = env_bool("ADMIN_LOCKOUT", True)
AXES_FAILURE_LIMIT = env_int("ADMIN_LOCKOUT_FAILURES", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("ADMIN_LOCKOUT_COOLOFF_MIN", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = env_lockout_parameters("ADMIN_LOCKOUT_BY", "username+ip_address")
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "core.throttling.client_ip"
AXES_LOCKOUT_CALLABLE = "core.throttling.admin_lockout_response"
AXES_HTTP_RESPONSE_CODE = 429

# Request bodies larger than this are refused before they reach a view (agent heartbeats of
# a 16-GPU machine are about 10 KiB).
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("MAX_REQUEST_BYTES", 256 * 1024, minimum=1024)

# DRF's settings: values of several types (lists, dicts, strings, numbers), as DRF reads them.
REST_FRAMEWORK: dict[str, Any] = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.auth.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "core.api.Pagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "core.api.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # DRF's JSON parser with a bound on nesting (a deeply nested body would crash the process).
    "DEFAULT_PARSER_CLASSES": ["core.parsers.BoundedJSONParser"],
    # Rates are read per request from THROTTLE_RATES (the throttles pick the scope themselves).
    "DEFAULT_THROTTLE_CLASSES": [
        "core.throttling.PrincipalRateThrottle",
        "core.throttling.RegisterRateThrottle",
        "core.throttling.RotateRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {},
    "NUM_PROXIES": TRUSTED_PROXIES,
}
if DEBUG:
    REST_FRAMEWORK["DEFAULT_RENDERER_CLASSES"].append("rest_framework.renderers.BrowsableAPIRenderer")

SPECTACULAR_SETTINGS = {
    "TITLE": "GPGPU marketplace API",
    "DESCRIPTION": (
        "Rent idle GPUs. Renters submit jobs and follow their leases; providers manage machines, "
        "availability windows and price floors; provider agents speak /api/agent/v1/. Every error "
        'body has the shape {"code": <stable machine-readable code>, "detail": <human text>}.'
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {},
}

# Celery: a broker that needs no server by default (kombu's filesystem transport, which works
# across processes on one host); CELERY_BROKER_URL or REDIS_URL for Redis in production.
BROKER_DIR = VAR_DIR / "broker"
BROKER_CONNECT_TIMEOUT_S = 2.0
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL") or "filesystem://"
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("in", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "in"),
        "data_folder_out": str(BROKER_DIR / "in"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "store_processed": False,
        "control_folder": str(BROKER_DIR / "control"),
        # The worker looks for new messages this often (kombu's default: every second), which a
        # job's dispatch pays twice (its reservation run, then its matching run).
        "polling_interval": 0.2,
    }
else:
    # A connect to a broker host that does not answer (down, its SYNs dropped) waited for the
    # kernel's SYN retries, about 2 minutes, on every try of a publish: a web request that queues a
    # task after its commit (a submitted job's matching run) was held that long while the rest of
    # the system answered. On a LAN a connect takes milliseconds; a publish now gives up in about
    # 4 s (Celery's tries, each cut at the timeout) and the beat schedule runs the work instead.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600, "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S}
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# How long the worker's ETA timer may sleep between looks at its schedule (Celery's default: a
# second). With the thread pool (the demo) or any transport without an event loop, a task with a
# countdown (a requested matching or reservation run, a run retried behind a held lock) started
# up to a second after its time; each job's dispatch waits for two of them.
CELERY_WORKER_TIMER_PRECISION = 0.1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# Marketplace behaviour.
GPGPU = {
    # How often the agent is asked to heartbeat, and how many missed beats make a machine offline.
    "HEARTBEAT_INTERVAL_S": env_int("HEARTBEAT_INTERVAL_S", 10, minimum=1),
    # The longest an agent's orders/wait call is held open waiting for a new order (its doorbell:
    # jobs.agent_apis.OrdersWaitApi). 0, the default, answers at once: each held call holds a
    # web worker (or thread) for that long, so enable it only on a server that has one to spare
    # per machine (runserver, granian with enough --blocking-threads).
    "AGENT_ORDERS_WAIT_S": min(env_int("AGENT_ORDERS_WAIT_S", 0, minimum=0), 25),
    "HEARTBEAT_GRACE_BEATS": env_int("HEARTBEAT_GRACE_BEATS", 3, minimum=1),
    # An agent stops its rentals' workloads once it has not reached the marketplace for this long
    # (a watchdog beside each workload enforces it even if the agent is paused or killed), and a
    # silent machine's leases end as lost only after LEASE_LOST_AFTER_S, later than that: so a
    # job never runs twice at once, whoever was cut off.
    "LEASE_FENCE_S": env_int("LEASE_FENCE_S", 120, minimum=10),
    "LEASE_LOST_AFTER_S": env_int("LEASE_LOST_AFTER_S", 0),
    # When at least this many machines and this share of the online fleet go silent at once, the
    # marketplace assumes the fault is between them and itself and stops ending leases (a
    # disrupted zone), for at most LIVENESS_DISRUPTION_HOLD_S.
    "LIVENESS_DISRUPTION_MIN_MACHINES": env_int("LIVENESS_DISRUPTION_MIN_MACHINES", 10, minimum=1),
    "LIVENESS_DISRUPTION_PCT": env_int("LIVENESS_DISRUPTION_PCT", 50, minimum=1),
    "LIVENESS_DISRUPTION_HOLD_S": env_int("LIVENESS_DISRUPTION_HOLD_S", 900, minimum=0),
    # The matching loop's period, and the most pending jobs one cycle considers.
    "MATCH_INTERVAL_S": env_int("MATCH_INTERVAL_S", 5, minimum=1),
    "MATCH_BATCH_SIZE": env_int("MATCH_BATCH_SIZE", 20000, minimum=1),
    # Connections that write a planned cycle's chunks at once, on PostgreSQL (marketplace.matching).
    "MATCH_WRITERS": env_int("MATCH_WRITERS", 2, minimum=1),
    # On PostgreSQL a matcher worker keeps the fleet it read between cycles and reads only the GPU
    # rows changed since (marketplace.matching, "The kept fleet"); it reads every row again at
    # least this often. 0: every cycle reads every row.
    "MATCH_FLEET_FULL_READ_S": env_int("MATCH_FLEET_FULL_READ_S", 300, minimum=0),
    # A lease the agent has not started within this many seconds is given up and re-queued.
    "LEASE_START_TIMEOUT_S": env_int("LEASE_START_TIMEOUT_S", 120, minimum=10),
    # ... unless its agent reported it starting (pulling its image): then within this many
    # seconds of its placement. A silent agent's leases end as lost anyway (LEASE_LOST_AFTER_S).
    "LEASE_START_MAX_S": env_int("LEASE_START_MAX_S", 1800, minimum=10),
    # How often a job may be placed before it fails (failed starts, lost machines).
    "JOB_MAX_ATTEMPTS": env_int("JOB_MAX_ATTEMPTS", 5, minimum=1),
    # Raw telemetry is kept at most one sample per GPU per this many seconds, for this many
    # hours; hourly rollups are kept for this many days.
    "TELEMETRY_SAMPLE_INTERVAL_S": env_int("TELEMETRY_SAMPLE_INTERVAL_S", 60, minimum=1),
    # With REDIS_URL: a heartbeat that repeats one that changed nothing is answered from Redis,
    # without the database (providers.heartbeat_steady); false: every heartbeat is a full one.
    "HEARTBEAT_STEADY_PATH": env_bool("HEARTBEAT_STEADY_PATH", True),
    "TELEMETRY_RAW_RETENTION_H": env_int("TELEMETRY_RAW_RETENTION_H", 48, minimum=1),
    "TELEMETRY_ROLLUP_RETENTION_D": env_int("TELEMETRY_ROLLUP_RETENTION_D", 400, minimum=1),
    # On PostgreSQL raw telemetry is partitioned by time, one partition per this many hours (a
    # divisor of 24); a sample is dropped with its partition, at most this long past retention.
    "TELEMETRY_PARTITION_H": env_divisor("TELEMETRY_PARTITION_H", 6, of=24),
    # Idle forecasts (providers.idle_history): stretch counts lose half their weight every this
    # many days; one fold takes at most this many new stretches into the fleet prior; a stretch
    # reported longer than this many days (a clock far off) is refused.
    "IDLE_FORECAST_HALF_LIFE_D": env_int("IDLE_FORECAST_HALF_LIFE_D", 28, minimum=1),
    "IDLE_FORECAST_FOLD_BATCH": env_int("IDLE_FORECAST_FOLD_BATCH", 20000, minimum=1),
    "IDLE_STRETCH_MAX_D": env_int("IDLE_STRETCH_MAX_D", 90, minimum=1),
    # A job keeps at most this many bytes of its output (the log chunks its agents ship; the
    # start is kept, a notice marks the cut), for this many hours after it finished.
    "JOB_LOG_MAX_BYTES": env_int("JOB_LOG_MAX_BYTES", 16 * 1024 * 1024, minimum=64 * 1024),
    "JOB_LOG_RETENTION_H": env_int("JOB_LOG_RETENTION_H", 168, minimum=1),
    # A job's checkpoint (its checkpoint_dir, packed by the agent) may be at most this many bytes;
    # an agent may upload it up to this many seconds after its lease ended (it uploads before it
    # reports the end, so this covers only a report that overtook it).
    "CHECKPOINT_MAX_BYTES": env_int("CHECKPOINT_MAX_BYTES", 1024**3, minimum=1024),
    "CHECKPOINT_UPLOAD_GRACE_S": env_int("CHECKPOINT_UPLOAD_GRACE_S", 300, minimum=0),
    # With a store that signs URLs (CHECKPOINT_S3_BUCKET), agents upload straight to it. Off for a
    # store that accepts a PUT's x-amz-checksum-sha256 without checking it against the bytes.
    "CHECKPOINT_DIRECT_UPLOAD": env_bool("CHECKPOINT_DIRECT_UPLOAD", True),
    # How long the checkpoint of a job its renter cancelled keeping it stays downloadable (hours).
    "CHECKPOINT_KEEP_AFTER_CANCEL_H": env_int("CHECKPOINT_KEEP_AFTER_CANCEL_H", 168, minimum=1),
    # Registration tokens expire after this many hours.
    "REGISTRATION_TOKEN_TTL_H": env_int("REGISTRATION_TOKEN_TTL_H", 24, minimum=1),
    # The EIP-712 domain chainId agents sign usage reports with (31337: the local dev chain).
    "USAGE_SIGNING_CHAIN_ID": env_int("USAGE_SIGNING_CHAIN_ID", 31337, minimum=1),
}

# The matcher's placement policy (marketplace.placement): v2 (forecast-aware, fair share across
# renters, price when short), v1 (FIFO, cheapest first: the rule before v2), first-fit.
MATCH_POLICY = env_choice("MATCH_POLICY", "v2", ("v2", "v1", "first-fit"))
# Leases are declared lost a margin after the agents' fence: by then every workload of a cut-off
# agent has been stopped. Set lower, a job could run on two machines at once.
GPGPU["LEASE_LOST_AFTER_S"] = GPGPU["LEASE_LOST_AFTER_S"] or GPGPU["LEASE_FENCE_S"] + 30
if GPGPU["LEASE_LOST_AFTER_S"] <= GPGPU["LEASE_FENCE_S"]:
    raise ImproperlyConfigured(
        f"LEASE_LOST_AFTER_S ({GPGPU['LEASE_LOST_AFTER_S']}) must be more than LEASE_FENCE_S "
        f"({GPGPU['LEASE_FENCE_S']}): a lease declared lost before its agent stops it could run twice."
    )

# Billing (docs/billing.md). Amounts are int in the token's smallest unit (6 decimals: micro).
BILLING_TOKEN_DECIMALS = env_int("BILLING_TOKEN_DECIMALS", 6)
# The platform's fee on every settled charge, in basis points (1000 = 10 %; the escrow caps it at 2000).
PLATFORM_FEE_BPS = env_int("PLATFORM_FEE_BPS", 1000)
# How often agents send usage reports (their default), and the metering period.
BILLING_USAGE_INTERVAL_S = env_int("BILLING_USAGE_INTERVAL_S", 60, minimum=1)
BILLING_METER_INTERVAL_S = env_int("BILLING_METER_INTERVAL_S", 30, minimum=1)
# An ended lease is billed for at most the seconds its usage reports cover plus this much: by
# default one usage interval plus the heartbeat grace.
USAGE_SLACK_S = env_int(
    "USAGE_SLACK_S",
    BILLING_USAGE_INTERVAL_S + GPGPU["HEARTBEAT_INTERVAL_S"] * GPGPU["HEARTBEAT_GRACE_BEATS"],
)
# An ended lease's charge becomes final this long after it ended (late usage reports count).
BILLING_FINALIZE_GRACE_S = env_int("BILLING_FINALIZE_GRACE_S", USAGE_SLACK_S)

# Chain (billing/chain/, README "Chain"). The node the operator sends settlements through; by
# default the local anvil that scripts/demo starts.
CHAIN_RPC_URL = os.environ.get("CHAIN_RPC_URL", "http://127.0.0.1:8545")
# The chain id the node must report (guards against pointing at the wrong network); empty: any.
CHAIN_ID: int | None = env_int("CHAIN_ID", 0, minimum=1) if os.environ.get("CHAIN_ID") else None
# Blocks (the transaction's own included) before a settlement counts as final: 1 on a local node;
# more on a public chain.
CHAIN_CONFIRMATIONS = env_int("CHAIN_CONFIRMATIONS", 1, minimum=1)
# A node whose head is below a block already seen on the chain (a confirmed settlement's, the
# deposit watcher's cursor) is waited for this long before those blocks count as gone: a lagging
# node read as a reorg undid confirmed settlements and sent them again (billing.rewind).
CHAIN_BEHIND_GRACE_S = env_int("CHAIN_BEHIND_GRACE_S", 300, minimum=0)
CHAIN_RECEIPT_TIMEOUT_S = env_int("CHAIN_RECEIPT_TIMEOUT_S", 120, minimum=1)
CHAIN_RPC_TIMEOUT_S = env_int("CHAIN_RPC_TIMEOUT_S", 10, minimum=1)
# The operator's signing key: a 0600 file named by CHAIN_OPERATOR_KEY_FILE (docker-compose mounts
# it as a secret), or hex in CHAIN_OPERATOR_KEY. Never committed. Unset in DEBUG: anvil's public
# development key #0.
CHAIN_OPERATOR_KEY = os.environ.get("CHAIN_OPERATOR_KEY", "")
CHAIN_OPERATOR_KEY_FILE = os.environ.get("CHAIN_OPERATOR_KEY_FILE", "")
# Where platform fees go (chain_deploy); unset in DEBUG: the operator.
CHAIN_TREASURY_ADDRESS = os.environ.get("CHAIN_TREASURY_ADDRESS", "")
# Production: the deployed escrow and token, and the block to scan its events from. Unset: the
# deployment file GPGPU_VAR_DIR/chain/deployment-<chain id>.json written by chain_deploy.
ESCROW_ADDRESS = os.environ.get("ESCROW_ADDRESS", "")
TOKEN_ADDRESS = os.environ.get("TOKEN_ADDRESS", "")
ESCROW_DEPLOYMENT_BLOCK = env_int("ESCROW_DEPLOYMENT_BLOCK", 0)
# Settlement (billing/settlement.py): a batch every SETTLEMENT_INTERVAL_S, sooner when
# SETTLEMENT_BATCH_MAX leases are waiting; a lease is sent once its new charge reaches
# SETTLEMENT_MIN_DELTA_MICRO (or its charge is final). Stuck batches are reconciled after
# SETTLEMENT_STUCK_S.
SETTLEMENT_INTERVAL_S = env_int("SETTLEMENT_INTERVAL_S", 120, minimum=1)
SETTLEMENT_BATCH_MAX = env_int("SETTLEMENT_BATCH_MAX", 100, minimum=1)
SETTLEMENT_MIN_DELTA_MICRO = env_int("SETTLEMENT_MIN_DELTA_MICRO", 0)
SETTLEMENT_STUCK_S = env_int("SETTLEMENT_STUCK_S", 600, minimum=1)
# The deposit watcher (billing/deposits.py): how often it runs and the most blocks one log query covers.
CHAIN_WATCH_INTERVAL_S = env_int("CHAIN_WATCH_INTERVAL_S", 15, minimum=1)
CHAIN_LOG_RANGE = env_int("CHAIN_LOG_RANGE", 2000, minimum=1)


def _every(task: str, seconds: float) -> dict[str, object]:
    """A beat entry that runs `task` every `seconds` and expires a run not started by the next."""
    return {"task": task, "schedule": float(seconds), "options": {"expires": float(seconds)}}


CELERY_BEAT_SCHEDULE = {
    "match-pending-jobs": _every("marketplace.tasks.match_pending_jobs", GPGPU["MATCH_INTERVAL_S"]),
    "sweep-machine-liveness": _every("providers.tasks.sweep_machine_liveness", GPGPU["HEARTBEAT_INTERVAL_S"]),
    "sweep-stuck-leases": _every("jobs.tasks.sweep_leases", 15.0),
    "rollup-telemetry": _every("providers.tasks.rollup_telemetry", 300.0),
    "prune-telemetry": _every("providers.tasks.prune_telemetry", 3600.0),
    "prune-job-logs": _every("jobs.tasks.prune_job_logs", 3600.0),
    "sweep-checkpoints": _every("jobs.tasks.sweep_checkpoints", 3600.0),
    # Idle stretches the heartbeats recorded, folded into each machine's forecast and the fleet prior.
    "fold-idle-stretches": _every("providers.tasks.fold_idle_stretches", 300.0),
    "meter-leases": _every("billing.tasks.meter_leases", BILLING_METER_INTERVAL_S),
    "release-budgets": _every("billing.tasks.release_budgets", 60.0),
    "watch-chain": _every("billing.tasks.watch_chain", CHAIN_WATCH_INTERVAL_S),
    # Runs every 15 s but sends a batch only every SETTLEMENT_INTERVAL_S, or sooner when a batch is full.
    "settle": _every("billing.tasks.settle", 15.0),
    "reconcile-settlements": _every("billing.tasks.reconcile_settlements", 60.0),
    # Billing: budgets are reserved on chain before their jobs are placed; also completes stuck batches.
    "reserve-budgets": _every("billing.tasks.reserve_budgets", 5.0),
    "release-jobs-on-chain": _every("billing.tasks.release_jobs_on_chain", 60.0),
    # The fleet's hourly summary, which the console's dashboard reads (marketplace.fleet_summary).
    "summarise-fleet": _every("marketplace.tasks.summarise_fleet", 300.0),
    # Proof of life of beat and a worker, read by /healthz (marketplace.health).
    "worker-heartbeat": _every("marketplace.tasks.worker_heartbeat", 30.0),
    # The ledger against the chain as of a confirmed block; its last result: billing.selectors.ledger_check_latest.
    "check-ledger": _every("billing.tasks.check_ledger", 300.0),
}

# LOG_FORMAT=json: one JSON object per line (python-json-logger) with the time, level, logger,
# message and the request (or Celery task), machine, lease and job ids it is about
# (core.logcontext; null where they do not apply), for a fleet's log pipeline. plain: for people.
LOG_FORMAT = env_choice("LOG_FORMAT", "plain", ("plain", "json"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "core.logcontext.ContextFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s "
            "%(request_id)s %(machine_id)s %(lease_id)s %(job_id)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
