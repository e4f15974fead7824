"""A run asked for soon, once per burst: what submitting a job (a matching run) or signing a
budget (a reservation run) uses so that the work starts within a second instead of at its next
beat run, while a burst of requests sends one task.

`request_soon` sends after the caller's transaction commits, unless a marker in the
"coordination" cache (shared by the web and the worker: Redis, or files without it) says a run
is already queued; the task clears the marker as it starts (`request_clear`), so a request from
then on asks for another run. The marker lives QUEUED_TTL_S if its run never starts (a lost
message): whole seconds, as Redis keeps them (Django's Redis cache cuts a timeout to whole
seconds, and an `add` with 0 deletes the key at once, so a sub-second marker coalesced nothing
there). Beat stays the safety net: a cache or broker that is down makes a request late, never
an error for the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.core.cache import caches
from django.db import transaction

logger = logging.getLogger(__name__)

QUEUED_TTL_S = 10
CACHE_ALIAS = "coordination"


def marker_delete(key: str) -> None:
    """Forget a queued marker (tests start each from none)."""
    caches[CACHE_ALIAS].delete(key)


def request_soon(*, key: str, send: Callable[[], None], what: str) -> None:
    """After commit, `send()` (which queues the task, with its countdown) unless a run is queued
    under `key`. `what` names the run in the log."""

    def dispatch() -> None:
        try:
            if caches[CACHE_ALIAS].add(key, 1, timeout=QUEUED_TTL_S):
                send()
        except Exception:  # the broker or the cache is down: the beat entry does the work
            logger.warning("could not dispatch a %s run; the beat schedule will", what, exc_info=True)

    transaction.on_commit(dispatch)


def request_clear(*, key: str, what: str) -> None:
    """Called by the requested task as it starts: a request from now on asks for another run."""
    try:
        caches[CACHE_ALIAS].delete(key)
    except Exception:
        logger.warning("could not clear the queued %s marker", what, exc_info=True)
