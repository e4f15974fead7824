"""Renters' REST API: submitting, following and cancelling jobs, their leases and audit trail."""

from __future__ import annotations

import pytest

from jobs.models import Event, Job, Lease
from jobs.services import job_set_unplaced, lease_end, lease_mark_started
from tests.factories import GPUFactory, JobFactory, placed_lease

pytestmark = pytest.mark.django_db

PROCESS_JOB = {
    "name": "train",
    "kind": "process",
    "command": ["python", "train.py", "--epochs", "3"],
    "env": {"BATCH_SIZE": "64"},
    "gpu_count": 2,
    "min_vram_mb": 16000,
    "allowed_models": ["RTX 4090"],
    "region": "eu-west",
    "max_price_per_gpu_hour": "0.80",
    "expected_duration_s": 3600,
    "max_duration_s": 7200,
    "interruptible": False,
}


# --- submitting -----------------------------------------------------------------------------


def test_renter_submits_a_job_and_gets_it_back_pending(renter_client):
    client, renter = renter_client

    response = client.post("/api/v1/jobs/", PROCESS_JOB, format="json")

    assert response.status_code == 201
    body = response.json()
    job = Job.objects.get(pk=body["id"])
    assert job.renter == renter
    assert body["status"] == "pending"
    assert body["max_price_per_gpu_hour"] == "0.800000"
    assert body["command"] == PROCESS_JOB["command"]
    assert body["gpu_count"] == 2
    assert body["interruptible"] is False
    assert body["current_lease"] is None
    assert body["unplaced_reason"] is None
    assert job.events.get().kind == "job.created"


def test_a_region_named_in_another_case_is_matched_with_the_machines_of_that_region(renter_client):
    """The search compares regions without case; the matcher compares them exactly: both sides are
    stored lower-cased, so a job asking for "EU-West " is placed on a machine of eu-west (it
    waited forever with region_unavailable, while its offers listed that machine)."""
    from billing.models import BudgetAuthorization
    from marketplace.matching import match_cycle
    from providers.models import Provider
    from providers.services import machine_register, registration_token_create
    from tests.factories import BudgetAuthorizationFactory, MachineFactory

    client, _ = renter_client
    machine = MachineFactory(region="eu-west", accepts_process=True)
    GPUFactory.create_batch(2, machine=machine, model="RTX 4090", vram_mb=24564)
    response = client.post("/api/v1/jobs/", {**PROCESS_JOB, "region": " EU-West "}, format="json")
    job = Job.objects.get(pk=response.json()["id"])
    if not BudgetAuthorization.objects.filter(job=job).exists():
        BudgetAuthorizationFactory(job=job)
    offered = client.get(f"/api/v1/jobs/{job.pk}/").json()

    match_cycle()

    assert job.region == "eu-west" and offered["region"] == "eu-west"
    assert Lease.objects.get(job=job).machine_id == machine.pk
    _, raw = registration_token_create(provider=Provider.objects.get(pk=machine.provider_id), label="rig")
    registered, _ = machine_register(raw_token=raw, hostname="rig-9", agent_version="1", region="EU-West")
    assert registered.region == "eu-west"


def test_max_duration_defaults_to_the_expected_duration(renter_client):
    client, _ = renter_client
    body = {k: v for k, v in PROCESS_JOB.items() if k != "max_duration_s"}

    response = client.post("/api/v1/jobs/", body, format="json")

    assert response.json()["max_duration_s"] == 3600


def test_a_job_without_checkpoints_says_so(renter_client):
    client, _ = renter_client

    body = client.post("/api/v1/jobs/", PROCESS_JOB, format="json").json()

    assert body["checkpoint_interval_s"] is None


@pytest.mark.parametrize("interval", [60, 900, 86400])
def test_the_renters_checkpoint_promise_is_kept_and_shown(renter_client, interval):
    client, _ = renter_client

    created = client.post("/api/v1/jobs/", {**PROCESS_JOB, "checkpoint_interval_s": interval}, format="json")

    assert created.status_code == 201
    assert created.json()["checkpoint_interval_s"] == interval
    assert Job.objects.get(pk=created.json()["id"]).checkpoint_interval_s == interval
    detail = client.get(f"/api/v1/jobs/{created.json()['id']}/").json()
    assert detail["checkpoint_interval_s"] == interval


def test_an_out_of_range_checkpoint_interval_is_refused_with_its_range(renter_client):
    client, _ = renter_client

    response = client.post("/api/v1/jobs/", {**PROCESS_JOB, "checkpoint_interval_s": 30}, format="json")

    assert response.status_code == 400
    assert "60" in str(response.json()["fields"]["checkpoint_interval_s"])
    assert not Job.objects.exists()


