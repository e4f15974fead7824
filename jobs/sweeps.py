"""The periodic sweep of leases an agent left stuck: never started, past their maximum, or still
running after a stop request. Each lease moves in its own transaction (core.periodic.item)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from django.conf import settings
from django.utils import timezone

from core import periodic
from jobs.models import Lease
from jobs.services import (
    ER,
    lease_end,
    lease_request_stop,
)

logger = logging.getLogger(__name__)


# A lease still running this long after its stop was requested is ended without the agent: it
# hears the request at its next heartbeat (10 s) and stops the workload within its grace (≤ 8 s).
STOP_GRACE_S = 30


@dataclass(frozen=True)
class LeaseSweepResult:
    start_timeouts: int
    stops_requested: int
    ended_after_stop: int

    def as_dict(self) -> dict[str, int]:
        return {
            "start_timeouts": self.start_timeouts,
            "stops_requested": self.stops_requested,
            "ended_after_stop": self.ended_after_stop,
        }


def leases_sweep(*, now: datetime | None = None) -> LeaseSweepResult:
    """Move leases that the agent left stuck:

    - assigned and asked to stop (a cancel after its start order was sent) STOP_GRACE_S ago,
      never reported started: ended with the requested reason, as of the request;
    - assigned for longer than LEASE_START_TIMEOUT_S (LEASE_START_MAX_S when its agent reported
      it starting): ended with `start_timeout` (the job is retried while it has attempts left);
    - running past their job's max_duration_s: asked to stop with reason `max_duration`;
    - still running STOP_GRACE_S after a stop request (whatever its reason): ended with the
      requested reason, as of the request (as of its maximum for max_duration), so that an
      unresponsive agent neither holds the lease nor is paid for the time it ignored the stop.

    Every move goes through lease_end / lease_request_stop, so a concurrent agent report wins or
    loses cleanly and running the sweep twice is harmless. Each lease moves in its own transaction
    (core.periodic.item): one that fails is logged and skipped, and the others' moves stand.
    """
    now = now or timezone.now()
    timeout_s = settings.GPGPU["LEASE_START_TIMEOUT_S"]
    ended_after_stop = 0
    # Asked to stop (a cancel) after its start order was sent, and never reported started: the
    # agent did not run it (it would have said so within the grace).
    for lease_id, stop_reason, stop_requested_at in (
        Lease.objects.filter(status=Lease.Status.ASSIGNED, stop_requested_at__lt=now - timedelta(seconds=STOP_GRACE_S))
        .order_by("pk")
        .values_list("pk", "stop_reason", "stop_requested_at")
    ):
        with periodic.item("lease", lease_id):
            ended_after_stop += lease_end(
                lease_id=lease_id,
                reason=stop_reason or ER.CANCELLED,
                actor="sweeper",
                at=stop_requested_at,
                detail=f"not reported started {STOP_GRACE_S} seconds after the stop request",
            )

    start_timeouts = 0
    max_s = max(timeout_s, settings.GPGPU["LEASE_START_MAX_S"])
    # One its agent reported starting (pulling its image, which takes minutes for a large one)
    # waits up to LEASE_START_MAX_S: ended at LEASE_START_TIMEOUT_S, it was placed again while the
    # pull went on, and the workload started here too once the image was in.
    for lease_id, reported in (
        Lease.objects.filter(status=Lease.Status.ASSIGNED, created_at__lt=now - timedelta(seconds=timeout_s))
        .exclude(start_reported_at__isnull=False, created_at__gte=now - timedelta(seconds=max_s))
        .order_by("pk")
        .values_list("pk", "start_reported_at")
    ):
        waited = max_s if reported is not None else timeout_s
        with periodic.item("lease", lease_id):
            start_timeouts += lease_end(
                lease_id=lease_id,
                reason=ER.START_TIMEOUT,
                actor="sweeper",
                detail=f"the agent did not start it within {waited} seconds",
            )

    for lease_id, stop_reason, stop_requested_at, started_at, max_duration_s in (
        Lease.objects.filter(status=Lease.Status.RUNNING, stop_requested_at__lt=now - timedelta(seconds=STOP_GRACE_S))
        .order_by("pk")
        .values_list("pk", "stop_reason", "stop_requested_at", "started_at", "job__max_duration_s")
    ):
        # The agent did not answer: the lease ends when it should have, not when the sweep
        # noticed. Past the maximum nothing is billed; after a stop request (cancel, budget
        # spent, suspension) nothing after the request is.
        end_at = stop_requested_at
        if (stop_reason or ER.MAX_DURATION) == ER.MAX_DURATION and started_at is not None:
            # cast: the filter on stop_requested_at excludes NULL.
            end_at = min(cast(datetime, stop_requested_at), started_at + timedelta(seconds=max_duration_s))
        with periodic.item("lease", lease_id):
            ended_after_stop += lease_end(
                lease_id=lease_id,
                reason=stop_reason or ER.MAX_DURATION,
                actor="sweeper",
                at=end_at,
                detail=f"still running {STOP_GRACE_S} seconds after the stop request; ended as of the request",
            )

    # Durations differ per job, so the deadline is compared here rather than in SQL (portable
    # across PostgreSQL and SQLite); only running leases without a stop request are read.
    stops_requested = 0
    for lease_id, started_at, max_duration_s in (
        Lease.objects.filter(status=Lease.Status.RUNNING, stop_requested_at__isnull=True, started_at__isnull=False)
        .order_by("pk")
        .values_list("pk", "started_at", "job__max_duration_s")
    ):
        if cast(datetime, started_at) + timedelta(seconds=max_duration_s) < now:  # the filter excludes NULL
            with periodic.item("lease", lease_id):
                stops_requested += lease_request_stop(lease_id=lease_id, reason=ER.MAX_DURATION, actor="sweeper")
    return LeaseSweepResult(
        start_timeouts=start_timeouts, stops_requested=stops_requested, ended_after_stop=ended_after_stop
    )
