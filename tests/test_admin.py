"""The operator console (Django admin): what an operator sees and what its actions do."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from accounts.models import ApiToken
from accounts.services import api_token_create, token_digest
from jobs.models import Event, Job, Lease, LeaseGPU, Renter, UsageReport
from jobs.services import lease_end
from providers.models import (
    GPU,
    AvailabilityWindow,
    Blackout,
    Machine,
    MachineCredentialRevocation,
    MachineIdleProfile,
    Provider,
    RegistrationToken,
    TelemetryRollup,
    TelemetrySample,
)
from providers.services import machine_credential_rotate, registration_token_create, secret_digest
from providers.telemetry import telemetry_rollup
from tests.factories import (
    JobFactory,
    MachineFactory,
    UserFactory,
    capabilities_report,
    idle_history_of,
    machine_with_gpus,
    placed_lease,
)
from tests.module_db import built_once

pytestmark = pytest.mark.django_db

# Billing's console pages are covered by billing/tests/test_admin.py.
APPS = ("accounts", "providers", "jobs")


def url(model: Any, view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


@pytest.fixture
def operator(db):  # type: ignore[no-untyped-def]
    return UserFactory(username="olga", is_staff=True, is_superuser=True)


@pytest.fixture
def console(operator) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(operator)
    return client


@pytest.fixture(scope="module")
def fleet_rows(django_db_setup: Any, django_db_blocker: Any) -> Iterator[dict[str, tuple[type[Any], int]]]:
    """One of everything the console lists, wired together as in production: built once for the
    module (tests.module_db), each object named by its model and pk."""
    with built_once(django_db_blocker):
        yield {name: (type(obj), obj.pk) for name, obj in _fleet_build().items()}


@pytest.fixture
def fleet(db: Any, fleet_rows: dict[str, tuple[type[Any], int]]) -> dict[str, Any]:
    """The fleet's objects, read afresh for each test (what an earlier test changed is undone)."""
    return {name: model._base_manager.get(pk=pk) for name, (model, pk) in fleet_rows.items()}


def _fleet_build() -> dict[str, Any]:
    machine = machine_with_gpus(count=2)
    provider = machine.provider
    token, _ = registration_token_create(provider=provider, label="rack 3")
    api_token, _ = api_token_create(user=provider.user, name="laptop")
    window = AvailabilityWindow.objects.create(
        provider=provider,
        machine=machine,
        days=0b0011111,
        start_time="20:00",
        end_time="08:00",
        timezone="Europe/Paris",
    )
    blackout = Blackout.objects.create(
        provider=provider, starts_at=timezone.now(), ends_at=timezone.now() + timedelta(hours=2), reason="maintenance"
    )
    job = JobFactory(name="train-resnet")
    lease = placed_lease(job=job, machine=machine, started=True)
    job.refresh_from_db()
    pending = JobFactory(name="waiting", unplaced_code="no_capacity", unplaced_detail="No idle GPU matches.")
    gpu = machine.gpus.order_by("index").first()
    hour_ago = timezone.now() - timedelta(hours=1)
    TelemetrySample.objects.create(
        gpu=gpu,
        at=hour_ago,
        utilization_pct=97.0,
        memory_used_mb=20000,
        temperature_c=71.0,
        power_w=310.0,
        state=GPU.State.LEASED,
    )
    TelemetrySample.objects.create(gpu=gpu, at=timezone.now(), utilization_pct=88.0, state=GPU.State.LEASED)
    telemetry_rollup(since=hour_ago)
    report = UsageReport.objects.create(
        lease=lease,
        report_id="r-1",
        period_start=hour_ago,
        period_end=timezone.now(),
        gpu_seconds=Decimal("3600"),
    )
    machine_credential_rotate(machine=machine, actor=f"provider:{provider.pk}")
    idle_history_of(machine, stretches=[(hour_ago - timedelta(hours=2), 7200.0)])
    return {
        "provider": provider,
        "machine": machine,
        "gpu": gpu,
        "registration_token": token,
        "api_token": api_token,
        "window": window,
        "blackout": blackout,
        "job": job,
        "pending": pending,
        "lease": lease,
        "lease_gpu": LeaseGPU.objects.get(lease=lease),
        "renter": job.renter,
        "event": Event.objects.filter(job=job).first(),
        "sample": TelemetrySample.objects.first(),
        "rollup": TelemetryRollup.objects.first(),
        "report": report,
        "revocation": MachineCredentialRevocation.objects.get(machine=machine),
        "idle_profile": MachineIdleProfile.objects.get(machine=machine),
    }