def test_same_idempotency_key_with_another_checkpoint_interval_is_a_conflict(renter_client):
    client, _ = renter_client
    headers = {"HTTP_IDEMPOTENCY_KEY": "checkpointed"}
    first = client.post("/api/v1/jobs/", {**PROCESS_JOB, "checkpoint_interval_s": 600}, format="json", **headers)

    again = client.post("/api/v1/jobs/", {**PROCESS_JOB, "checkpoint_interval_s": 1200}, format="json", **headers)

    assert first.status_code == 201
    assert again.status_code == 409


def test_same_idempotency_key_and_body_returns_the_same_job(renter_client):
    client, _ = renter_client

    first = client.post("/api/v1/jobs/", PROCESS_JOB, format="json", HTTP_IDEMPOTENCY_KEY="run-42")
    again = client.post("/api/v1/jobs/", PROCESS_JOB, format="json", HTTP_IDEMPOTENCY_KEY="run-42")

    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert Job.objects.count() == 1


def test_same_idempotency_key_with_another_body_is_a_conflict(renter_client):
    client, _ = renter_client
    client.post("/api/v1/jobs/", PROCESS_JOB, format="json", HTTP_IDEMPOTENCY_KEY="run-42")

    response = client.post(
        "/api/v1/jobs/", {**PROCESS_JOB, "gpu_count": 4}, format="json", HTTP_IDEMPOTENCY_KEY="run-42"
    )

    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_key_reused"
    assert Job.objects.count() == 1


def test_idempotency_keys_are_per_renter(renter_client):
    from rest_framework.test import APIClient

    from tests.factories import RenterFactory, token_for

    client, _ = renter_client
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Token {token_for(RenterFactory().user)}")

    mine = client.post("/api/v1/jobs/", PROCESS_JOB, format="json", HTTP_IDEMPOTENCY_KEY="k")
    theirs = other.post("/api/v1/jobs/", PROCESS_JOB, format="json", HTTP_IDEMPOTENCY_KEY="k")

    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]


def test_without_idempotency_key_each_submission_is_a_new_job(renter_client):
    client, _ = renter_client

    client.post("/api/v1/jobs/", PROCESS_JOB, format="json")
    client.post("/api/v1/jobs/", PROCESS_JOB, format="json")

    assert Job.objects.count() == 2


@pytest.mark.parametrize("key", ["", "x" * 129, "caf\u00e9", "tab\there"])
def test_malformed_idempotency_key_is_refused(renter_client, key):
    client, _ = renter_client

    response = client.post("/api/v1/jobs/", PROCESS_JOB, format="json", HTTP_IDEMPOTENCY_KEY=key)

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_idempotency_key"
    assert not Job.objects.exists()


def test_idempotency_key_of_128_characters_is_accepted(renter_client):
    client, _ = renter_client

    response = client.post("/api/v1/jobs/", PROCESS_JOB, format="json", HTTP_IDEMPOTENCY_KEY="k" * 128)

    assert response.status_code == 201


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"gpu_count": 0}, "gpu_count"),
        ({"gpu_count": 17}, "gpu_count"),
        ({"gpu_count": "two"}, "gpu_count"),
        ({"gpu_count": 1.5}, "gpu_count"),
        ({"max_price_per_gpu_hour": "0"}, "max_price_per_gpu_hour"),
        ({"max_price_per_gpu_hour": "1000.01"}, "max_price_per_gpu_hour"),
        ({"max_price_per_gpu_hour": "free"}, "max_price_per_gpu_hour"),
        ({"expected_duration_s": 0}, "expected_duration_s"),
        ({"expected_duration_s": 10**9}, "expected_duration_s"),
        ({"max_duration_s": 60}, "max_duration_s"),
        ({"kind": "vm"}, "kind"),
        ({"command": "python train.py"}, "command"),
        ({"command": []}, "command"),
        ({"command": ["x"] * 257}, "command"),
        ({"env": {"BAD-NAME": "1"}}, "env"),
        # What every agent refuses to run (failed_to_start, attempt after attempt on providers' GPUs).
        ({"kind": "container", "image": "not an image!"}, "image"),
        ({"kind": "container", "image": "--privileged"}, "image"),
        ({"kind": "container", "image": "python:3.12", "env": {"NVIDIA_MIG_CONFIG_DEVICES": "all"}}, "env"),
        ({"kind": "container", "image": "python:3.12", "env": {"NVIDIA_MOFED": "enabled"}}, "env"),
        # Pulled from the owner's machine, outside the rentals' firewall: not from the owner's network.
        ({"kind": "container", "image": "192.168.1.1:8080/probe:1"}, "image"),
        ({"kind": "container", "image": "localhost:5000/probe"}, "image"),
        ({"kind": "container", "image": "169.254.169.254/latest"}, "image"),
        ({"kind": "container", "image": "0x7f.1/x"}, "image"),
        ({"env": ["A=1"]}, "env"),
        ({"min_vram_mb": -1}, "min_vram_mb"),
        ({"allowed_models": "RTX 4090"}, "allowed_models"),
        ({"region": "r" * 65}, "region"),
        ({"gpus": 2}, "gpus"),
        ({"checkpoint_interval_s": 59}, "checkpoint_interval_s"),
        ({"checkpoint_interval_s": 0}, "checkpoint_interval_s"),
        ({"checkpoint_interval_s": -600}, "checkpoint_interval_s"),
        ({"checkpoint_interval_s": 86401}, "checkpoint_interval_s"),
        ({"checkpoint_interval_s": "hourly"}, "checkpoint_interval_s"),
        ({"checkpoint_interval_s": 90.5}, "checkpoint_interval_s"),
    ],
)
def test_invalid_job_requests_are_refused_and_create_nothing(renter_client, change, field):
    client, _ = renter_client

    response = client.post("/api/v1/jobs/", {**PROCESS_JOB, **change}, format="json")

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert any(name.split(".")[0].split("[")[0] == field for name in body["fields"]), body
    assert not Job.objects.exists()


