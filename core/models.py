"""What the project itself keeps: how its periodic tasks have been doing."""

from __future__ import annotations

from django.db import models


class PeriodicTaskState(models.Model):
    """One row per periodic task, written by core.periodic at the start and end of every
    run (and when a run is skipped because the previous one still holds the lock), so an operator
    can see which sweep keeps failing and why.

    A run is not ok when it raised, when its result reported an error (an unreachable chain node),
    or when any of its items failed; `consecutive_failures` counts such runs since the last ok one.
    """

    name = models.CharField(max_length=200, unique=True)
    last_started_at = models.DateTimeField(null=True, blank=True)
    last_finished_at = models.DateTimeField(null=True, blank=True)
    last_skipped_at = models.DateTimeField(null=True, blank=True)
    # None until a run has finished.
    last_ok = models.BooleanField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    total_runs = models.PositiveBigIntegerField(default=0)
    total_failures = models.PositiveBigIntegerField(default=0)
    total_skipped = models.PositiveBigIntegerField(default=0)
    # The last failure's description, scrubbed of node URL secrets and cut short. Kept after
    # later ok runs, so the console still says what went wrong last.
    last_error = models.CharField(max_length=500, blank=True, default="")
    # Items of the last finished run that went through, and that failed (and were skipped).
    items_ok = models.PositiveIntegerField(default=0)
    items_failed = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
