"""Celery tasks of the matching engine."""

from __future__ import annotations

from celery import shared_task

from marketplace import matching


@shared_task(ignore_result=True, time_limit=120, soft_time_limit=100)
def match_pending_jobs() -> dict[str, float]:
    """One matching cycle (beat runs it every MATCH_INTERVAL_S). Safe to run concurrently."""
    return matching.match_cycle().as_dict()
