"""Idle history: the stretches of owners' absence the heartbeats see, kept as one forecast per
machine (providers.forecasting) and one for the whole fleet.

A *stretch* of a GPU is the time its owner leaves it alone: it is `idle` or `leased`, and its
`idle_since` is set. The agent keeps reporting `idle` and the same `idle_since` while a rental
runs on the GPU (gpgpu_agent.idle: the renter's utilisation does not break the owner's quiet), so
the stretch starts at `idle_since` (the agent's start of the owner's quiet, before its grace
period) and runs through the leases on it. It is over when the heartbeat clears or moves
`idle_since`:

- the agent reports the owner back (`owner_busy`): an *ended* stretch, its length observed (up
  to one heartbeat interval long: the owner came back since the last one);
- the GPU is not idle without the owner being back (outside the schedule, declined, unreadable),
  it is no longer reported, its machine went silent, was suspended or revoked
  (providers.services._machine_gpus_offline), or the agent reports a later `idle_since` (it
  restarted): *censored* at what we saw of it.

Recording is cheap: the heartbeat compares each GPU's `idle_since` before and after its report,
in memory, and writes the stretches that are over in one bulk insert (`IdleStretch`), only when
there are some. A stretch that is longer than IDLE_STRETCH_MAX_D days, or negative (a clock far
off), is refused and logged, never raised. Stretches still running are not counted: the
forecast is learnt from stretches that are over.

Folding (`idle_stretches_fold`, beat: providers.tasks.fold_idle_stretches every 5 minutes): first
up to IDLE_FORECAST_FOLD_BATCH new rows go into the FleetIdleProfile in one transaction (marked
`in_fleet`), then each machine's rows into its MachineIdleProfile and are deleted, machine by
machine (core.periodic.item: one bad machine is skipped, not the run). Each step is one
transaction, so a row is counted once in each profile however often the task runs or dies.
Counts decay with a half-life of IDLE_FORECAST_HALF_LIFE_D days, applied when a profile is
folded into (a machine with no new stretches keeps its counts as they were).

Storage: a profile is at most 168 hours × 22 bins × 2 numbers, decayed counts under 0.01 are
dropped, and its analogs (providers.forecasting.Analogs: the ended stretches of at least 2
minutes over the last 4 days, at most 1,000, and their calibration, refreshed at each fold);
stretch rows live until the next fold. A deleted machine takes its rows and profile
with it (CASCADE); the fold deletes the profile and rows of a machine its provider removed.

Known approximation: a stretch cut by a machine's silence is counted censored at the silence,
and, if the agent kept its `idle_since` through it, again in full when it ends: the same hour
of the week gets one extra (censored) stretch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from core.periodic import item
from providers.forecasting import SAFE_P, Analogs, Forecast, StretchCounts, hour_of_week
from providers.models import GPU, FleetIdleProfile, IdleStretch, MachineIdleProfile

logger = logging.getLogger(__name__)

_FLEET_PK = 1
_UPDATE_CHUNK = 1000
# The states in which the owner leaves the GPU alone.
AWAY_STATES = (GPU.State.IDLE, GPU.State.LEASED)


# --- recording (the heartbeat's hot path: no queries here) ------------------------------------


def idle_stretch_over(
    *, machine_id: int, gpu_id: int, began_at: datetime, over_at: datetime, ended: bool
) -> IdleStretch | None:
    """The unsaved IdleStretch of a GPU's stretch from `began_at` to `over_at` (ended by the owner's
    return when `ended`, else censored there); None, logged, when its length is negative or over
    IDLE_STRETCH_MAX_D days (a clock far off: the stretch says nothing true)."""
    length_s = (over_at - began_at).total_seconds()
    longest_s = settings.GPGPU["IDLE_STRETCH_MAX_D"] * 86400
    if not 0 <= length_s <= longest_s:
        logger.warning(
            "idle stretch of GPU %s refused: %.0f s from %s (allowed 0..%d s)", gpu_id, length_s, began_at, longest_s
        )
        return None
    return IdleStretch(machine_id=machine_id, gpu_id=gpu_id, began_at=began_at, length_s=length_s, ended=ended)


def idle_stretches_record(stretches: Iterable[IdleStretch | None]) -> int:
    """Insert the stretches (Nones skipped) in one query, none when there are none; how many."""
    rows = [s for s in stretches if s is not None]
    if rows:
        IdleStretch.objects.bulk_create(rows)
    return len(rows)


# --- folding (the periodic task) ---------------------------------------------------------------


def _decayed(counts: StretchCounts, *, since: datetime, now: datetime) -> StretchCounts:
    elapsed_s = (now - since).total_seconds()
    if elapsed_s > 0:
        half_life_s = settings.GPGPU["IDLE_FORECAST_HALF_LIFE_D"] * 86400
        counts.decay(0.5 ** (elapsed_s / half_life_s))
    return counts


def _counts_of(data: object, *, whose: str) -> StretchCounts:
    """A profile's stored counts; a profile that cannot be read (edited by hand, say) is logged
    and starts afresh, so it cannot stop every later fold."""
    try:
        return StretchCounts.from_json(data if isinstance(data, dict) else None)
    except (ValueError, TypeError, AttributeError):
        logger.error("idle profile of %s cannot be read; it starts afresh", whose, exc_info=True)
        return StretchCounts()


def _analogs_of(data: object, *, whose: str) -> Analogs:
    """A profile's stored analogs; ones that cannot be read are logged and start afresh."""
    try:
        return Analogs.from_json(data if isinstance(data, dict) else None)
    except (ValueError, TypeError, AttributeError, IndexError):
        logger.error("idle analogs of %s cannot be read; they start afresh", whose, exc_info=True)
        return Analogs()


