"""Reads of the fleet."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, TypedDict

from django.db.models import Count, Prefetch, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from providers.availability import FOREVER, Interval, WindowSpec, available_until
from providers.errors import NotFound
from providers.leases import machine_leases
from providers.models import GPU, AvailabilityWindow, Blackout, Machine, Provider, RegistrationToken

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
    for w in AvailabilityWindow.objects.filter(provider_id__in=provider_ids).filter(
        Q(machine__isnull=True) | Q(machine_id__in=machine_ids)
    ):
        spec = WindowSpec(days=w.days, start=w.start_time, end=w.end_time, tz=w.timezone)
        (machine_windows[w.machine_id] if w.machine_id else provider_windows[w.provider_id]).append(spec)

    provider_blackouts: dict[int, list[Interval]] = defaultdict(list)
    machine_blackouts: dict[int, list[Interval]] = defaultdict(list)
    for b in Blackout.objects.filter(provider_id__in=provider_ids, ends_at__gt=now).filter(
        Q(machine__isnull=True) | Q(machine_id__in=machine_ids)
    ):
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
