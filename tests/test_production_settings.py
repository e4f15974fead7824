"""The production profile is safe by default: no signing key without one being given, HTTPS
enforced once TLS is declared, the proxy's headers trusted only when configured, and
`check --deploy` clean with what docker-compose sets.

Settings are read from the environment when the settings module is imported, so each case reads
the module again with an environment of its own (nothing from this shell leaks in); what a
server does at start runs in a fresh interpreter."""

from __future__ import annotations

import os
import runpy
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from tests.faults import harness

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ROOT / "marketplace" / "settings.py"
A_KEY = secrets.token_urlsafe(50)


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python <args>` in the repository with only PATH, a private var dir and `env`: a fresh
    interpreter, as a server starts (no pytest loaded)."""
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "GPGPU_VAR_DIR": str(tmp_path / "var"),
        "STATIC_ROOT": str(tmp_path / "static"),
        "LOG_LEVEL": "WARNING",
        **env,
    }
    return subprocess.run(  # noqa: S603 - our own interpreter and files
        [sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )


def settings_with(tmp_path: Path, **env: str) -> dict[str, Any]:
    """The settings module's values when the environment is exactly `env` (plus a private var
    dir): the module run again in a namespace of its own; the live settings are untouched."""
    environment = {"GPGPU_VAR_DIR": str(tmp_path / "var"), "STATIC_ROOT": str(tmp_path / "static"), **env}
    with mock.patch.dict(os.environ, environment, clear=True):
        return runpy.run_path(str(SETTINGS), run_name="settings_under_test")


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# --- SECRET_KEY -----------------------------------------------------------------------------


def test_without_a_secret_key_and_debug_off_the_marketplace_refuses_to_start_with_one_clear_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = run(["manage.py", "check"], tmp_path)

    assert done.returncode != 0
    assert last_line(done.stderr).startswith(
        "django.core.exceptions.ImproperlyConfigured: SECRET_KEY is not set and DEBUG is off"
    ), done.stderr


def test_the_old_opt_out_no_longer_brings_back_the_public_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = run(["manage.py", "check"], tmp_path, GPGPU_REQUIRE_SECRET_KEY="false")

    assert done.returncode != 0
    assert "SECRET_KEY is not set" in last_line(done.stderr)


def test_the_public_development_key_is_refused_when_debug_is_off(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from django.conf import settings

    done = run(["manage.py", "check"], tmp_path, SECRET_KEY=settings.DEV_SECRET_KEY)

    assert done.returncode != 0
    assert "SECRET_KEY is the public development key" in last_line(done.stderr)


def test_debug_runs_on_the_development_key_and_production_on_the_one_given(tmp_path) -> None:  # type: ignore[no-untyped-def]
    development = settings_with(tmp_path, DEBUG="true")

    assert development["SECRET_KEY"] == development["DEV_SECRET_KEY"]
    assert settings_with(tmp_path, SECRET_KEY=A_KEY)["SECRET_KEY"] == A_KEY


# --- TLS and the proxy ----------------------------------------------------------------------


def test_without_tls_declared_nothing_forces_https(tmp_path) -> None:  # type: ignore[no-untyped-def]
    shown = settings_with(tmp_path, SECRET_KEY=A_KEY)

    assert shown["SECURE_SSL_REDIRECT"] is False
    assert shown["SECURE_HSTS_SECONDS"] == 0
    assert shown["SESSION_COOKIE_SECURE"] is False
    assert "SECURE_PROXY_SSL_HEADER" not in shown


def test_tls_turns_on_the_redirect_hsts_and_secure_cookies_but_trusts_no_proxy_header_by_itself(tmp_path) -> None:  # type: ignore[no-untyped-def]
    shown = settings_with(tmp_path, SECRET_KEY=A_KEY, TLS="true")

    assert shown["SECURE_SSL_REDIRECT"] is True
    assert shown["SECURE_HSTS_SECONDS"] == 365 * 24 * 3600
    assert shown["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True
    assert shown["SESSION_COOKIE_SECURE"] is True and shown["CSRF_COOKIE_SECURE"] is True
    assert "SECURE_PROXY_SSL_HEADER" not in shown


def test_the_forwarded_proto_header_is_trusted_only_when_configured(tmp_path) -> None:  # type: ignore[no-untyped-def]
    shown = settings_with(tmp_path, SECRET_KEY=A_KEY, TLS="true", TRUST_X_FORWARDED_PROTO="true")

    assert shown["SECURE_PROXY_SSL_HEADER"] == ("HTTP_X_FORWARDED_PROTO", "https")


def test_check_deploy_passes_with_tls_declared(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = run(
        ["manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        tmp_path,
        SECRET_KEY=A_KEY,
        TLS="true",
        TRUST_X_FORWARDED_PROTO="true",
    )

    assert done.returncode == 0, done.stderr + done.stdout


@pytest.mark.django_db
def test_with_the_redirect_on_plain_http_is_sent_to_https_but_the_health_probe_is_not(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SECURE_SSL_REDIRECT = True

    assert Client().get("/api/v1/me").status_code == 301
    assert Client().get("/api/v1/me")["Location"].startswith("https://")
    assert Client().get("/healthz").status_code == 200
    assert Client().get("/livez").status_code == 200
    assert Client().get("/readyz").status_code == 200
    assert Client().get("/metrics").status_code == 404  # off (no METRICS_TOKEN), and not redirected
    assert Client().get("/livezz").status_code == 301


@pytest.mark.django_db
def test_a_client_cannot_claim_https_with_x_forwarded_proto_unless_a_proxy_is_trusted(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = None

    assert Client().get("/admin/login/", HTTP_X_FORWARDED_PROTO="https").status_code == 301

    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert Client().get("/admin/login/", HTTP_X_FORWARDED_PROTO="https").status_code == 200


# --- rate limits and lockout ----------------------------------------------------------------


def test_the_rate_limit_cache_is_redis_when_redis_url_is_set_and_local_memory_otherwise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with_redis = settings_with(tmp_path, SECRET_KEY=A_KEY, REDIS_URL="redis://cache.internal:6379/1")
    without = settings_with(tmp_path, SECRET_KEY=A_KEY)

    assert with_redis["CACHES"]["default"]["BACKEND"] == "core.cache.RedisCache"
    assert with_redis["CACHES"]["default"]["LOCATION"] == "redis://cache.internal:6379/1"
    assert without["CACHES"]["default"]["BACKEND"] == "django.core.cache.backends.locmem.LocMemCache"


def test_the_default_rates_and_lockout_are_the_documented_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    shown = settings_with(tmp_path, SECRET_KEY=A_KEY)

    assert shown["THROTTLE_ENABLED"] is True
    assert shown["THROTTLE_RATES"] == {
        "user": "600/min",
        "machine": "600/min",
        "machine_logs": "600/min",
        "anon": "60/min",
        "register": "20/min",
        "machine_rotate": "6/h",
    }
    assert shown["AXES_FAILURE_LIMIT"] == 5
    assert shown["AXES_COOLOFF_TIME"].total_seconds() == 15 * 60
    assert shown["AXES_LOCKOUT_PARAMETERS"] == [["username", "ip_address"]]


def test_rates_and_lockout_come_from_the_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    shown = settings_with(
        tmp_path,
        SECRET_KEY=A_KEY,
        THROTTLE_USER="100/hour",
        THROTTLE_REGISTER="off",
        THROTTLE_ENABLED="false",
        ADMIN_LOCKOUT_FAILURES="3",
        ADMIN_LOCKOUT_COOLOFF_MIN="60",
        ADMIN_LOCKOUT_BY="username,ip_address",
    )

    assert shown["THROTTLE_ENABLED"] is False
    assert shown["THROTTLE_RATES"]["user"] == "100/hour"
    assert shown["THROTTLE_RATES"]["register"] is None
    assert (shown["AXES_FAILURE_LIMIT"], shown["AXES_COOLOFF_TIME"].total_seconds()) == (3, 3600)
    assert shown["AXES_LOCKOUT_PARAMETERS"] == ["username", "ip_address"]


@pytest.mark.parametrize(
    ("name", "value"), [("THROTTLE_MACHINE", "lots"), ("THROTTLE_ANON", "10/fortnight"), ("ADMIN_LOCKOUT_BY", "email")]
)
def test_a_malformed_rate_or_lockout_setting_is_refused_by_name(tmp_path, name, value) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImproperlyConfigured, match=name):
        settings_with(tmp_path, SECRET_KEY=A_KEY, **{name: value})


@pytest.mark.parametrize("url", ["localhost:6379", "http://127.0.0.1:6379/0", "127.0.0.1"])
def test_a_redis_url_that_is_no_redis_url_is_refused_at_start(tmp_path, url) -> None:  # type: ignore[no-untyped-def]
    """The cache's client refused it on every request: every API call answered 500 while the
    health checks said ready."""
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL"):
        settings_with(tmp_path, SECRET_KEY=A_KEY, REDIS_URL=url)
    assert settings_with(tmp_path, SECRET_KEY=A_KEY, REDIS_URL="redis://127.0.0.1:6379/5")["REDIS_URL"]


def test_a_short_metrics_token_is_refused_and_none_leaves_metrics_off(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImproperlyConfigured, match="METRICS_TOKEN"):
        settings_with(tmp_path, SECRET_KEY=A_KEY, METRICS_TOKEN="short-guessable")
    assert settings_with(tmp_path, SECRET_KEY=A_KEY)["METRICS_TOKEN"] == ""
    token = secrets.token_urlsafe(32)
    assert settings_with(tmp_path, SECRET_KEY=A_KEY, METRICS_TOKEN=token)["METRICS_TOKEN"] == token


# --- docker-compose -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_seeds_demo_users_only_in_the_demo_profile_and_keeps_their_secrets_out_of_the_logs(compose) -> None:  # type: ignore[no-untyped-def]
    services = compose["services"]

    assert services["seed"]["profiles"] == ["demo"]
    # The agent runs on the seed's demo provider token: without the profile it is not started either.
    assert services["agent"]["profiles"] == ["demo"]
    assert [name for name, service in services.items() if "demo" in service.get("profiles", [])] == ["seed", "agent"]
    command = " ".join(services["seed"]["command"])
    assert "demo_seed >/dev/null" in command


def test_compose_gives_the_operator_key_as_a_file_secret_to_the_signing_services_only(compose) -> None:  # type: ignore[no-untyped-def]
    services = compose["services"]
    signing = {"chain-deploy", "worker", "beat"}

    assert "file" in compose["secrets"]["chain_operator_key"]
    for name, service in services.items():
        environment = service.get("environment") or {}
        assert "CHAIN_OPERATOR_KEY" not in environment, name
        if name in signing:
            assert service["secrets"] == ["chain_operator_key"], name
            assert environment["CHAIN_OPERATOR_KEY_FILE"] == "/run/secrets/chain_operator_key", name
        else:
            assert "secrets" not in service and "CHAIN_OPERATOR_KEY_FILE" not in environment, name
    # Never baked into the image or committed.
    assert "secrets" in (ROOT / ".dockerignore").read_text().split()


def test_compose_uses_redis_for_the_cache_and_leaves_tls_to_be_declared(compose) -> None:  # type: ignore[no-untyped-def]
    web = compose["services"]["web"]["environment"]

    assert web["REDIS_URL"].startswith("redis://redis:6379/")
    assert web["REDIS_URL"] != web["CELERY_BROKER_URL"]
    assert web["TLS"] == "${TLS:-false}"
    assert web["TRUST_X_FORWARDED_PROTO"] == "${TRUST_X_FORWARDED_PROTO:-false}"
    assert "GPGPU_REQUIRE_SECRET_KEY" not in web


def test_compose_checks_web_on_liveness_which_no_dependency_outage_fails(compose) -> None:  # type: ignore[no-untyped-def]
    probe = " ".join(compose["services"]["web"]["healthcheck"]["test"])

    assert "http://127.0.0.1:8000/livez" in probe
    assert "/healthz" not in probe and "/readyz" not in probe


def test_compose_runs_prometheus_and_grafana_only_in_the_monitoring_profile(compose) -> None:  # type: ignore[no-untyped-def]
    services = compose["services"]

    monitoring = [name for name, service in services.items() if "monitoring" in service.get("profiles", [])]
    assert monitoring == ["prometheus", "grafana"]
    for name in monitoring:
        assert services[name]["profiles"] == ["monitoring"], name
        tag = services[name]["image"].partition(":")[2]
        assert tag and tag != "latest" and tag[0] in "v0123456789", name  # pinned
        # Reachable from this host only: the token-free UIs are not published to the network.
        assert all(str(port).startswith("127.0.0.1:") for port in services[name]["ports"]), name
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
    # Prometheus reads the token from the file its entrypoint writes, the one prometheus.yml names.
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    token_file = scrape["authorization"]["credentials_file"]
    assert token_file in services["prometheus"]["command"][0]
    assert scrape["static_configs"][0]["targets"] == ["web:8000"]


def test_compose_gives_web_and_the_worker_their_own_metrics_directory_and_web_reads_both(compose) -> None:  # type: ignore[no-untyped-def]
    web = compose["services"]["web"]["environment"]
    worker = compose["services"]["worker"]["environment"]

    assert web["PROMETHEUS_MULTIPROC_DIR"] != worker["PROMETHEUS_MULTIPROC_DIR"]
    own = [web["PROMETHEUS_MULTIPROC_DIR"], worker["PROMETHEUS_MULTIPROC_DIR"]]
    assert web["METRICS_MULTIPROC_DIRS"].split(",") == own
    # Each replica of either counts under a directory of its own, its container's hostname (the
    # files are named by pid, and two containers' processes may share one), which /metrics reads
    # as a subdirectory of the listed ones.
    replica_dir = 'export PROMETHEUS_MULTIPROC_DIR="$$PROMETHEUS_MULTIPROC_DIR/$$(cat /etc/hostname)" && '
    for name in ("web", "worker"):
        assert " ".join(compose["services"][name]["command"]).startswith(f"sh -c {replica_dir}"), name
    # Each empties its own directory before its server starts: a previous run's files would add
    # to this run's counts.
    for name in ("web", "worker"):
        command = " ".join(compose["services"][name]["command"])
        assert 'rm -f "$$PROMETHEUS_MULTIPROC_DIR"/*.db && exec ' in command, name
    for name in ("beat", "migrate", "seed", "chain-deploy"):
        assert "PROMETHEUS_MULTIPROC_DIR" not in (compose["services"][name].get("environment") or {}), name


def _web(compose: dict[str, Any], tmp_path: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """The command compose gives web, as its shell runs it, on a free local port (DEBUG, SQLite
    in tmp_path, metrics under tmp_path/metrics): the server, its URL and its log."""
    command = " ".join(compose["services"]["web"]["command"][2:]).replace("$$", "$")
    port = harness.free_port()
    assert "--host 0.0.0.0 --port 8000 " in command
    command = command.replace("--host 0.0.0.0 --port 8000 ", f"--host 127.0.0.1 --port {port} ")
    log = tmp_path / "web.log"
    environment = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
        "DEBUG": "true",
        "GPGPU_VAR_DIR": str(tmp_path / "var"),
        "STATIC_ROOT": str(tmp_path / "static"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "PYTHONPATH": str(ROOT),
    }
    with log.open("wb") as out:
        server = subprocess.Popen(  # noqa: S603 - compose's own command line
            ["/bin/sh", "-c", command],
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return server, f"http://127.0.0.1:{port}", log


def _stopped_within(server: subprocess.Popen[bytes], seconds: float) -> float:
    """SIGTERM, as compose stops a service; how long the server took to exit (killed, with
    every process of its session, after `seconds`: then the test fails)."""
    server.terminate()
    started = time.monotonic()
    try:
        server.wait(seconds)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        raise AssertionError(f"web did not stop within {seconds} s of SIGTERM") from None
    return time.monotonic() - started


def test_the_web_command_of_compose_serves_the_app_counts_into_an_emptied_directory_and_logs_access(
    compose, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    replica = tmp_path / "metrics" / Path("/etc/hostname").read_text().strip()
    replica.mkdir(parents=True)
    (replica / "counter_7.db").write_bytes(b"a previous run's")
    (replica / "keep.txt").write_text("not ours")
    server, base, log = _web(compose, tmp_path)
    try:
        harness.wait_until(lambda: _answers(f"{base}/livez"), 60, "web answering /livez")
        # An agent's usage report without a credential, and a heartbeat without one (counted).
        assert _post(f"{base}/api/agent/v1/leases/7/usage") == 401
        assert _post(f"{base}/api/agent/v1/heartbeat") == 401
        harness.wait_until(lambda: '/usage HTTP/1.1" 401' in log.read_text(errors="replace"), 10, "access log")
        harness.wait_until(lambda: '/heartbeat HTTP/1.1" 401' in log.read_text(errors="replace"), 10, "access log")
    finally:
        stopped_after = _stopped_within(server, 20)
    assert stopped_after < 10  # compose's grace before it kills

    # What a previous run left is gone, the workers counted into the replica's directory, and
    # the access log says which usage report was refused, in the form the fault suite reads.
    names = sorted(p.name for p in replica.iterdir())
    assert "counter_7.db" not in names
    assert "keep.txt" in names
    assert any(name.startswith("counter_") for name in names), names
    refusals = [r for line in log.read_text(errors="replace").splitlines() if (r := harness.usage_refusal(line))]
    assert [(lease, status) for _, lease, status in refusals] == [(7, 401)]
    assert abs(refusals[0][0] - time.time()) < 120


def test_every_compose_service_keeps_a_bounded_log(compose) -> None:  # type: ignore[no-untyped-def]
    for name, service in compose["services"].items():
        logging = service.get("logging") or {}
        options = logging.get("options") or {}
        assert logging.get("driver") == "json-file", name
        assert options.get("max-size") and int(options.get("max-file", 0)) >= 1, name


def test_web_stopped_while_its_workers_start_exits_within_composes_grace(compose, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Connections are taken once the first worker has loaded the app, often before the others
    # have: a SIGTERM then (compose stopping a service that just started, a deployment rolled
    # back at once) left granian waiting forever on the workers still starting.
    server, base, _ = _web(compose, tmp_path)
    port = int(base.rsplit(":", 1)[1])
    harness.wait_until(lambda: _accepts(port), 60, "web listening", step_s=0.01)
    assert _stopped_within(server, 20) < 10


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a local URL of our own
            return bool(response.status == 200)
    except OSError:
        return False


def _post(url: str) -> int:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - a local URL of our own
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


# --- liveness -------------------------------------------------------------------------------


def test_leases_cannot_be_declared_lost_before_the_agents_fence_stops_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    values = settings_with(tmp_path, DEBUG="true", LEASE_FENCE_S="60")
    assert values["GPGPU"]["LEASE_LOST_AFTER_S"] == 90  # the fence and a margin, by default
    with pytest.raises(ImproperlyConfigured, match=r"LEASE_LOST_AFTER_S \(60\) must be more than LEASE_FENCE_S"):
        settings_with(tmp_path, DEBUG="true", LEASE_FENCE_S="60", LEASE_LOST_AFTER_S="60")


def test_an_unreachable_postgresql_is_given_up_within_the_connect_timeout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = "postgres://gpgpu:pw@db.internal:5432/gpgpu"
    values = settings_with(tmp_path, DEBUG="true", DATABASE_URL=url)
    assert values["DATABASES"]["default"]["OPTIONS"]["connect_timeout"] == 5
    values = settings_with(tmp_path, DEBUG="true", DATABASE_URL=url, DATABASE_CONNECT_TIMEOUT_S="2")
    assert values["DATABASES"]["default"]["OPTIONS"]["connect_timeout"] == 2


def test_a_connection_pool_is_bounded_per_process_and_replaces_per_thread_connections(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = "postgres://gpgpu@db.internal:5432/gpgpu"
    pooled = settings_with(tmp_path, SECRET_KEY=A_KEY, DATABASE_URL=url, DATABASE_POOL_MAX_SIZE="15")
    plain = settings_with(tmp_path, SECRET_KEY=A_KEY, DATABASE_URL=url)

    database = pooled["DATABASES"]["default"]
    assert database["OPTIONS"]["pool"] == {"min_size": 2, "max_size": 15, "timeout": 10}
    assert database["CONN_MAX_AGE"] == 0  # Django refuses persistent connections with a pool
    assert "pool" not in plain["DATABASES"]["default"]["OPTIONS"]
    assert plain["DATABASES"]["default"]["CONN_MAX_AGE"] == 60


def test_json_logs_are_an_option_and_a_wrong_format_is_refused_by_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert settings_with(tmp_path, SECRET_KEY=A_KEY)["LOGGING"]["handlers"]["console"]["formatter"] == "plain"
    json_logs = settings_with(tmp_path, SECRET_KEY=A_KEY, LOG_FORMAT="json")["LOGGING"]
    assert json_logs["handlers"]["console"]["formatter"] == "json"
    assert json_logs["handlers"]["console"]["filters"] == ["context"]

    refused = run(["manage.py", "check"], tmp_path, SECRET_KEY=A_KEY, LOG_FORMAT="xml")
    assert refused.returncode != 0
    assert "LOG_FORMAT" in refused.stderr and "xml" in refused.stderr


def test_compose_keeps_checkpoints_in_a_private_minio_bucket_whose_password_must_be_set(compose) -> None:  # type: ignore[no-untyped-def]
    services = compose["services"]
    env = services["web"]["environment"]
    assert env["CHECKPOINT_S3_ENDPOINT_URL"].endswith("http://minio:9000}")
    assert env["CHECKPOINT_S3_SECRET_ACCESS_KEY"].startswith("${MINIO_ROOT_PASSWORD:?")
    assert "MINIO_ROOT_PASSWORD:?" in services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    # Its API is not published beyond this host, and the bucket is made private before web starts.
    assert all(port.startswith("127.0.0.1:") for port in services["minio"]["ports"])
    assert "mc anonymous set none" in " ".join(services["minio-init"]["command"])
    assert services["web"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_settings_put_checkpoints_in_s3_when_a_bucket_is_named(tmp_path: Path) -> None:
    local = settings_with(tmp_path, DEBUG="true")["STORAGES"]["checkpoints"]
    assert local["BACKEND"] == "django.core.files.storage.FileSystemStorage"
    s3 = settings_with(
        tmp_path, DEBUG="true", CHECKPOINT_S3_BUCKET="checkpoints", CHECKPOINT_S3_ENDPOINT_URL="http://minio:9000"
    )["STORAGES"]["checkpoints"]
    assert s3["BACKEND"] == "storages.backends.s3.S3Storage"
    assert s3["OPTIONS"]["bucket_name"] == "checkpoints"
    # Private objects, read by short-lived pre-signed URLs only.
    assert s3["OPTIONS"]["default_acl"] is None
    assert s3["OPTIONS"]["querystring_auth"] is True
    assert s3["OPTIONS"]["querystring_expire"] == 120


def test_the_web_process_freezes_what_it_made_at_start_so_full_collections_skip_it() -> None:
    import gc
    import importlib

    import marketplace.wsgi

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    importlib.reload(marketplace.wsgi)
    # Django's modules, settings, app registry and middleware at least: tens of thousands of objects.
    assert gc.get_freeze_count() > 10_000
    assert callable(marketplace.wsgi.application)
