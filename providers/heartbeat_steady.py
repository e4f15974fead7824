"""The steady heartbeat: a repeat of a heartbeat that changed nothing is answered from Redis.

Most heartbeats of a fleet say what the one before said: the same GPUs, idle (or busy with their
owner, or rented) since the same instant, the same machine facts, the same leases running. The
full heartbeat (providers.services.machine_heartbeat: authentication, validation, five
statements and a commit) then writes only the machine's `last_heartbeat_at` and, once per
sample interval, each GPU's telemetry sample and latest telemetry. A steady heartbeat writes
none of it to PostgreSQL: it is answered from Redis, and a worker writes what it leaves there in
batches.

- **Which heartbeats.** After a full heartbeat whose repeat would change nothing but the
  machine's last heartbeat and its GPUs' telemetry (HeartbeatReply.steady: the machine online,
  no assigned lease, no availability window or coming blackout, no order in the reply, no
  idle_since in the future), the view records (`remember`) under the credential's digest: the
  machine, a fingerprint of the report without its telemetry (`fingerprint`: the leases the
  agent lists and their states are in it), the sample interval it was in, its GPUs' ids and
  states, the machine's generation and, while leases run there, the reply's prediction. A later
  heartbeat with the same credential and fingerprint, whose telemetry is valid (the heartbeat
  view, providers.agent_apis, checks it against its serializer's bounds) and whose machine's
  generation has not moved, is steady (`steady`, one Lua script, one round trip): it is counted
  against the machine's rate limit (the Redis log core.throttling keeps for it), its time goes
  into a Redis hash, and it gets the reply the full heartbeat would give (no orders, always
  available, the prediction). Anything else (another body, a header or a body the fast check
  does not accept, the rate limit reached, Redis unreachable) takes the full heartbeat, which
  validates and answers as it always did.
- **Running leases.** The reply to a machine running leases tells their jobs how long its idle
  stretch is likely to last (`predicted_idle_s`), counted down from a prediction computed at
  most once per interval of providers.services.PREDICTED_IDLE_CACHE_S (five minutes): for
  every such machine at once after each fold of the forecasts, off the heartbeat, and stored
  here (`predictions_store`; dropped by a full heartbeat in which an idle stretch of the
  machine began or ended, `prediction_forget`), or by the full heartbeat that found none
  stored. The record keeps the reply's prediction and when it is due; its steady replies count
  down the stored prediction when one is due later, else the record's, and it stops answering
  when the later is due. So such a machine takes the full path no more often than an idle one
  while the predictions are refreshed (every time, with the cache off).
- **Samples.** The first steady heartbeat of each of its machine's sample intervals
  (each machine's intervals are shifted by an offset of its own, `bucket`, so a
  fleet's do not all turn at once) queues its telemetry as the interval's sample, with the
  GPUs' states of the record, and moves the record on to that interval; `flush` writes the
  queued samples as TelemetrySample rows and each GPU row's latest telemetry, as the full
  heartbeat does when it samples. A GPU row's telemetry is thus its sample interval's first
  report (or its last change of state's), at most one liveness sweep late.
- **Generations.** Whatever could change what a machine's next heartbeat writes or answers bumps
  its generation, now and when its transaction commits (`forget`): a lease assigned on it
  (providers.services.gpus_lease, before the doorbell rings its agent), a lease on it ended or
  asked to stop (providers.services.machine_orders_changed, from jobs.services.lease_end and
  lease_request_stop, before the doorbell), suspension, credential rotation, revocation and
  removal, a window or blackout of it or its provider, and the liveness sweep taking it
  offline. `remember` writes only when the generation read before the full heartbeat began is
  still current, so an assignment committed meanwhile is not forgotten. A record lasts
  RECORD_INTERVALS sample intervals at most (moving it on keeps its expiry), five minutes with
  leases, so a bump lost to a Redis failure delays an order by at most that long. It runs out
  at its machine's turn in a cycle of RECORD_INTERVALS intervals (`record_ends`), so the fleet's
  full heartbeats stay spread over the cycle whatever sent many machines to the full path at
  once.
- **Liveness.** The Redis hash of steady heartbeats' times is written to the machines' rows by
  `flush`, which the liveness sweep calls before it looks at them (every HEARTBEAT_INTERVAL_S):
  `last_heartbeat_at` (and `capabilities_reported_at` when the report carried capabilities)
  is the later of the row's and the hash's. A sweep that cannot read the hash takes no machine
  offline (it cannot tell which are silent). Elsewhere `last_heartbeat_at` lags the agent's
  last steady heartbeat by up to one sweep.

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
from typing import Any, NamedTuple

import redis
from django.conf import settings
from django.db import connection, transaction

from core.throttling import LOG_SCRIPT_BODY
from providers.columns import field_column
from providers.models import GPU, Machine, TelemetrySample

logger = logging.getLogger(__name__)

# What Redis raises when it cannot be reached or answers an error: the heartbeat then takes the
# full path.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

# A GPU report's telemetry: the values that move on every heartbeat and decide nothing.
TELEMETRY_FIELDS = ("memory_used_mb", "utilization_pct", "temperature_c", "power_w")
# How long a generation counter is kept after its last bump: far longer than a record lives.
_GENERATION_TTL_S = 86_400

# Spreads the machines' sample intervals over the interval (see bucket).
OFFSET_FACTOR = 7919

# A record outlives the full heartbeat that wrote it by at most this many sample intervals:
# however its heartbeats go on, a machine takes the full path at least that often, which bounds
# what a generation bump lost to a Redis failure can delay.
RECORD_INTERVALS = 10

# One steady heartbeat, in one round trip. KEYS: the credential's record, the seen hash, the
# seen-with-capabilities hash, the samples list, the machine's rate-limit log. ARGV: the report's
# fingerprint, the generations' key prefix, now (epoch seconds), the sample interval, the rate
# limit's duration (0: none) and count, the report's telemetry ([[TELEMETRY_FIELDS…], …] in its
# order), the stored predictions' key prefix. The record: machine|interval|capabilities 0/1|
# generation|until|prediction|fingerprint|id:state,…, where `until` (epoch seconds, 0: the reply
# carries no prediction) is when the record's prediction is due to be computed again and
# `prediction` is empty (the reply's predicted_idle_s is null) or `seconds,computed at` (epoch
# seconds). A record with an `until` answers with the machine's stored prediction instead when one
# is due later (`predictions_store`: `seconds,computed at,due`, seconds empty for null), and stops
# answering when the later of the two is due. Answers {code, prediction}: code 0 when the
# heartbeat is not steady (no record, another fingerprint, the generation moved, the prediction
# due, a time before the record's interval), -1 over the rate limit (nothing written), 1 steady, 2
# steady and the first of a new sample interval (its sample queued, the record moved on).
_STEADY = (
    LOG_SCRIPT_BODY
    + """
