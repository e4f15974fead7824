"""What jobs tells the apps above it, which it may not import (.importlinter: layers).

- `lease_ended`: sent (sender: Lease) inside the transaction that ended a lease, with `lease_id`,
  `reason` and `ended_at` (the lease's end, which may be earlier than now: a lost machine's last
  heartbeat), after its GPUs were released (idle again unless the owner took them back or the
  machine was lost) and its job moved on (requeued, finished). The marketplace asks for a
  matching run once that transaction commits: a job waiting for a GPU gets the one just freed, and
  has an hour of its fleet summary recomputed when the lease ended in an hour already summarised."""

from __future__ import annotations

from django.dispatch import Signal

lease_ended = Signal()
