"""The agent API (/api/agent/v1/) as an agent daemon sees it: docs/agent-api.md."""

from __future__ import annotations

import json
import secrets
import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Event, Job, Lease, UsageReport
from jobs.services import job_cancel, lease_request_stop
from providers import services
from providers.models import GPU, Machine, RegistrationToken, TelemetrySample
from tests.factories import (
    GPUFactory,
    JobFactory,
    MachineFactory,
    ProviderFactory,
    agent_client,
    capabilities_report,
    gpu_entry,
    heartbeat,
    machine_with_gpus,
    placed_lease,
)

pytestmark = pytest.mark.django_db

API = "/api/agent/v1/"
on_postgres = pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql", reason="needs PostgreSQL"
)


# --- helpers --------------------------------------------------------------------------------


def post_event(client: APIClient, lease: Lease, type_: str, event_id: str | None = None, **fields: Any):  # type: ignore[no-untyped-def]
    body = {"event_id": event_id or secrets.token_hex(8), "type": type_, "at": timezone.now().isoformat(), **fields}
    return client.post(f"{API}leases/{lease.pk}/events", body, format="json")


def usage_body(lease: Lease, *, start_offset_s: float = 0, seconds: float = 60, gpu_seconds: str = "57.000", **kw: Any):  # type: ignore[no-untyped-def]
    start = lease.started_at + timedelta(seconds=start_offset_s)
    body = {
        "report_id": secrets.token_hex(6),
        "period_start": start.isoformat(),
        "period_end": (start + timedelta(seconds=seconds)).isoformat(),
        "gpu_seconds": gpu_seconds,
        "mean_utilization_pct": 93.5,
        "peak_memory_mb": 20480,
        "signature": "0x" + "ab" * 65,
    }
    body.update(kw)
    return body


def running_lease(client: APIClient, job: Job, gpus: list[GPU]) -> Lease:
    """`job` leased on `gpus`, reported started by their machine's agent (`client`), ten minutes ago."""
    lease = placed_lease(job=job, gpus=gpus)
    assert post_event(client, lease, "started").status_code == 200
    lease.refresh_from_db()
    # Usage periods are checked against the start; put it a while back so a period fits.
    Lease.objects.filter(pk=lease.pk).update(started_at=timezone.now() - timedelta(minutes=10))
    lease.refresh_from_db()
    return lease


# --- register -------------------------------------------------------------------------------


def test_register_trades_token_for_credential_that_authenticates_heartbeats(api_client: APIClient) -> None:
    provider = ProviderFactory()
    token, raw = services.registration_token_create(provider=provider, label="rig")

    resp = api_client.post(
        API + "register",
        {
            "token": raw,
            "hostname": "rig-1",
            "agent_version": "0.1.0",
            "signing_address": "0x" + "1" * 40,
            "region": "eu",
        },
        format="json",
    )

    assert resp.status_code == 201, resp.json()
    body = resp.json()
    assert body["credential"].startswith("gpm_")
    assert body["heartbeat_interval_s"] == settings.GPGPU["HEARTBEAT_INTERVAL_S"]
    machine = Machine.objects.get(pk=body["machine_id"])
    assert machine.provider == provider
    assert (machine.hostname, machine.region, machine.signing_address) == ("rig-1", "eu", "0x" + "1" * 40)
    assert machine.status == Machine.Status.OFFLINE
    token.refresh_from_db()
    assert token.used_at is not None and token.machine == machine

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {body['credential']}")
    assert heartbeat(client, [gpu_entry("GPU-a")]).status_code == 200
    machine.refresh_from_db()
    assert machine.status == Machine.Status.ONLINE


def test_registration_token_works_only_once(api_client: APIClient) -> None:
    _, raw = services.registration_token_create(provider=ProviderFactory())
    body = {"token": raw, "hostname": "rig-1", "agent_version": "0.1.0"}
    assert api_client.post(API + "register", body, format="json").status_code == 201

    again = api_client.post(API + "register", {**body, "hostname": "rig-2"}, format="json")

    assert again.status_code == 401
    assert again.json()["code"] == "registration_token_invalid"
    assert "already been used" in again.json()["detail"]
    assert list(Machine.objects.values_list("hostname", flat=True)) == ["rig-1"]


def test_expired_registration_token_is_refused(api_client: APIClient) -> None:
    token, raw = services.registration_token_create(provider=ProviderFactory())
    RegistrationToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    resp = api_client.post(API + "register", {"token": raw, "hostname": "rig", "agent_version": "0.1"}, format="json")

    assert resp.status_code == 401
    assert resp.json()["code"] == "registration_token_invalid"
    assert not Machine.objects.exists()
    token.refresh_from_db()
    assert token.used_at is None


def test_unknown_registration_token_is_refused(api_client: APIClient) -> None:
    resp = api_client.post(
        API + "register", {"token": "gpreg_nope", "hostname": "rig", "agent_version": "0.1"}, format="json"
    )
    assert resp.status_code == 401
    assert resp.json()["code"] == "registration_token_invalid"
    assert not Machine.objects.exists()


def test_register_refuses_malformed_fields_without_using_the_token(api_client: APIClient) -> None:
    token, raw = services.registration_token_create(provider=ProviderFactory())
    resp = api_client.post(
        API + "register",
        {"token": raw, "hostname": "h" * 256, "agent_version": "0.1", "signing_address": "0x123"},
        format="json",
    )
    assert resp.status_code == 400
    assert set(resp.json()["fields"]) == {"hostname", "signing_address"}
    token.refresh_from_db()
    assert token.used_at is None