local rec = redis.call('GET', KEYS[1])
if not rec then return {0, ''} end
local mid, b, caps, gen, untl, pred, fp, gpus = string.match(
  rec, '^(%d+)|(%d+)|([01])|(%d+)|(%d+)|([%d.,]*)|(%x+)|([%w:_,]*)$')
if not mid or fp ~= ARGV[1] then return {0, ''} end
if (redis.call('GET', ARGV[2] .. mid) or '0') ~= gen then return {0, ''} end
local now = tonumber(ARGV[3])
local due = tonumber(untl)
if due > 0 then
  local stored = redis.call('GET', ARGV[8] .. mid)
  if stored then
    local ss, sat, sdue = string.match(stored, '^(%d*),([%d.]+),([%d.]+)$')
    if sdue and tonumber(sdue) > due then
      due = tonumber(sdue)
      pred = (ss ~= '' and (ss .. ',' .. sat)) or ''
    end
  end
  if now >= due then return {0, ''} end
end
local interval = tonumber(ARGV[4])
local current = math.floor((now + (tonumber(mid) * OFFSET_FACTOR) % interval) / interval)
if current < tonumber(b) then return {0, ''} end
if tonumber(ARGV[5]) > 0 then
  local decided = throttle_log(KEYS[5], now, tonumber(ARGV[5]), tonumber(ARGV[6]))
  if decided[1] == 0 then return {-1, ''} end
