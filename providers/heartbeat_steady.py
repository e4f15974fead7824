"""The steady heartbeat: a repeat of a heartbeat that changed nothing is answered from Redis.

Most heartbeats of a fleet say what the one before said: the same GPUs, idle (or busy with their
owner) since the same instant, the same machine facts, no lease. The full heartbeat
(providers.services.machine_heartbeat: authentication, validation, five statements and a
commit) then writes only the machine's `last_heartbeat_at` and each GPU's latest telemetry. A
steady heartbeat writes neither to PostgreSQL: it is answered from Redis in about a tenth of the
time.

- **Which heartbeats.** After a full heartbeat whose repeat would change nothing but the
  machine's last heartbeat and its GPUs' telemetry (HeartbeatReply.steady: the machine online,
  no lease listed, active or assigned, no availability window or coming blackout, no order in
  the reply, no idle_since in the future), the view records (`remember`) under the
  credential's digest: the machine, a fingerprint of the report without its telemetry
  (`fingerprint`), the telemetry sample interval it was in, and the machine's generation. A
  later heartbeat with the same credential and fingerprint, in the same sample interval, whose
  telemetry values are valid (the bounds of the heartbeat's own serializer) and whose
  machine's generation has not moved, is steady (`check`, called by the heartbeat's
  view, providers.agent_apis, which checks the telemetry against its serializer's bounds): it is counted against the
  machine's rate limit, its time goes into a Redis hash, and it gets the reply the full
  heartbeat would give (no orders, always available). Anything else (another body, a new sample
  interval, a header or a body the fast check does not accept, Redis unreachable) takes the
  full heartbeat, which validates and answers as it always did.
- **Generations.** Whatever could change what a machine's next heartbeat writes or answers bumps
  its generation once its transaction commits (`forget`): a lease assigned on it
  (providers.services.gpus_lease, before the doorbell rings its agent), suspension, credential
  rotation, revocation and removal, a window or blackout of it or its provider, and the liveness
  sweep taking it offline. `remember` writes only when the generation read before the full
  heartbeat began is still current, so an assignment committed meanwhile is not forgotten. A
  record lives to the end of its sample interval at most, so a bump lost to a Redis failure
  delays an order by at most TELEMETRY_SAMPLE_INTERVAL_S.
- **Liveness.** The Redis hash of steady heartbeats' times is written to the machines' rows by
  `flush`, which the liveness sweep calls before it looks at them (every HEARTBEAT_INTERVAL_S):
  `last_heartbeat_at` (and `capabilities_reported_at` when the report carried capabilities)
  is the later of the row's and the hash's. A sweep that cannot read the hash takes no machine
  offline (it cannot tell which are silent). Elsewhere `last_heartbeat_at` lags the agent's
  last steady heartbeat by up to one sweep.
- **Telemetry.** A steady heartbeat's telemetry is checked and dropped: a GPU row's telemetry
  is the first report of each TELEMETRY_SAMPLE_INTERVAL_S interval (its sample's), or of the
  last change of state, rather than the last report's.

Without REDIS_URL (the embedded defaults) or with HEARTBEAT_STEADY_PATH=false every heartbeat is
a full one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Field

from providers.models import Machine

logger = logging.getLogger(__name__)

# A GPU report's telemetry: the values that move on every heartbeat and decide nothing.
TELEMETRY_FIELDS = ("memory_used_mb", "utilization_pct", "temperature_c", "power_w")
# How long a generation counter is kept after its last bump: far longer than a record lives.
_GENERATION_TTL_S = 86_400

# Spreads the machines' sample intervals over the interval (see bucket).
OFFSET_FACTOR = 7919

# GET the record, check its fingerprint, interval (as `bucket` computes it) and generation;
# answer the machine id, negative when its record carries capabilities (0: not steady).
_CHECK = """
local rec = redis.call('GET', KEYS[1])
if not rec then return 0 end
local mid, bucket, caps, gen, fp = string.match(rec, '^(%d+)|(%d+)|([01])|(%d+)|(%x+)$')
if not mid or fp ~= ARGV[1] then return 0 end
local interval = tonumber(ARGV[4])
local offset = (tonumber(mid) * OFFSET_FACTOR) % interval
if math.floor((tonumber(ARGV[2]) + offset) / interval) ~= tonumber(bucket) then return 0 end
local current = redis.call('GET', ARGV[3] .. mid) or '0'
if current ~= gen then return 0 end
if caps == '1' then return -tonumber(mid) end
return tonumber(mid)
""".replace("OFFSET_FACTOR", str(OFFSET_FACTOR))
# SET the record only while the generation read before the full heartbeat is current.
_REMEMBER = """
local current = redis.call('GET', KEYS[2]) or '0'
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""
# HDEL each field whose value is still the one flushed (a later heartbeat's stays).
_FORGET_FLUSHED = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""

