"""Per-user event history, seen-sets, idempotency, trending counts, item-to-item co-visitation and fresh
items in Redis (redis.asyncio).

Key layout (``p`` is the prefix, ``u`` a user id; the kind segment comes first, so user ids that contain
``:`` cannot collide across kinds):

- ``p h:u``   sorted set, the user's last ``history_cap`` events: score = event timestamp, member =
  16 hex digits of a global sequence number + compact JSON ``[item_id, type, value, event_id]``. The
  sequence prefix makes identical events distinct and keeps arrival order among equal timestamps.
- ``p s:u``   set of every item the user ever interacted with (uncapped; for ``exclude_seen``).
- ``p e:u``   sorted set of the user's event ids → first ingestion time (server clock). Idempotency is
  per user and lasts ``dedup_window_s`` (7 days) after an id is first stored: long enough for any retry
  or replay of a day's backlog, bounded in memory. Keying it per user lets ``forget`` erase it.
- ``p trend`` / ``p trend:meta``  recency-weighted popularity (see ``_APPEND_LUA``) and its reference time.
- ``p cv:i``  sorted set "what followed item i": member = an item that some user interacted with within
  ``covisit_window`` (W) events after i, score = the sum over those pairs of a recency weight
  2^((t - ref_i) / half_life) / distance (t the later event's time, forward decay with the trending
  half-life, rescaled like trending), relative to the reference time ``ref_i`` kept in the hash
  ``p cvref`` (field = i). Trimmed to the ``covisit_size`` (K) best members after every write, so it is
  a bounded heavy-hitter list, not an exact count: a pair must gather weight faster than the K-th entry
  decays to stay. An event that arrives after later events of its user counts as following its
  predecessors only.
- ``p fresh``  sorted set of the newest ``fresh_size`` (F) items → time first seen: an item's first
  event ever (its timestamp, capped at now + 1 h) or its first ``POST /v1/items`` (server time),
  whichever came first. ``p iseen`` is the set of every item that ever had an event (what "first"
  means).
- ``p seq``  the sequence counter; ``p batch:<token>`` the cached result of one ``append`` call.

Co-visitation, fresh items and trending are anonymous aggregates over all users: ``forget`` leaves them
alone (no key names a user, and no member does).

Memory bound of the item keys: co-visitation holds at most items × K entries (K = 50 by default) plus
one ``cvref`` field per source item. ``MEMORY USAGE`` on Redis 7.0 after ``load-history`` of MovieLens
100K (1,634 sets, 64,723 entries): 21.6 bytes per entry in a full 50-entry set (1,080 bytes a set;
23.8 on average with the smaller sets' fixed cost), ~58 bytes per ``cvref`` field. That is the listpack
encoding, used up to ``zset-max-listpack-entries`` (128) members; ids of 12 and 36 characters measured
37 and 63 bytes per entry, and a K above 128 switches to a skiplist at ~100 bytes per entry. So
10⁵ items with short ids take at most ~110 MB at K = 50. ``fresh`` holds F entries (26 kB at 200);
``iseen`` one member per item ever seen in an event (~42 bytes each).

Redis Cluster: the key names live in ``_KIND`` and ``HistoryStore._key`` only. The append script builds
``cv:<item>`` keys itself and writes keys of many users and items in one call, which works on a single
Redis (or a primary with replicas) only, not on Redis Cluster yet.

Every call has a deadline; on a connection error, a timeout or a Redis error the store raises
``StoreUnavailable`` after counting it in ``REDIS_ERRORS`` and logging one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from models.features import EVENT_TYPE_IDS
from service.metrics import REDIS_ERRORS, REDIS_LATENCY

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

DEDUP_WINDOW_S = 7 * 86400
_BATCH_RESULT_GRACE_S = 5  # a transparent retry happens within the call's deadline; keep results a bit longer
_SEQ_DIGITS = 16
# Trending scores are stored as 2^((t - ref) / half_life); once an event is this many half-lives past
# ref the whole set is rescaled to a new ref, so stored scores stay below ~2^64 per event.
_RESCALE_EXPONENT = 64.0
_OVERFETCH_MAX = 500
"""At most this many extra trending entries are read to make up for excluded (seen) items."""


class _KIND:
    """Key kinds (the segment after the prefix), in one place: a Redis Cluster layout changes them here."""

    HISTORY, SEEN, EVENT_IDS = "h", "s", "e"
    TRENDING, TRENDING_META = "trend", "trend:meta"
    COVISIT, COVISIT_REF = "cv", "cvref"  # cv:<item> sorted sets; cvref hash (item → reference time)
    FRESH, EVENT_ITEMS = "fresh", "iseen"
    SEQUENCE, BATCH = "seq", "batch"


# One atomic script per append call. Phase 1 only reads (cached result of a retried call, key types,
# timestamps) and returns an error before any write, so a rejected batch changes nothing; Redis refuses
# the whole script up front when it is out of memory (the shebang marks it as a writing script).
_APPEND_LUA = r"""#!lua
-- KEYS: 1 seq, 2 trend, 3 trend:meta, 4 batch:<token>, 5 cvref, 6 fresh, 7 iseen, then per user h, s, e.
-- ARGV: 1 history cap, 2 half-life, 3 dedup window, 4 batch-result ttl, 5 rescale exponent, 6 co-visitation
-- key prefix, 7 co-visitation window W, 8 co-visitation size K, 9 fresh size F; then 5 per event.
-- The co-visitation keys (prefix .. item id) are built here, not declared in KEYS: cross-item keys touched
-- from Lua work on a single Redis (or a primary with replicas) only, not on Redis Cluster for now.
local U, H = 7, 9
local done = redis.call('GET', KEYS[4])
if done then
  local a, d = string.match(done, '(%d+),(%d+)')
  return {tonumber(a), tonumber(d)}