end
redis.call('HSET', KEYS[2], mid, ARGV[3])
if caps == '1' then redis.call('HSET', KEYS[3], mid, ARGV[3]) end
if current > tonumber(b) then
  local moved = string.format('%s|%d|%s|%s|%s|%s|%s|%s', mid, current, caps, gen, untl, pred, fp, gpus)
  redis.call('SET', KEYS[1], moved, 'KEEPTTL')
  redis.call('RPUSH', KEYS[4], mid .. '|' .. ARGV[3] .. '|' .. gpus .. '|' .. ARGV[7])
  return {2, pred}
end
return {1, pred}
""".replace("OFFSET_FACTOR", str(OFFSET_FACTOR))
)
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
            _client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
            _client_url = url
            _scripts.clear()
            scripts = (("steady", _STEADY), ("remember", _REMEMBER), ("forget_flushed", _FORGET_FLUSHED))
            for name, lua in scripts:
                _scripts[name] = _client.register_script(lua)
        return _client


def _key(*parts: object) -> str:
    return ":".join([settings.CACHE_KEY_PREFIX, "steady", *(str(p) for p in parts)])


def _generation_prefix() -> str:
    return _key("gen") + ":"


SEEN_KEY = "seen"  # machine id -> time of its last steady heartbeat (epoch seconds)
CAPABILITIES_KEY = "seen-capabilities"  # the same, for reports that carry capabilities
SAMPLES_KEY = "samples"  # a list of queued telemetry samples, oldest first (see _STEADY)
# Samples written per statement by `flush`.
_SAMPLES_PER_BATCH = 2000


def offset(machine_id: int, interval: float) -> float:
    """How far the machine's intervals of this length are shifted (as _STEADY computes it), so
    that a fleet's do not all turn at once."""
    return (machine_id * OFFSET_FACTOR) % interval


def bucket(at: datetime, machine_id: int) -> int:
    """The telemetry sample interval of the machine that `at` is in: TELEMETRY_SAMPLE_INTERVAL_S
    long, shifted by the machine's `offset` (each turn samples the machine's telemetry)."""
    interval = settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"]
    return math.floor((at.timestamp() + offset(machine_id, interval)) / interval)


def record_ends(machine_id: int, b: int) -> float:
    """When a record remembered in the machine's sample interval `b` stops answering (epoch
    seconds): at the end of the machine's turn, the first of its intervals from `b` on whose
    number is the machine's id modulo RECORD_INTERVALS. A record lasts at most RECORD_INTERVALS
    intervals, exactly that many when it was remembered as the last one ran out, and the fleet's
    turns are spread over RECORD_INTERVALS intervals. So after the whole fleet took the full path
    at once (Redis emptied, a fleet registered or started in the same minute) its machines take
    it next spread over that span: when every record lasted RECORD_INTERVALS intervals, such a
    fleet took it again all in one interval, at every turn (benchmarks/README.md)."""
    interval = settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"]
    turn = b + (machine_id - b) % RECORD_INTERVALS
    return (turn + 1) * interval - offset(machine_id, interval)


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


# What `steady` answers.
NOT_STEADY, THROTTLED, STEADY, SAMPLED = 0, -1, 1, 2


class Prediction(NamedTuple):
    """A machine's predicted idle time as computed at `at` (Unix time): `seconds` (None: no idle
    stretch runs there), counted down from then, and computed again from `due` on."""

    seconds: int | None
    at: float
    due: float


class Answer(NamedTuple):
    """What `steady` answers: the code, and for a steady heartbeat the prediction its reply
    counts down (seconds, the Unix time it was computed at; None: the reply's predicted_idle_s is
    null)."""

    code: int
    predicted: tuple[int, float] | None = None