def _counted(counts: StretchCounts, rows: Iterable[tuple[datetime, float, bool]]) -> int:
    n = 0
    for began_at, length_s, ended in rows:
        if not math.isfinite(length_s):
            continue  # never written by idle_stretch_over; skipped rather than stop the fold
        counts.add(began_hour=hour_of_week(began_at), length_s=max(length_s, 0.0), ended=ended)
        n += 1
    return n


def _fleet_fold(*, now: datetime) -> int:
    """Count up to IDLE_FORECAST_FOLD_BATCH rows not yet in the fleet prior into it; how many."""
    batch = settings.GPGPU["IDLE_FORECAST_FOLD_BATCH"]
    with transaction.atomic():
        fleet, _ = FleetIdleProfile.objects.select_for_update().get_or_create(
            pk=_FLEET_PK, defaults={"counts": {}, "decayed_at": now}
        )
        rows = list(
            IdleStretch.objects.filter(in_fleet=False)
            .order_by("pk")
            .values_list("pk", "began_at", "length_s", "ended")[:batch]
        )
        if not rows:
            return 0
        counts = _decayed(_counts_of(fleet.counts, whose="the fleet"), since=fleet.decayed_at, now=now)
        n = _counted(counts, (row[1:] for row in rows))
        FleetIdleProfile.objects.filter(pk=_FLEET_PK).update(
            counts=counts.to_json(), decayed_at=max(now, fleet.decayed_at), stretches=fleet.stretches + n
        )
        ids = [row[0] for row in rows]
        for start in range(0, len(ids), _UPDATE_CHUNK):
            IdleStretch.objects.filter(pk__in=ids[start : start + _UPDATE_CHUNK]).update(in_fleet=True)
    return n