OBJECTS = {
    ApiToken: "api_token",
    Provider: "provider",
    RegistrationToken: "registration_token",
    Machine: "machine",
    MachineCredentialRevocation: "revocation",
    GPU: "gpu",
    AvailabilityWindow: "window",
    Blackout: "blackout",
    TelemetrySample: "sample",
    TelemetryRollup: "rollup",
    Renter: "renter",
    Job: "job",
    Lease: "lease",
    LeaseGPU: "lease_gpu",
    Event: "event",
    UsageReport: "report",
    MachineIdleProfile: "idle_profile",
}


def test_every_model_of_the_marketplace_is_in_the_console() -> None:
    registered = {m for m in admin.site._registry if m._meta.app_label in APPS}
    assert registered == set(OBJECTS)


@pytest.mark.parametrize("model", list(OBJECTS), ids=lambda m: m.__name__)
def test_list_and_detail_pages_render_with_data(console, fleet, model) -> None:  # type: ignore[no-untyped-def]
    obj = fleet[OBJECTS[model]]

    listing = console.get(url(model, "changelist"))
    detail = console.get(url(model, "change", obj.pk))

    assert listing.status_code == 200
    assert listing.context["cl"].result_count >= 1
    assert detail.status_code == 200
    if admin.site._registry[model].has_add_permission(listing.wsgi_request):
        assert console.get(url(model, "add")).status_code == 200


@pytest.mark.parametrize(
    "model", [Machine, GPU, Job, Lease, Event, TelemetryRollup, RegistrationToken], ids=lambda m: m.__name__
)
def test_list_pages_do_not_query_once_per_row(console, fleet, model) -> None:  # type: ignore[no-untyped-def]
    with CaptureQueriesContext(connection) as few:
        console.get(url(model, "changelist"))
    # More of everything: machines with GPUs, jobs with leases and events, telemetry.
    for _ in range(4):
        machine = machine_with_gpus(count=2)
        placed_lease(machine=machine, started=True)
        registration_token_create(provider=machine.provider)
        TelemetrySample.objects.create(
            gpu=machine.gpus.first(), at=timezone.now() - timedelta(hours=1), state=GPU.State.IDLE
        )
    telemetry_rollup(since=timezone.now() - timedelta(hours=2))

    with CaptureQueriesContext(connection) as many:
        response = console.get(url(model, "changelist"))

    assert response.context["cl"].result_count > 1
    assert len(many) == len(few), [q["sql"] for q in many.captured_queries]


def test_search_and_filters_narrow_the_lists(console, fleet) -> None:  # type: ignore[no-untyped-def]
    other = MachineFactory(hostname="rig-b")
    hostname = fleet["machine"].hostname

    machines = console.get(url(Machine, "changelist"), {"q": hostname}).context["cl"].result_list
    jobs_by_id = console.get(url(Job, "changelist"), {"q": str(fleet["pending"].pk)}).context["cl"].result_list
    pending = console.get(url(Job, "changelist"), {"status__exact": "pending"}).context["cl"].result_list
    running = console.get(url(Job, "changelist"), {"status__exact": "running"}).context["cl"].result_list
    leased = console.get(url(GPU, "changelist"), {"state__exact": "leased"}).context["cl"].result_list

    assert [m.pk for m in machines] == [fleet["machine"].pk] and other.pk != fleet["machine"].pk
    assert [j.pk for j in jobs_by_id] == [fleet["pending"].pk]
    assert [j.pk for j in pending] == [fleet["pending"].pk]
    assert [j.pk for j in running] == [fleet["job"].pk]
    assert [g.pk for g in leased] == [fleet["gpu"].pk]