def _prediction_parse(text: str) -> tuple[int, float] | None:
    if not text:
        return None
    seconds, at = text.split(",")
    return int(seconds), float(at)


def steady(
    *,
    digest: str,
    fp: str,
    at: datetime,
    gpus: list[Mapping[str, Any]],
    rate_limit: tuple[str, float, int] | None,
) -> Answer:
    """Whether a heartbeat of this credential with this fingerprint at `at` is steady (`_STEADY`
    says what each answer means and does): an Answer whose code is NOT_STEADY, THROTTLED, STEADY
    or SAMPLED. `gpus`: the report's GPUs, for their telemetry; `rate_limit`: the machine's budget
    (its log's Redis key, duration, count; None: no limit). Raises REDIS_ERRORS."""
    _redis()
    telemetry = json.dumps([[g.get(name) for name in TELEMETRY_FIELDS] for g in gpus], separators=(",", ":"))
    key, duration, count = rate_limit if rate_limit is not None else ("", 0.0, 0)
    seen, capabilities, samples, none, generations, predictions = _steady_keys()
    keys = [_key("cred", digest), seen, capabilities, samples, key or none]
    interval = settings.GPGPU["TELEMETRY_SAMPLE_INTERVAL_S"]
    args = [fp, generations, repr(at.timestamp()), interval, duration, count, telemetry, predictions]
    code, prediction = _scripts["steady"](keys=keys, args=args)
    return Answer(int(code), _prediction_parse(prediction.decode() if isinstance(prediction, bytes) else prediction))


def _steady_keys() -> tuple[str, str, str, str, str, str]:
    """The keys and key prefixes every steady heartbeat names, for this CACHE_KEY_PREFIX: the
    seen hashes, the samples, the key that stands for no rate limit, the generations' and the
    predictions' prefixes."""
    keys = _STEADY_KEYS.get(settings.CACHE_KEY_PREFIX)
    if keys is None:
        keys = _STEADY_KEYS[settings.CACHE_KEY_PREFIX] = (
            _key(SEEN_KEY),
            _key(CAPABILITIES_KEY),
            _key(SAMPLES_KEY),
            _key("none"),
            _generation_prefix(),
            _key("pred") + ":",
        )
    return keys


_STEADY_KEYS: dict[str, tuple[str, str, str, str, str, str]] = {}


def generation(machine_id: int) -> str | None:
    """The machine's generation now, to pass to `remember` (None: Redis unreachable, then
    nothing is remembered)."""
    if not enabled():
        return None
    try:
        value = _redis().get(_key("gen", machine_id))
    except REDIS_ERRORS:
        warn_unreachable()
        return None
    return value.decode() if value is not None else "0"


def remember(
    *,
    digest: str,
    machine_id: int,
    fp: str,
    at: datetime,
    capabilities: bool,
    gpus: Iterable[tuple[int, str]],
    generation_before: str,
    predicted: Prediction | None = None,
) -> bool:
    """Record that a repeat of this credential's heartbeat (fingerprint `fp`; `gpus` its GPUs'
    (id, state) as the full heartbeat wrote them, in the report's order) is steady, unless the
    machine's generation moved since `generation_before`. The record lasts until `record_ends`
    (at most RECORD_INTERVALS sample intervals). `predicted`: what the reply's
    predicted_idle_s was counted down from (None: the reply carries none); the record answers until
    it is due, or a later stored prediction (`predictions_store`) is. Returns whether it recorded."""
    b = bucket(at, machine_id)
    ttl = max(1, math.ceil(record_ends(machine_id, b) - at.timestamp()))
    until = 0
    prediction = ""
    if predicted is not None:
        until = math.floor(predicted.due)
        if until - at.timestamp() < 1:
            return False  # due within the second: the next heartbeat computes it again
        if predicted.seconds is not None:
            prediction = f"{max(0, int(predicted.seconds))},{predicted.at:.3f}"
    listed = ",".join(f"{gpu_id}:{state}" for gpu_id, state in gpus)
    value = f"{machine_id}|{b}|{int(capabilities)}|{generation_before}|{until}|{prediction}|{fp}|{listed}"
    try:
        _redis()
        done = _scripts["remember"](
            keys=[_key("cred", digest), _key("gen", machine_id)], args=[generation_before, value, ttl]
        )
    except REDIS_ERRORS:
        logger.warning("steady heartbeats: could not remember machine %s", machine_id, exc_info=True)
        return False
    return bool(done)


