"""The marketplace's own tables: the fleet's hourly summary, which the dashboard reads
(marketplace.fleet_summary writes it; marketplace.dashboard's module docstring says what each
figure means)."""

from __future__ import annotations

from django.db import models


class FleetHour(models.Model):
    """The fleet over one hour that has ended: every figure of the dashboard that is a sum over
    time, as marketplace.dashboard computes it from the rollups, leases, job events, ledger and
    settlements of that hour. A `stale` row is one whose sources changed after it was computed
    (a late or backfilled rollup, a lease ended back in that hour): the dashboard computes that
    hour from its sources until the summary task recomputes it."""

    hour = models.DateTimeField(unique=True)
    # Telemetry rollup rows of the hour (GPUs that reported) and the sums of their idle and
    # leased shares (GPU-hours).
    gpus_reported = models.PositiveIntegerField(default=0)
    idle_gpu_h = models.FloatField(default=0)
    leased_gpu_h = models.FloatField(default=0)
    placements = models.PositiveIntegerField(default=0)
    preemptions = models.PositiveIntegerField(default=0)
    reclaims = models.PositiveIntegerField(default=0)
    # Job events into and out of pending.
    pending_in = models.PositiveIntegerField(default=0)
    pending_out = models.PositiveIntegerField(default=0)
    # Waits of the hour's placements (lease created − job created); null: no placement.
    wait_p50_s = models.FloatField(null=True)
    wait_p95_s = models.FloatField(null=True)
    # In the token's smallest unit.
    revenue_micro = models.BigIntegerField(default=0)
    fees_micro = models.BigIntegerField(default=0)
    # created → confirmed of each settlement batch confirmed in the hour, in seconds (the
    # dashboard's median is over every batch of the range, so each is kept).
    settlement_lags_s = models.JSONField(default=list)
    # Null: a placeholder, written as the hour's first summary begins (fleet_hours_summarise).
    computed_at = models.DateTimeField(null=True)
    stale = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"fleet hour {self.hour:%Y-%m-%d %H:00}"


class FleetHourSlice(models.Model):
    """One GPU model's or one region's part of a FleetHour: the dashboard's breakdowns. By
    model and by region separately, not as a model × region grid: a lease on GPUs of two models
    counts once in each model and once in its region, which a grid could not give back."""

    class Dimension(models.TextChoices):
        MODEL = "model"
        REGION = "region"

    hour = models.DateTimeField()
    dimension = models.CharField(max_length=8, choices=Dimension.choices)
    # The GPU model or the region ("" where the source has none).
    key = models.CharField(max_length=128)
    gpus_reported = models.PositiveIntegerField(default=0)
    idle_gpu_h = models.FloatField(default=0)
    leased_gpu_h = models.FloatField(default=0)
    placements = models.PositiveIntegerField(default=0)
    reclaims = models.PositiveIntegerField(default=0)
    # By region only (a lease's charges cannot be split between its GPUs' models).
    revenue_micro = models.BigIntegerField(null=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["hour", "dimension", "key"], name="fleet_slice_unique_hour_key")]

    def __str__(self) -> str:
        return f"fleet hour {self.hour:%Y-%m-%d %H:00} {self.dimension} {self.key}"