@on_postgres
@pytest.mark.django_db(transaction=True)
def test_two_concurrent_registrations_cannot_both_use_one_token() -> None:
    _, raw = services.registration_token_create(provider=ProviderFactory())
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def register(hostname: str) -> None:
        try:
            barrier.wait()
            services.machine_register(raw_token=raw, hostname=hostname, agent_version="0.1")
            outcomes.append("ok")
        except services.RegistrationTokenInvalid:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=register, args=(f"rig-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(outcomes) == ["ok", "refused"]
    assert Machine.objects.count() == 1


# --- authentication and isolation -----------------------------------------------------------


def test_unknown_credential_is_401(api_client: APIClient) -> None:
    api_client.credentials(HTTP_AUTHORIZATION="Machine gpm_not-a-real-one")
    resp = heartbeat(api_client, [gpu_entry("GPU-a")])
    assert resp.status_code == 401
    assert resp.json()["code"] == "machine_credential_invalid"
    assert not GPU.objects.exists()


def test_missing_credential_is_401(api_client: APIClient) -> None:
    resp = heartbeat(api_client, [gpu_entry("GPU-a")])
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Machine"


def test_a_persons_api_token_does_not_open_the_agent_api(renter_client) -> None:  # type: ignore[no-untyped-def]
    client, _ = renter_client
    assert heartbeat(client, [gpu_entry("GPU-a")]).status_code == 401


def test_suspended_machine_is_403_and_nothing_changes() -> None:
    machine = MachineFactory(status=Machine.Status.SUSPENDED, suspended_reason="abuse")
    client = agent_client(machine)
    before = Machine.objects.get(pk=machine.pk).last_heartbeat_at

    resp = heartbeat(client, [gpu_entry("GPU-a")])

    assert resp.status_code == 403
    assert resp.json()["code"] == "machine_suspended"
    machine.refresh_from_db()
    assert machine.status == Machine.Status.SUSPENDED and machine.last_heartbeat_at == before
    assert not GPU.objects.exists()


def test_machine_cannot_post_events_or_usage_for_another_machines_lease() -> None:
    owner = machine_with_gpus(count=1)
    other_client = agent_client(MachineFactory())
    owner_client = agent_client(owner)
    lease = running_lease(owner_client, JobFactory(), list(owner.gpus.all()))

    event = post_event(other_client, lease, "exited", exit_code=0)
    usage = other_client.post(f"{API}leases/{lease.pk}/usage", usage_body(lease), format="json")

    assert (event.status_code, usage.status_code) == (404, 404)
    assert event.json()["code"] == "not_found"
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RUNNING
    assert not UsageReport.objects.exists()


def test_nonexistent_lease_is_404() -> None:
    client = agent_client(MachineFactory())
    resp = client.post(
        f"{API}leases/{2**70}/events",
        {"event_id": "e", "type": "started", "at": timezone.now().isoformat()},
        format="json",
    )
    assert resp.status_code == 404


# --- heartbeat ------------------------------------------------------------------------------


def test_heartbeat_records_inventory_facts_and_telemetry() -> None:
    machine = MachineFactory(status=Machine.Status.OFFLINE, last_heartbeat_at=None)
    client = agent_client(machine)

    resp = heartbeat(
        client,
        [gpu_entry("GPU-a", 0, utilization_pct=3.5, temperature_c=40.0), gpu_entry("GPU-b", 1, memory_used_mb=None)],
        driver_version="555.1",
    )

    assert resp.status_code == 200, resp.json()
    body = resp.json()
    assert body["heartbeat_interval_s"] == settings.GPGPU["HEARTBEAT_INTERVAL_S"]
    assert body["start"] == [] and body["stop"] == []
    machine.refresh_from_db()
    assert machine.status == Machine.Status.ONLINE
    assert machine.last_heartbeat_at is not None
    assert (machine.driver_version, machine.cpu_cores, machine.ram_mb) == ("555.1", 16, 64000)
    a, b = GPU.objects.filter(machine=machine).order_by("index")
    assert (a.uuid, a.model, a.vram_mb, a.state) == ("GPU-a", "NVIDIA GeForce RTX 4090", 24564, GPU.State.IDLE)
    assert (a.utilization_pct, a.temperature_c) == (3.5, 40.0)
    assert b.memory_used_mb is None
    assert TelemetrySample.objects.filter(gpu__machine=machine).count() == 2


def test_heartbeat_derives_each_gpus_state() -> None:
    machine = machine_with_gpus(count=1)
    leased = machine.gpus.get()
    placed_lease(gpus=[leased])
    client = agent_client(machine)

    resp = heartbeat(
        client,
        [
            gpu_entry(leased.uuid, 0),  # idle by the agent's eyes, but in an active lease
            gpu_entry("GPU-idle", 1),
            gpu_entry("GPU-owner", 2, idle=False, owner_busy=True),
            gpu_entry("GPU-warm", 3, idle=False),  # not idle yet (grace period), no owner process
        ],
    )

    assert resp.status_code == 200
    states = dict(GPU.objects.filter(machine=machine).values_list("uuid", "state"))
    assert states == {
        leased.uuid: GPU.State.LEASED,
        "GPU-idle": GPU.State.IDLE,
        "GPU-owner": GPU.State.OWNER_BUSY,
        "GPU-warm": GPU.State.OWNER_BUSY,
    }
    assert GPU.objects.get(uuid="GPU-owner").idle_since is None
    assert GPU.objects.get(uuid="GPU-idle").idle_since.isoformat().startswith("2026-01-01")


def test_gpu_missing_from_heartbeat_goes_offline() -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    heartbeat(client, [gpu_entry("GPU-a", 0), gpu_entry("GPU-b", 1)])

    resp = heartbeat(client, [gpu_entry("GPU-a", 0)])

    assert resp.status_code == 200
    assert GPU.objects.get(uuid="GPU-b").state == GPU.State.OFFLINE
    assert GPU.objects.get(uuid="GPU-a").state == GPU.State.IDLE


def test_gpus_may_swap_indexes_and_a_new_gpu_may_take_a_fallen_ones_slot() -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    heartbeat(client, [gpu_entry("GPU-a", 0), gpu_entry("GPU-b", 1), gpu_entry("GPU-c", 2)])

    resp = heartbeat(client, [gpu_entry("GPU-a", 1), gpu_entry("GPU-b", 0), gpu_entry("GPU-new", 2)])

    assert resp.status_code == 200, resp.json()
    gpus = {g.uuid: g for g in GPU.objects.filter(machine=machine)}
    assert (gpus["GPU-a"].index, gpus["GPU-b"].index, gpus["GPU-new"].index) == (1, 0, 2)
    assert gpus["GPU-c"].state == GPU.State.OFFLINE


def test_gpu_uuid_of_another_machine_is_409_and_nothing_changes() -> None:
    taken = GPUFactory(uuid="GPU-taken")
    machine = MachineFactory(status=Machine.Status.OFFLINE, last_heartbeat_at=None)
    client = agent_client(machine)

    resp = heartbeat(client, [gpu_entry("GPU-mine", 0), gpu_entry("GPU-taken", 1)])

    assert resp.status_code == 409
    assert resp.json()["code"] == "gpu_uuid_taken"
    assert not GPU.objects.filter(machine=machine).exists()
    machine.refresh_from_db()
    assert machine.status == Machine.Status.OFFLINE and machine.last_heartbeat_at is None
    taken.refresh_from_db()
    assert taken.machine_id != machine.pk


def test_oversized_heartbeat_is_413_and_changes_nothing() -> None:
    machine = MachineFactory(status=Machine.Status.OFFLINE, last_heartbeat_at=None)
    client = agent_client(machine)

    resp = heartbeat(client, [gpu_entry("GPU-a")], padding="x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1))

    assert resp.status_code == 413
    assert resp.json()["code"] == "too_large"
    assert not GPU.objects.exists()
    machine.refresh_from_db()
    assert machine.last_heartbeat_at is None


@pytest.mark.parametrize(
    ("gpus", "field"),
    [
        ([gpu_entry("GPU-a", utilization_pct=100.5)], "gpus.0.utilization_pct"),
        ([gpu_entry("GPU-a", temperature_c=-1)], "gpus.0.temperature_c"),
        ([gpu_entry("GPU-a", power_w="a lot")], "gpus.0.power_w"),
        ([gpu_entry("GPU-a", vram_mb=2**40)], "gpus.0.vram_mb"),
        ([gpu_entry("GPU-a", idle=None)], "gpus.0.idle"),
        ([gpu_entry("GPU a b")], "gpus.0.uuid"),
        ([gpu_entry("G" * 97)], "gpus.0.uuid"),
        ([{"uuid": "GPU-a"}], "gpus.0.index"),
        ([gpu_entry("GPU-a", 0), gpu_entry("GPU-a", 1)], "gpus"),
        ([gpu_entry("GPU-a", 0), gpu_entry("GPU-b", 0)], "gpus"),
        ([gpu_entry(f"GPU-{i}", i) for i in range(65)], "gpus"),
        ("not a list", "gpus"),
    ],
)
def test_malformed_heartbeat_is_400_with_the_offending_field(gpus: Any, field: str) -> None:
    machine = MachineFactory(last_heartbeat_at=None)
    client = agent_client(machine)

    resp = heartbeat(client, gpus)

    assert resp.status_code == 400
    body = resp.json()
    assert body["code"] == "invalid"
    assert any(key.startswith(field) for key in body["fields"]), body
    assert not GPU.objects.exists()
    machine.refresh_from_db()
    assert machine.last_heartbeat_at is None


def test_heartbeat_with_non_finite_number_is_400() -> None:
    client = agent_client(MachineFactory())
    raw = json.dumps({"gpus": [gpu_entry("GPU-a")]}).replace('"utilization_pct": 0.0', '"utilization_pct": NaN')
    assert "NaN" in raw
    resp = client.post(API + "heartbeat", raw, content_type="application/json")
    assert resp.status_code == 400
    assert not GPU.objects.exists()


@pytest.mark.parametrize(
    ("leases", "field"),
    [
        ([{"lease_id": 1, "state": "dancing"}], "leases.0.state"),
        ([{"lease_id": 0, "state": "running"}], "leases.0.lease_id"),
        ([{"lease_id": 1, "state": "running"}, {"lease_id": 1, "state": "running"}], "leases"),
    ],
)
def test_malformed_lease_list_is_400(leases: list[dict[str, Any]], field: str) -> None:
    client = agent_client(MachineFactory())
    resp = heartbeat(client, [gpu_entry("GPU-a")], leases)
    assert resp.status_code == 400
    assert any(key.startswith(field) for key in resp.json()["fields"]), resp.json()


def test_repeated_heartbeat_is_harmless_and_samples_telemetry_once_per_interval(settings) -> None:  # type: ignore[no-untyped-def]
    settings.GPGPU = {**settings.GPGPU, "TELEMETRY_SAMPLE_INTERVAL_S": 10**9}
    machine = MachineFactory()
    client = agent_client(machine)
    gpus = [gpu_entry("GPU-a", 0), gpu_entry("GPU-b", 1, idle=False, owner_busy=True)]

    first = heartbeat(client, gpus)
    second = heartbeat(client, gpus)

    assert first.status_code == second.status_code == 200
    assert first.json()["start"] == second.json()["start"] == []
    assert sorted(GPU.objects.filter(machine=machine).values_list("uuid", "state")) == [
        ("GPU-a", GPU.State.IDLE),
        ("GPU-b", GPU.State.OWNER_BUSY),
    ]
    assert TelemetrySample.objects.count() == 2


@pytest.mark.usefixtures("full_heartbeats")  # the interval's end is written to the row, not to Redis's record
def test_a_new_telemetry_sample_is_written_once_the_interval_has_passed() -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    heartbeat(client, [gpu_entry("GPU-a", 0, utilization_pct=10.0)])
    interval = settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"]
    GPU.objects.filter(uuid="GPU-a").update(last_telemetry_at=timezone.now() - timedelta(seconds=interval))

    heartbeat(client, [gpu_entry("GPU-a", 0, utilization_pct=55.0)])

    assert sorted(TelemetrySample.objects.values_list("utilization_pct", flat=True)) == [10.0, 55.0]


def test_heartbeat_reply_says_what_to_start_and_what_to_stop() -> None:
    machine = machine_with_gpus(count=4)
    g0, g1, g2, g3 = machine.gpus.order_by("index")
    client = agent_client(machine)
    job = JobFactory(kind=Job.Kind.CONTAINER, image="pytorch:2", command=["python", "train.py"], env={"A": "1"})
    to_start = placed_lease(job=job, gpus=[g0, g1])
    running = placed_lease(gpus=[g2])
    lease_to_cancel = placed_lease(gpus=[g3])
    post_event(client, running, "started")
    post_event(client, lease_to_cancel, "started")
    lease_request_stop(lease_id=running.pk, reason=Lease.EndReason.MAX_DURATION, actor="test")
    job_cancel(job=lease_to_cancel.job, actor="test")
    lease_end_cancelled = Lease.objects.get(pk=lease_to_cancel.pk)
    assert lease_end_cancelled.status == Lease.Status.RUNNING  # cancel asks the agent to stop it

    resp = heartbeat(
        client,
        [gpu_entry(g.uuid, g.index, idle=False) for g in (g0, g1, g2, g3)],
        [
            {"lease_id": running.pk, "state": "running"},
            {"lease_id": lease_to_cancel.pk, "state": "running"},
            {"lease_id": 999_999, "state": "running"},
        ],
    )

    assert resp.status_code == 200
    body = resp.json()
    assert body["start"] == [
        {
            "lease_id": to_start.pk,
            "job_id": job.pk,
            "kind": "container",
            "image": "pytorch:2",
            "command": ["python", "train.py"],
            "env": {"A": "1"},
            "gpu_uuids": [g0.uuid, g1.uuid],
            "max_duration_s": job.max_duration_s,
            "price_per_gpu_hour": "0.400000",
            "checkpoint_interval_s": None,
            "checkpoint": None,
        }
    ]
    assert body["stop"] == [
        {"lease_id": running.pk, "reason": "max_duration", "save_checkpoint": False},
        {"lease_id": lease_to_cancel.pk, "reason": "cancelled", "save_checkpoint": False},
        {"lease_id": 999_999, "reason": "unknown_lease", "save_checkpoint": False},
    ]
    # The leased GPUs stay leased whatever the agent says about their idleness.
    assert set(GPU.objects.filter(machine=machine).values_list("state", flat=True)) == {GPU.State.LEASED}

    # Once the agent reports the lease as starting, it is no longer asked to start it.
    again = heartbeat(
        client, [gpu_entry(g.uuid, g.index) for g in (g0, g1, g2, g3)], [{"lease_id": to_start.pk, "state": "starting"}]
    )
    assert again.json()["start"] == []


def test_ended_lease_the_agent_still_lists_is_in_stop_with_its_end_reason() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))
    post_event(client, lease, "exited", exit_code=0)

    resp = heartbeat(client, [gpu_entry(machine.gpus.get().uuid, 0)], [{"lease_id": lease.pk, "state": "stopping"}])

    assert resp.json()["stop"] == [{"lease_id": lease.pk, "reason": "succeeded", "save_checkpoint": False}]