def predictions_store(predictions: Mapping[int, Prediction], *, now: float) -> int:
    """Store machines' predictions, computed off the heartbeat (providers.services
    .running_predictions_refresh): a record of such a machine answers with its stored prediction
    when it is due later than the record's own (see _STEADY), and the full heartbeat uses it
    (`prediction`); each is kept until it is due. Returns how many were stored; raises
    REDIS_ERRORS."""
    pipe = _redis().pipeline(transaction=False)
    stored = 0
    for machine_id, p in predictions.items():
        ttl = math.ceil(p.due - now)
        if ttl < 1:
            continue
        seconds = "" if p.seconds is None else str(max(0, int(p.seconds)))
        pipe.set(_key("pred", machine_id), f"{seconds},{p.at:.3f},{p.due:.3f}", ex=ttl)
        stored += 1
    pipe.execute()
    return stored


def prediction(machine_id: int, *, now: float) -> Prediction | None:
    """The machine's stored prediction (`predictions_store`) while it is not due; None when there
    is none, or Redis is unreachable or the steady path off."""
    if not enabled():
        return None
    try:
        raw = _redis().get(_key("pred", machine_id))
    except REDIS_ERRORS:
        warn_unreachable()
        return None
    if raw is None:
        return None
    seconds, at, due = raw.decode().split(",")
    p = Prediction(int(seconds) if seconds else None, float(at), float(due))
    return p if now < p.due else None


def prediction_forget(machine_id: int) -> None:
    """Drop the machine's stored prediction (its idle stretch moved); logged when Redis fails (the
    prediction is then answered until it is due, at most two intervals)."""
    if not enabled():
        return
    try:
        _redis().delete(_key("pred", machine_id))
    except REDIS_ERRORS:
        logger.warning("steady heartbeats: could not drop machine %s's stored prediction", machine_id, exc_info=True)


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
        except REDIS_ERRORS:
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
    Redis's) and their queued samples; the number of machines written, or None when Redis could
    not be read. With Redis, also once the steady path is switched off: what it left is written."""
    if not settings.REDIS_URL:
        return 0
    try:
        client = _redis()
        seen_raw = client.hgetall(_key(SEEN_KEY))
        caps_raw = client.hgetall(_key(CAPABILITIES_KEY))
    except REDIS_ERRORS:
        logger.warning("steady heartbeats: could not read their times from Redis", exc_info=True)
        return None
    samples = _samples_flush(client)
    if samples:
        logger.debug("steady heartbeats: %d queued samples written", samples)
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
        except REDIS_ERRORS:
            logger.warning("steady heartbeats: could not clear flushed times (written again next time)", exc_info=True)
    return written


def _samples_flush(client: Any) -> int:
    """Write the queued samples (oldest first, _SAMPLES_PER_BATCH at a time): a TelemetrySample
    per GPU, and each GPU row's latest telemetry where the sample is newer than the row's. A batch
    leaves the queue once its transaction committed; the number of samples written."""
    key = _key(SAMPLES_KEY)
    written = 0
    while True:
        try:
            batch = client.lrange(key, 0, _SAMPLES_PER_BATCH - 1)
        except REDIS_ERRORS:
            logger.warning("steady heartbeats: could not read the queued samples (written next time)", exc_info=True)
            return written
        if not batch:
            return written
        rows = [row for raw in batch for row in _sample_rows(raw.decode())]
        with transaction.atomic():
            if connection.vendor == "postgresql":
                _pg_samples_write(rows)
            else:
                _samples_insert_orm(rows)
                _latest_telemetry_write(rows)
        try:
            client.ltrim(key, len(batch), -1)
        except REDIS_ERRORS:
            logger.error("steady heartbeats: written samples stay queued (Redis failed): they will be written twice")
            return written + len(batch)
        written += len(batch)
        if len(batch) < _SAMPLES_PER_BATCH:
            return written


_SampleRow = tuple[int, datetime, str, Any, Any, Any, Any]  # gpu, at, state, then TELEMETRY_FIELDS' values


def _newest(rows: list[_SampleRow]) -> list[_SampleRow]:
    """Each GPU's newest row, by GPU id."""
    newest: dict[int, _SampleRow] = {}
    for row in rows:
        if row[0] not in newest or newest[row[0]][1] < row[1]:
            newest[row[0]] = row
    return [newest[gpu_id] for gpu_id in sorted(newest)]