_client: Any = None
_client_url = ""
_scripts: dict[str, Any] = {}
_client_lock = threading.Lock()


_warned_at = -math.inf


def warn_unreachable() -> None:
    """Log (once a minute) that Redis failed a steady heartbeat: it took the full path."""
    global _warned_at
    at = time.monotonic()
    if at - _warned_at >= 60:
        _warned_at = at
        logger.warning("steady heartbeats: Redis unreachable; heartbeats take the full path", exc_info=True)


def enabled() -> bool:
    return bool(settings.REDIS_URL) and bool(settings.GPGPU["HEARTBEAT_STEADY_PATH"])


def _redis() -> Any:  # redis.Redis: the package ships no types
    global _client, _client_url
    url = settings.REDIS_URL
    with _client_lock:
        if _client is None or _client_url != url:
            import redis

            _client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
            _client_url = url
            _scripts.clear()
            for name, lua in (("check", _CHECK), ("remember", _REMEMBER), ("forget_flushed", _FORGET_FLUSHED)):
                _scripts[name] = _client.register_script(lua)
        return _client


def _key(*parts: object) -> str:
    return ":".join([settings.CACHE_KEY_PREFIX, "steady", *(str(p) for p in parts)])


def _generation_prefix() -> str:
    return _key("gen") + ":"


SEEN_KEY = "seen"  # machine id -> time of its last steady heartbeat (epoch seconds)
CAPABILITIES_KEY = "seen-capabilities"  # the same, for reports that carry capabilities


def bucket(at: datetime, machine_id: int) -> int:
    """The telemetry sample interval of the machine that `at` is in: TELEMETRY_SAMPLE_INTERVAL_S
    long, shifted by an offset of the machine's own, so that a fleet's intervals do not all
    turn at once (each turn sends a machine's next heartbeat the full way, with its sample)."""
    interval = settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"]
    return math.floor((at.timestamp() + (machine_id * OFFSET_FACTOR) % interval) / interval)


