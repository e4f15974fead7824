"""The agents' doorbell over Redis pub/sub: a held `orders/wait` call (jobs.agent_apis.OrdersWaitApi)
sleeps until a commit that gave its machine an order rings it, instead of asking the database
every 0.25 s.

- `ring(machine_ids)`: after the caller's transaction commits, PUBLISH the machine ids on one
  channel (one message per commit, whatever the number of machines). Called where orders are
  made: a lease assigned (jobs.services.leases_assign) and a lease asked to stop
  (jobs.services.lease_request_stop).
- `waiter(machine_id)`: a held call's bell, registered before the call's first look at the
  database (so a ring between that look and the wait is not lost). One listener thread per web
  process holds one subscription for every held call in that process and sets the bells of the
  machines a message names.

Without REDIS_URL (the embedded defaults) nothing is published and `Bell.live` is False: the
held call falls back to looking every ORDERS_CHECK_S, as before. When the subscription breaks,
every bell is rung (each held call looks at the database once) and `live` stays False until the
listener has subscribed again (when it rings every bell once more), so an outage of Redis makes
orders late by at most the held calls' old check interval, never lost. A PUBLISH that fails while
the subscription stays up (a timeout) costs that machine at most its held call (the agent's next
call looks at the database first) or its next heartbeat. The orders themselves are still handed
over by the heartbeat only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from django.conf import settings
from django.db import transaction

logger = logging.getLogger(__name__)

# The listener's wait for a message, between its checks that it should go on.
_LISTEN_TIMEOUT_S = 1.0
_RECONNECT_S = (0.5, 1.0, 2.0, 5.0)


def channel() -> str:
    """One channel per deployment (the cache's key prefix: tests' runs do not hear each other)."""
    return f"{settings.CACHE_KEY_PREFIX}:doorbell"


def _redis_url() -> str:
    return str(getattr(settings, "REDIS_URL", "") or "")


_publisher: Any = None
_publisher_url = ""
_publisher_lock = threading.Lock()


def _publisher_client() -> Any:
    global _publisher, _publisher_url
    url = _redis_url()
    with _publisher_lock:
        if _publisher is None or _publisher_url != url:
            import redis

            _publisher = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
            _publisher_url = url
        return _publisher


def _encode(machine_ids: Iterable[int]) -> str:
    return ",".join(str(int(m)) for m in sorted(set(machine_ids)))


def _decode(payload: Any) -> set[int]:
    """The machine ids of a message; anything else on the channel is ignored (a bad message can
    at worst ring no one)."""
    if isinstance(payload, bytes):
        payload = payload.decode("ascii", "replace")
    if not isinstance(payload, str):
        return set()
    ids = set()
    for part in payload.split(",")[:100_000]:
        if part.isdigit() and len(part) <= 19:
            ids.add(int(part))
    return ids


def ring(machine_ids: Iterable[int]) -> None:
    """Ring these machines' held calls once the caller's transaction commits (at once outside
    one). A failure to publish is logged: those agents get their orders at their next look at
    the database or their next heartbeat."""
    payload = _encode(machine_ids)
    if not payload or not _redis_url():
        return

    def publish() -> None:
        try:
            _publisher_client().publish(channel(), payload)
        except Exception:
            logger.warning("could not ring the doorbell of machines %s", payload[:200], exc_info=True)

    transaction.on_commit(publish)


class Bell:
    """One held call's bell."""

    def __init__(self, listener: _Listener | None) -> None:
        self._event = threading.Event()
        self._listener = listener
        # A newer call of the same machine took this call's place (waiter): it ends at once.
        self.superseded = False

    @property
    def live(self) -> bool:
        """Whether a ring is heard now (a subscription is up): else look at the database often."""
        return self._listener is not None and self._listener.subscribed.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Wait until rung or `timeout_s`; True if rung. The bell is ready for the next ring."""
        rung = self._event.wait(max(0.0, timeout_s))
        self._event.clear()
        return rung

    def set(self) -> None:
        self._event.set()

    def supersede(self) -> None:
        self.superseded = True
        self._event.set()


class _Listener(threading.Thread):
    """The process's one subscription; rings the bells of the machines each message names."""

    def __init__(self, url: str, channel_name: str) -> None:
        super().__init__(name="gpgpu-doorbell-listener", daemon=True)
        self.url = url
        self.channel_name = channel_name
        self.subscribed = threading.Event()
        self._bells: dict[int, set[Bell]] = {}
        self._lock = threading.Lock()

    def add(self, machine_id: int, bell: Bell) -> None:
        with self._lock:
            self._bells.setdefault(machine_id, set()).add(bell)

    def remove(self, machine_id: int, bell: Bell) -> None:
        with self._lock:
            bells = self._bells.get(machine_id)
            if bells is not None:
                bells.discard(bell)
                if not bells:
                    del self._bells[machine_id]

    def _ring(self, machine_ids: Iterable[int] | None) -> None:
        with self._lock:
            if machine_ids is None:
                bells = [b for group in self._bells.values() for b in group]
            else:
                bells = [b for m in machine_ids for b in self._bells.get(m, ())]
        for bell in bells:
            bell.set()

    def _current(self) -> bool:
        """Whether this is still the process's listener (settings changed: a new one took over)."""
        return _listener is self

    def run(self) -> None:
        import redis

        failures = 0
        while self._current():
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=None)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel_name)
                # The subscription is up: from now on a ring is heard. The bells are rung once,
                # for what was published while it was down.
                self.subscribed.set()
                self._ring(None)
                failures = 0
                while self._current():
                    message = pubsub.get_message(timeout=_LISTEN_TIMEOUT_S)
                    if message is not None and message.get("type") == "message":
                        self._ring(_decode(message.get("data")))
            except Exception:
                if self.subscribed.is_set():
                    logger.warning("the doorbell's subscription broke; held calls look at the database", exc_info=True)
                self.subscribed.clear()
                self._ring(None)
                time.sleep(_RECONNECT_S[min(failures, len(_RECONNECT_S) - 1)])
                failures += 1
            finally:
                try:
                    pubsub.close()
                    client.close()
                except Exception:  # a broken connection may fail to close: it is dropped anyway
                    logger.debug("closing the doorbell's subscription failed", exc_info=True)