def _pg_samples_write(rows: list[_SampleRow]) -> None:
    """PostgreSQL: the samples inserted and the GPU rows' latest telemetry updated with two
    statements whatever their number, their values as arrays (unnest): a VALUES list of
    thousands of rows costs more to build and parse than to run. A GPU deleted since its sample
    was queued (only a test's or a benchmark's clean-up deletes GPUs) is left out."""
    if not rows:
        return
    qn = connection.ops.quote_name
    gpu_table, samples = qn(GPU._meta.db_table), qn(TelemetrySample._meta.db_table)
    gpu_id = field_column(GPU, "id")[1]
    telemetry = [field_column(GPU, name) for name in TELEMETRY_FIELDS]
    types = [f.cast_db_type(connection) for f, _ in telemetry]
    arrays = ", ".join(f"%s::{t}[]" for t in ["bigint", "timestamptz", "text", *types])
    names = ["gpu", "at", "state", *TELEMETRY_FIELDS]
    columns = [field_column(TelemetrySample, name)[1] for name in names]
    source = f"unnest({arrays}) AS v ({', '.join(names)})"
    params = [list(values) for values in zip(*rows, strict=True)]
    # Only the models' own (quoted) table and column names go into the text; values are parameters.
    insert = f"INSERT INTO {samples} ({', '.join(columns)}) SELECT v.{', v.'.join(names)} FROM {source} "  # noqa: S608
    insert += f"JOIN {gpu_table} g ON g.{gpu_id} = v.gpu"
    latest_at = field_column(GPU, "last_telemetry_at")[1]
    sets = ", ".join(
        [
            f"{latest_at} = v.at",
            *(f"{column} = v.{name}" for (_, column), name in zip(telemetry, TELEMETRY_FIELDS, strict=True)),
        ]
    )
    update = f"UPDATE {gpu_table} SET {sets} FROM {source} "  # noqa: S608
    update += (
        f"WHERE {gpu_table}.{gpu_id} = v.gpu AND ({gpu_table}.{latest_at} IS NULL OR {gpu_table}.{latest_at} < v.at)"
    )
    with connection.cursor() as cursor:
        cursor.execute(insert, params)
        cursor.execute(update, [list(values) for values in zip(*_newest(rows), strict=True)])


def _samples_insert_orm(rows: list[_SampleRow]) -> None:
    """Other databases: the samples through the ORM, a GPU deleted meanwhile left out."""
    known = set(GPU.objects.filter(pk__in={row[0] for row in rows}).values_list("pk", flat=True))
    TelemetrySample.objects.bulk_create(
        [
            TelemetrySample(
                gpu_id=gpu,
                at=at,
                state=state,
                memory_used_mb=mem,
                utilization_pct=util,
                temperature_c=temp,
                power_w=power,
            )
            for gpu, at, state, mem, util, temp, power in rows
            if gpu in known
        ],
        batch_size=1000,
    )


