"""What providers tells the apps above it, which it may not import (.importlinter: layers).

- `rollups_written`: sent (sender: TelemetryRollup) inside the transaction of a telemetry rollup
  run (providers.telemetry.telemetry_rollup) that computed rollups, with `start` and `end`: the
  hours [start, end) it wrote or recomputed, a late or backfilled hour included. The marketplace
  marks those hours of its fleet summary stale and has them summarised again."""

from __future__ import annotations

from django.dispatch import Signal

rollups_written = Signal()
