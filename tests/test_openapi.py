"""The OpenAPI schema and its Swagger UI: the schema generates cleanly, documents every public
endpoint with its errors, and the docs page works offline (every asset served locally)."""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.test import Client

pytestmark = pytest.mark.django_db

# Every endpoint of the renter and provider API, with its methods.
PUBLIC_API = {
    "/api/v1/me": {"get"},
    "/api/v1/gpus/": {"get"},
    "/api/v1/jobs/": {"get", "post"},
    "/api/v1/jobs/{job_id}/": {"get"},
    "/api/v1/jobs/{job_id}/cancel/": {"post"},
    "/api/v1/jobs/{job_id}/leases/": {"get"},
    "/api/v1/jobs/{job_id}/events/": {"get"},
    "/api/v1/jobs/{job_id}/logs/": {"get"},
    "/api/v1/jobs/{job_id}/checkpoint/": {"get"},
    "/api/v1/leases/": {"get"},
    "/api/v1/leases/{lease_id}/": {"get"},
    "/api/v1/leases/{lease_id}/telemetry/": {"get"},
    "/api/v1/machines/": {"get"},
    "/api/v1/machines/{machine_id}/": {"get", "delete"},
    "/api/v1/machines/{machine_id}/gpus/{gpu_id}/": {"patch"},
    "/api/v1/machines/{machine_id}/usage/": {"get"},
    "/api/v1/machines/{machine_id}/credential/rotate/": {"post"},
    "/api/v1/machines/{machine_id}/credential/revoke/": {"post"},
    "/api/v1/provider/": {"get", "patch"},
    "/api/v1/availability-windows/": {"get", "post"},
    "/api/v1/availability-windows/{window_id}/": {"get", "put", "patch", "delete"},
    "/api/v1/blackouts/": {"get", "post"},
    "/api/v1/blackouts/{blackout_id}/": {"get", "delete"},
    "/api/v1/registration-tokens/": {"get", "post"},
    "/api/v1/jobs/{job_id}/budget-authorization/": {"get", "put"},
    "/api/v1/billing/balance/": {"get"},
    "/api/v1/billing/deposits/": {"get"},
    "/api/v1/billing/charges/": {"get"},
    "/api/v1/billing/statements/jobs/{job_id}/": {"get"},
    "/api/v1/billing/statements/monthly/": {"get"},
    "/api/v1/billing/settlements/": {"get"},
    "/api/v1/billing/wallets/": {"get", "post"},
    "/api/v1/billing/earnings/": {"get"},
}
# GET endpoints under PUBLIC_API that return one object, not a paginated list.
SINGLE_OBJECT_GETS = {
    "/api/v1/provider/",
    "/api/v1/billing/balance/",
    "/api/v1/billing/statements/monthly/",
    "/api/v1/billing/earnings/",
    "/api/v1/jobs/{job_id}/budget-authorization/",
    "/api/v1/leases/{lease_id}/telemetry/",
    "/api/v1/machines/{machine_id}/usage/",
    "/api/v1/jobs/{job_id}/logs/",
    "/api/v1/jobs/{job_id}/checkpoint/",
}
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def schema() -> dict:
    return yaml.load(Client().get("/api/schema/").content, Loader=yaml.CSafeLoader)


def test_schema_generates_and_validates_without_warnings(tmp_path: Path):
    out = tmp_path / "schema.yaml"
    stderr = StringIO()

    # --fail-on-warn raises SchemaGenerationError on any warning or error.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out), stderr=stderr)

    assert out.stat().st_size > 0
    assert "Warning" not in stderr.getvalue()


def test_schema_lists_every_public_endpoint_and_method(schema):
    documented = {
        path: {m for m in ops if m in HTTP_METHODS}
        for path, ops in schema["paths"].items()
        if path.startswith("/api/v1/")
    }

    assert documented == PUBLIC_API


