"""The schema is the contract: every error under /api/ is JSON in the one shape (404 for a
malformed or unknown URL, 405, 413, 500 included), every query parameter is checked (400 naming
it), and the OpenAPI schema states the rules the server enforces (id ranges, limit/offset,
address, signature, month, price and Idempotency-Key patterns, the errors each operation can
give). tests/test_api_fuzz.py checks the same against a live server with schemathesis."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
import yaml
from django.test import Client

from billing.chain.anvil import free_port
from core.api import ID_MAX, decimal_pattern
from jobs.models import Job
from jobs.services import JobSpec
from marketplace.submit import job_submit

pytestmark = pytest.mark.django_db

HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def schema() -> dict:
    return yaml.load(Client().get("/api/schema/").content, Loader=yaml.CSafeLoader)


def _operations(schema: dict) -> list[tuple[str, str, dict]]:
    return [
        (path, method, operation)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if method in HTTP_METHODS
    ]


def _job(renter: Any) -> Job:
    spec = JobSpec(
        gpu_count=1,
        max_price_per_gpu_hour=Decimal("1.00"),
        expected_duration_s=600,
        kind=Job.Kind.PROCESS,
        command=["true"],
    )
    return job_submit(renter=renter, spec=spec)[0]


def _is_error_shape(response: Any, status: int, code: str | None = None) -> bool:
    body = response.json()
    return (
        response.status_code == status
        and response["Content-Type"].startswith("application/json")
        and isinstance(body.get("code"), str)
        and isinstance(body.get("detail"), str)
        and (code is None or body["code"] == code)
    )


# --- every error is JSON in the one shape ---------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/jobs/abc/",
        "/api/v1/jobs/1.5/",
        "/api/v1/jobs/-1/",
        "/api/v1/machines/0x10/",
        "/api/v1/no-such-endpoint/",
        "/api/agent/v1/leases/abc/events",
        "/api/agent/v1/nothing",
    ],
)
def test_a_malformed_or_unknown_api_url_is_a_json_404(renter_client, path):
    client, _ = renter_client

    response = client.get(path)

    assert _is_error_shape(response, 404, "not_found"), response.content[:200]


def test_an_id_beyond_the_database_range_is_a_json_404_not_a_crash(renter_client):
    client, _ = renter_client

    for job_id in (ID_MAX + 1, 10**30):
        response = client.get(f"/api/v1/jobs/{job_id}/")

        assert _is_error_shape(response, 404, "not_found"), (job_id, response.content[:200])


def test_outside_the_api_django_keeps_its_own_404_page(client):
    response = client.get("/no-such-page/")

    assert response.status_code == 404
    assert not response["Content-Type"].startswith("application/json")


def test_a_method_an_endpoint_does_not_have_is_a_json_405(renter_client):
    client, _ = renter_client

    response = client.delete("/api/v1/jobs/")

    assert _is_error_shape(response, 405, "method_not_allowed")


def test_a_body_over_the_limit_is_a_json_413(renter_client, settings):
    client, _ = renter_client
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024

    response = client.post("/api/v1/jobs/", data="x" * 2048, content_type="application/json")

    assert _is_error_shape(response, 413, "too_large")


def test_a_body_that_is_not_json_is_a_json_415(renter_client):
    client, _ = renter_client

    response = client.post("/api/v1/jobs/", data="gpu_count=1", content_type="application/x-www-form-urlencoded")

    assert _is_error_shape(response, 415, "unsupported_media_type")


def test_an_accept_header_without_json_is_a_json_406(renter_client):
    client, _ = renter_client

    response = client.get("/api/v1/jobs/", HTTP_ACCEPT="text/html")

    assert _is_error_shape(response, 406, "not_acceptable")


def test_a_crash_under_the_api_is_a_json_500(renter_client, monkeypatch):
    from accounts.apis import MeApi

    client, _ = renter_client
    client.raise_request_exception = False

    def crash(self: Any, request: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(MeApi, "get", crash)
    response = client.get("/api/v1/me")

    assert _is_error_shape(response, 500, "server_error")
    assert "boom" not in response.content.decode()


# --- query parameters are checked ---------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=", "limit"),
        ("limit=1.5", "limit"),
        ("limit=%EF%BC%95", "limit"),  # a full-width digit: int() takes it, the API does not
        ("offset=-1", "offset"),
        ("offset=x", "offset"),
        ("offset=99999999999999999999", "offset"),
    ],
)
def test_a_bad_limit_or_offset_is_a_400_naming_it(renter_client, query, parameter):
    client, _ = renter_client

    response = client.get(f"/api/v1/jobs/?{query}")

    assert _is_error_shape(response, 400, "invalid")
    assert list(response.json()["fields"]) == [parameter]


def test_limit_and_offset_in_range_page_the_list(renter_client):
    client, renter = renter_client
    jobs = [_job(renter) for _ in range(3)]

    page = client.get("/api/v1/jobs/?limit=2&offset=1").json()

    assert page["count"] == 3 and len(page["results"]) == 2
    assert {job["id"] for job in page["results"]} <= {job.pk for job in jobs}
    assert client.get("/api/v1/jobs/?limit=500").status_code == 200


def test_an_unknown_query_parameter_is_ignored_or_refused_never_a_crash(renter_client, provider_client):
    renter, _ = renter_client
    provider, _ = provider_client

    assert provider.get("/api/v1/machines/?whatever=1&limit=5").status_code == 200
    refused = renter.get("/api/v1/gpus/?whatever=1")
    assert _is_error_shape(refused, 400, "invalid") and "whatever" in refused.json()["fields"]


@pytest.mark.parametrize("month", ["2026-13", "2026-00", "1969-12", "2026-1", "26-11", "２０２６-１１", "2026-11x"])
def test_a_month_not_written_yyyy_mm_from_1970_is_a_400(renter_client, month):
    client, _ = renter_client

    response = client.get("/api/v1/billing/statements/monthly/", {"month": month})

    assert _is_error_shape(response, 400, "invalid") and list(response.json()["fields"]) == ["month"]


def test_a_month_written_yyyy_mm_gets_its_statement(renter_client):
    client, _ = renter_client

    assert client.get("/api/v1/billing/statements/monthly/", {"month": "2026-11"}).status_code == 200


def test_the_last_month_the_schema_allows_gets_its_statement(renter_client):
    client, _ = renter_client
    client.raise_request_exception = False

    response = client.get("/api/v1/billing/statements/monthly/", {"month": "9999-12"})

    assert response.status_code == 200


# --- a body is checked before the chain is asked ------------------------------------------


@pytest.fixture
def chain_down(settings: Any) -> None:
    settings.CHAIN_ID = None
    settings.CHAIN_RPC_URL = f"http://127.0.0.1:{free_port()}"
    settings.CHAIN_RPC_TIMEOUT_S = 2


@pytest.mark.parametrize(
    "body",
    [
        {"renter_address": "not an address", "max_amount": 1, "deadline": 1, "signature": "0x" + "ab" * 65},
        {"renter_address": "0x" + "11" * 20, "max_amount": 1, "deadline": 1, "signature": "0xnothex"},
        {"renter_address": "0x" + "11" * 20, "max_amount": 0, "deadline": 1, "signature": "0x" + "ab" * 65},
        {"renter_address": "0x" + "11" * 20, "max_amount": 1, "signature": "0x" + "ab" * 65},
        {"renter_address": "0x" + "11" * 20, "max_amount": 1, "deadline": 1, "signature": "0x" + "ab" * 65, "x": 1},
    ],
)
def test_a_malformed_budget_authorization_is_a_400_even_with_the_chain_down(renter_client, chain_down, body):
    client, renter = renter_client

    response = client.put(f"/api/v1/jobs/{_job(renter).pk}/budget-authorization/", body, format="json")

    assert _is_error_shape(response, 400, "invalid"), response.json()


def test_a_well_formed_budget_authorization_with_the_chain_down_is_a_503(renter_client, chain_down):
    client, renter = renter_client
    body = {"renter_address": "0x" + "11" * 20, "max_amount": 1, "deadline": 1, "signature": "0x" + "ab" * 65}

    response = client.put(f"/api/v1/jobs/{_job(renter).pk}/budget-authorization/", body, format="json")

    assert _is_error_shape(response, 503, "chain_unavailable")


# --- the schema states the rules ----------------------------------------------------------


def _component(schema: dict, name: str) -> dict:
    return schema["components"]["schemas"][name]["properties"]


def test_every_id_in_a_path_is_an_integer_from_1_to_the_largest_bigint(schema):
    for path, method, operation in _operations(schema):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                assert parameter["schema"] == {
                    "type": "integer",
                    "format": "int64",
                    "minimum": 1,
                    "maximum": ID_MAX,
                }, (method, path, parameter["name"])


def test_limit_and_offset_are_bounded_integers_in_the_schema(schema):
    parameters = {p["name"]: p["schema"] for p in schema["paths"]["/api/v1/jobs/"]["get"]["parameters"]}

    assert parameters["limit"] == {"type": "integer", "minimum": 1, "maximum": 500}
    assert parameters["offset"]["type"] == "integer" and parameters["offset"]["minimum"] == 0


def test_every_operation_documents_the_errors_the_framework_gives(schema):
    for path, method, operation in _operations(schema):
        responses = set(operation["responses"])
        assert {"406", "413"} <= responses, (method, path)
        if "requestBody" in operation:
            assert {"400", "415"} <= responses, (method, path)
        names = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        if names:
            assert "400" in responses, (method, path)


def test_the_schema_states_address_and_signature_patterns(schema):
    address = re.compile(r"^0x[0-9a-fA-F]{40}$")
    for component, field in [
        ("WalletLinkInputRequest", "address"),
        ("BudgetAuthorizationInputRequest", "renter_address"),
        ("AgentRegisterInputRequest", "signing_address"),
        ("AgentCredentialRotateInputRequest", "signing_address"),
        ("PatchedProfileInputRequest", "payout_address"),
    ]:
        rule = _component(schema, component)[field]
        # A field that may also be empty is oneOf the pattern or a string of length 0.
        pattern = next(r["pattern"] for r in rule.get("oneOf", [rule]) if "pattern" in r)
        assert re.match(pattern, "0x" + "aB" * 20), (component, field)
        assert not re.match(pattern, "0x" + "g" * 40) and not re.match(pattern, "0x" + "a" * 39), (component, field)
    signature = _component(schema, "BudgetAuthorizationInputRequest")["signature"]["pattern"]
    assert re.match(signature, "0x" + "ab" * 65) and not re.match(signature, "0x" + "ab" * 64)
    offer = {
        p["name"]: p["schema"]
        for p in schema["paths"]["/api/v1/jobs/{job_id}/budget-authorization/"]["get"]["parameters"]
    }
    assert address.pattern == offer["address"]["pattern"]


def test_the_schema_states_the_idempotency_key_rule(schema):
    (header,) = [p for p in schema["paths"]["/api/v1/jobs/"]["post"]["parameters"] if p["name"] == "Idempotency-Key"]
    rule = header["schema"]

    assert (rule["minLength"], rule["maxLength"]) == (1, 128)
    assert re.match(rule["pattern"], "retry-1 of job 7") and re.match(rule["pattern"], "a" * 128)
    assert not re.match(rule["pattern"], " leading") and not re.match(rule["pattern"], "tab\there")


def test_the_schema_states_the_month_format(schema):
    (month,) = [
        p for p in schema["paths"]["/api/v1/billing/statements/monthly/"]["get"]["parameters"] if p["name"] == "month"
    ]
    pattern = month["schema"]["pattern"]

    assert all(re.match(pattern, m) for m in ["1970-01", "2026-11", "9999-12"])
    assert not any(re.match(pattern, m) for m in ["1969-12", "2026-13", "2026-00", "2026-1"])


def test_the_schema_states_price_formats_and_ranges(schema):
    job_price = _component(schema, "JobCreateInputRequest")["max_price_per_gpu_hour"]["pattern"]
    floor = _component(schema, "PatchedProfileInputRequest")["default_price_floor"]["pattern"]
    search = {p["name"]: p["schema"] for p in schema["paths"]["/api/v1/gpus/"]["get"]["parameters"]}["max_price"]

    for pattern in (floor, search["pattern"]):
        assert all(re.match(pattern, v) for v in ["0", "0.5", "999.999999", "1000", "1000.000000"])
        assert not any(re.match(pattern, v) for v in ["-1", "1000.01", "1001", "0.0000001", "1e3", ""])
    # A job's ceiling must be above 0.
    assert not re.match(job_price, "0") and not re.match(job_price, "0.000000")
    assert re.match(job_price, "0.000001") and re.match(job_price, "1000")


@pytest.mark.parametrize(
    ("value", "ok"),
    [("0", True), ("12.5", True), ("999", True), ("1000.0", True), ("1000.5", False), ("1234", False)],
)
def test_decimal_pattern_bounds_digits_and_value(value, ok):
    pattern = decimal_pattern(whole_digits=3, decimal_places=6, maximum=Decimal(1000))

    assert bool(re.match(pattern, value)) is ok


def test_a_price_the_schema_allows_is_accepted_and_one_it_refuses_is_a_400(renter_client):
    client, _ = renter_client
    body = {"kind": "process", "command": ["true"], "gpu_count": 1, "expected_duration_s": 60}

    accepted = client.post("/api/v1/jobs/", {**body, "max_price_per_gpu_hour": "0.000001"}, format="json")
    zero = client.post("/api/v1/jobs/", {**body, "max_price_per_gpu_hour": "0"}, format="json")

    assert accepted.status_code == 201, accepted.json()
    assert _is_error_shape(zero, 400, "invalid") and "max_price_per_gpu_hour" in zero.json()["fields"]
