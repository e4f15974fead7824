"""Reads of the fleet."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, TypedDict

from django.db.models import Count, Prefetch, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from providers.availability import FOREVER, Interval, WindowSpec, available_until
from providers.errors import NotFound
from providers.idle_history import machine_forecasts, machines_idle_since
from providers.leases import machine_leases
from providers.models import GPU, AvailabilityWindow, Blackout, JobKind, Machine, Provider, RegistrationToken

if TYPE_CHECKING:
    # django-stubs-ext is a development requirement: its names are for the types only.
    from django_stubs_ext import WithAnnotations


class MarketAnnotations(TypedDict):
    """What gpu_market_queryset annotates each GPU with."""

    effective_price: Decimal
    in_active_lease: bool


def machines_available_until(*, machines: Iterable[tuple[int, int]], now: datetime) -> dict[int, datetime | None]:
    """For each (machine_id, provider_id): the end of its current availability stretch
    (see providers.availability.available_until). Two queries, whatever the number of machines."""
    pairs = list(machines)
    if not pairs:
        return {}
    machine_ids = {m for m, _ in pairs}
    provider_ids = {p for _, p in pairs}

    provider_windows: dict[int, list[WindowSpec]] = defaultdict(list)
    machine_windows: dict[int, list[WindowSpec]] = defaultdict(list)
    # Every window and blackout of the providers, the other machines' left out here rather than
    # in the query (an IN list of every machine id cost a tenth of a match cycle's fleet read).
    for w in AvailabilityWindow.objects.filter(provider_id__any=provider_ids):
        if w.machine_id is not None and w.machine_id not in machine_ids:
            continue
        spec = WindowSpec(days=w.days, start=w.start_time, end=w.end_time, tz=w.timezone)
        (machine_windows[w.machine_id] if w.machine_id else provider_windows[w.provider_id]).append(spec)

    provider_blackouts: dict[int, list[Interval]] = defaultdict(list)
    machine_blackouts: dict[int, list[Interval]] = defaultdict(list)
    for b in Blackout.objects.filter(provider_id__any=provider_ids, ends_at__gt=now):
        if b.machine_id is not None and b.machine_id not in machine_ids:
            continue
        iv = Interval(b.starts_at, b.ends_at)
        (machine_blackouts[b.machine_id] if b.machine_id else provider_blackouts[b.provider_id]).append(iv)

    result: dict[int, datetime | None] = {}
    # Machines with the same provider and no windows or blackouts of their own share one answer.
    shared: dict[int, datetime | None] = {}
    for machine_id, provider_id in pairs:
        own_windows = machine_windows.get(machine_id)
        own_blackouts = machine_blackouts.get(machine_id)
        if own_windows is None and own_blackouts is None:
            if provider_id not in shared:
                shared[provider_id] = available_until(
                    windows=provider_windows.get(provider_id, []),
                    blackouts=provider_blackouts.get(provider_id, []),
                    now=now,
                )
            result[machine_id] = shared[provider_id]
        else:
            result[machine_id] = available_until(
                windows=own_windows if own_windows is not None else provider_windows.get(provider_id, []),
                blackouts=(own_blackouts or []) + provider_blackouts.get(provider_id, []),
                now=now,
            )
    return result


def machine_available_until(*, machine: Machine, now: datetime) -> datetime | None:
    return machines_available_until(machines=[(machine.pk, machine.provider_id)], now=now)[machine.pk]


# --- the market and provider-scoped reads (REST API) ------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuAvailability:
    """Whether a GPU may be placed on now, and until when (None with `forever`: no end known)."""

    available_now: bool
    until: datetime | None
    forever: bool


def gpu_market_queryset() -> QuerySet[WithAnnotations[GPU, MarketAnnotations]]:
    """GPUs on the market (any machine not suspended by an operator), annotated with
    `effective_price` (the GPU's floor, else its provider's default) and `in_active_lease`,
    cheapest first."""
    return (
        GPU.objects.exclude(machine__status=Machine.Status.SUSPENDED)
        .select_related("machine")
        .annotate(
            effective_price=Coalesce("price_floor", "machine__provider__default_price_floor"),
            in_active_lease=machine_leases().gpu_in_active_lease(),
        )
        .order_by("effective_price", "pk")
    )


def _placeable_now(
    queryset: QuerySet[WithAnnotations[GPU, MarketAnnotations]],
) -> QuerySet[WithAnnotations[GPU, MarketAnnotations]]:
    return queryset.filter(state=GPU.State.IDLE, machine__status=Machine.Status.ONLINE, in_active_lease=False)


def gpu_search(
    *,
    models: Sequence[str] = (),
    min_vram_mb: int | None = None,
    max_price: Decimal | None = None,
    region: str = "",
    available_now: bool | None = None,
    now: datetime | None = None,
) -> QuerySet[WithAnnotations[GPU, MarketAnnotations]]:
    """The market's GPUs matching every filter given (see gpu_market_queryset).

    models: any of these model names, case-insensitive. max_price: the effective floor is at
    most this. region: the machine's region, case-insensitive. available_now: True keeps the
    GPUs a job could be placed on now (idle, machine online, not in an active lease, inside its
    machine's availability stretch: windows minus blackouts), False keeps the others.
    """
    queryset = gpu_market_queryset()
    if models:
        wanted = Q()
        for name in models:
            wanted |= Q(model__iexact=name)
        queryset = queryset.filter(wanted)
    if min_vram_mb is not None:
        queryset = queryset.filter(vram_mb__gte=min_vram_mb)
    if max_price is not None:
        queryset = queryset.filter(effective_price__lte=max_price)
    if region:
        queryset = queryset.filter(machine__region__iexact=region)
    if available_now is not None:
        now = now or timezone.now()
        pairs = set(_placeable_now(queryset).order_by().values_list("machine_id", "machine__provider_id").distinct())
        until = machines_available_until(machines=pairs, now=now)
        open_machines = [machine_id for machine_id, end in until.items() if end is not None]
        placeable = _placeable_now(queryset).filter(machine_id__in=open_machines)
        if available_now:
            queryset = placeable
        else:
            queryset = queryset.exclude(pk__in=placeable.order_by().values("pk"))
    return queryset


def gpus_availability(*, gpus: Sequence[GPU], now: datetime | None = None) -> dict[int, GpuAvailability]:
    """For GPUs from gpu_market_queryset (a page of them): may each be placed on now, and until
    when. Two queries for the availability schedules, whatever the number of GPUs."""
    now = now or timezone.now()
    until = machines_available_until(machines={(g.machine_id, g.machine.provider_id) for g in gpus}, now=now)
    result: dict[int, GpuAvailability] = {}
    for gpu in gpus:
        end = until.get(gpu.machine_id)
        placeable = (
            gpu.state == GPU.State.IDLE
            and gpu.machine.status == Machine.Status.ONLINE
            and not getattr(gpu, "in_active_lease", False)
            and end is not None
        )
        if not placeable:
            result[gpu.pk] = GpuAvailability(available_now=False, until=None, forever=False)
        elif end == FOREVER:
            result[gpu.pk] = GpuAvailability(available_now=True, until=None, forever=True)
        else:
            result[gpu.pk] = GpuAvailability(available_now=True, until=end, forever=False)
    return result


@dataclass(frozen=True, slots=True)
class IdleRisk:
    """What a renter risks on a machine: how long its owner is likely to stay away (the median of
    its forecast, seconds; None when no stretch is running on it), and the probability that a job
    of the duration asked for runs to its end without the owner coming back (None when no
    duration was asked for, the machine takes no job now or its stretch is unknown; 0 when its
    availability window ends first)."""

    predicted_idle_s: int | None
    p_finish: float | None


def machines_idle_risk(
    *, availability: Mapping[int, GpuAvailability], duration_s: int | None = None, now: datetime | None = None
) -> dict[int, IdleRisk]:
    """For each machine of `availability` (machine id: whether it takes a job now, and until
    when), its IdleRisk for a job of `duration_s` starting now, from its idle forecast
    (providers.idle_history): three queries whatever the number of machines."""
    now = now or timezone.now()
    ids = list(availability)
    since = machines_idle_since(machine_ids=ids)
    forecasts = machine_forecasts(machine_ids=[m for m in ids if since.get(m) is not None])
    at = now.timestamp()
    result: dict[int, IdleRisk] = {}
    for machine_id, avail in availability.items():
        began = since.get(machine_id)
        if began is None:
            result[machine_id] = IdleRisk(predicted_idle_s=None, p_finish=None)
            continue
        forecast = forecasts[machine_id]
        predicted = round(forecast.median_more(idle_since=began, now=at))
        p_finish: float | None = None
        if duration_s is not None and avail.available_now:
            if avail.until is not None and (avail.until - now).total_seconds() < duration_s:
                p_finish = 0.0
            else:
                p_finish = round(forecast.survival(idle_since=began, now=at, more_s=duration_s), 4)
        result[machine_id] = IdleRisk(predicted_idle_s=predicted, p_finish=p_finish)
    return result


# The most GPUs machine_offers reads (the cheapest that fit): bounds the read of a job's detail.
OFFER_GPUS_READ = 1000


@dataclass(frozen=True)
class MachineOffer:
    """A machine a job could be placed on now: the cheapest GPUs of it that fit the job (as many
    as it asks for), at the highest floor among them, with its idle risk for the job."""

    machine_id: int
    region: str
    gpus: list[GPU]
    price_per_gpu_hour: Decimal
    availability: GpuAvailability
    risk: IdleRisk


def machine_offers(
    *,
    models: Sequence[str],
    min_vram_mb: int,
    max_price: Decimal,
    region: str,
    kind: str,
    gpu_count: int,
    duration_s: int,
    limit: int = 5,
    now: datetime | None = None,
) -> list[MachineOffer]:
    """Up to `limit` machines a job with these constraints could be placed on now (as the
    matcher places: GPUs available now, of one of `models` (empty: any), with at least
    `min_vram_mb`, a floor at most `max_price`, in `region` (empty: any), on a machine that
    accepts `kind`, `gpu_count` of them on one machine whose availability lasts `duration_s`),
    best first: the likeliest to finish the job (p_finish), then the cheapest. Read among the
    OFFER_GPUS_READ cheapest fitting GPUs; a bounded number of queries."""
    now = now or timezone.now()
    gpus = gpu_search(
        models=models, min_vram_mb=min_vram_mb, max_price=max_price, region=region, available_now=True, now=now
    )
    if kind == JobKind.PROCESS:
        gpus = gpus.filter(machine__accepts_process=True)
    else:
        gpus = gpus.filter(machine__accepts_container=True)
    by_machine: dict[int, list[WithAnnotations[GPU, MarketAnnotations]]] = defaultdict(list)
    for gpu in gpus[:OFFER_GPUS_READ]:
        by_machine[gpu.machine_id].append(gpu)
    fitting = {m: chosen[:gpu_count] for m, chosen in by_machine.items() if len(chosen) >= gpu_count}
    availability = gpus_availability(gpus=[chosen[0] for chosen in fitting.values()], now=now)
    by_machine_availability = {m: availability[chosen[0].pk] for m, chosen in fitting.items()}
    lasting = {
        m: a
        for m, a in by_machine_availability.items()
        if a.available_now and (a.until is None or (a.until - now).total_seconds() >= duration_s)
    }
    risks = machines_idle_risk(availability=lasting, duration_s=duration_s, now=now)
    offers = [
        MachineOffer(
            machine_id=m,
            region=fitting[m][0].machine.region,
            gpus=list(fitting[m]),
            price_per_gpu_hour=max(g.effective_price for g in fitting[m]),
            availability=lasting[m],
            risk=risks[m],
        )
        for m in lasting
    ]
    offers.sort(key=lambda o: (-(o.risk.p_finish or 0.0), o.price_per_gpu_hour, o.machine_id))
    return offers[:limit]


def machine_list_for_provider(*, provider: Provider) -> QuerySet[Machine]:
    """The provider's machines in service (not removed), with `gpu_count`."""
    return (
        Machine.objects.filter(provider=provider, removed_at__isnull=True)
        .annotate(gpu_count=Count("gpus"))
        .order_by("pk")
    )


def machine_get_for_provider(*, provider: Provider, machine_id: int) -> Machine:
    """The provider's machine with its GPUs (and their `effective_price`); NotFound for a
    machine that is not the provider's, or that it removed."""
    gpus = GPU.objects.annotate(
        effective_price=Coalesce("price_floor", "machine__provider__default_price_floor")
    ).order_by("index")
    machine = (
        Machine.objects.filter(provider=provider, pk=machine_id, removed_at__isnull=True)
        .prefetch_related(Prefetch("gpus", queryset=gpus))
        .first()
    )
    if machine is None:
        raise NotFound(f"Machine {machine_id} not found.")
    return machine


def gpu_get_for_provider(*, provider: Provider, machine_id: int, gpu_id: int) -> GPU:
    """One GPU of the provider's machine; NotFound otherwise."""
    gpu = GPU.objects.filter(pk=gpu_id, machine_id=machine_id, machine__provider=provider).first()
    if gpu is None:
        raise NotFound(f"GPU {gpu_id} of machine {machine_id} not found.")
    return gpu


def availability_window_list(*, provider: Provider) -> QuerySet[AvailabilityWindow]:
    return AvailabilityWindow.objects.filter(provider=provider).order_by("pk")


def availability_window_get(*, provider: Provider, window_id: int) -> AvailabilityWindow:
    window = AvailabilityWindow.objects.filter(provider=provider, pk=window_id).first()
    if window is None:
        raise NotFound(f"Availability window {window_id} not found.")
    return window


def blackout_list(*, provider: Provider) -> QuerySet[Blackout]:
    return Blackout.objects.filter(provider=provider).order_by("starts_at", "pk")


def blackout_get(*, provider: Provider, blackout_id: int) -> Blackout:
    blackout = Blackout.objects.filter(provider=provider, pk=blackout_id).first()
    if blackout is None:
        raise NotFound(f"Blackout {blackout_id} not found.")
    return blackout


def registration_token_list(*, provider: Provider) -> QuerySet[RegistrationToken]:
    return RegistrationToken.objects.filter(provider=provider).order_by("-created_at", "-pk")