def test_a_container_job_needs_an_image(renter_client):
    client, _ = renter_client

    response = client.post("/api/v1/jobs/", {**PROCESS_JOB, "kind": "container", "image": ""}, format="json")

    assert response.status_code == 400
    assert "image" in response.json()["fields"]


@pytest.mark.parametrize("payload", ["{not json", "[1, 2]", '"a string"'])
def test_a_body_that_is_not_a_json_object_is_refused(renter_client, payload):
    client, _ = renter_client

    response = client.post("/api/v1/jobs/", data=payload, content_type="application/json")

    assert response.status_code == 400
    assert {"code", "detail"} <= set(response.json())
    assert not Job.objects.exists()


def test_an_oversized_body_is_refused(renter_client, settings):
    client, _ = renter_client
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096

    response = client.post("/api/v1/jobs/", {**PROCESS_JOB, "name": "x" * 5000}, format="json")

    assert response.status_code == 413
    assert response.json()["code"] == "too_large"
    assert not Job.objects.exists()


# --- reading --------------------------------------------------------------------------------


def test_renter_lists_only_its_own_jobs_newest_first(renter_client):
    client, renter = renter_client
    older = JobFactory(renter=renter)
    newer = JobFactory(renter=renter)
    JobFactory()  # another renter's

    response = client.get("/api/v1/jobs/")

    assert response.status_code == 200
    assert [j["id"] for j in response.json()["results"]] == [newer.pk, older.pk]


def test_job_list_filters_by_status(renter_client):
    client, renter = renter_client
    pending = JobFactory(renter=renter)
    cancelled = JobFactory(renter=renter, status=Job.Status.CANCELLED)
    failed = JobFactory(renter=renter, status=Job.Status.FAILED)

    only_pending = client.get("/api/v1/jobs/", {"status": "pending"}).json()["results"]
    finished = client.get("/api/v1/jobs/", {"status": "cancelled,failed"}).json()["results"]

    assert [j["id"] for j in only_pending] == [pending.pk]
    assert {j["id"] for j in finished} == {cancelled.pk, failed.pk}


def test_job_list_refuses_an_unknown_status(renter_client):
    client, _ = renter_client

    response = client.get("/api/v1/jobs/", {"status": "paused"})

    assert response.status_code == 400
    assert "status" in response.json()["fields"]


def test_job_list_paginates(renter_client):
    client, renter = renter_client
    for _ in range(3):
        JobFactory(renter=renter)

    page = client.get("/api/v1/jobs/", {"limit": 2}).json()

    assert page["count"] == 3
    assert len(page["results"]) == 2
    assert page["next"] is not None and page["previous"] is None


def test_pending_job_says_why_it_is_not_placed(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter)
    job_set_unplaced(reasons={job.pk: ("no_gpu_matches", "No GPU on the market has 80 GB of memory.")})

    body = client.get(f"/api/v1/jobs/{job.pk}/").json()

    assert body["status"] == "pending"
    assert body["unplaced_reason"]["code"] == "no_gpu_matches"
    assert body["unplaced_reason"]["detail"] == "No GPU on the market has 80 GB of memory."
    assert body["unplaced_reason"]["checked_at"] is not None


