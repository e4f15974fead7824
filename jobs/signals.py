"""What jobs tells the apps above it, which it may not import (.importlinter: layers).

- `lease_ended`: sent (sender: Lease) inside the transaction that ended a lease, with `lease_id`
  and `reason`, after its GPUs were released (idle again unless the owner took them back or the
  machine was lost) and its job moved on (requeued, finished). The marketplace asks for a
  matching run once that transaction commits: a job waiting for a GPU gets the one just freed."""

from __future__ import annotations

from django.dispatch import Signal

lease_ended = Signal()
