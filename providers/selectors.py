"""Reads of the fleet."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime

from django.db.models import Q

from providers.availability import Interval, WindowSpec, available_until
from providers.models import AvailabilityWindow, Blackout, Machine


def machines_available_until(
    *, machines: Iterable[tuple[int, int]], now: datetime
) -> dict[int, datetime | None]:
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