def test_machine_list_shows_gpu_count_and_gpu_list_the_effective_floor(console, fleet) -> None:  # type: ignore[no-untyped-def]
    fleet["provider"].default_price_floor = Decimal("0.35")
    fleet["provider"].save()
    GPU.objects.filter(pk=fleet["gpu"].pk).update(price_floor=Decimal("0.50"))

    machines = console.get(url(Machine, "changelist")).content.decode()
    gpus = console.get(url(GPU, "changelist")).content.decode()

    assert '<td class="field-gpu_count">2</td>' in machines
    assert "0.500000" in gpus and "0.350000 (provider default)" in gpus


def test_suspending_a_machine_ends_its_leases_and_requeues_interruptible_jobs(console, fleet, operator) -> None:  # type: ignore[no-untyped-def]
    machine, job, lease = fleet["machine"], fleet["job"], fleet["lease"]

    response = console.post(
        url(Machine, "changelist"), {"action": "suspend", "_selected_action": [machine.pk]}, follow=True
    )

    machine.refresh_from_db()
    lease.refresh_from_db()
    job.refresh_from_db()
    assert machine.status == Machine.Status.SUSPENDED
    assert machine.suspended_reason == "suspended by operator olga"
    assert (lease.status, lease.end_reason) == (Lease.Status.ENDED, Lease.EndReason.MACHINE_SUSPENDED)
    assert job.status == Job.Status.PENDING
    assert set(machine.gpus.values_list("state", flat=True)) == {GPU.State.OFFLINE}
    assert Event.objects.filter(lease=lease, kind="lease.ended", actor=f"operator:{operator.pk}").exists()
    assert "Suspended 1 machine(s); 1 active lease(s) ended." in messages_of(response)


CAPABILITIES = capabilities_report(
    kinds=("container",),
    process={"sandbox": "bubblewrap", "sandbox_version": "0.8.0", "user": "gpgpu-rental", "network": "none"},
    refused={"process": "process jobs are off (allow_process_jobs = false)"},
)


def test_machine_list_shows_accepted_kinds_and_its_page_the_capabilities(console, fleet) -> None:  # type: ignore[no-untyped-def]
    machine = fleet["machine"]
    Machine.objects.filter(pk=machine.pk).update(
        capabilities=CAPABILITIES,
        accepts_container=True,
        accepts_process=False,
        capabilities_reported_at=timezone.now(),
    )
    silent = MachineFactory(accepts_container=True, accepts_process=False)
    MachineFactory(accepts_container=True, accepts_process=True)

    listing = console.get(url(Machine, "changelist")).content.decode()
    page = console.get(url(Machine, "change", machine.pk)).content.decode()
    silent_page = console.get(url(Machine, "change", silent.pk)).content.decode()
    process_only = console.get(url(Machine, "changelist"), {"accepts_process__exact": "1"}).context["cl"].result_list

    assert '<td class="field-accepts">container</td>' in listing
    assert '<td class="field-accepts">container, process</td>' in listing
    for shown in (
        "podman 4.3.1",
        "runc",
        "bubblewrap 0.8.0",
        "gpgpu-rental",
        "filtered",
        "3 CPUs, 12000 MB memory, 4096 processes",
        "process jobs are off (allow_process_jobs = false)",
    ):
        assert shown in page, shown
    assert "not reported yet: accepts containers only" in silent_page
    assert machine.pk not in {m.pk for m in process_only}


def test_rotate_credential_action_shows_the_new_credential_once_and_the_old_one_stops_working(
    console, fleet, operator
) -> None:  # type: ignore[no-untyped-def]
    machine, lease = fleet["machine"], fleet["lease"]
    old_digest = Machine.objects.get(pk=machine.pk).credential_digest

    response = console.post(
        url(Machine, "changelist"), {"action": "rotate_credential", "_selected_action": [machine.pk]}, follow=True
    )

    (shown,) = [m for m in messages_of(response) if "New credential" in m]
    raw = next(word for word in shown.split() if word.startswith("gpm_"))
    machine.refresh_from_db()
    assert machine.credential_digest == secret_digest(raw) != old_digest
    assert MachineCredentialRevocation.objects.filter(
        digest=old_digest, kind="rotated", actor=f"operator:{operator.pk}"
    ).exists()
    lease.refresh_from_db()
    assert lease.status == Lease.Status.RUNNING
    page = console.get(url(Machine, "change", machine.pk)).content.decode()
    assert raw not in page and machine.credential_digest not in page
    assert "Rotated" in page  # the credential history


