"""Celery tasks of jobs and leases: thin, idempotent, each calling one service. The periodic ones
run under core.periodic (a lock per task, logging, a failure count per task)."""

from __future__ import annotations

from core.periodic import periodic_task
from jobs import checkpoints, services, sweeps


@periodic_task(name="jobs.tasks.sweep_leases", time_limit=120)
def sweep_leases() -> dict[str, int]:
    """Leases stuck assigned time out, leases past their job's max duration are stopped (then
    ended if the agent does not stop them), each lease in its own transaction. Beat runs it every
    15 s; a run that finds the previous one still holding the lock does nothing."""
    return sweeps.leases_sweep().as_dict()


@periodic_task(name="jobs.tasks.prune_job_logs", time_limit=600)
def prune_job_logs() -> dict[str, int]:
    """The output of jobs finished more than JOB_LOG_RETENTION_H hours ago is deleted; beat runs
    it hourly."""
    return {"pruned": services.log_chunks_prune()}


@periodic_task(name="jobs.tasks.sweep_checkpoints", time_limit=600)
def sweep_checkpoints() -> dict[str, int]:
    """Checkpoints' files no job holds any more (a deletion that failed) are deleted; beat runs it
    hourly."""
    return {"deleted": checkpoints.checkpoint_orphans_delete()}