_listener: _Listener | None = None
_listener_lock = threading.Lock()


def _process_listener() -> _Listener | None:
    """This process's listener, started by the first held call (None without Redis). A forked
    child (a web server's worker forked after a call was held in its parent) starts its own."""
    global _listener
    url = _redis_url()
    if not url:
        return None
    with _listener_lock:
        if _listener is None or not _listener.is_alive() or _listener.url != url or _listener.channel_name != channel():
            _listener = _Listener(url, channel())
            _listener.start()
        return _listener


# The call each machine holds in this process: one at most. A machine sending more at once (an
# agent's retries, or one trying to hold every thread of the web server) has the older ended.
_holding: dict[int, Bell] = {}
_holding_lock = threading.Lock()


@contextmanager
def waiter(machine_id: int) -> Iterator[Bell]:
    """A bell for one held call on `machine_id`, heard from now until the block ends. A call the
    machine already holds in this process is superseded (its bell's `superseded`, rung)."""
    listener = _process_listener()
    bell = Bell(listener)
    with _holding_lock:
        older = _holding.get(machine_id)
        _holding[machine_id] = bell
    if older is not None:
        older.supersede()
    if listener is not None:
        listener.add(machine_id, bell)
    try:
        yield bell
    finally:
        if listener is not None:
            listener.remove(machine_id, bell)
        with _holding_lock:
            if _holding.get(machine_id) is bell:
                del _holding[machine_id]


def held_calls() -> int:
    """How many calls this process holds now (for tests and benchmarks)."""
    with _holding_lock:
        return len(_holding)


__all__ = ["Bell", "channel", "held_calls", "ring", "waiter"]