def fingerprint(data: Mapping[str, Any]) -> str | None:
    """A digest of a heartbeat's JSON body without its GPUs' telemetry; None for a body whose
    `gpus` is not a list of objects (the full heartbeat answers it)."""
    gpus = data.get("gpus")
    if not isinstance(gpus, list) or not all(isinstance(g, dict) for g in gpus):
        return None
    stripped = dict(data)
    stripped["gpus"] = [{k: v for k, v in g.items() if k not in TELEMETRY_FIELDS} for g in gpus]
    try:
        text = json.dumps(stripped, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def check(*, digest: str, fp: str, at: datetime) -> tuple[int, bool] | None:
    """(machine id, whether its record carries capabilities) when a heartbeat of this credential
    with this fingerprint at `at` is steady; None otherwise. Raises redis errors."""
    _redis()
    interval = settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"]
    args = [fp, repr(at.timestamp()), _generation_prefix(), interval]
    mid = int(_scripts["check"](keys=[_key("cred", digest)], args=args))
    if mid == 0:
        return None
    return abs(mid), mid < 0


def seen(*, machine_id: int, capabilities: bool, at: datetime) -> None:
    """Record a steady heartbeat's time for `flush`. Raises redis errors."""
    stamp = repr(at.timestamp())
    pipe = _redis().pipeline(transaction=False)
    pipe.hset(_key(SEEN_KEY), str(machine_id), stamp)
    if capabilities:
        pipe.hset(_key(CAPABILITIES_KEY), str(machine_id), stamp)
    pipe.execute()


def generation(machine_id: int) -> str | None:
    """The machine's generation now, to pass to `remember` (None: Redis unreachable, then
    nothing is remembered)."""
    if not enabled():
        return None
    try:
        value = _redis().get(_key("gen", machine_id))
    except Exception:
        logger.warning("steady heartbeats: Redis unreachable; heartbeats take the full path", exc_info=True)
        return None
    return value.decode() if value is not None else "0"


def remember(
    *, digest: str, machine_id: int, fp: str, at: datetime, capabilities: bool, generation_before: str
) -> bool:
    """Record that a repeat of this credential's heartbeat (fingerprint `fp`) within `at`'s
    sample interval is steady, unless the machine's generation moved since `generation_before`."""
    b = bucket(at, machine_id)
    interval = settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"]
    ttl = max(1, math.ceil((b + 1) * interval - (machine_id * OFFSET_FACTOR) % interval - at.timestamp()) + 1)
    value = f"{machine_id}|{b}|{int(capabilities)}|{generation_before}|{fp}"
    try:
        _redis()
        done = _scripts["remember"](
            keys=[_key("cred", digest), _key("gen", machine_id)], args=[generation_before, value, ttl]
        )
    except Exception:
        logger.warning("steady heartbeats: could not remember machine %s", machine_id, exc_info=True)
        return False
    return bool(done)


def forget(machine_ids: Iterable[int]) -> None:
    """Bump the machines' generations now and again once the caller's transaction commits:
    their next heartbeat is a full one. Now: no record remembered before this can be used (the
    transaction's own connection sees its writes); at commit: nor one a full heartbeat
    remembered meanwhile from what was committed before."""
    ids = sorted({int(m) for m in machine_ids})
    if not ids or not enabled():
        return

    def bump() -> None:
        try:
            pipe = _redis().pipeline(transaction=False)
            for machine_id in ids:
                key = _key("gen", machine_id)
                pipe.incr(key)
                pipe.expire(key, _GENERATION_TTL_S)
            pipe.execute()
        except Exception:
            logger.warning(
                "steady heartbeats: could not bump the generation of machines %s; their records end with "
                "their sample interval",
                ids[:20],
                exc_info=True,
            )

    bump()
    if transaction.get_connection().in_atomic_block:
        transaction.on_commit(bump)


def forget_provider(provider_id: int) -> None:
    """`forget` every machine of the provider (its windows or blackouts changed)."""
    if enabled():
        forget(Machine.objects.filter(provider_id=provider_id).values_list("pk", flat=True))


def flush() -> int | None:
    """Write the steady heartbeats' times to the machines' rows (the later of the row's and
    Redis's); the number of machines written, or None when Redis could not be read."""
    if not enabled():
        return 0
    try:
        client = _redis()
        seen_raw = client.hgetall(_key(SEEN_KEY))
        caps_raw = client.hgetall(_key(CAPABILITIES_KEY))
    except Exception:
        logger.warning("steady heartbeats: could not read their times from Redis", exc_info=True)
        return None
    written = 0
    columns = ((SEEN_KEY, seen_raw, "last_heartbeat_at"), (CAPABILITIES_KEY, caps_raw, "capabilities_reported_at"))
    for key, raw, column in columns:
        if not raw:
            continue
        times = {int(m): datetime.fromtimestamp(float(t), tz=UTC) for m, t in raw.items()}
        with transaction.atomic():
            _times_write(times, column=column)
        if key == SEEN_KEY:
            written = len(times)
        args: list[Any] = []
        for m, t in raw.items():
            args.extend([m, t])
        try:
            for start in range(0, len(args), 2000):
                _scripts["forget_flushed"](keys=[_key(key)], args=args[start : start + 2000])
        except Exception:
            logger.warning("steady heartbeats: could not clear flushed times (written again next time)", exc_info=True)
    return written


def _times_write(times: Mapping[int, datetime], *, column: str) -> None:
    """Set `column` of each machine to the later of its value and the given time, in one
    UPDATE … FROM (VALUES …) per thousand machines."""
    qn = connection.ops.quote_name
    table = qn(Machine._meta.db_table)
    field = Machine._meta.get_field(column)
    pk_field = Machine._meta.get_field("id")
    assert isinstance(field, Field) and isinstance(pk_field, Field)
    assert field.column is not None and pk_field.column is not None
    col, pk = qn(field.column), qn(pk_field.column)
    cast = f"::{field.cast_db_type(connection)}" if connection.vendor == "postgresql" else ""
    items = sorted(times.items())
    for start in range(0, len(items), 1000):
        chunk = items[start : start + 1000]
        values = ", ".join([f"(%s::bigint, %s{cast})" if cast else "(%s, %s)"] * len(chunk))
        # Only the model's own (quoted) table and column names go into the text; values are parameters.
        sql = f"WITH v (id, at) AS (VALUES {values}) UPDATE {table} SET {col} = v.at FROM v "  # noqa: S608
        sql += f"WHERE {table}.{pk} = v.id AND ({table}.{col} IS NULL OR {table}.{col} < v.at)"
        params: list[Any] = []
        for machine_id, at in chunk:
            params.extend([machine_id, field.get_db_prep_save(at, connection)])
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