end
local function check_type(key, kind)
  local t = redis.call('TYPE', key).ok
  if t ~= 'none' and t ~= kind then
    return 'WRONGTYPE ' .. key .. ' holds a ' .. t .. '; batch rejected'
  end
end
local kinds = {'zset', 'set', 'zset'}
local nusers = (#KEYS - U) / 3
for j = 1, nusers do
  for k = 1, 3 do
    local err = check_type(KEYS[U + 3 * (j - 1) + k], kinds[k])
    if err then return redis.error_reply(err) end
  end
end
local fixed = {'string', 'zset', 'hash', nil, 'hash', 'zset', 'set'}
for k = 1, U do
  if fixed[k] then
    local err = check_type(KEYS[k], fixed[k])
    if err then return redis.error_reply(err) end
  end
end
local n = (#ARGV - H) / 5
for i = 0, n - 1 do
  local ts = tonumber(ARGV[H + 1 + 5 * i + 2])
  if not ts or ts ~= ts or ts == math.huge or ts == -math.huge then
    return redis.error_reply('event ' .. i .. ': timestamp is not a finite number; batch rejected')
  end
end

local cap = tonumber(ARGV[1])
local half_life = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local max_exp = tonumber(ARGV[5])
local cv_prefix = ARGV[6]
local cv_window = tonumber(ARGV[7])
local cv_size = tonumber(ARGV[8])
local fresh_size = tonumber(ARGV[9])
local now = tonumber(redis.call('TIME')[1])

-- Co-visitation, read-only part: each event's stored predecessors (the W latest stored events at or before
-- its timestamp), and the type of every co-visitation key the batch may write.
local stored_before = {}
if cv_window > 0 then
  local cv_checked = {}
  local function check_cv(item)
    if not cv_checked[item] then
      cv_checked[item] = true
      return check_type(cv_prefix .. item, 'zset')
    end
  end
  for i = 0, n - 1 do
    local b = H + 1 + 5 * i
    local j, ts_arg, item = tonumber(ARGV[b]), ARGV[b + 2], ARGV[b + 3]
    local rows = redis.call('ZREVRANGEBYSCORE', KEYS[U + 3 * (j - 1) + 1], ts_arg, '-inf', 'WITHSCORES',
      'LIMIT', 0, cv_window)
    local before = {}
    for r = 1, #rows, 2 do
      local prev = cjson.decode(string.sub(rows[r], 17))[1]
      before[#before + 1] = {tonumber(rows[r + 1]), prev}
      local err = check_cv(prev)
      if err then return redis.error_reply(err) end
    end
    stored_before[i] = before
    local err = check_cv(item)
    if err then return redis.error_reply(err) end
  end
end

for j = 1, nusers do
  local ids = KEYS[U + 3 * (j - 1) + 3]
  redis.call('ZREMRANGEBYSCORE', ids, '-inf', '(' .. (now - window))
end

-- Forward decay: a weight 2^((t - ref) / half_life) relative to a reference time; when an event is
-- max_exp half-lives past ref, the set's scores are rescaled to a new ref (weights below 1e-12 dropped).
local function rescale(key, old_ref, new_ref)
  local factor = 2 ^ ((old_ref - new_ref) / half_life)
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local args = {}
  for i = 1, #entries, 2 do
    local s = tonumber(entries[i + 1]) * factor
    if s >= 1e-12 then
      args[#args + 1] = string.format('%.17g', s)
      args[#args + 1] = entries[i]
    else
      redis.call('ZREM', key, entries[i])
    end
    if #args >= 2000 then
      redis.call('ZADD', key, unpack(args))
      args = {}
    end
  end
  if #args > 0 then redis.call('ZADD', key, unpack(args)) end
end

local meta = redis.call('HMGET', KEYS[3], 'ref', 'latest')
local ref, latest = tonumber(meta[1]), tonumber(meta[2])
local seq = redis.call('INCRBY', KEYS[1], n) - n
local accepted, dups = 0, 0
local touched, with_ids, new_events = {}, {}, {}
local fresh_added = false
for i = 0, n - 1 do
  local b = H + 1 + 5 * i
  local j, eid, ts_arg, item, payload = tonumber(ARGV[b]), ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local base = U + 3 * (j - 1)
  local new = true
  if eid ~= '' then
    new = redis.call('ZADD', KEYS[base + 3], 'NX', now, eid) == 1
    with_ids[j] = true
  end
  if new then
    accepted = accepted + 1
    seq = seq + 1
    redis.call('ZADD', KEYS[base + 1], ts_arg, string.format('%016x', seq) .. payload)
    redis.call('SADD', KEYS[base + 2], item)
    touched[j] = true
    -- trending is about now: a timestamp from a skewed clock must not outweigh every real event
    local ts = math.min(tonumber(ts_arg), now + 3600)
    if ref == nil then ref, latest = ts, ts end
    if ts > latest then latest = ts end
    if (ts - ref) / half_life > max_exp then
      rescale(KEYS[2], ref, ts)
      ref = ts
    end
    local w = 2 ^ ((ts - ref) / half_life)
    if w > 0 then redis.call('ZINCRBY', KEYS[2], string.format('%.17g', w), item) end
    -- fresh items: the first event ever of an item (time first seen = its timestamp)
    if redis.call('SADD', KEYS[7], item) == 1 then
      redis.call('ZADD', KEYS[6], 'NX', string.format('%.17g', ts), item)
      fresh_added = true
    end
    local list = new_events[j]
    if not list then
      list = {}
      new_events[j] = list
    end
    list[#list + 1] = {tonumber(ts_arg), i, item, ts}
  else
    dups = dups + 1
  end
end

-- Co-visitation: for each new event (item i at t), each of the user's W previous events (item j, the d-th
-- before it in time order) adds 2^((t - ref_j) / half_life) / d to member i of j's set. New events of one
-- user are taken in time order, whatever their order in the batch.
if cv_window > 0 then
  local refs, cv_touched = {}, {}
  local function cv_add(src, item, t, weight_div)
    local key = cv_prefix .. src
    local r = refs[src]
    if r == nil then
      r = tonumber(redis.call('HGET', KEYS[5], src)) or t
    end
    if (t - r) / half_life > max_exp then
      rescale(key, r, t)
      r = t
    end
    refs[src] = r
    local w = 2 ^ ((t - r) / half_life) / weight_div
    if w > 0 then
      redis.call('ZINCRBY', key, string.format('%.17g', w), item)
      cv_touched[src] = true
    end
  end
  for _, list in pairs(new_events) do
    table.sort(list, function(a, b)
      if a[1] ~= b[1] then return a[1] < b[1] end
      return a[2] < b[2]
    end)
    for p = 1, #list do
      local e = list[p]
      local before = stored_before[e[2]]
      -- merge, newest first: earlier new events of the batch (list[p-1], ...) and the stored ones; at
      -- equal timestamps the batch's events are the later arrivals
      local q, s, d = p - 1, 1, 0
      local used = {[e[3]] = true}
      while d < cv_window and (q >= 1 or s <= #before) do
        local prev
        if q >= 1 and (s > #before or list[q][1] >= before[s][1]) then
          prev = list[q][3]
          q = q - 1
        else
          prev = before[s][2]
          s = s + 1
        end
        d = d + 1
        if not used[prev] then
          used[prev] = true
          cv_add(prev, e[3], e[4], d)
        end
      end
    end
  end
  local ref_args = {}
  for src in pairs(cv_touched) do
    redis.call('ZREMRANGEBYRANK', cv_prefix .. src, 0, -(cv_size + 1))
    ref_args[#ref_args + 1] = src
    ref_args[#ref_args + 1] = string.format('%.17g', refs[src])
    if #ref_args >= 2000 then
      redis.call('HSET', KEYS[5], unpack(ref_args))
      ref_args = {}
    end
  end
  if #ref_args > 0 then redis.call('HSET', KEYS[5], unpack(ref_args)) end
end

if fresh_added then
  redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -(fresh_size + 1))
end
for j in pairs(touched) do
  redis.call('ZREMRANGEBYRANK', KEYS[U + 3 * (j - 1) + 1], 0, -(cap + 1))
end
for j in pairs(with_ids) do
  redis.call('EXPIRE', KEYS[U + 3 * (j - 1) + 3], window)
end
if ref ~= nil then
  redis.call('HSET', KEYS[3], 'ref', string.format('%.17g', ref), 'latest', string.format('%.17g', latest))
end
redis.call('SET', KEYS[4], accepted .. ',' .. dups, 'EX', tonumber(ARGV[4]))
return {accepted, dups}
"""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    item_id: str
    type: str
    timestamp: float
    value: float | None = None
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class SourceLists:
    """What ``HistoryStore.candidate_lists`` read for one recommend request."""

    covisit: list[list[tuple[str, float]]]  # per source item, best first; scores comparable within a list
    fresh: list[str]  # newest first
    trending: list[str]  # best first


class StoreUnavailable(Exception):
    """Redis unreachable or past its deadline."""


_LOG_EVERY_S = 5.0
_last_logged: dict[str, tuple[float, int]] = {}  # op -> (monotonic time of the last line, failures since)


def _log_failure(op: str, elapsed_ms: float, reason: str) -> None:
    """One warning line per op every few seconds: an outage under load must not flood the log."""
    now = time.monotonic()
    last, suppressed = _last_logged.get(op, (-math.inf, 0))
    if now - last < _LOG_EVERY_S:
        _last_logged[op] = (last, suppressed + 1)
        return
    _last_logged[op] = (now, 0)
    more = f" ({suppressed} more since the last report)" if suppressed else ""
    log.warning("redis %s failed after %.1f ms: %s%s", op, elapsed_ms, reason, more)


async def redis_call(op: str, awaitable: Awaitable[T], timeout_s: float) -> T:
    """Await one Redis round trip under a deadline, recording latency or the error by ``op``."""
    start = time.perf_counter()
    try:
        result = await asyncio.wait_for(awaitable, timeout_s)
    except (RedisError, OSError) as exc:  # OSError covers TimeoutError (the deadline) and socket errors
        REDIS_ERRORS.labels(op).inc()
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout_s * 1000:.0f} ms"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        _log_failure(op, (time.perf_counter() - start) * 1000, reason)
        raise StoreUnavailable(f"redis {op}: {reason}") from exc
    REDIS_LATENCY.labels(op).observe(time.perf_counter() - start)
    return result


def connect(url: str, *, timeout_s: float, max_connections: int = 64) -> Redis:
    """A pooled client that reconnects by itself: a dead pooled connection (Redis restarted) is
    replaced and the command retried twice with a short backoff, all within the caller's deadline."""
    socket_timeout = max(timeout_s, 1.0)
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,  # wait for a free pooled connection (the call's deadline cuts it shorter)
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.002), retries=2),
    )
    return Redis.from_pool(pool)


def _check_event(user_id: str, event: StoredEvent) -> None:
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user_id must be a non-empty string")
    if not isinstance(event.item_id, str) or not event.item_id:
        raise ValueError("item_id must be a non-empty string")
    if event.type not in EVENT_TYPE_IDS:
        raise ValueError(f"unknown event type {event.type!r}")
    if not isinstance(event.timestamp, int | float) or not math.isfinite(event.timestamp):
        raise ValueError("timestamp must be a finite number")
    if event.value is not None and (
        not isinstance(event.value, int | float) or not math.isfinite(event.value)
    ):
        raise ValueError("value must be a finite number or null")
    if event.event_id is not None and (not isinstance(event.event_id, str) or not event.event_id):
        raise ValueError("event_id must be a non-empty string or null")


class HistoryStore:
    """Redis-backed user histories; every public call is one round trip under ``timeout_s``."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "cr:",
        history_cap: int = 200,
        timeout_s: float = 0.05,
        trending_half_life_s: float = 259200.0,
        dedup_window_s: int = DEDUP_WINDOW_S,
        covisit_window: int = 5,
        covisit_size: int = 50,
        fresh_size: int = 200,
    ) -> None:
        if history_cap < 1 or timeout_s <= 0 or trending_half_life_s <= 0 or dedup_window_s < 1:
            raise ValueError(
                "history_cap, timeout_s, trending_half_life_s and dedup_window_s must be positive"
            )
        if covisit_window < 0 or covisit_size < 1 or fresh_size < 1:
            raise ValueError("covisit_window must be >= 0, covisit_size and fresh_size positive")
        self._client = client
        self._prefix = prefix
        self._cap = history_cap
        self._timeout_s = timeout_s
        self._half_life_s = trending_half_life_s
        self._dedup_window_s = dedup_window_s
        self._covisit_window = covisit_window
        self._covisit_size = covisit_size
        self._fresh_size = fresh_size
        self._append_script = client.register_script(_APPEND_LUA)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, timeout_s: float | None = None, max_connections: int = 64
    ) -> HistoryStore:
        """The store the settings describe; ``timeout_s`` overrides ``redis_timeout_ms`` (bulk loads)."""
        timeout_s = settings.redis_timeout_ms / 1000.0 if timeout_s is None else timeout_s
        return cls(
            connect(settings.redis_url, timeout_s=timeout_s, max_connections=max_connections),
            prefix=settings.redis_prefix,
            history_cap=settings.history_cap,
            timeout_s=timeout_s,
            trending_half_life_s=settings.trending_half_life_s,
            covisit_window=settings.covisit_window,
            covisit_size=settings.covisit_size,
            fresh_size=settings.fresh_size,
        )

    @property
    def client(self) -> Redis:
        """The underlying client (shared with the item catalog)."""
        return self._client

    def _key(self, kind: str, name: str | None = None) -> str:
        """``p kind`` or ``p kind:name`` (``name`` a user or item id; ``""`` gives the bare ``p kind:``)."""
        return f"{self._prefix}{kind}" if name is None else f"{self._prefix}{kind}:{name}"

    async def append(self, events: Sequence[tuple[str, StoredEvent]]) -> tuple[int, int]:
        """(accepted, duplicates). All or nothing, atomic in Redis (one Lua script); an event_id already
        stored for the user is acknowledged as duplicate, not stored twice, also within the batch. Also adds
        to the user's seen-set, the recency-weighted trending counts, the co-visitation sets and the fresh
        items (duplicates count nowhere). Raises ValueError on an invalid event (nothing is written) and
        StoreUnavailable.

        Each call carries a random token under which its result is cached for a few seconds past the
        deadline, so the client's transparent retry after a lost reply cannot store the batch twice.
        """
        if not events:
            return 0, 0
        users: dict[str, int] = {}
        argv: list[str | int | float] = []
        for i, (user_id, event) in enumerate(events):
            try:
                _check_event(user_id, event)
            except ValueError as exc:
                raise ValueError(f"event {i}: {exc}") from None
            j = users.setdefault(user_id, len(users) + 1)
            value = None if event.value is None else float(event.value)
            payload = json.dumps([event.item_id, event.type, value, event.event_id], separators=(",", ":"))
            argv += [j, event.event_id or "", repr(float(event.timestamp)), event.item_id, payload]
        keys = [
            self._key(_KIND.SEQUENCE),
            self._key(_KIND.TRENDING),
            self._key(_KIND.TRENDING_META),
            self._key(_KIND.BATCH, uuid.uuid4().hex),
            self._key(_KIND.COVISIT_REF),
            self._key(_KIND.FRESH),
            self._key(_KIND.EVENT_ITEMS),
        ]
        for user_id in users:
            keys += [self._key(kind, user_id) for kind in (_KIND.HISTORY, _KIND.SEEN, _KIND.EVENT_IDS)]
        head = [
            self._cap,
            repr(self._half_life_s),
            self._dedup_window_s,
            math.ceil(self._timeout_s) + _BATCH_RESULT_GRACE_S,
            _RESCALE_EXPONENT,
            self._key(_KIND.COVISIT, ""),
            self._covisit_window,
            self._covisit_size,
            self._fresh_size,
        ]
        accepted, duplicates = await redis_call(
            "append", self._append_script(keys=keys, args=head + argv), self._timeout_s
        )
        return int(accepted), int(duplicates)

    async def history(
        self, user_id: str, n: int, *, with_seen: bool = False
    ) -> tuple[list[StoredEvent], set[str] | None]:
        """Last n events by timestamp, newest last, plus the seen-set if asked; one pipelined round trip."""
        n = max(int(n), 0)
        if n == 0 and not with_seen:
            return [], None

        async def run() -> list:
            async with self._client.pipeline(transaction=False) as pipe:
                if n:
                    pipe.zrange(self._key(_KIND.HISTORY, user_id), -n, -1, withscores=True)
                if with_seen:
                    pipe.smembers(self._key(_KIND.SEEN, user_id))
                return await pipe.execute()

        replies = await redis_call("history", run(), self._timeout_s)
        events: list[StoredEvent] = []
        if n and replies[0]:
            # One JSON parse for all members, not one per member (a third of this method's time).
            fields = json.loads(b"[" + b",".join(member[_SEQ_DIGITS:] for member, _ in replies[0]) + b"]")
            events = [
                StoredEvent(item_id, kind, float(score), value, event_id)
                for (item_id, kind, value, event_id), (_, score) in zip(fields, replies[0], strict=True)
            ]
        seen = {m.decode() for m in replies[-1]} if with_seen else None
        return events, seen

    async def forget(self, user_id: str) -> bool:
        """Delete the user's history, seen-set and event ids; True if there was anything.

        Trending counts, co-visitation and fresh items are anonymous aggregates over all users (no key or
        member names a user) and are left alone."""
        keys = [self._key(kind, user_id) for kind in (_KIND.HISTORY, _KIND.SEEN, _KIND.EVENT_IDS)]
        return bool(await redis_call("forget", self._client.delete(*keys), self._timeout_s))

    async def trending(self, k: int, exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Top-k items by recency-weighted event count, expressed as the number of events at the time of
        the latest ingested event that carries the same weight (an event one half-life older counts 0.5)."""
        if k <= 0:
            return []
        excluded = exclude if isinstance(exclude, set | frozenset) else set(exclude)

        async def run() -> list:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrevrange(self._key(_KIND.TRENDING), 0, k + len(excluded) - 1, withscores=True)
                pipe.hmget(self._key(_KIND.TRENDING_META), "ref", "latest")
                return await pipe.execute()

        rows, (ref, latest) = await redis_call("trending", run(), self._timeout_s)
        if ref is None or latest is None:
            return []
        scale = 2.0 ** ((float(ref) - float(latest)) / self._half_life_s)
        out: list[tuple[str, float]] = []
        for member, score in rows:
            item_id = member.decode()
            if item_id not in excluded:
                out.append((item_id, float(score) * scale))
                if len(out) == k:
                    break
        return out

    async def add_fresh(self, item_ids: Sequence[str]) -> None:
        """Record items new to the catalog as fresh (time first seen = now, kept if already there), keeping
        the newest ``fresh_size``; one atomic round trip (MULTI/EXEC)."""
        if not item_ids:
            return
        key, now = self._key(_KIND.FRESH), time.time()

        async def run() -> list:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zadd(key, dict.fromkeys(item_ids, now), nx=True)
                pipe.zremrangebyrank(key, 0, -(self._fresh_size + 1))
                return await pipe.execute()

        await redis_call("fresh", run(), self._timeout_s)

    async def candidate_lists(
        self, sources: Sequence[str], *, trending: int, exclude: int = 0
    ) -> SourceLists:
        """The co-visitation set of each source item, the fresh items and the top ``trending`` (+ up to
        ``exclude`` more, to make up for excluded ones) trending items: one pipelined round trip."""
        extra = min(exclude, _OVERFETCH_MAX) if trending > 0 else 0

        async def run() -> list:
            async with self._client.pipeline(transaction=False) as pipe:
                for item_id in sources:
                    pipe.zrevrange(self._key(_KIND.COVISIT, item_id), 0, -1, withscores=True)
                pipe.zrevrange(self._key(_KIND.FRESH), 0, self._fresh_size - 1)
                if trending > 0:
                    pipe.zrevrange(self._key(_KIND.TRENDING), 0, trending + extra - 1)
                return await pipe.execute()

        replies = await redis_call("candidates", run(), self._timeout_s)
        covisit = [[(m.decode(), float(s)) for m, s in rows] for rows in replies[: len(sources)]]
        fresh = [m.decode() for m in replies[len(sources)]]
        trend = [m.decode() for m in replies[len(sources) + 1]] if trending > 0 else []
        return SourceLists(covisit=covisit, fresh=fresh, trending=trend)

    async def ping(self) -> None:
        """Raises StoreUnavailable unless Redis answers within the deadline."""
        await redis_call("ping", self._client.ping(), self._timeout_s)

    async def close(self) -> None:
        await self._client.aclose()
