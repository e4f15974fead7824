"""Celery tasks of the matching engine."""

from __future__ import annotations

from core.periodic import periodic_task
from marketplace import matching


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
