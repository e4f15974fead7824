"""Periodic tasks: one decorator gives every beat task its lock, its logging and its failure count,
and `item` runs one item of a sweep so that its failure skips that item, not the sweep.

    @periodic_task(name="jobs.tasks.sweep_leases", time_limit=120)
    def sweep_leases() -> dict[str, int]:
        return sweeps.leases_sweep().as_dict()

    # in the sweep (a service):
    for lease_id in lease_ids:
        with item("lease", lease_id) as it:
            lease_end(lease_id=lease_id, ...)
        ended += it.ok

A run of a periodic task:

- takes the lock named after the task (`lock=` names one shared by several tasks) with
  core.locks.try_lock, never waiting for it: a run that finds it held returns
  {"skipped": "locked"} at once. With `retry_locked=(tries, countdown_s)` it asks Celery to run it
  again countdown_s later, up to `tries` times: a message with an ETA, not a sleeping worker;
- logs its start, and its end with its result, its items and its duration;
- records itself in PeriodicTaskState (core.models), which the console reads.

A run is not ok when it raised (recorded, then raised again for Celery to log), when its result
reports a failure of the whole run, or when any item failed; its result then says so under
"items_failed" (a count) and "failed_items" (the first few, with their errors). A result reports a
failure with a non-empty "error", "errors" or "node_unavailable" (the chain tasks report an
unreachable node that way instead of raising), with "ok": False (a check that found differences),
at its top level or in a dict nested in it (a settlement run reports its reservation run's
outcome under "reservations"). A run that is not ok is logged at ERROR (failed as a whole) or
WARNING (items failed), never as a plain "finished".

An item (`item`) runs in its own transaction, or in none with `atomic=False` for an item that
commits step by step around chain calls (a transaction must not stay open while the chain is
waited for). An exception is logged with the item's id, counted, and swallowed, so the sweep goes
on with the next item; `it.ok` says whether the item went through. Not swallowed: the soft time
limit (the run is out of time), a closed database connection (every later item would fail the
same), the end of the database session that held the run's lock (core.locks.LockLost: checked
before each item and after a failed one; another run may hold the lock now), and the exception
types the caller names in `passthrough` (an unreachable node ends a chain
run, which reports it). A service called outside a periodic run (tests, the shell) gets the same
per-item behaviour, without the counting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.db import DatabaseError, InterfaceError, transaction
from django.db.models import F
from django.utils import timezone

from core.locks import LockLost, lock_check, try_lock
from core.scrub import scrub

logger = logging.getLogger(__name__)

SKIPPED = {"skipped": "locked"}
# Result keys by which a run reports that it failed as a whole.
RUN_ERROR_KEYS = ("error", "errors", "node_unavailable")
FAILED_ITEMS_SHOWN = 20
ERROR_CHARS = 300


@dataclass
class _Run:
    name: str
    lock: str
    items_ok: int = 0
    failed: list[str] = field(default_factory=list)


_current: ContextVar[_Run | None] = ContextVar("marketplace_periodic_run", default=None)


@dataclass
class Item:
    """One item of a sweep; `ok` turns True once it went through."""

    kind: str
    id: object
    ok: bool = False


def describe(error: BaseException) -> str:
    """A short description of `error` fit to store and show: scrubbed of what a node URL may hide
    a secret in (core.scrub.scrub), at most ERROR_CHARS characters."""
    return scrub(f"{type(error).__name__}: {error}")[:ERROR_CHARS]


@contextlib.contextmanager
def item(
    kind: str, item_id: object, *, atomic: bool = True, passthrough: tuple[type[BaseException], ...] = ()
) -> Iterator[Item]:
    """Run one item of a sweep (the body of the `with`): in its own transaction unless `atomic` is
    False; an exception other than those in `passthrough` (and the soft time limit, and a closed
    connection) is logged with `kind` and `item_id`, counted in the current periodic run, and
    swallowed. The caller must not hold a transaction open around the sweep, or the item's
    transaction is only a savepoint of it."""
    it = Item(kind=kind, id=item_id)
    run = _current.get()
    if run is not None:
        lock_check(run.lock)  # each item runs under the run's lock, or not at all
    try:
        with transaction.atomic() if atomic else contextlib.nullcontext():
            yield it
    except (SoftTimeLimitExceeded, InterfaceError, LockLost, *passthrough):
        raise
    except Exception as error:
        if run is not None:
            # The failure may have been the database session's end, the run's lock with it:
            # another run may hold the lock now, so this one stops rather than go on without it.
            lock_check(run.lock)
        logger.exception("%s: %s %s failed and was skipped", run.name if run else "sweep", kind, item_id)
        if run is not None:
            run.failed.append(f"{kind} {item_id}: {describe(error)}")
        return
    it.ok = True
    if run is not None:
        run.items_ok += 1


def periodic_task(
    *,
    name: str,
    lock: str | None = None,
    retry_locked: tuple[int, float] | None = None,
    **options: Any,  # shared_task's options: celery ships no types
) -> Callable[[Callable[[], object]], Any]:  # a celery task: celery ships no types
    """Make `fn` (no arguments; returns its counts, usually a dict) the Celery task `name`, run
    under the lock `lock` (default: `name`), logged and recorded as the module docstring says.
    `options` go to shared_task (time_limit, soft_time_limit, ...); results are ignored."""
    lock_name = lock or name

    def decorate(fn: Callable[[], object]) -> Any:  # a celery task: celery ships no types
        def run(task: Any) -> object:  # a bound celery Task: celery ships no types
            with try_lock(lock_name) as acquired:
                if acquired:
                    return _run(name, fn, lock_name)
            return _skip(task, name, lock_name, retry_locked)

        run.__name__, run.__qualname__ = fn.__name__, fn.__qualname__
        run.__module__, run.__doc__ = fn.__module__, fn.__doc__
        # `periodic_lock` becomes an attribute of the task: the lock it runs under.
        return shared_task(name=name, bind=True, ignore_result=True, periodic_lock=lock_name, **options)(run)

    return decorate


# `task`: a bound celery Task (celery ships no types).
def _skip(task: Any, name: str, lock_name: str, retry_locked: tuple[int, float] | None) -> dict[str, str]:
    _state_write(name, last_skipped_at=timezone.now(), total_skipped=F("total_skipped") + 1)
    request = task.request
    if retry_locked is not None and not (request.called_directly or request.is_eager):
        tries, countdown_s = retry_locked
        if request.retries < tries:
            logger.info("%s: lock %s is held; running again in %s s", name, lock_name, countdown_s)
            raise task.retry(countdown=countdown_s, max_retries=tries)
    logger.info("%s: skipped, lock %s is held by another run", name, lock_name)
    return dict(SKIPPED)


def _run(name: str, fn: Callable[[], object], lock: str) -> object:
    run = _Run(name=name, lock=lock)
    started = time.monotonic()
    _state_write(name, last_started_at=timezone.now())
    lock_check(lock)  # the state's write may have been the first to find the session gone
    logger.info("%s: started", name)
    token = _current.set(run)
    try:
        result = fn()
    except Exception as exc:
        seconds = time.monotonic() - started
        logger.error("%s: failed after %.2f s (%d item(s) ok, %d failed)", name, seconds, run.items_ok, len(run.failed))
        _finish(name, run, ok=False, error=describe(exc))
        raise
    finally:
        _current.reset(token)
    seconds = time.monotonic() - started
    error = _result_error(result)
    counts = (run.items_ok, len(run.failed))
    if error is not None:
        logger.error(
            "%s: failed after %.2f s: %s; result %s (%d item(s) ok, %d failed)", name, seconds, error, result, *counts
        )
    if run.failed:
        if isinstance(result, dict):
            result = {**result, "items_failed": len(run.failed), "failed_items": run.failed[:FAILED_ITEMS_SHOWN]}
        more = f" (and {len(run.failed) - 1} more)" if len(run.failed) > 1 else ""
        if error is None:
            logger.warning(
                "%s: finished in %.2f s with failed items: %s (%d item(s) ok, %d failed)",
                name,
                seconds,
                result,
                *counts,
            )
        error = error or f"{run.failed[0]}{more}"[:ERROR_CHARS]
    if error is None:
        logger.info("%s: finished in %.2f s: %s (%d item(s) ok, %d failed)", name, seconds, result, *counts)
    _finish(name, run, ok=error is None, error=error)
    return result


def _result_error(result: object, path: str = "") -> str | None:
    """The failure `result` reports (module docstring), named by where it is ("reservations.error:
    ..."); None when it reports none. Dicts nested in it are searched too."""
    if not isinstance(result, dict):
        return None
    for key in RUN_ERROR_KEYS:
        if result.get(key):
            return f"{path}{key}: {result[key]}"[:ERROR_CHARS]
    if result.get("ok") is False:
        detail = result.get("differences") or result.get("detail") or "not ok"
        return f"{path}ok: False: {detail}"[:ERROR_CHARS]
    for key, value in result.items():
        found = _result_error(value, f"{path}{key}.")
        if found is not None:
            return found
    return None


def _finish(name: str, run: _Run, *, ok: bool, error: str | None) -> None:
    changes: dict[str, object] = {
        "last_finished_at": timezone.now(),
        "last_ok": ok,
        "total_runs": F("total_runs") + 1,
        "items_ok": run.items_ok,
        "items_failed": len(run.failed),
    }
    if ok:
        changes["consecutive_failures"] = 0
    else:
        changes.update(
            consecutive_failures=F("consecutive_failures") + 1,
            total_failures=F("total_failures") + 1,
            last_error=(error or "failed")[:ERROR_CHARS],
        )
    _state_write(name, **changes)


def _state_write(name: str, **changes: object) -> None:
    """Update the task's PeriodicTaskState row (created on first use). A database that cannot take
    the write costs the record, never the run."""
    from core.models import PeriodicTaskState

    try:
        with transaction.atomic():
            PeriodicTaskState.objects.get_or_create(name=name)
            PeriodicTaskState.objects.filter(name=name).update(**changes)
    except DatabaseError:
        logger.warning("%s: could not record the run's state", name, exc_info=True)


__all__ = ["SKIPPED", "Item", "describe", "item", "periodic_task"]
