"""factory_boy factories for the whole project (apps' tests import from here)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import factory
from django.contrib.auth import get_user_model
from django.core.handlers.wsgi import WSGIRequest
from django.db import transaction
from django.http import HttpResponse, HttpResponseBase
from django.test.client import ClientHandler
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.services import api_token_create
from jobs.models import Job, Lease, Renter
from jobs.services import Placement, lease_mark_started, leases_assign
from providers.heartbeat_front import SteadyHeartbeats
from providers.models import GPU, Machine, Provider
from providers.services import secret_digest


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.org")


class ProviderFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Provider

    user = factory.SubFactory(UserFactory)
    display_name = factory.Sequence(lambda n: f"provider {n}")
    payout_address = factory.Sequence(lambda n: "0x" + f"{n + 1:040x}")
    default_price_floor = Decimal("0.20")


# What a factory-made renter has deposited, in micro (10,000 tokens): enough for any ordinary
# test job's budget. RenterFactory(funds=0) makes an unfunded renter.
DEFAULT_RENTER_FUNDS_MICRO = 10_000 * 10**6


def fund(renter: Renter, amount: int) -> None:
    """Credit `amount` micro to the renter's available balance, as a deposit seen on chain would
    (through billing.services, with a made-up transaction hash)."""
    from billing.services import deposit_record

    deposit_record(renter=renter, amount=amount, tx_hash=f"test-deposit-{uuid.uuid4().hex}", log_index=0)


class RenterFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Renter
        skip_postgeneration_save = True

    user = factory.SubFactory(UserFactory)
    display_name = factory.Sequence(lambda n: f"renter {n}")

    @factory.post_generation
    def funds(self, create: bool, extracted: int | None, **kwargs: object) -> None:
        amount = DEFAULT_RENTER_FUNDS_MICRO if extracted is None else extracted
        if create and amount:
            fund(self, amount)


class MachineFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Machine

    provider = factory.SubFactory(ProviderFactory)
    hostname = factory.Sequence(lambda n: f"host-{n}")
    credential_digest = factory.Sequence(lambda n: secret_digest(f"machine-credential-{n}"))
    status = Machine.Status.ONLINE
    region = "eu-west"
    last_heartbeat_at = factory.LazyFunction(timezone.now)
    # Most tests run process jobs (JobFactory's kind): a factory machine accepts both kinds, as
    # one whose provider opted in to process jobs would. A new machine's own default is
    # containers only; MachineFactory(accepts_process=False) makes one like that.
    accepts_container = True
    accepts_process = True


class GPUFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = GPU

    machine = factory.SubFactory(MachineFactory)
    uuid = factory.Sequence(lambda n: f"GPU-{n:08d}-0000-0000-0000-000000000000")
    index = factory.Sequence(lambda n: n % 8)
    model = "RTX 4090"
    vram_mb = 24564
    state = GPU.State.IDLE
    idle_since = factory.LazyFunction(timezone.now)


class BudgetAuthorizationFactory(factory.django.DjangoModelFactory):
    """A job's budget as the escrow holds it after its reservation batch confirmed (status
    reserved), for tests that place jobs without a chain: the matcher places only such jobs.
    The chain half (signing, the `reserve` transaction, its receipt) is covered by billing's
    tests. The signature is a placeholder no escrow would accept."""

    class Meta:
        model = "billing.BudgetAuthorization"

    job = factory.SubFactory("tests.factories.JobFactory")
    renter_address = factory.Sequence(lambda n: "0x" + f"{n + 1:040x}")
    max_amount = factory.LazyAttribute(lambda a: _job_budget_micro(a.job))
    deadline = factory.LazyFunction(lambda: timezone.now() + timedelta(days=30))
    signature = "0x" + "00" * 65
    status = "reserved"
    activated_at = factory.LazyFunction(timezone.now)


def _job_budget_micro(job: Job) -> int:
    from billing.services import job_budget_micro_for

    return job_budget_micro_for(job)


class JobFactory(factory.django.DjangoModelFactory):
    """A pending job (no ledger reservation). `JobFactory(budget_reserved=True)` also gives it a
    budget reserved in the escrow (BudgetAuthorizationFactory), as the matcher needs to place it."""

    class Meta:
        model = Job
        skip_postgeneration_save = True

    class Params:
        budget_reserved = factory.Trait(
            budget_authorization=factory.RelatedFactory(BudgetAuthorizationFactory, factory_related_name="job")
        )

    renter = factory.SubFactory(RenterFactory)
    kind = Job.Kind.PROCESS
    command = ["python", "-c", "print('hello')"]
    gpu_count = 1
    max_price_per_gpu_hour = Decimal("1.00")
    expected_duration_s = 600
    max_duration_s = 1200
    interruptible = True


def budget_reserved(job: Job) -> Job:
    """Mark `job`'s budget reserved in the escrow (BudgetAuthorizationFactory), as for a job a renter
    submitted and signed through the API; returns the job."""
    BudgetAuthorizationFactory(job=job)
    return job


def machine_with_gpus(*, count: int = 1, provider: Provider | None = None, **gpu_kwargs) -> Machine:  # type: ignore[no-untyped-def]
    """An online machine (of `provider`, or of a new one) with `count` idle GPUs (indexes
    0..count-1)."""
    machine = MachineFactory(provider=provider) if provider is not None else MachineFactory()
    for i in range(count):
        GPUFactory(machine=machine, index=i, **gpu_kwargs)
    return machine


def placed_lease(
    *,
    job: Job | None = None,
    machine: Machine | None = None,
    gpus: int | Sequence[GPU] | None = None,
    provider: Provider | None = None,
    renter: Renter | None = None,
    price: Decimal | str | int = "0.40",
    started: bool | datetime = False,
    **job_fields: Any,
) -> Lease:
    """A lease placed through jobs.services.leases_assign, in a transaction of its own, as the
    matcher places one: the GPUs shown leased with their active LeaseGPU rows, the job scheduled
    with one more attempt, the `lease.assigned` event. Returns the lease as stored.

    - `job`: a pending job (one from job_submit has its budget reserved in the ledger). Without
      it, a JobFactory job of `renter` (or of a new funded renter) with `job_fields`, asking for
      as many GPUs as the lease gets.
    - `gpus`: the GPUs to lease (all on one machine), or how many (default: the job's
      gpu_count). A number is taken from `machine`, its GPUs in no active lease by index (their
      state and the machine's are not checked: a test may place on a silent machine), or else
      from a fresh online machine of `provider` (or of a new provider) with that many idle GPUs.
    - `price`: the lease's price per GPU-hour.
    - `started`: True marks the lease started now, a datetime started then
      (jobs.services.lease_mark_started, as the agent's `started` event does), so the lease and
      its job are running.

    The job and GPU rows are not locked first as the matcher locks them: a test places from one
    thread. Raises ValueError when it cannot place (too few free GPUs, a job not pending) and
    TypeError for arguments that contradict each other.
    """
    if job is None:
        count = 1 if gpus is None else gpus if isinstance(gpus, int) else len(gpus)
        job_fields.setdefault("gpu_count", count)
        job = JobFactory(renter=renter, **job_fields) if renter is not None else JobFactory(**job_fields)
    elif renter is not None or job_fields:
        raise TypeError("renter and job fields describe the job placed_lease makes; not with job=")
    if gpus is None or isinstance(gpus, int):
        count = job.gpu_count if gpus is None else gpus
        if machine is None:
            machine = machine_with_gpus(count=count, provider=provider)
        elif provider is not None:
            raise TypeError("provider is for the fresh machine placed_lease makes; not with machine=")
        machine_id = machine.pk
        free = machine.gpus.exclude(lease_gpus__active=True).order_by("index").values_list("pk", flat=True)
        gpu_ids = tuple(free[:count])
        if len(gpu_ids) < count:
            raise ValueError(f"machine {machine_id} has {len(gpu_ids)} GPUs in no active lease, not {count}")
    else:
        if machine is not None or provider is not None:
            raise TypeError("the GPUs given name their machine; not with machine= or provider=")
        machine_ids = {gpu.machine_id for gpu in gpus}
        if len(machine_ids) != 1:
            raise ValueError(f"a lease's GPUs are on one machine, not on machines {sorted(machine_ids)}")
        (machine_id,) = machine_ids
        gpu_ids = tuple(gpu.pk for gpu in gpus)
    with transaction.atomic():
        placed = leases_assign(
            placements=[
                Placement(job_id=job.pk, machine_id=machine_id, gpu_ids=gpu_ids, price_per_gpu_hour=Decimal(str(price)))
            ]
        )
    if not placed:
        raise ValueError(f"job {job.pk} is not pending: leases_assign placed nothing")
    lease_id = placed[job.pk]
    if started is not False:
        at = timezone.now() if started is True else started
        lease_mark_started(lease_id=lease_id, actor=f"machine:{machine_id}", at=at)
    return Lease.objects.get(pk=lease_id)


def token_for(user) -> str:  # type: ignore[no-untyped-def]
    _, raw = api_token_create(user=user)
    return raw


def capabilities_report(*, kinds: tuple[str, ...] = ("container", "process"), **extra: object) -> dict:
    """A heartbeat's `capabilities` as the agent sends it: Podman and bubblewrap, each with limits,
    for the accepted `kinds`; `extra` adds or replaces top-level keys (e.g. refused=…)."""
    limits = {"cpus": 3.0, "memory_mb": 12000, "pids": 4096}
    report: dict = {
        "kinds": list(kinds),
        "container": {
            "engine": "podman",
            "engine_version": "4.3.1",
            "runtime": "runc",
            "user_namespace": True,
            "network": "filtered",
            "read_only_root": True,
            "limits": dict(limits),
        }
        if "container" in kinds
        else None,
        "process": {
            "sandbox": "bubblewrap",
            "sandbox_version": "0.8.0",
            "user": "gpgpu-rental",
            "network": "none",
            "limits": dict(limits),
        }
        if "process" in kinds
        else None,
    }
    report.update(extra)
    return report


def idle_history_of(machine: Machine, *, stretches: Sequence[tuple[datetime, float]], ended: bool = True) -> None:
    """Give `machine` a history of idle stretches (start, length in seconds), as its heartbeats
    would have recorded them, and fold it into its forecast and the fleet prior."""
    from providers.idle_history import idle_stretches_fold
    from providers.models import IdleStretch

    gpu = machine.gpus.first() or GPUFactory(machine=machine)
    IdleStretch.objects.bulk_create(
        IdleStretch(machine=machine, gpu=gpu, began_at=began, length_s=length, ended=ended)
        for began, length in stretches
    )
    idle_stretches_fold()


def nightly_owner_history(machine: Machine, *, weeks: int = 4, until: datetime) -> None:
    """An owner away every night from 22:00 to 07:00 UTC, and by day for 4 minutes at a time,
    for the `weeks` before `until`."""
    start = (until - timedelta(weeks=weeks)).replace(hour=0, minute=0, second=0, microsecond=0)
    stretches: list[tuple[datetime, float]] = []
    for day in range(7 * weeks):
        midnight = start + timedelta(days=day)
        stretches.append((midnight + timedelta(hours=22), 9 * 3600.0))
        stretches.extend((midnight + timedelta(hours=hour), 240.0) for hour in range(8, 21))
    idle_history_of(machine, stretches=stretches)


def fickle_owner_history(machine: Machine, *, weeks: int = 4, until: datetime) -> None:
    """An owner back every few minutes, at any hour, for the `weeks` before `until`."""
    start = until - timedelta(weeks=weeks)
    stretches = [(start + timedelta(hours=h), 120.0 + 60 * (h % 4)) for h in range(weeks * 168)]
    idle_history_of(machine, stretches=stretches)


# --- the agent API, as an agent calls it ---------------------------------------------------------

AGENT_API = "/api/agent/v1/"


def agent_client(machine: Machine) -> APIClient:
    """A client holding a fresh credential of `machine`."""
    raw = f"gpm_test_{secrets.token_urlsafe(16)}"
    Machine.objects.filter(pk=machine.pk).update(credential_digest=secret_digest(raw))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Machine {raw}")
    return client


class _FrontHandler(ClientHandler):
    """The test client's handler with the marketplace's WSGI layer in front of it
    (marketplace.wsgi: providers.heartbeat_front), as a WSGI server runs them."""

    def __call__(self, environ: dict[str, Any]) -> HttpResponseBase:
        behind: list[HttpResponseBase] = []

        def django(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            behind.append(ClientHandler.__call__(self, environ))
            return []

        answered: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            answered.update(status=status, headers=headers)

        body = b"".join(SteadyHeartbeats(django)(environ, start_response))
        if behind:
            return behind[0]
        response = HttpResponse(body, status=int(answered["status"].split()[0]))
        for name in list(response.headers):
            del response[name]
        for name, value in answered["headers"]:
            response[name] = value
        response.wsgi_request = WSGIRequest(environ)  # type: ignore[attr-defined]  # as ClientHandler sets it
        return response


def through_front(client: APIClient) -> APIClient:
    """`client`, its requests going through the WSGI layer in front of Django first."""
    client.handler = _FrontHandler(client.handler.enforce_csrf_checks)
    return client


def gpu_entry(uuid: str, index: int = 0, **overrides: Any) -> dict[str, Any]:
    """One GPU of a heartbeat, idle, with its telemetry."""
    entry: dict[str, Any] = {
        "uuid": uuid,
        "index": index,
        "model": "NVIDIA GeForce RTX 4090",
        "vram_mb": 24564,
        "memory_used_mb": 312,
        "utilization_pct": 0.0,
        "temperature_c": 41.0,
        "power_w": 22.5,
        "idle": True,
        "idle_since": "2026-01-01T00:00:00Z",
        "owner_busy": False,
    }
    entry.update(overrides)
    return entry


def heartbeat(client: APIClient, gpus: list[dict[str, Any]], leases: list[dict[str, Any]] | None = None, **facts: Any):  # type: ignore[no-untyped-def]
    """POST a heartbeat with these GPUs and leases (and the machine's facts)."""
    body = {
        "agent_version": "0.1.0",
        "driver_version": "550.54",
        "cuda_version": "12.4",
        "cpu_cores": 16,
        "ram_mb": 64000,
        "disk_gb": 900,
        "region": "eu-west",
        "gpus": gpus,
        "leases": leases or [],
        **facts,
    }
    return client.post(AGENT_API + "heartbeat", body, format="json")