def _machine_fold(*, machine_id: int, now: datetime) -> int:
    """Fold the machine's rows already in the fleet prior into its profile and delete them; how
    many. The caller holds a transaction."""
    rows = list(
        IdleStretch.objects.filter(machine_id=machine_id, in_fleet=True)
        .order_by("pk")
        .values_list("pk", "began_at", "length_s", "ended")
    )
    if not rows:
        return 0
    profile = MachineIdleProfile.objects.select_for_update().filter(machine_id=machine_id).first()
    if profile is None:
        profile = MachineIdleProfile(machine_id=machine_id, counts={}, decayed_at=now)
    counts = _decayed(_counts_of(profile.counts, whose=f"machine {machine_id}"), since=profile.decayed_at, now=now)
    n = _counted(counts, (row[1:] for row in rows))
    # The owner's days as they were: stretches the owner ended (a censored one says nothing of
    # when the owner came back), then how well they read this machine (Analogs.calibrate).
    analogs = _analogs_of(profile.analogs, whose=f"machine {machine_id}")
    for _, began_at, length_s, ended in rows:
        if ended and math.isfinite(length_s):
            start = began_at.timestamp()
            analogs.add(start, start + length_s)
    analogs.calibrate(SAFE_P)
    profile.analogs = analogs.to_json()
    profile.counts = counts.to_json()
    profile.decayed_at = max(now, profile.decayed_at)
    profile.stretches += n
    profile.save()
    IdleStretch.objects.filter(pk__in=[row[0] for row in rows]).delete()
    return n


def idle_stretches_fold(*, now: datetime | None = None) -> dict[str, int]:
    """Fold the recorded stretches into the fleet prior, then into each machine's profile
    (module docstring); drop the profiles and rows of machines their providers removed.
    Idempotent: a row is counted once in each profile, however often this runs."""
    now = now or timezone.now()
    with transaction.atomic():
        removed_rows, _ = IdleStretch.objects.filter(in_fleet=True, machine__removed_at__isnull=False).delete()
        removed_profiles, _ = MachineIdleProfile.objects.filter(machine__removed_at__isnull=False).delete()
    fleet = _fleet_fold(now=now)
    machine_ids = list(
        IdleStretch.objects.filter(in_fleet=True).order_by("machine_id").values_list("machine_id", flat=True).distinct()
    )
    machines = folded = 0
    for machine_id in machine_ids:
        with item("machine", machine_id) as it:
            n = _machine_fold(machine_id=machine_id, now=now)
        if it.ok:
            machines += 1
            folded += n
    return {
        "fleet": fleet,
        "machines": machines,
        "stretches": folded,
        "removed": removed_rows + removed_profiles,
    }


# --- reads ---------------------------------------------------------------------------------------


# Machines' profiles as read, by machine id: (the fold's stamp: when it was last folded into and
# how many stretches it has counted; counts; analogs or None), kept
# across calls in this process (a matcher worker asks for every candidate machine every cycle,
# and reading a profile's analogs costs about half a millisecond for 300 stretches) and read
# again only when a fold has changed it. Bounded: emptied when it holds more than this.
_READ: dict[int, tuple[tuple[datetime, int], StretchCounts, Analogs | None]] = {}
_READ_MAX = 200_000
# The fleet prior as last read (its stored counts, them read, and the Forecast of a machine with no
# history of its own: one tuple, replaced whole), and
# each machine's Forecast as last handed out, emptied with _READ and whenever the prior changes
# (each fold: so a forecast's cached curves live a fold interval at most): a forecast whose
# profile and prior have not changed is the same object from call to call (its curves are worked
# out once, and a matcher that keeps its pool between cycles, marketplace.matching, sees that it
# has not changed).
_FLEET_READ: list[tuple[Any, StretchCounts, Forecast]] = []
_FORECASTS: dict[int, Forecast] = {}