# --- lease events ---------------------------------------------------------------------------


def test_lease_lifecycle_from_start_to_success() -> None:
    machine = machine_with_gpus(count=1)
    gpu = machine.gpus.get()
    client = agent_client(machine)
    lease = placed_lease(gpus=[gpu])

    started = post_event(client, lease, "started")
    assert started.status_code == 200, started.json()
    assert started.json() == {
        "lease_id": lease.pk,
        "lease_status": "running",
        "job_status": "running",
        "duplicate": False,
    }

    exited = post_event(client, lease, "exited", exit_code=0, detail="done", log_tail="epoch 10\nloss 0.01\n")

    assert exited.status_code == 200
    assert exited.json()["lease_status"] == "ended" and exited.json()["job_status"] == "succeeded"
    lease.refresh_from_db()
    assert (lease.end_reason, lease.exit_code, lease.log_tail) == ("succeeded", 0, "epoch 10\nloss 0.01\n")
    assert lease.started_at <= lease.ended_at
    gpu.refresh_from_db()
    assert gpu.state == GPU.State.IDLE


def test_non_zero_exit_fails_the_job_with_its_exit_code() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))

    resp = post_event(client, lease, "exited", exit_code=3, detail="CUDA out of memory")

    assert resp.json()["job_status"] == "failed"
    job = Job.objects.get(pk=lease.job_id)
    assert (job.exit_code, job.failure_reason) == (3, "CUDA out of memory")
    assert Lease.objects.get(pk=lease.pk).end_reason == "failed"


