"""The fleet's REST API: the GPU market search and providers' own machines, GPUs, profile,
availability windows, blackouts and registration tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Job, Lease
from providers.models import GPU, AvailabilityWindow, Blackout, Machine, Provider, RegistrationToken
from providers.services import secret_digest
from tests.factories import (
    GPUFactory,
    JobFactory,
    MachineFactory,
    ProviderFactory,
    capabilities_report,
    machine_with_gpus,
    placed_lease,
)

pytestmark = pytest.mark.django_db


def hhmm(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H:%M")


def window_around_now(machine: Machine) -> AvailabilityWindow:
    """A daily UTC window on `machine` from an hour ago to an hour from now."""
    now = timezone.now()
    return AvailabilityWindow.objects.create(
        provider=machine.provider,
        machine=machine,
        days=127,
        start_time=(now - timedelta(hours=1)).astimezone(UTC).time().replace(second=0, microsecond=0),
        end_time=(now + timedelta(hours=1)).astimezone(UTC).time().replace(second=0, microsecond=0),
        timezone="UTC",
    )


def window_later_today(machine: Machine) -> AvailabilityWindow:
    """A daily UTC one-hour window on `machine` that starts two hours from now (so not now)."""
    now = timezone.now()
    return AvailabilityWindow.objects.create(
        provider=machine.provider,
        machine=machine,
        days=127,
        start_time=(now + timedelta(hours=2)).astimezone(UTC).time().replace(second=0, microsecond=0),
        end_time=(now + timedelta(hours=3)).astimezone(UTC).time().replace(second=0, microsecond=0),
        timezone="UTC",
    )


def uuids(response) -> set[str]:  # type: ignore[no-untyped-def]
    return {row["uuid"] for row in response.json()["results"]}


# --- GPU search -----------------------------------------------------------------------------


def test_gpu_search_shows_market_fields_and_hides_provider_private_data(renter_client):
    client, _ = renter_client
    provider = ProviderFactory(default_price_floor=Decimal("0.30"))
    machine = MachineFactory(provider=provider, region="eu-west")
    gpu = GPUFactory(machine=machine, index=0, utilization_pct=3.5)

    response = client.get("/api/v1/gpus/")

    assert response.status_code == 200
    [row] = response.json()["results"]
    assert row["uuid"] == gpu.uuid
    assert row["price_per_gpu_hour"] == "0.300000"
    assert row["region"] == "eu-west"
    assert row["machine"] == machine.pk
    assert row["state"] == "idle"
    assert row["utilization_pct"] == 3.5
    assert row["available_now"] is True
    assert row["available_indefinitely"] is True
    assert row["available_until"] is None
    body = response.content.decode()
    assert provider.payout_address not in body
    assert machine.hostname not in body
    assert machine.credential_digest not in body


def test_gpu_search_uses_the_gpus_own_price_floor_over_the_providers_default(renter_client):
    client, _ = renter_client
    provider = ProviderFactory(default_price_floor=Decimal("0.30"))
    cheap = GPUFactory(machine=MachineFactory(provider=provider), index=0, price_floor=Decimal("0.10"))
    default = GPUFactory(machine=MachineFactory(provider=provider), index=0)

    rows = client.get("/api/v1/gpus/").json()["results"]

    prices = {row["uuid"]: row["price_per_gpu_hour"] for row in rows}
    assert prices == {cheap.uuid: "0.100000", default.uuid: "0.300000"}
    assert [row["uuid"] for row in rows] == [cheap.uuid, default.uuid], "cheapest first"


def test_gpu_search_filters_by_model_list_case_insensitively(renter_client):
    client, _ = renter_client
    a100 = GPUFactory(model="NVIDIA A100")
    h100 = GPUFactory(model="NVIDIA H100")
    GPUFactory(model="RTX 4090")

    assert uuids(client.get("/api/v1/gpus/", {"model": "nvidia a100"})) == {a100.uuid}
    assert uuids(client.get("/api/v1/gpus/", {"model": "nvidia a100, NVIDIA H100"})) == {a100.uuid, h100.uuid}


def test_gpu_search_filters_by_vram_price_and_region(renter_client):
    client, _ = renter_client
    big = GPUFactory(vram_mb=81920, price_floor=Decimal("2.00"), machine=MachineFactory(region="us-east"))
    small_cheap = GPUFactory(vram_mb=8192, price_floor=Decimal("0.10"), machine=MachineFactory(region="eu-west"))

    assert uuids(client.get("/api/v1/gpus/", {"min_vram_mb": 40000})) == {big.uuid}
    assert uuids(client.get("/api/v1/gpus/", {"max_price": "0.5"})) == {small_cheap.uuid}
    assert uuids(client.get("/api/v1/gpus/", {"max_price": "2.00"})) == {big.uuid, small_cheap.uuid}
    assert uuids(client.get("/api/v1/gpus/", {"region": "US-EAST"})) == {big.uuid}


def test_gpu_search_max_price_compares_against_the_providers_default_floor(renter_client):
    client, _ = renter_client
    gpu = GPUFactory(machine=MachineFactory(provider=ProviderFactory(default_price_floor=Decimal("0.75"))))

    assert uuids(client.get("/api/v1/gpus/", {"max_price": "0.74"})) == set()
    assert uuids(client.get("/api/v1/gpus/", {"max_price": "0.75"})) == {gpu.uuid}


def test_available_now_keeps_only_gpus_a_job_could_be_placed_on_now(renter_client):
    client, _ = renter_client
    free = GPUFactory()
    in_window = GPUFactory()
    window_around_now(in_window.machine)
    outside_window = GPUFactory()
    window_later_today(outside_window.machine)
    in_blackout = GPUFactory()
    Blackout.objects.create(
        provider=in_blackout.machine.provider,
        machine=in_blackout.machine,
        starts_at=timezone.now() - timedelta(hours=1),
        ends_at=timezone.now() + timedelta(hours=1),
    )
    owner_busy = GPUFactory(state=GPU.State.OWNER_BUSY)
    offline_machine = GPUFactory(machine=MachineFactory(status=Machine.Status.OFFLINE))
    leased = GPUFactory()
    placed_lease(gpus=[leased])
    GPUFactory(machine=MachineFactory(status=Machine.Status.SUSPENDED))

    available = client.get("/api/v1/gpus/", {"available_now": "true"})
    others = client.get("/api/v1/gpus/", {"available_now": "false"})

    assert uuids(available) == {free.uuid, in_window.uuid}
    assert uuids(others) == {
        outside_window.uuid,
        in_blackout.uuid,
        owner_busy.uuid,
        offline_machine.uuid,
        leased.uuid,
    }, "a suspended machine's GPU is not on the market at all"


def test_gpu_inside_a_window_shows_when_its_stretch_ends(renter_client):
    client, _ = renter_client
    gpu = GPUFactory()
    window = window_around_now(gpu.machine)

    [row] = client.get("/api/v1/gpus/", {"available_now": "true"}).json()["results"]

    assert row["available_indefinitely"] is False
    until = datetime.fromisoformat(row["available_until"])
    assert hhmm(until) == window.end_time.strftime("%H:%M")
    assert timezone.now() < until <= timezone.now() + timedelta(hours=1, minutes=1)


def test_gpu_outside_its_window_is_listed_as_not_available(renter_client):
    client, _ = renter_client
    gpu = GPUFactory()
    window_later_today(gpu.machine)

    [row] = client.get("/api/v1/gpus/").json()["results"]

    assert row["uuid"] == gpu.uuid
    assert row["available_now"] is False
    assert row["available_until"] is None
    assert row["available_indefinitely"] is False


@pytest.mark.parametrize(
    "params",
    [
        {"min_vram_mb": "lots"},
        {"min_vram_mb": "-1"},
        {"max_price": "cheap"},
        {"max_price": "-0.1"},
        {"max_price": "1000000"},
        {"max_price": "NaN"},
        {"available_now": "maybe"},
        {"region": "x" * 65},
        {"model": ",".join(f"m{i}" for i in range(40))},
        {"colour": "green"},
    ],
)
def test_gpu_search_refuses_invalid_filters(renter_client, params):
    client, _ = renter_client

    response = client.get("/api/v1/gpus/", params)

    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert response.json()["detail"]


def test_gpu_search_is_open_to_providers_too(provider_client):
    client, _ = provider_client
    GPUFactory()

    response = client.get("/api/v1/gpus/")

    assert response.status_code == 200
    assert response.json()["count"] == 1


def test_gpu_search_paginates(renter_client):
    client, _ = renter_client
    for _ in range(5):
        GPUFactory()

    first = client.get("/api/v1/gpus/", {"limit": 2}).json()
    last = client.get("/api/v1/gpus/", {"limit": 2, "offset": 4}).json()

    assert first["count"] == 5
    assert len(first["results"]) == 2
    assert first["next"] and "offset=2" in first["next"]
    assert len(last["results"]) == 1
    assert last["next"] is None


# --- machines and GPUs ----------------------------------------------------------------------


def test_provider_lists_only_its_own_machines(provider_client):
    client, provider = provider_client
    mine = machine_with_gpus(count=2)
    Machine.objects.filter(pk=mine.pk).update(provider=provider)
    machine_with_gpus(count=1)  # another provider's

    response = client.get("/api/v1/machines/")

    assert response.status_code == 200
    [row] = response.json()["results"]
    assert row["id"] == mine.pk
    assert row["gpu_count"] == 2
    assert row["status"] == "online"


def test_machine_detail_shows_gpus_facts_heartbeat_and_schedule(provider_client):
    client, provider = provider_client
    machine = MachineFactory(provider=provider, driver_version="550.54", cuda_version="12.4", ram_mb=64000)
    GPUFactory(machine=machine, index=1, price_floor=Decimal("0.45"), temperature_c=40.0)
    GPUFactory(machine=machine, index=0)
    window_later_today(machine)

    body = client.get(f"/api/v1/machines/{machine.pk}/").json()

    assert body["driver_version"] == "550.54"
    assert body["cuda_version"] == "12.4"
    assert body["ram_mb"] == 64000
    assert body["last_heartbeat_at"] is not None
    assert body["gpu_count"] == 2
    assert [g["index"] for g in body["gpus"]] == [0, 1]
    assert body["gpus"][0]["price_floor"] is None
    assert body["gpus"][0]["effective_price_floor"] == "0.200000"
    assert body["gpus"][1]["price_floor"] == "0.450000"
    assert body["gpus"][1]["temperature_c"] == 40.0
    assert body["schedule_open_now"] is False
    assert "credential_digest" not in body


def test_provider_sees_which_job_kinds_each_machine_accepts_and_how_it_isolates_them(provider_client):
    client, provider = provider_client
    reported = capabilities_report(
        kinds=("container",), refused={"process": "process jobs are off (allow_process_jobs = false)"}
    )
    reporting = MachineFactory(
        provider=provider,
        accepts_container=True,
        accepts_process=False,
        capabilities=reported,
        capabilities_reported_at=timezone.now(),
    )
    silent = MachineFactory(provider=provider, accepts_container=True, accepts_process=False)

    listed = {row["id"]: row for row in client.get("/api/v1/machines/").json()["results"]}
    detail = client.get(f"/api/v1/machines/{reporting.pk}/").json()

    assert (listed[silent.pk]["accepts_container"], listed[silent.pk]["accepts_process"]) == (True, False)
    assert listed[silent.pk]["capabilities"] is None
    assert (detail["accepts_container"], detail["accepts_process"]) == (True, False)
    assert detail["capabilities"] == {**reported, "refused": {**reported["refused"], "container": None}}
    assert detail["capabilities_reported_at"] is not None
    assert detail["credential_revoked_at"] is None


def test_provider_sets_and_clears_a_gpu_price_floor(provider_client):
    client, provider = provider_client
    gpu = GPUFactory(machine=MachineFactory(provider=provider))
    url = f"/api/v1/machines/{gpu.machine_id}/gpus/{gpu.pk}/"

    set_response = client.patch(url, {"price_floor": "0.45"}, format="json")
    gpu.refresh_from_db()
    assert set_response.status_code == 200
    assert set_response.json()["price_floor"] == "0.450000"
    assert gpu.price_floor == Decimal("0.45")

    clear_response = client.patch(url, {"price_floor": None}, format="json")
    gpu.refresh_from_db()
    assert clear_response.json()["price_floor"] is None
    assert clear_response.json()["effective_price_floor"] == "0.200000"
    assert gpu.price_floor is None


@pytest.mark.parametrize("value", ["-0.01", "1000.01", "abc", "0.1234567", [1], True])
def test_gpu_price_floor_out_of_range_or_wrong_type_is_refused(provider_client, value):
    client, provider = provider_client
    gpu = GPUFactory(machine=MachineFactory(provider=provider), price_floor=Decimal("0.50"))

    response = client.patch(f"/api/v1/machines/{gpu.machine_id}/gpus/{gpu.pk}/", {"price_floor": value}, format="json")

    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert "price_floor" in response.json()["fields"]
    gpu.refresh_from_db()
    assert gpu.price_floor == Decimal("0.50")


def test_gpu_of_another_machine_path_is_not_found(provider_client):
    client, provider = provider_client
    mine = MachineFactory(provider=provider)
    other_gpu = GPUFactory()

    response = client.patch(f"/api/v1/machines/{mine.pk}/gpus/{other_gpu.pk}/", {"price_floor": "1"}, format="json")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


# --- provider profile -----------------------------------------------------------------------


def test_provider_reads_and_updates_its_profile(provider_client):
    client, provider = provider_client
    address = "0x" + "ab" * 20

    before = client.get("/api/v1/provider/").json()
    response = client.patch(
        "/api/v1/provider/",
        {"display_name": "  Rig Farm ", "payout_address": address, "default_price_floor": "0.35"},
        format="json",
    )

    assert before["display_name"] == provider.display_name
    assert response.status_code == 200
    assert response.json()["display_name"] == "Rig Farm"
    assert response.json()["default_price_floor"] == "0.350000"
    provider.refresh_from_db()
    assert provider.payout_address == address
    assert provider.default_price_floor == Decimal("0.35")


@pytest.mark.parametrize(
    "body",
    [
        {"payout_address": "0x123"},
        {"payout_address": "0x" + "g" * 40},
        {"default_price_floor": "-1"},
        {"default_price_floor": "5000"},
        {"display_name": ""},
        {"display_name": "x" * 101},
        {"owner": "someone else"},
    ],
)
def test_invalid_profile_changes_are_refused_and_change_nothing(provider_client, body):
    client, provider = provider_client
    before = Provider.objects.values().get(pk=provider.pk)

    response = client.patch("/api/v1/provider/", body, format="json")

    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert Provider.objects.values().get(pk=provider.pk) == before


def test_bad_json_is_a_400_with_the_error_shape(provider_client):
    client, _ = provider_client

    response = client.patch("/api/v1/provider/", data="{not json", content_type="application/json")

    assert response.status_code == 400
    assert set(response.json()) == {"code", "detail"}
    assert response.json()["code"] == "parse_error"


# --- availability windows -------------------------------------------------------------------


def test_provider_creates_reads_updates_and_deletes_a_window(provider_client):
    client, provider = provider_client
    machine = MachineFactory(provider=provider)

    created = client.post(
        "/api/v1/availability-windows/",
        {
            "machine": machine.pk,
            "days": ["mon", "tue"],
            "start_time": "20:00",
            "end_time": "08:00",
            "timezone": "Europe/Paris",
        },
        format="json",
    )
    assert created.status_code == 201
    window_id = created.json()["id"]
    assert created.json()["days"] == ["mon", "tue"]
    assert created.json()["start_time"] == "20:00"
    window = AvailabilityWindow.objects.get(pk=window_id)
    assert window.days == 0b11 and window.machine_id == machine.pk and window.timezone == "Europe/Paris"

    listed = client.get("/api/v1/availability-windows/").json()
    assert [w["id"] for w in listed["results"]] == [window_id]
    assert client.get(f"/api/v1/availability-windows/{window_id}/").json()["end_time"] == "08:00"

    patched = client.patch(
        f"/api/v1/availability-windows/{window_id}/", {"days": ["sat", "sun"], "machine": None}, format="json"
    )
    assert patched.status_code == 200
    assert patched.json()["days"] == ["sat", "sun"]
    assert patched.json()["machine"] is None
    assert patched.json()["timezone"] == "Europe/Paris", "fields not given stay"

    replaced = client.put(
        f"/api/v1/availability-windows/{window_id}/",
        {"days": ["wed"], "start_time": "09:00", "end_time": "17:00", "timezone": "UTC"},
        format="json",
    )
    assert replaced.status_code == 200
    window.refresh_from_db()
    assert (window.days, window.start_time.hour, window.end_time.hour, window.timezone) == (0b100, 9, 17, "UTC")

    deleted = client.delete(f"/api/v1/availability-windows/{window_id}/")
    assert deleted.status_code == 204
    assert not AvailabilityWindow.objects.filter(pk=window_id).exists()


def test_a_window_changes_what_the_market_shows_as_available(provider_client, renter_client):
    client, provider = provider_client
    renter, _ = renter_client
    gpu = GPUFactory(machine=MachineFactory(provider=provider))
    later = timezone.now() + timedelta(hours=2)

    response = client.post(
        "/api/v1/availability-windows/",
        {
            "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
            "start_time": hhmm(later),
            "end_time": hhmm(later + timedelta(hours=1)),
            "timezone": "UTC",
        },
        format="json",
    )

    assert response.status_code == 201
    assert uuids(renter.get("/api/v1/gpus/", {"available_now": "true"})) == set()
    client.delete(f"/api/v1/availability-windows/{response.json()['id']}/")
    assert uuids(renter.get("/api/v1/gpus/", {"available_now": "true"})) == {gpu.uuid}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"timezone": ""}, "timezone"),
        ({"days": []}, "days"),
        ({"days": ["funday"]}, "days"),
        ({"days": "mon"}, "days"),
        ({"start_time": "25:00"}, "start_time"),
        ({"start_time": 2000}, "start_time"),
        ({"end_time": "8pm"}, "end_time"),
        ({"machine": "first"}, "machine"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_windows_are_refused(provider_client, change, field):
    client, _ = provider_client
    body = {"days": ["mon"], "start_time": "20:00", "end_time": "08:00", "timezone": "Europe/Paris", **change}

    response = client.post("/api/v1/availability-windows/", body, format="json")

    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert any(name.split(".")[0] == field for name in response.json()["fields"])
    assert not AvailabilityWindow.objects.exists()


def test_a_window_on_another_providers_machine_is_refused(provider_client):
    client, _ = provider_client
    theirs = MachineFactory()

    response = client.post(
        "/api/v1/availability-windows/",
        {"machine": theirs.pk, "days": ["mon"], "start_time": "20:00", "end_time": "08:00", "timezone": "UTC"},
        format="json",
    )

    assert response.status_code == 400
    assert "machine" in response.json()["fields"]
    assert not AvailabilityWindow.objects.exists()


def test_updating_a_window_with_an_unknown_time_zone_changes_nothing(provider_client):
    client, provider = provider_client
    window = AvailabilityWindow.objects.create(
        provider=provider, days=1, start_time="20:00", end_time="08:00", timezone="Europe/Paris"
    )

    response = client.patch(
        f"/api/v1/availability-windows/{window.pk}/", {"timezone": "Europe/Atlantis"}, format="json"
    )

    assert response.status_code == 400
    window.refresh_from_db()
    assert window.timezone == "Europe/Paris"


# --- blackouts ------------------------------------------------------------------------------


def test_provider_creates_lists_and_deletes_blackouts(provider_client):
    client, provider = provider_client
    machine = MachineFactory(provider=provider)

    created = client.post(
        "/api/v1/blackouts/",
        {
            "machine": machine.pk,
            "starts_at": "2030-01-01T00:00:00Z",
            "ends_at": "2030-01-02T00:00:00Z",
            "reason": "holiday",
        },
        format="json",
    )
    assert created.status_code == 201
    blackout_id = created.json()["id"]
    assert created.json()["machine"] == machine.pk
    assert created.json()["reason"] == "holiday"

    listed = client.get("/api/v1/blackouts/").json()["results"]
    assert [b["id"] for b in listed] == [blackout_id]
    assert client.get(f"/api/v1/blackouts/{blackout_id}/").json()["ends_at"].startswith("2030-01-02")

    assert client.delete(f"/api/v1/blackouts/{blackout_id}/").status_code == 204
    assert not Blackout.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"starts_at": "2030-01-02T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z"}, "ends_at"),
        ({"starts_at": "2030-01-01T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z"}, "ends_at"),
        ({"starts_at": "soon", "ends_at": "2030-01-01T00:00:00Z"}, "starts_at"),
        ({"ends_at": "2030-01-01T00:00:00Z"}, "starts_at"),
        ({"starts_at": "2030-01-01T00:00:00Z", "ends_at": "2030-01-02T00:00:00Z", "reason": "x" * 256}, "reason"),
    ],
)
def test_invalid_blackouts_are_refused(provider_client, body, field):
    client, _ = provider_client

    response = client.post("/api/v1/blackouts/", body, format="json")

    assert response.status_code == 400
    assert field in response.json()["fields"]
    assert not Blackout.objects.exists()


def test_a_blackout_on_another_providers_machine_is_refused(provider_client):
    client, _ = provider_client

    response = client.post(
        "/api/v1/blackouts/",
        {"machine": MachineFactory().pk, "starts_at": "2030-01-01T00:00:00Z", "ends_at": "2030-01-02T00:00:00Z"},
        format="json",
    )

    assert response.status_code == 400
    assert not Blackout.objects.exists()


# --- registration tokens --------------------------------------------------------------------


def test_registration_token_is_shown_once_and_listed_without_it(provider_client):
    client, provider = provider_client

    created = client.post("/api/v1/registration-tokens/", {"label": "rig 1"}, format="json")

    assert created.status_code == 201
    raw = created.json()["token"]
    token = RegistrationToken.objects.get(pk=created.json()["id"])
    assert token.provider == provider
    assert token.token_digest == secret_digest(raw)
    assert raw.startswith(created.json()["prefix"])

    listed = client.get("/api/v1/registration-tokens/")
    [row] = listed.json()["results"]
    assert row["label"] == "rig 1"
    assert row["state"] == "unused"
    assert row["used_at"] is None and row["machine"] is None
    assert "token" not in row
    assert raw not in listed.content.decode()


def test_registration_token_list_shows_used_and_expired_tokens(provider_client):
    client, provider = provider_client
    machine = MachineFactory(provider=provider)
    now = timezone.now()
    RegistrationToken.objects.create(
        provider=provider,
        prefix="gpreg_used",
        token_digest="a" * 64,
        expires_at=now + timedelta(hours=1),
        used_at=now,
        machine=machine,
    )
    RegistrationToken.objects.create(
        provider=provider, prefix="gpreg_old", token_digest="b" * 64, expires_at=now - timedelta(hours=1)
    )

    rows = {row["prefix"]: row for row in client.get("/api/v1/registration-tokens/").json()["results"]}

    assert rows["gpreg_used"]["state"] == "used"
    assert rows["gpreg_used"]["machine"] == machine.pk
    assert rows["gpreg_old"]["state"] == "expired"


def test_registration_token_label_too_long_is_refused(provider_client):
    client, _ = provider_client

    response = client.post("/api/v1/registration-tokens/", {"label": "x" * 101}, format="json")

    assert response.status_code == 400
    assert not RegistrationToken.objects.exists()


# --- machine credentials --------------------------------------------------------------------


def machine_client(credential: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {credential}")
    return client


def agent_heartbeat(credential: str, machine: Machine) -> Any:
    gpus = [
        {"uuid": g.uuid, "index": g.index, "model": g.model, "vram_mb": g.vram_mb, "idle": True}
        for g in machine.gpus.order_by("index")
    ]
    return machine_client(credential).post("/api/agent/v1/heartbeat", {"gpus": gpus}, format="json")


def with_credential(machine: Machine) -> str:
    raw = f"gpm_test_{machine.pk}"
    Machine.objects.filter(pk=machine.pk).update(credential_digest=secret_digest(raw))
    machine.refresh_from_db()
    return raw


def test_provider_rotates_a_machine_credential_shown_once(provider_client):
    client, provider = provider_client
    machine = machine_with_gpus(count=1)
    Machine.objects.filter(pk=machine.pk).update(provider=provider)
    old = with_credential(machine)

    response = client.post(f"/api/v1/machines/{machine.pk}/credential/rotate/")

    assert response.status_code == 200, response.json()
    new = response.json()["credential"]
    assert response.json()["machine_id"] == machine.pk
    refused = agent_heartbeat(old, machine)
    assert refused.status_code == 401
    assert refused.json()["code"] == "credential_revoked"
    assert agent_heartbeat(new, machine).status_code == 200
    detail = client.get(f"/api/v1/machines/{machine.pk}/").content.decode()
    assert new not in detail and secret_digest(new) not in detail
    (revocation,) = machine.credential_revocations.all()
    assert (revocation.kind, revocation.actor) == ("rotated", f"provider:{provider.pk}")


def test_rotation_refuses_unknown_fields_and_changes_nothing(provider_client):
    client, provider = provider_client
    machine = MachineFactory(provider=provider)
    old = with_credential(machine)

    response = client.post(f"/api/v1/machines/{machine.pk}/credential/rotate/", {"credential": "mine"}, format="json")

    assert response.status_code == 400
    assert response.json()["fields"] == {"credential": ["Unknown field."]}
    assert agent_heartbeat(old, machine).status_code == 200


def test_provider_revokes_a_machine_credential_its_leases_end_and_interruptible_jobs_requeue(provider_client):
    client, provider = provider_client
    machine = machine_with_gpus(count=2)
    Machine.objects.filter(pk=machine.pk).update(provider=provider)
    credential = with_credential(machine)
    g0, g1 = machine.gpus.order_by("index")
    leases = [
        placed_lease(gpus=[g0], interruptible=True, started=True),
        placed_lease(gpus=[g1], interruptible=False),
    ]

    response = client.post(
        f"/api/v1/machines/{machine.pk}/credential/revoke/", {"reason": "laptop stolen"}, format="json"
    )

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "offline"
    assert body["credential_revoked_at"] is not None
    assert {g["state"] for g in body["gpus"]} == {"offline"}
    interruptible, other = (Lease.objects.select_related("job").get(pk=lease.pk) for lease in leases)
    assert (interruptible.status, interruptible.end_reason) == (Lease.Status.ENDED, "credential_revoked")
    assert interruptible.job.status == Job.Status.PENDING
    assert (other.status, other.end_reason) == (Lease.Status.ENDED, "credential_revoked")
    assert other.job.status == Job.Status.FAILED
    refused = agent_heartbeat(credential, machine)
    assert refused.status_code == 401
    assert refused.json()["code"] == "credential_revoked"
    assert "(laptop stolen)" in refused.json()["detail"]
    machine.refresh_from_db()
    assert machine.status == Machine.Status.OFFLINE

    again = client.post(f"/api/v1/machines/{machine.pk}/credential/revoke/")
    rotate = client.post(f"/api/v1/machines/{machine.pk}/credential/rotate/")

    assert again.status_code == 200
    assert again.json()["credential_revoked_at"] == body["credential_revoked_at"]
    assert machine.credential_revocations.count() == 1
    assert rotate.status_code == 409
    assert rotate.json()["code"] == "machine_revoked"


def test_a_revoked_machine_is_never_matched_again(provider_client):
    from marketplace.matching import match_cycle

    client, provider = provider_client
    machine = machine_with_gpus(count=1)
    Machine.objects.filter(pk=machine.pk).update(provider=provider)
    client.post(f"/api/v1/machines/{machine.pk}/credential/revoke/")
    job = JobFactory(budget_reserved=True)  # placeable anywhere else: only the revocation keeps it off

    match_cycle()

    job.refresh_from_db()
    assert job.status == Job.Status.PENDING
    assert not Lease.objects.filter(machine=machine).exists()


@pytest.mark.parametrize("action", ["rotate", "revoke"])
def test_another_providers_machine_credential_is_not_found_and_unchanged(provider_client, action):
    client, _ = provider_client
    theirs = MachineFactory()
    credential = with_credential(theirs)

    response = client.post(f"/api/v1/machines/{theirs.pk}/credential/{action}/")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert not theirs.credential_revocations.exists()
    assert Machine.objects.get(pk=theirs.pk).credential_digest == secret_digest(credential)