def machine_forecasts(*, machine_ids: Iterable[int]) -> dict[int, Forecast]:
    """The idle forecast of each machine: its MachineIdleProfile blended with the fleet prior
    (providers.forecasting.Forecast), with its analogs; a machine with no profile is forecast
    as the fleet, and with no fleet prior either, as forecasting's default (an hour's mean);
    those machines share one Forecast object. Two queries whatever the number of machines, and a
    third for the profiles folded since this process last read them."""
    ids = sorted(set(machine_ids))
    if not ids:
        return {}
    fleet_row = FleetIdleProfile.objects.filter(pk=_FLEET_PK).values_list("counts", flat=True).first()
    prior_before = _FLEET_READ[0] if _FLEET_READ else None
    if prior_before is not None and prior_before[0] == fleet_row:
        _, fleet, as_the_fleet = prior_before
    else:
        fleet = _counts_of(fleet_row, whose="the fleet")
        # Machines with no history share one Forecast, and so its cached curves.
        as_the_fleet = Forecast(StretchCounts(), fleet)
        _FLEET_READ[:] = [(fleet_row, fleet, as_the_fleet)]
        _FORECASTS.clear()  # every forecast blends the prior in: made again as asked for
    stamps = {
        machine_id: (decayed_at, stretches)
        for machine_id, decayed_at, stretches in MachineIdleProfile.objects.filter(machine_id__any=ids).values_list(
            "machine_id", "decayed_at", "stretches"
        )
    }
    stale = [machine_id for machine_id, stamp in stamps.items() if _READ.get(machine_id, (None,))[0] != stamp]
    if len(_READ) + len(stale) > _READ_MAX:
        _READ.clear()
        _FORECASTS.clear()
        stale = list(stamps)  # every profile asked for is read again, not only the changed ones
    if stale:
        rows = MachineIdleProfile.objects.filter(machine_id__any=stale).values_list(
            "machine_id", "decayed_at", "stretches", "counts", "analogs"
        )
        for machine_id, decayed_at, stretches, counts, analogs in rows:
            whose = f"machine {machine_id}"
            read = _analogs_of(analogs, whose=whose)
            kept = read if read.starts else None
            _READ[machine_id] = ((decayed_at, stretches), _counts_of(counts, whose=whose), kept)
    forecasts: dict[int, Forecast] = {}
    for machine_id in ids:
        read_before = _READ.get(machine_id) if machine_id in stamps else None
        if read_before is None:
            forecasts[machine_id] = as_the_fleet
            continue
        forecast = _FORECASTS.get(machine_id)
        if (
            forecast is None
            or forecast.machine is not read_before[1]
            or forecast.fleet is not fleet
            or forecast.analogs is not read_before[2]
        ):
            forecast = _FORECASTS[machine_id] = Forecast(read_before[1], fleet, read_before[2])
        forecasts[machine_id] = forecast
    return forecasts


def machines_idle_since(*, machine_ids: Iterable[int]) -> dict[int, float | None]:
    """When each machine's current stretch began, in Unix seconds: the latest `idle_since` among
    its GPUs that are idle or leased (the youngest stretch on it: a job on several of its GPUs
    lasts as long as the first of them to be taken back, and a younger stretch is the likelier to
    end soon). None for a machine with no such GPU (its owner is at it, or it is offline). One
    query."""
    ids = sorted(set(machine_ids))
    result: dict[int, float | None] = dict.fromkeys(ids)
    if not ids:
        return result
    latest = (
        GPU.objects.filter(machine_id__any=ids, state__in=AWAY_STATES, idle_since__isnull=False)
        .order_by()
        .values("machine_id")
        .annotate(latest=Max("idle_since"))
        .values_list("machine_id", "latest")
    )
    for machine_id, since in latest:
        result[machine_id] = since.timestamp()
    return result


def machine_predicted_idle_s(*, machine_id: int, now: float) -> int | None:
    """How many more seconds the machine's current idle stretch is likely to last (the median of
    its forecast), at Unix time `now`; None when no stretch is running on it. Three queries."""
    return machines_predicted_idle_s(machine_ids=[machine_id], now=now)[machine_id]


def machines_predicted_idle_s(*, machine_ids: Iterable[int], now: float) -> dict[int, int | None]:
    """machine_predicted_idle_s of each machine, in three queries whatever their number (and a
    fourth for the profiles folded since this process last read them)."""
    since = machines_idle_since(machine_ids=machine_ids)
    forecasts = machine_forecasts(machine_ids=[machine_id for machine_id, at in since.items() if at is not None])
    return {
        machine_id: None if at is None else round(forecasts[machine_id].median_more(idle_since=at, now=now))
        for machine_id, at in since.items()
    }


__all__ = [
    "AWAY_STATES",
    "idle_stretch_over",
    "idle_stretches_fold",
    "idle_stretches_record",
    "machine_forecasts",
    "machine_predicted_idle_s",
    "machines_idle_since",
    "machines_predicted_idle_s",
]