def test_exited_without_exit_code_is_400() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))

    resp = post_event(client, lease, "exited")

    assert resp.status_code == 400
    assert "exit_code" in resp.json()["fields"]
    assert Lease.objects.get(pk=lease.pk).status == Lease.Status.RUNNING


@pytest.mark.parametrize(
    ("fields", "offending"),
    [
        ({"type": "exploded"}, "type"),
        ({"event_id": "e" * 129}, "event_id"),
        ({"at": "yesterday"}, "at"),
        ({"exit_code": 2**40, "type": "exited"}, "exit_code"),
        ({"log_tail": "x" * (64 * 1024 + 1)}, "log_tail"),
        ({"log_tail": "é" * (32 * 1024 + 1)}, "log_tail"),  # counted in UTF-8 bytes
        ({"log_tail": "a\x00b"}, "log_tail"),
    ],
)
def test_malformed_event_is_400_and_changes_nothing(fields: dict[str, Any], offending: str) -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = placed_lease(machine=machine)
    body = {"event_id": "e1", "type": "started", "at": timezone.now().isoformat(), **fields}

    resp = client.post(f"{API}leases/{lease.pk}/events", body, format="json")

    assert resp.status_code == 400
    assert offending in resp.json()["fields"]
    lease.refresh_from_db()
    assert (lease.status, lease.log_tail) == (Lease.Status.ASSIGNED, "")