def _sample_rows(raw: str) -> list[_SampleRow]:
    """A queued sample's rows: `machine|time|id:state,…|[[TELEMETRY_FIELDS…], …]` (see _STEADY)."""
    _mid, stamp, gpus, telemetry = raw.split("|", 3)
    at = datetime.fromtimestamp(float(stamp), tz=UTC)
    states = [pair.split(":") for pair in gpus.split(",") if pair]
    rows: list[_SampleRow] = []
    for (gpu_id, state), (mem, *floats) in zip(states, json.loads(telemetry), strict=True):
        # One type per column (int, then floats): the JSON numbers may be either.
        rows.append((int(gpu_id), at, state, mem, *(None if v is None else float(v) for v in floats)))
    return rows


def _latest_telemetry_write(rows: list[_SampleRow]) -> None:
    """Other databases than PostgreSQL (_pg_samples_write there): each GPU row's telemetry and
    `last_telemetry_at` from its newest sample in `rows`, where that is newer than the row's: one
    UPDATE … FROM (VALUES …) per thousand GPUs."""
    table = connection.ops.quote_name(GPU._meta.db_table)
    fields, columns = zip(
        *(field_column(GPU, name) for name in ("id", "last_telemetry_at", *TELEMETRY_FIELDS)), strict=True
    )
    row_sql = "(" + ", ".join("%s" for _ in fields) + ")"
    items = _newest(rows)
    for start in range(0, len(items), 1000):
        chunk = items[start : start + 1000]
        values = ", ".join([row_sql] * len(chunk))
        names = ", ".join(columns)
        sets = ", ".join(f"{c} = v.{c}" for c in columns[1:])
        at = columns[1]
        # Only the model's own (quoted) table and column names go into the text; values are parameters.
        sql = f"WITH v ({names}) AS (VALUES {values}) UPDATE {table} SET {sets} FROM v "  # noqa: S608
        sql += f"WHERE {table}.{columns[0]} = v.{columns[0]} AND ({table}.{at} IS NULL OR {table}.{at} < v.{at})"
        params: list[Any] = []
        for gpu_id, at_value, _state, *values_ in chunk:
            params.append(gpu_id)
            params.append(fields[1].get_db_prep_save(at_value, connection))
            params.extend(values_)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)


def _times_write(times: Mapping[int, datetime], *, column: str) -> None:
    """Set `column` of each machine to the later of its value and the given time: on PostgreSQL
    in one statement, elsewhere one UPDATE … FROM (VALUES …) per thousand machines."""
    table = connection.ops.quote_name(Machine._meta.db_table)
    field, col = field_column(Machine, column)
    pk = field_column(Machine, "id")[1]
    if connection.vendor == "postgresql":  # two arrays, one statement (see _pg_samples_write)
        ids, ats = zip(*sorted(times.items()), strict=True)
        # Only the model's own (quoted) table and column names go into the text; values are parameters.
        sql = f"UPDATE {table} SET {col} = v.at FROM unnest(%s::bigint[], %s::timestamptz[]) AS v (id, at) "  # noqa: S608
        sql += f"WHERE {table}.{pk} = v.id AND ({table}.{col} IS NULL OR {table}.{col} < v.at)"
        with connection.cursor() as cursor:
            cursor.execute(sql, [list(ids), list(ats)])
        return
    items = sorted(times.items())
    for start in range(0, len(items), 1000):
        chunk = items[start : start + 1000]
        values = ", ".join(["(%s, %s)"] * len(chunk))
        # Only the model's own (quoted) table and column names go into the text; values are parameters.
        sql = f"WITH v (id, at) AS (VALUES {values}) UPDATE {table} SET {col} = v.at FROM v "  # noqa: S608
        sql += f"WHERE {table}.{pk} = v.id AND ({table}.{col} IS NULL OR {table}.{col} < v.at)"
        params: list[Any] = []
        for machine_id, at in chunk:
            params.extend([machine_id, field.get_db_prep_save(at, connection)])
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