def test_revoke_credential_action_ends_leases_and_requeues_interruptible_jobs(console, fleet, operator) -> None:  # type: ignore[no-untyped-def]
    machine, job, lease = fleet["machine"], fleet["job"], fleet["lease"]

    response = console.post(
        url(Machine, "changelist"),
        {"action": "revoke_credential", "_selected_action": [machine.pk]},
        follow=True,
    )
    again = console.post(
        url(Machine, "changelist"),
        {"action": "revoke_credential", "_selected_action": [machine.pk]},
        follow=True,
    )

    machine.refresh_from_db()
    lease.refresh_from_db()
    job.refresh_from_db()
    assert machine.credential_revoked_at is not None
    assert machine.status == Machine.Status.OFFLINE
    assert (lease.status, lease.end_reason) == (Lease.Status.ENDED, Lease.EndReason.CREDENTIAL_REVOKED)
    assert job.status == Job.Status.PENDING
    assert Event.objects.filter(lease=lease, kind="lease.ended", actor=f"operator:{operator.pk}").exists()
    revocation = MachineCredentialRevocation.objects.get(machine=machine, kind="revoked")
    assert revocation.reason == "revoked by operator olga"
    assert any("Revoked the credential of 1 machine(s); 1 active lease(s) ended." in m for m in messages_of(response))
    assert "1 machine(s) were already revoked." in messages_of(again)
    refused = console.post(
        url(Machine, "changelist"), {"action": "rotate_credential", "_selected_action": [machine.pk]}, follow=True
    )
    assert not any("gpm_" in m for m in messages_of(refused))


def test_unsuspending_brings_a_machine_back_offline_and_skips_others(console, fleet) -> None:  # type: ignore[no-untyped-def]
    machine = fleet["machine"]
    console.post(url(Machine, "changelist"), {"action": "suspend", "_selected_action": [machine.pk]})
    online = MachineFactory()

    response = console.post(
        url(Machine, "changelist"), {"action": "unsuspend", "_selected_action": [machine.pk, online.pk]}, follow=True
    )

    machine.refresh_from_db()
    online.refresh_from_db()
    assert (machine.status, machine.suspended_reason) == (Machine.Status.OFFLINE, "")
    assert online.status == Machine.Status.ONLINE
    shown = messages_of(response)
    assert any("Unsuspended 1 machine(s)" in m for m in shown)
    assert any(str(online) in m and "Not suspended" in m for m in shown)


def test_cancel_action_cancels_live_jobs_and_reports_finished_ones(console, fleet, operator) -> None:  # type: ignore[no-untyped-def]
    running, pending = fleet["job"], fleet["pending"]
    done = JobFactory()
    lease_end(lease_id=placed_lease(job=done, started=True).pk, reason="succeeded", actor="machine:1", exit_code=0)

    response = console.post(
        url(Job, "changelist"),
        {"action": "cancel", "_selected_action": [running.pk, pending.pk, done.pk]},
        follow=True,
    )

    for job in (running, pending, done):
        job.refresh_from_db()
    assert running.status == pending.status == Job.Status.CANCELLED
    assert done.status == Job.Status.SUCCEEDED
    # The running lease is asked to stop; the agent hears it on its next heartbeat.
    assert Lease.objects.get(pk=fleet["lease"].pk).stop_reason == Lease.EndReason.CANCELLED
    assert Event.objects.filter(job=pending, kind="job.cancelled", actor=f"operator:{operator.pk}").exists()
    shown = messages_of(response)
    assert "Cancelled 2 job(s)." in shown
    assert f"Could not cancel 1 finished job(s): job {done.pk} (succeeded)." in shown


