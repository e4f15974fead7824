"""With the database down, every request is a 503 the client may retry: JSON in the API's error
shape under /api/ (renter, provider and agent APIs), plain text elsewhere (the admin), with
Retry-After, whether the failure happens in a view or in a middleware before it, and logged once
without the DSN's password. The outages are real (core.tests.outage): a PostgreSQL port nobody
listens on, an SQLite file that cannot be opened, a PostgreSQL cluster stopped under an open
connection."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import IntegrityError
from django.http import HttpRequest, HttpResponse
from django.test import Client

from core.middleware import DETAIL, RETRY_AFTER_S
from core.tests.outage import default_database, postgres_down_url, sqlite_unopenable_url, throwaway_postgres

pytestmark = pytest.mark.django_db

PASSWORD = "pw-Sekr1t-DSN"

# One request of each API, each authenticated as its callers are, so that the first thing the
# view does is a query (the credential's lookup).
API_REQUESTS = {
    "renter": ("get", "/api/v1/jobs/", {"HTTP_AUTHORIZATION": "Token gpg_renter-token"}),
    "provider": ("get", "/api/v1/machines/", {"HTTP_AUTHORIZATION": "Token gpg_provider-token"}),
    "agent": ("post", "/api/agent/v1/heartbeat", {"HTTP_AUTHORIZATION": "Machine mc_agent-credential"}),
    "agent-register": ("post", "/api/agent/v1/register", {}),
}


def _send(client: Client, method: str, path: str, headers: dict[str, str]) -> HttpResponse:
    if method == "post":
        body = {"token": "gpreg_a-token", "hostname": "gpu-1", "agent_version": "1.0"}
        return client.post(path, data=body, content_type="application/json", **headers)
    return client.get(path, **headers)


def _assert_json_503(response: HttpResponse, *secrets: str) -> None:
    text = response.content.decode()
    assert response.status_code == 503, text
    assert response["Content-Type"] == "application/json"
    assert response["Retry-After"] == str(RETRY_AFTER_S)
    assert response.json() == {"code": "database_unavailable", "detail": DETAIL}
    assert "<html" not in text.lower()
    for secret in secrets:
        assert secret not in text, secret


@pytest.fixture
def postgres_down() -> Iterator[str]:
    url = postgres_down_url(password=PASSWORD)
    with default_database(url, connect_timeout=2):
        yield url


@pytest.mark.parametrize("api", sorted(API_REQUESTS))
def test_every_api_answers_a_json_503_when_postgresql_is_down(api: str, postgres_down: str, caplog) -> None:  # type: ignore[no-untyped-def]
    method, path, headers = API_REQUESTS[api]
    port = postgres_down.rsplit(":", 1)[1].split("/")[0]

    with caplog.at_level(logging.ERROR):
        response = _send(Client(), method, path, headers)

    _assert_json_503(response, PASSWORD, "gpgpu_outage", f":{port}", "postgres://")
    # One line at ERROR for the request, naming the failure, never the password.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "OperationalError" in errors[0].getMessage() and path in errors[0].getMessage()
    assert PASSWORD not in caplog.text


def test_the_api_answers_a_json_503_when_the_sqlite_file_cannot_be_opened(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with default_database(sqlite_unopenable_url(str(tmp_path))):
        response = Client().get("/api/v1/me", HTTP_AUTHORIZATION="Token gpg_renter-token")

    _assert_json_503(response, str(tmp_path))


def test_the_admin_answers_a_plain_text_503_when_the_database_is_down(postgres_down: str) -> None:
    client = Client()
    client.cookies["sessionid"] = "a-session-the-database-would-hold"

    response = client.get("/admin/")

    assert response.status_code == 503
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Retry-After"] == str(RETRY_AFTER_S)
    text = response.content.decode()
    assert "database" in text and "<html" not in text.lower() and PASSWORD not in text


def resolve_user_first(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """A middleware that loads the user before any view runs (as an authentication or audit
    middleware would): with the database down it raises outside every view."""

    def middleware(request: HttpRequest) -> HttpResponse:
        request.user.is_authenticated  # noqa: B018 - loading the user queries the session
        return get_response(request)

    return middleware


@pytest.fixture
def user_resolved_before_the_view(settings: Any) -> None:
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "core.tests.test_database_outage.resolve_user_first"]


@pytest.mark.parametrize(("path", "json"), [("/api/v1/me", True), ("/admin/", False)])
def test_a_middleware_that_hits_the_down_database_before_any_view_gets_the_503_too(
    path: str, json: bool, user_resolved_before_the_view: None, postgres_down: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A real server never re-raises; the test client would, for an exception Django handled.
    client = Client(raise_request_exception=False)
    client.cookies["sessionid"] = "a-session-the-database-would-hold"

    with caplog.at_level(logging.ERROR):
        response = client.get(path)

    if json:
        _assert_json_503(response, PASSWORD)
    else:
        assert response.status_code == 503 and response["Content-Type"].startswith("text/plain")
        assert response["Retry-After"] == str(RETRY_AFTER_S)
    # Django's own "Service Unavailable" line, with the traceback, is not added to ours.
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert PASSWORD not in caplog.text


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[Any]:
    with throwaway_postgres() as cluster:
        if cluster is None:
            pytest.skip("initdb and pg_ctl are not installed")
        yield cluster


def test_a_postgresql_that_dies_under_an_open_connection_is_a_json_503(postgres_cluster: Any) -> None:
    with default_database(postgres_cluster.url, connect_timeout=2) as connection:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        postgres_cluster.stop()

        response = Client().get("/api/v1/jobs/", HTTP_AUTHORIZATION="Token gpg_renter-token")

    _assert_json_503(response, str(postgres_cluster.port))


def test_other_database_errors_stay_a_500(renter_client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from accounts.apis import MeApi

    client, _ = renter_client
    client.raise_request_exception = False

    def violate(self: Any, request: Any) -> Any:
        raise IntegrityError("duplicate key value violates unique constraint")

    monkeypatch.setattr(MeApi, "get", violate)
    response = client.get("/api/v1/me")

    assert response.status_code == 500
    assert response.json()["code"] == "server_error"


def test_every_api_operation_documents_the_503(client) -> None:  # type: ignore[no-untyped-def]
    import yaml

    schema = yaml.load(client.get("/api/schema/").content, Loader=yaml.CSafeLoader)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if method in {"get", "post", "put", "patch", "delete"}:
                response = operation["responses"].get("503")
                assert response is not None, (method, path)
                assert response["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
