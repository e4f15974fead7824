"""The machine and lease pages' telemetry charts (providers.telemetry_charts)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from providers.models import GPU, TelemetryRollup, TelemetrySample
from providers.telemetry_charts import MAX_POINTS, gpu_telemetry_charts
from tests.factories import GPUFactory, MachineFactory

pytestmark = pytest.mark.django_db


def _titles(svg: str) -> list[str]:
    return re.findall(r'<circle class="point"[^>]*><title>([^<]*)</title>', svg)


def test_raw_samples_are_averaged_per_bucket_one_series_per_gpu() -> None:
    machine = MachineFactory()
    gpus = [GPUFactory(machine=machine, index=i, model="L40S") for i in range(2)]
    # Buckets are aligned on the epoch: start on an even minute.
    until = timezone.now().replace(second=0, microsecond=0, minute=0)
    since = until - timedelta(hours=MAX_POINTS / 60 * 2)  # two-minute buckets
    TelemetrySample.objects.bulk_create(
        TelemetrySample(
            gpu=gpus[0], at=since + timedelta(minutes=m), utilization_pct=10.0 * (m % 2), state=GPU.State.IDLE
        )
        for m in range(10)
    )

    ((heading, svg),) = gpu_telemetry_charts(gpus=gpus, since=since, until=until, metrics=["utilization_pct"])

    assert heading == "Utilisation (telemetry samples, mean per 120 s)"
    titles = _titles(svg)
    # Ten minute samples in two-minute buckets: five points, each the mean of 0 and 10.
    assert len(titles) == 5
    assert all(t.startswith("GPU 0 (L40S), ") and t.endswith(": 5 %") for t in titles)
    assert 'data-series="GPU 1 (L40S)"' in svg


def test_without_raw_samples_the_hourly_rollups_are_drawn() -> None:
    gpu = GPUFactory(machine=MachineFactory(), index=0, model="L40S")
    until = timezone.now()
    hour = until.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    TelemetryRollup.objects.create(gpu=gpu, hour=hour, samples=60, power_avg_w=250.0, utilization_avg=80.0)

    charts = dict(gpu_telemetry_charts(gpus=[gpu], since=until - timedelta(hours=24), until=until))

    power = charts["Power (hourly telemetry rollups (raw samples no longer kept))"]
    assert _titles(power) == [f"GPU 0 (L40S), {(hour + timedelta(minutes=30)):%Y-%m-%d %H:%M:%S} UTC: 250 W"]
    assert "no data" in charts["Temperature (hourly telemetry rollups (raw samples no longer kept))"]