def test_owner_preemption_requeues_an_interruptible_job() -> None:
    machine = machine_with_gpus(count=1)
    gpu = machine.gpus.get()
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(interruptible=True), [gpu])

    resp = post_event(client, lease, "preempted_by_owner", detail="owner started a game")

    assert resp.json() == {"lease_id": lease.pk, "lease_status": "ended", "job_status": "pending", "duplicate": False}
    assert Lease.objects.get(pk=lease.pk).end_reason == "preempted_by_owner"
    gpu.refresh_from_db()
    assert gpu.state == GPU.State.OWNER_BUSY


def test_owner_preemption_fails_a_non_interruptible_job_with_a_reason() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(interruptible=False), list(machine.gpus.all()))

    resp = post_event(client, lease, "preempted_by_owner")

    assert resp.json()["job_status"] == "failed"
    assert "preempted_by_owner" in Job.objects.get(pk=lease.job_id).failure_reason


def test_failed_start_is_retried_then_fails_after_max_attempts(settings) -> None:  # type: ignore[no-untyped-def]
    settings.GPGPU = {**settings.GPGPU, "JOB_MAX_ATTEMPTS": 2}
    machine = machine_with_gpus(count=1)
    gpu = machine.gpus.get()
    client = agent_client(machine)
    job = JobFactory()

    first = post_event(client, placed_lease(job=job, gpus=[gpu]), "failed_to_start", detail="image pull failed")
    assert first.json()["job_status"] == "pending"
    gpu.refresh_from_db()
    assert gpu.state == GPU.State.IDLE

    second = post_event(client, placed_lease(job=job, gpus=[gpu]), "failed_to_start", detail="image pull failed")

    assert second.json()["job_status"] == "failed"
    job.refresh_from_db()
    assert job.attempts == 2
    assert "image pull failed" in job.failure_reason


def test_repeated_event_id_is_answered_like_the_first_and_changes_nothing() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))
    first = post_event(client, lease, "exited", event_id="exit-1", exit_code=0, log_tail="first")
    events_after_first = Event.objects.count()

    again = post_event(client, lease, "exited", event_id="exit-1", exit_code=0, log_tail="second")

    assert again.status_code == 200
    assert again.json() == {**first.json(), "duplicate": True}
    assert Event.objects.count() == events_after_first
    assert Lease.objects.get(pk=lease.pk).log_tail == "first"


def test_a_start_cannot_be_backdated_before_its_agent_was_told_to_start() -> None:
    """Billing counts from the start: a start reported an hour back would bill the time between
    the lease's assignment and its start order (or one never sent)."""
    machine = machine_with_gpus(count=2)
    client = agent_client(machine)
    sent, never_sent = (placed_lease(job=JobFactory(), gpus=[gpu]) for gpu in machine.gpus.all())
    sent_at = timezone.now() - timedelta(seconds=30)
    Lease.objects.filter(pk=sent.pk).update(created_at=sent_at - timedelta(minutes=5), start_sent_at=sent_at)
    hour_ago = (timezone.now() - timedelta(hours=1)).isoformat()

    before = timezone.now()
    for lease in (sent, never_sent):
        assert post_event(client, lease, "started", at=hour_ago).status_code == 200

    assert Lease.objects.get(pk=sent.pk).started_at == sent_at
    assert Lease.objects.get(pk=never_sent.pk).started_at >= before


def test_event_ids_of_different_leases_do_not_collide() -> None:
    machine = machine_with_gpus(count=2)
    g0, g1 = machine.gpus.order_by("index")
    client = agent_client(machine)
    a, b = placed_lease(gpus=[g0]), placed_lease(gpus=[g1])

    ra = post_event(client, a, "started", event_id="start")
    rb = post_event(client, b, "started", event_id="start")

    assert (ra.json()["duplicate"], rb.json()["duplicate"]) == (False, False)
    assert set(Lease.objects.filter(pk__in=[a.pk, b.pk]).values_list("status", flat=True)) == {"running"}


def test_event_the_state_does_not_allow_is_409() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))
    post_event(client, lease, "exited", exit_code=0)

    resp = post_event(client, lease, "started", event_id="a-new-one")

    assert resp.status_code == 409
    assert resp.json()["code"] == "invalid_transition"
    assert Lease.objects.get(pk=lease.pk).end_reason == "succeeded"


def test_exit_after_a_stop_request_ends_the_lease_with_the_requested_reason() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))
    lease_request_stop(lease_id=lease.pk, reason=Lease.EndReason.MAX_DURATION, actor="test")

    resp = post_event(client, lease, "exited", exit_code=137)

    assert resp.json()["job_status"] == "failed"
    assert Lease.objects.get(pk=lease.pk).end_reason == "max_duration"


# --- usage ----------------------------------------------------------------------------------


def test_usage_report_is_stored_once() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))
    body = usage_body(lease, start_offset_s=60, seconds=60, gpu_seconds="57.000")

    created = client.post(f"{API}leases/{lease.pk}/usage", body, format="json")
    again = client.post(f"{API}leases/{lease.pk}/usage", body, format="json")

    assert created.status_code == 201, created.json()
    assert created.json()["duplicate"] is False
    assert again.status_code == 200
    assert again.json() == {**created.json(), "duplicate": True}
    report = UsageReport.objects.get()
    assert (report.lease_id, report.report_id, report.gpu_seconds) == (lease.pk, body["report_id"], Decimal("57.000"))
    assert report.signature == body["signature"]
    assert report.payload["period_start"] == body["period_start"]


def test_a_usage_reports_unknown_fields_are_ignored_and_not_stored() -> None:
    """The contract ignores unknown fields; storing them kept unchecked text (a NUL, which
    PostgreSQL's jsonb refuses: a 500) and up to a request's size in every report."""
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))
    body = usage_body(lease, start_offset_s=60, seconds=60, gpu_seconds="57.000")

    resp = client.post(
        f"{API}leases/{lease.pk}/usage", {**body, "note": "a\u0000b", "junk": "x" * 100_000}, format="json"
    )

    assert resp.status_code == 201, resp.content
    report = UsageReport.objects.get()
    assert set(report.payload) <= set(body) and report.payload["report_id"] == body["report_id"]
    assert report.payload["signature"] == body["signature"]


