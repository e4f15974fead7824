"""Celery tasks of the fleet: thin, idempotent, each calling one service. The periodic ones run
under core.periodic (a lock per task, logging, a failure count per task)."""

from __future__ import annotations

from core.periodic import periodic_task
from providers import idle_history, services, telemetry


@periodic_task(name="providers.tasks.sweep_machine_liveness", time_limit=60)
def sweep_machine_liveness() -> dict[str, int | bool]:
    """Silent machines go offline, and much later their leases end as lost
    (providers.services.machines_liveness_sweep)."""
    return services.machines_liveness_sweep().as_dict()


@periodic_task(name="providers.tasks.rollup_telemetry", time_limit=600)
def rollup_telemetry() -> dict[str, int]:
    """Roll raw telemetry samples up into hourly aggregates (beat: every 5 minutes)."""
    return {"rollups": telemetry.telemetry_rollup()}


@periodic_task(name="providers.tasks.prune_telemetry", time_limit=600)
def prune_telemetry() -> dict[str, int]:
    """Delete telemetry past its retention (beat: every hour)."""
    return {"pruned": telemetry.telemetry_prune()}


@periodic_task(name="providers.tasks.fold_idle_stretches", time_limit=600)
def fold_idle_stretches() -> dict[str, int]:
    """Fold the idle stretches heartbeats recorded into each machine's forecast and the fleet
    prior, then delete them (providers.idle_history; beat: every 5 minutes); then predict, from
    the new forecasts, the idle time of every machine running a lease, for their heartbeats
    (providers.services.running_predictions_refresh)."""
    folded = idle_history.idle_stretches_fold()
    return {**folded, "predicted": services.running_predictions_refresh()}