@pytest.mark.parametrize(
    ("model", "key", "field", "value"),
    [
        (Job, "job", "status", "succeeded"),
        (Lease, "lease", "status", "ended"),
        (Machine, "machine", "status", "online"),
    ],
)
def test_status_cannot_be_edited_in_the_console(console, fleet, model, key, field, value) -> None:  # type: ignore[no-untyped-def]
    obj = fleet[key]
    before = getattr(obj, field)

    page = console.get(url(model, "change", obj.pk))
    console.post(url(model, "change", obj.pk), {field: value})

    assert field not in page.context["adminform"].form.fields
    obj.refresh_from_db()
    assert getattr(obj, field) == before


def test_audit_trail_is_view_only(console, fleet) -> None:  # type: ignore[no-untyped-def]
    event = fleet["event"]

    add = console.get(url(Event, "add"))
    change = console.post(url(Event, "change", event.pk), {"kind": "forged"})
    delete = console.post(url(Event, "delete", event.pk), {"post": "yes"})

    assert add.status_code == 403 and delete.status_code == 403
    event.refresh_from_db()
    assert event.kind != "forged"
    assert change.status_code == 403


def test_registration_token_is_created_through_the_console_and_shown_once(console, fleet) -> None:  # type: ignore[no-untyped-def]
    provider = fleet["provider"]

    response = console.post(url(RegistrationToken, "add"), {"provider": provider.pk, "label": "new rig"}, follow=True)

    token = RegistrationToken.objects.get(label="new rig")
    (shown,) = [m for m in messages_of(response) if "Registration token" in m]
    raw = next(word for word in shown.split() if word.startswith("gpreg_"))
    assert secret_digest(raw) == token.token_digest and token.provider == provider
    assert token.expires_at > timezone.now()
    detail = console.get(url(RegistrationToken, "change", token.pk)).content.decode()
    assert raw not in detail and token.token_digest not in detail


def test_provider_action_issues_registration_tokens(console, fleet) -> None:  # type: ignore[no-untyped-def]
    provider = fleet["provider"]
    before = provider.registration_tokens.count()

    response = console.post(
        url(Provider, "changelist"),
        {"action": "create_registration_tokens", "_selected_action": [provider.pk]},
        follow=True,
    )

    assert provider.registration_tokens.count() == before + 1
    assert any("gpreg_" in m for m in messages_of(response))


def test_api_token_is_issued_with_the_raw_key_shown_once_and_can_be_revoked(console, fleet) -> None:  # type: ignore[no-untyped-def]
    user = UserFactory()

    response = console.post(url(ApiToken, "add"), {"user": user.pk, "name": "ci"}, follow=True)

    token = ApiToken.objects.get(user=user, name="ci")
    raw = next(word for m in messages_of(response) for word in m.split() if word.startswith("gpg_"))
    assert token_digest(raw) == token.key_digest
    assert token.key_digest not in console.get(url(ApiToken, "change", token.pk)).content.decode()
    assert console.get("/api/v1/jobs/", HTTP_AUTHORIZATION=f"Token {raw}").status_code != 401

    console.post(url(ApiToken, "changelist"), {"action": "revoke", "_selected_action": [token.pk]})

    token.refresh_from_db()
    assert token.revoked_at is not None
    assert Client().get("/api/v1/jobs/", HTTP_AUTHORIZATION=f"Token {raw}").status_code == 401


def test_gpu_page_charts_its_recent_hours(console, fleet) -> None:  # type: ignore[no-untyped-def]
    page = console.get(url(GPU, "change", fleet["gpu"].pk)).content.decode()

    assert "(so far)" in page  # the current hour, from raw samples
    assert "<td>97</td>" in page  # the rolled-up hour's average utilisation


def test_people_who_are_not_staff_are_sent_to_the_login_page(fleet) -> None:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(fleet["renter"].user)

    for path in (url(Job, "changelist"), url(Machine, "change", fleet["machine"].pk), reverse("admin:index")):
        response = client.get(path)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login"))