def test_a_usage_report_overlapping_one_already_accepted_is_refused() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))
    first = usage_body(lease, start_offset_s=60, seconds=60)
    overlapping = usage_body(lease, start_offset_s=90, seconds=60)
    adjacent = usage_body(lease, start_offset_s=120, seconds=60)

    assert client.post(f"{API}leases/{lease.pk}/usage", first, format="json").status_code == 201
    refused = client.post(f"{API}leases/{lease.pk}/usage", overlapping, format="json")
    accepted = client.post(f"{API}leases/{lease.pk}/usage", adjacent, format="json")

    assert refused.status_code == 409
    assert refused.json()["code"] == "usage_period_overlaps"
    assert first["report_id"] in refused.json()["detail"]
    assert accepted.status_code == 201  # touching the end of another is not overlapping
    assert UsageReport.objects.filter(lease=lease).count() == 2


def test_a_lease_stores_a_bounded_number_of_usage_reports() -> None:
    from jobs.ingestion import usage_reports_max

    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    job = JobFactory(expected_duration_s=60, max_duration_s=100)
    lease = running_lease(client, job, list(machine.gpus.all()))
    limit = usage_reports_max(max_duration_s=100)
    codes = [
        client.post(
            f"{API}leases/{lease.pk}/usage",
            usage_body(lease, start_offset_s=i, seconds=1, gpu_seconds="1.000"),
            format="json",
        ).status_code
        for i in range(limit + 3)
    ]

    assert limit == 20
    assert codes == [201] * limit + [409] * 3
    assert UsageReport.objects.filter(lease=lease).count() == limit


def test_usage_of_an_ended_lease_within_its_span_is_accepted() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))
    post_event(client, lease, "exited", exit_code=0)
    lease.refresh_from_db()

    resp = client.post(
        f"{API}leases/{lease.pk}/usage",
        usage_body(lease, seconds=(lease.ended_at - lease.started_at).total_seconds()),
        format="json",
    )

    assert resp.status_code == 201


@pytest.mark.parametrize(
    ("offset_s", "seconds", "gpu_seconds", "code"),
    [
        (-60, 30, "10", "usage_period_outside_lease"),  # before the lease started
        (60, 3600, "10", "usage_period_outside_lease"),  # reaches into the future
        (60, 60, "60.001", "usage_gpu_seconds_exceeded"),  # one GPU for 60 s
    ],
)
def test_usage_report_outside_the_lease_or_over_its_capacity_is_400(
    offset_s: int, seconds: int, gpu_seconds: str, code: str
) -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))

    resp = client.post(
        f"{API}leases/{lease.pk}/usage",
        usage_body(lease, start_offset_s=offset_s, seconds=seconds, gpu_seconds=gpu_seconds),
        format="json",
    )

    assert resp.status_code == 400
    assert resp.json()["code"] == code
    assert not UsageReport.objects.exists()


def test_usage_gpu_seconds_may_reach_period_times_gpu_count() -> None:
    machine = machine_with_gpus(count=2)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(gpu_count=2), list(machine.gpus.all()))

    resp = client.post(
        f"{API}leases/{lease.pk}/usage",
        usage_body(lease, start_offset_s=1, seconds=60, gpu_seconds="120.000"),
        format="json",
    )

    assert resp.status_code == 201


def test_usage_within_the_clock_skew_allowance_is_accepted() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))

    resp = client.post(
        f"{API}leases/{lease.pk}/usage",
        usage_body(lease, start_offset_s=-4, seconds=30, gpu_seconds="30"),
        format="json",
    )

    assert resp.status_code == 201


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"gpu_seconds": "-1"}, "gpu_seconds"),
        ({"gpu_seconds": "NaN"}, "gpu_seconds"),
        ({"gpu_seconds": "1.0001"}, "gpu_seconds"),
        ({"mean_utilization_pct": 101}, "mean_utilization_pct"),
        ({"signature": "not hex"}, "signature"),
        ({"report_id": ""}, "report_id"),
    ],
)
def test_malformed_usage_report_is_400(overrides: dict[str, Any], field: str) -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))

    resp = client.post(f"{API}leases/{lease.pk}/usage", usage_body(lease, start_offset_s=1, **overrides), format="json")

    assert resp.status_code == 400
    assert field in resp.json()["fields"]
    assert not UsageReport.objects.exists()


def test_usage_period_that_ends_before_it_starts_is_400() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = running_lease(client, JobFactory(), list(machine.gpus.all()))
    body = usage_body(lease, start_offset_s=60)
    body["period_end"], body["period_start"] = body["period_start"], body["period_end"]

    resp = client.post(f"{API}leases/{lease.pk}/usage", body, format="json")

    assert resp.status_code == 400
    assert "period_end" in resp.json()["fields"]


def test_usage_of_a_lease_not_yet_started_is_400() -> None:
    machine = machine_with_gpus(count=1)
    client = agent_client(machine)
    lease = placed_lease(machine=machine)
    now = timezone.now()
    body = {
        "report_id": "r1",
        "period_start": (now - timedelta(seconds=30)).isoformat(),
        "period_end": now.isoformat(),
        "gpu_seconds": "1",
    }

    resp = client.post(f"{API}leases/{lease.pk}/usage", body, format="json")

    assert resp.status_code == 400
    assert resp.json()["code"] == "usage_period_outside_lease"


# --- schema ---------------------------------------------------------------------------------


def test_agent_endpoints_are_in_the_openapi_schema_with_machine_auth(api_client: APIClient) -> None:
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    paths = schema["paths"]
    assert {"/api/agent/v1/register", "/api/agent/v1/heartbeat"} <= set(paths)
    assert "machineAuth" in schema["components"]["securitySchemes"]
    assert paths["/api/agent/v1/heartbeat"]["post"]["security"] == [{"machineAuth": []}]
    assert "409" in paths["/api/agent/v1/heartbeat"]["post"]["responses"]