def test_scheduled_job_shows_its_current_lease_and_attempts(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter, unplaced_code="no_gpu_matches", unplaced_detail="none")
    lease = placed_lease(job=job, gpus=2)

    body = client.get(f"/api/v1/jobs/{job.pk}/").json()

    assert body["status"] == "scheduled"
    assert body["attempts"] == 1
    assert body["unplaced_reason"] is None
    assert body["current_lease"]["id"] == lease.pk
    assert body["current_lease"]["status"] == "assigned"
    assert body["current_lease"]["price_per_gpu_hour"] == "0.400000"
    assert len(body["current_lease"]["gpus"]) == 2
    assert body["current_lease"]["region"] == "eu-west"


def test_finished_job_shows_exit_code_and_failure_reason(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter)
    lease = placed_lease(job=job)
    lease_mark_started(lease_id=lease.pk, actor="machine:1")
    lease_end(lease_id=lease.pk, reason="failed", actor="machine:1", exit_code=3, detail="CUDA out of memory")

    body = client.get(f"/api/v1/jobs/{job.pk}/").json()

    assert body["status"] == "failed"
    assert body["exit_code"] == 3
    assert body["failure_reason"] == "CUDA out of memory"
    assert body["current_lease"] is None
    assert body["finished_at"] is not None


def test_job_leases_and_events_show_the_audit_trail(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter)
    lease = placed_lease(job=job)
    lease_mark_started(lease_id=lease.pk, actor="machine:1")
    lease_end(lease_id=lease.pk, reason="succeeded", actor="machine:1", exit_code=0)
    Event.objects.create(job=job, kind="job.created", actor=f"renter:{renter.pk}", to_status="pending")

    leases = client.get(f"/api/v1/jobs/{job.pk}/leases/").json()["results"]
    events = client.get(f"/api/v1/jobs/{job.pk}/events/").json()["results"]

    assert [row["id"] for row in leases] == [lease.pk]
    assert leases[0]["end_reason"] == "succeeded"
    assert leases[0]["exit_code"] == 0
    assert [e["kind"] for e in events] == [
        "lease.assigned",
        "lease.started",
        "lease.ended",
        "job.succeeded",
        "job.created",
    ]
    assert events[2]["lease"] == lease.pk
    assert events[3]["to_status"] == "succeeded"


def test_renter_reads_its_leases_with_the_log_tail(renter_client):
    client, renter = renter_client
    lease = placed_lease(renter=renter)
    Lease.objects.filter(pk=lease.pk).update(log_tail="epoch 1: loss 0.3\n")
    placed_lease()  # another renter's

    listed = client.get("/api/v1/leases/").json()
    detail = client.get(f"/api/v1/leases/{lease.pk}/").json()

    assert [row["id"] for row in listed["results"]] == [lease.pk]
    assert "log_tail" not in listed["results"][0]
    assert detail["log_tail"] == "epoch 1: loss 0.3\n"
    assert detail["status"] == "assigned"
    assert detail["end_reason"] is None
    assert GPUFactory._meta.model.objects.get(uuid=detail["gpus"][0]["uuid"]).state == "leased"


# --- cancelling -----------------------------------------------------------------------------


def test_cancelling_a_pending_job_cancels_it(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter)

    response = client.post(f"/api/v1/jobs/{job.pk}/cancel/")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED
    assert job.events.filter(kind="job.cancelled", actor=f"renter:{renter.pk}").exists()


def test_cancelling_a_running_job_asks_its_lease_to_stop(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter)
    lease = placed_lease(job=job)
    lease_mark_started(lease_id=lease.pk, actor="machine:1")

    response = client.post(f"/api/v1/jobs/{job.pk}/cancel/")

    assert response.json()["status"] == "cancelled"
    lease.refresh_from_db()
    assert lease.stop_requested_at is not None
    assert lease.stop_reason == "cancelled"


def test_cancelling_twice_is_harmless(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter)

    client.post(f"/api/v1/jobs/{job.pk}/cancel/")
    again = client.post(f"/api/v1/jobs/{job.pk}/cancel/")

    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"


def test_cancelling_a_finished_job_is_a_conflict(renter_client):
    client, renter = renter_client
    job = JobFactory(renter=renter, status=Job.Status.SUCCEEDED)

    response = client.post(f"/api/v1/jobs/{job.pk}/cancel/")

    assert response.status_code == 409
    assert response.json()["code"] == "invalid_transition"
    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED
