"""Celery tasks of the matching engine and of the fleet's hourly summary."""

from __future__ import annotations

from core.periodic import periodic_task
from marketplace import fleet_summary, matching


@periodic_task(name="marketplace.tasks.match_pending_jobs", time_limit=120, soft_time_limit=100)
def match_pending_jobs() -> dict[str, float]:
    """One matching cycle (beat runs it every MATCH_INTERVAL_S). Cycles are safe to run
    concurrently (marketplace.matching), but one that overlaps the previous would only contend for
    the same jobs and GPUs, so a run that finds the previous one still going skips."""
    return matching.match_cycle().as_dict()


@periodic_task(
    name="marketplace.tasks.match_pending_jobs_soon",
    lock="marketplace.tasks.match_pending_jobs",
    retry_locked=(matching.LOCKED_TRIES, matching.LOCKED_RETRY_S),
    time_limit=120,
    soft_time_limit=100,
)
def match_pending_jobs_soon() -> dict[str, float]:
    """A matching cycle asked for by matching.matching_request_soon (a job submitted, a budget
    reserved), under the beat run's lock: the two never overlap. Finding it held, it runs again
    shortly, a few times (core.periodic retry_locked); the beat entry stays the safety net."""
    matching.matching_request_clear()
    return matching.match_cycle().as_dict()


@periodic_task(name="marketplace.tasks.worker_heartbeat", time_limit=30)
def worker_heartbeat() -> dict[str, int]:
    """Proof that beat and a worker are alive (beat sends it every 30 s, its entry
    "worker-heartbeat"): it does nothing, and core.periodic records when it ran in
    PeriodicTaskState, which /healthz reads (marketplace.health: a heartbeat older than three
    intervals means beat or every worker is down)."""
    return {}


@periodic_task(name="marketplace.tasks.summarise_fleet", time_limit=900, soft_time_limit=840)
def summarise_fleet() -> dict[str, int]:
    """The fleet summary's due hours (beat runs it every few minutes, its entry "summarise-fleet";
    marketplace.fleet_summary): the hours that ended recently, and any of the last week not
    summarised yet or stale. Its first run on a deployment fills the week."""
    return fleet_summary.fleet_summary_run()


@periodic_task(
    name="marketplace.tasks.summarise_fleet_soon",
    lock="marketplace.tasks.summarise_fleet",
    retry_locked=(fleet_summary.LOCKED_TRIES, fleet_summary.LOCKED_RETRY_S),
    time_limit=900,
    soft_time_limit=840,
)
def summarise_fleet_soon() -> dict[str, int]:
    """A summary run asked for by a change to a summarised hour (fleet_summary.fleet_hours_changed),
    under the beat run's lock."""
    fleet_summary.fleet_summary_request_clear()
    return fleet_summary.fleet_summary_run()