def test_every_public_operation_documents_its_errors_with_the_error_shape(schema):
    for path, methods in PUBLIC_API.items():
        for method in methods:
            responses = schema["paths"][path][method]["responses"]
            assert "401" in responses, (method, path)
            if "{" in path:
                assert "404" in responses, (method, path)
            if method in {"post", "put", "patch"} and path != "/api/v1/jobs/{job_id}/cancel/":
                assert "400" in responses, (method, path)
            for code, response in responses.items():
                if code.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (method, path, code)
    error = schema["components"]["schemas"]["Error"]
    assert {"code", "detail"} <= set(error["required"])


def test_renter_and_provider_endpoints_document_their_403(schema):
    for path, methods in PUBLIC_API.items():
        if path in {"/api/v1/me", "/api/v1/gpus/"}:
            continue
        for method in methods:
            assert "403" in schema["paths"][path][method]["responses"], (method, path)


def test_every_public_operation_requires_the_api_token(schema):
    assert schema["components"]["securitySchemes"]["tokenAuth"]["name"] == "Authorization"
    for path, methods in PUBLIC_API.items():
        for method in methods:
            schemes = {name for entry in schema["paths"][path][method]["security"] for name in entry}
            assert "tokenAuth" in schemes, (method, path)


def test_lists_are_documented_as_paginated(schema):
    for path, methods in PUBLIC_API.items():
        if "get" in methods and path.endswith("/") and not re.search(r"\{[a-z_]+\}/$", path):
            if path in SINGLE_OBJECT_GETS:
                continue
            ok = schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
            component = schema["components"]["schemas"][ok["$ref"].rsplit("/", 1)[1]]
            assert {"count", "next", "previous", "results"} <= set(component["properties"]), path
            names = {p["name"] for p in schema["paths"][path]["get"].get("parameters", [])}
            assert {"limit", "offset"} <= names, path


def test_money_is_a_decimal_string_in_the_schema(schema):
    components = schema["components"]["schemas"]
    for component, field in [
        ("MarketGpu", "price_per_gpu_hour"),
        ("Job", "max_price_per_gpu_hour"),
        ("Lease", "price_per_gpu_hour"),
        ("ProviderProfile", "default_price_floor"),
        ("ProviderGpu", "price_floor"),
    ]:
        prop = components[component]["properties"][field]
        assert prop["type"] == "string" and prop["format"] == "decimal", (component, field)


def test_job_submission_documents_the_idempotency_key_header(schema):
    parameters = schema["paths"]["/api/v1/jobs/"]["post"]["parameters"]

    assert any(p["in"] == "header" and p["name"] == "Idempotency-Key" for p in parameters)
    assert {"200", "201", "409"} <= set(schema["paths"]["/api/v1/jobs/"]["post"]["responses"])


def test_a_jobs_checkpoint_and_unplaced_reason_are_documented_as_the_api_returns_them(schema):
    """A generated client reads these shapes: the checkpoint was documented as an unplaced
    reason, and the unplaced reason as any object."""
    components = schema["components"]["schemas"]
    job = components["Job"]["properties"]

    def fields(prop: dict) -> set[str]:
        ref = prop.get("$ref") or next(one["$ref"] for one in prop.get("oneOf", prop.get("allOf", [])) if "$ref" in one)
        return set(components[ref.rsplit("/", 1)[-1]]["properties"])

    assert {"size", "sha256", "created_at", "kept_until"} <= fields(job["checkpoint"])
    assert {"code", "detail", "checked_at"} <= fields(job["unplaced_reason"])


def test_swagger_ui_renders_with_only_local_assets_and_they_are_served():
    client = Client()

    page = client.get("/api/docs/")

    assert page.status_code == 200
    html = page.content.decode()
    assets = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    assert any(a.endswith("swagger-ui.css") for a in assets)
    assert not re.search(r"https?://", " ".join(assets)), assets
    assert 'url: "/api/schema/"' in html
    for asset in assets:
        assert asset.startswith("/static/"), asset
        served = client.get(asset)
        assert served.status_code == 200, asset
        body = b"".join(served.streaming_content) if served.streaming else served.content
        assert len(body) > 0, asset


def test_schema_endpoint_serves_the_public_api():
    response = Client().get("/api/schema/", HTTP_ACCEPT="application/json")

    assert response.status_code == 200
    assert "/api/v1/jobs/" in response.json()["paths"]