# --- capabilities: which job kinds the machine accepts --------------------------------------

CAPABILITIES: dict[str, Any] = capabilities_report()


def registered_machine(api_client: APIClient) -> tuple[Machine, APIClient]:
    """A machine registered through the agent API, as a real agent registers, and its client."""
    _, raw = services.registration_token_create(provider=ProviderFactory())
    body = api_client.post(
        API + "register", {"token": raw, "hostname": "rig", "agent_version": "0.2.0"}, format="json"
    ).json()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {body['credential']}")
    return Machine.objects.get(pk=body["machine_id"]), client


def test_a_machine_accepts_containers_only_until_its_agent_reports_otherwise(api_client: APIClient) -> None:
    machine, client = registered_machine(api_client)

    assert heartbeat(client, [gpu_entry("GPU-a")]).status_code == 200

    machine.refresh_from_db()
    assert (machine.accepts_container, machine.accepts_process) == (True, False)
    assert machine.capabilities is None and machine.capabilities_reported_at is None


def test_heartbeat_capabilities_say_which_kinds_the_machine_accepts_and_are_kept_until_reported_again(
    api_client: APIClient,
) -> None:
    machine, client = registered_machine(api_client)
    reported = json.loads(json.dumps(CAPABILITIES))
    # A newer agent may say more; only the known fields are stored.
    reported["container"].update(ready=True, problem=None)
    reported["future"] = {"vm": True}

    first = heartbeat(client, [gpu_entry("GPU-a")], capabilities=reported)
    machine.refresh_from_db()
    opted_in = (machine.accepts_container, machine.accepts_process, machine.capabilities)
    reported_at = machine.capabilities_reported_at
    without = heartbeat(client, [gpu_entry("GPU-a")])
    machine.refresh_from_db()

    assert first.status_code == 200, first.json()
    assert opted_in == (True, True, {**CAPABILITIES, "refused": {}})
    assert reported_at is not None
    assert without.status_code == 200
    assert (machine.accepts_container, machine.accepts_process) == (True, True)
    assert machine.capabilities_reported_at == reported_at

    refused = {"process": "process jobs are off (allow_process_jobs = false)"}
    heartbeat(
        client,
        [gpu_entry("GPU-a")],
        capabilities={"kinds": ["container"], "container": CAPABILITIES["container"], "refused": refused},
    )
    machine.refresh_from_db()
    assert (machine.accepts_container, machine.accepts_process) == (True, False)
    assert machine.capabilities["refused"] == refused
    assert machine.capabilities["process"] is None

    heartbeat(client, [gpu_entry("GPU-a")], capabilities={"kinds": []})
    machine.refresh_from_db()
    assert (machine.accepts_container, machine.accepts_process) == (False, False)


def _capabilities(**changes: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(CAPABILITIES))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = body
        for key in parents:
            target = target[key]
        target[leaf] = value
    return body


@pytest.mark.parametrize(
    ("capabilities", "field"),
    [
        ("yes", "capabilities.non_field_errors"),
        ({"container": None}, "capabilities.kinds"),
        (_capabilities(kinds=["container", "container"]), "capabilities.kinds"),
        (_capabilities(kinds=["vm"]), "capabilities.kinds.0"),
        (_capabilities(kinds="container"), "capabilities.kinds"),
        (_capabilities(process=None), "capabilities.process"),
        (_capabilities(container={"network": "filtered"}), "capabilities.container.engine"),
        (_capabilities(container__engine="x" * 33), "capabilities.container.engine"),
        (_capabilities(container__engine_version="1" * 65), "capabilities.container.engine_version"),
        (_capabilities(container__runtime="r" * 33), "capabilities.container.runtime"),
        (_capabilities(container__user_namespace="maybe"), "capabilities.container.user_namespace"),
        (_capabilities(container__network="open"), "capabilities.container.network"),
        (_capabilities(process__user="u" * 65), "capabilities.process.user"),
        (_capabilities(process__sandbox=""), "capabilities.process.sandbox"),
        (_capabilities(container__limits__cpus=0), "capabilities.container.limits.cpus"),
        (_capabilities(container__limits__cpus=4097), "capabilities.container.limits.cpus"),
        (_capabilities(container__limits__cpus="Infinity"), "capabilities.container.limits.cpus"),
        (_capabilities(process__limits__memory_mb=-1), "capabilities.process.limits.memory_mb"),
        (_capabilities(process__limits__memory_mb=2.5), "capabilities.process.limits.memory_mb"),
        (_capabilities(process__limits__pids=0), "capabilities.process.limits.pids"),
        (_capabilities(kinds=["container"], refused={"process": "x" * 301}), "capabilities.refused.process"),
        (_capabilities(refused={"process": "off"}), "capabilities.refused.process"),
    ],
)
def test_malformed_capabilities_are_400_and_change_nothing(capabilities: Any, field: str) -> None:
    machine = MachineFactory(last_heartbeat_at=None, accepts_container=True, accepts_process=False)
    client = agent_client(machine)

    resp = heartbeat(client, [gpu_entry("GPU-a")], capabilities=capabilities)

    assert resp.status_code == 400
    body = resp.json()
    assert body["code"] == "invalid"
    assert field in body["fields"], body
    machine.refresh_from_db()
    assert (machine.accepts_container, machine.accepts_process, machine.capabilities) == (True, False, None)
    assert machine.last_heartbeat_at is None
    assert not GPU.objects.exists()


def test_capabilities_with_a_non_finite_number_are_400() -> None:
    machine = MachineFactory(accepts_process=False)
    client = agent_client(machine)
    raw = json.dumps({"gpus": [], "capabilities": _capabilities(process__limits__cpus=1.5)}).replace("1.5", "NaN")

    resp = client.post(API + "heartbeat", raw, content_type="application/json")

    assert resp.status_code == 400
    machine.refresh_from_db()
    assert machine.accepts_process is False


def test_a_lease_of_a_kind_the_machine_stopped_accepting_is_never_sent_and_its_job_requeued() -> None:
    machine = machine_with_gpus(count=1)
    gpu = machine.gpus.get()
    lease = placed_lease(gpus=[gpu], kind=Job.Kind.PROCESS)
    client = agent_client(machine)
    containers_only = {
        "kinds": ["container"],
        "container": CAPABILITIES["container"],
        "refused": {"process": "process jobs are off (allow_process_jobs = false)"},
    }

    resp = heartbeat(client, [gpu_entry(gpu.uuid, 0)], capabilities=containers_only)

    assert resp.status_code == 200
    assert resp.json()["start"] == []
    lease.refresh_from_db()
    assert (lease.status, lease.end_reason) == (Lease.Status.ENDED, Lease.EndReason.FAILED_TO_START)
    assert "no longer accepts process jobs" in lease.end_detail
    assert Job.objects.get(pk=lease.job_id).status == Job.Status.PENDING
    assert GPU.objects.get(pk=gpu.pk).state == GPU.State.IDLE


# --- credential rotation --------------------------------------------------------------------


def test_agent_rotates_its_credential_and_the_old_one_is_refused_everywhere() -> None:
    machine = machine_with_gpus(count=1)
    gpu = machine.gpus.get()
    old = agent_client(machine)
    lease = running_lease(old, JobFactory(), [gpu])
    new_address = "0x" + "ab" * 20

    resp = old.post(API + "credential/rotate", {"signing_address": new_address}, format="json")

    assert resp.status_code == 200, resp.json()
    body = resp.json()
    assert body["machine_id"] == machine.pk and body["credential"].startswith("gpm_")
    refused = [
        heartbeat(old, [gpu_entry(gpu.uuid, 0)]),
        post_event(old, lease, "exited", exit_code=0),
        old.post(f"{API}leases/{lease.pk}/usage", usage_body(lease), format="json"),
        old.post(API + "credential/rotate", {}, format="json"),
    ]
    for answer in refused:
        assert answer.status_code == 401
        assert answer.json()["code"] == "credential_revoked"
        assert "replaced by a newer credential" in answer.json()["detail"]
    new = APIClient()
    new.credentials(HTTP_AUTHORIZATION=f"Machine {body['credential']}")
    assert heartbeat(new, [gpu_entry(gpu.uuid, 0)], [{"lease_id": lease.pk, "state": "running"}]).status_code == 200
    machine.refresh_from_db()
    assert machine.signing_address == new_address
    assert machine.status == Machine.Status.ONLINE
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RUNNING
    (revocation,) = machine.credential_revocations.all()
    assert (revocation.kind, revocation.actor) == ("rotated", f"machine:{machine.pk}")


def test_rotation_without_a_body_keeps_the_signing_address() -> None:
    machine = MachineFactory(signing_address="0x" + "11" * 20)
    client = agent_client(machine)

    resp = client.post(API + "credential/rotate")

    assert resp.status_code == 200
    machine.refresh_from_db()
    assert machine.signing_address == "0x" + "11" * 20
    assert machine.credential_digest == services.secret_digest(resp.json()["credential"])


@pytest.mark.parametrize("address", ["0x123", "", "0x" + "zz" * 20])
def test_rotation_with_a_malformed_signing_address_is_400_and_changes_nothing(address: str) -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    digest = Machine.objects.get(pk=machine.pk).credential_digest

    resp = client.post(API + "credential/rotate", {"signing_address": address}, format="json")

    assert resp.status_code == 400
    assert "signing_address" in resp.json()["fields"]
    assert Machine.objects.get(pk=machine.pk).credential_digest == digest
    assert heartbeat(client, [gpu_entry("GPU-a")]).status_code == 200


def test_revoked_credential_is_401_saying_when_and_why_and_cannot_rotate_itself() -> None:
    machine = MachineFactory()
    client = agent_client(machine)
    services.machine_credential_revoke(machine=machine, actor="provider:1", reason="laptop stolen")

    beat = heartbeat(client, [gpu_entry("GPU-a")])
    rotate = client.post(API + "credential/rotate", {}, format="json")

    for answer in (beat, rotate):
        assert answer.status_code == 401
        assert answer.json()["code"] == "credential_revoked"
        assert "revoked on" in answer.json()["detail"] and "(laptop stolen)" in answer.json()["detail"]
        assert "register the machine again" in answer.json()["detail"]
    assert not GPU.objects.exists()


def test_a_heartbeat_that_waited_while_the_credential_was_rotated_records_nothing() -> None:
    machine = MachineFactory(last_heartbeat_at=None)
    as_authenticated = Machine.objects.get(pk=machine.pk)
    services.machine_credential_rotate(machine=machine, actor="provider:1")
    report = services.HeartbeatReport(
        gpus=[services.GpuReport(uuid="GPU-a", index=0, model="L4", vram_mb=1, idle=True)]
    )

    with pytest.raises(services.MachineCredentialRevoked):
        services.machine_heartbeat(machine=as_authenticated, report=report)

    machine.refresh_from_db()
    assert machine.last_heartbeat_at is None
    assert not GPU.objects.exists()


@on_postgres
@pytest.mark.django_db(transaction=True)
def test_two_concurrent_rotations_with_one_credential_cannot_both_succeed() -> None:
    machine = MachineFactory()
    authenticated = [Machine.objects.get(pk=machine.pk) for _ in range(2)]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def rotate(as_authenticated: Machine) -> None:
        try:
            barrier.wait()
            services.machine_credential_rotate(
                machine=as_authenticated, actor="machine", only_if_digest=as_authenticated.credential_digest
            )
            outcomes.append("ok")
        except services.MachineCredentialRevoked:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=rotate, args=(m,)) for m in authenticated]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(outcomes) == ["ok", "refused"]
    assert machine.credential_revocations.count() == 1
