"""Per-user event history, seen-sets, idempotency and trending counts in Redis (redis.asyncio).

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
- ``p seq``  the sequence counter; ``p batch:<token>`` the cached result of one ``append`` call.

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

# One atomic script per append call. Phase 1 only reads (cached result of a retried call, key types,
# timestamps) and returns an error before any write, so a rejected batch changes nothing; Redis refuses
# the whole script up front when it is out of memory (the shebang marks it as a writing script).
_APPEND_LUA = r"""#!lua
local done = redis.call('GET', KEYS[4])
if done then
  local a, d = string.match(done, '(%d+),(%d+)')
  return {tonumber(a), tonumber(d)}
end
local kinds = {'zset', 'set', 'zset'}
local nusers = (#KEYS - 4) / 3
for j = 1, nusers do
  for k = 1, 3 do
    local key = KEYS[4 + 3 * (j - 1) + k]
    local t = redis.call('TYPE', key).ok
    if t ~= 'none' and t ~= kinds[k] then
      return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. '; batch rejected')
    end
  end
end
local fixed = {[1] = 'string', [2] = 'zset', [3] = 'hash'}
for k, kind in pairs(fixed) do
  local t = redis.call('TYPE', KEYS[k]).ok
  if t ~= 'none' and t ~= kind then
    return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' holds a ' .. t .. '; batch rejected')
  end
end
local n = (#ARGV - 5) / 5
for i = 0, n - 1 do
  local ts = tonumber(ARGV[6 + 5 * i + 2])
  if not ts or ts ~= ts or ts == math.huge or ts == -math.huge then
    return redis.error_reply('event ' .. i .. ': timestamp is not a finite number; batch rejected')
  end
end

local cap = tonumber(ARGV[1])
local half_life = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local max_exp = tonumber(ARGV[5])
local now = tonumber(redis.call('TIME')[1])
for j = 1, nusers do
  local ids = KEYS[4 + 3 * (j - 1) + 3]
  redis.call('ZREMRANGEBYSCORE', ids, '-inf', '(' .. (now - window))
end

local meta = redis.call('HMGET', KEYS[3], 'ref', 'latest')
local ref, latest = tonumber(meta[1]), tonumber(meta[2])
local function rescale(new_ref)
  local factor = 2 ^ ((ref - new_ref) / half_life)
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local args = {}
  for i = 1, #entries, 2 do
    local s = tonumber(entries[i + 1]) * factor
    if s >= 1e-12 then
      args[#args + 1] = string.format('%.17g', s)
      args[#args + 1] = entries[i]
    else
      redis.call('ZREM', KEYS[2], entries[i])
    end
    if #args >= 2000 then
      redis.call('ZADD', KEYS[2], unpack(args))
      args = {}
    end
  end
  if #args > 0 then redis.call('ZADD', KEYS[2], unpack(args)) end
  ref = new_ref
end

local seq = redis.call('INCRBY', KEYS[1], n) - n
local accepted, dups = 0, 0
local touched, with_ids = {}, {}
for i = 0, n - 1 do
  local b = 6 + 5 * i
  local j, eid, ts_arg, item, payload = tonumber(ARGV[b]), ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local base = 4 + 3 * (j - 1)
  local fresh = true
  if eid ~= '' then
    fresh = redis.call('ZADD', KEYS[base + 3], 'NX', now, eid) == 1
    with_ids[j] = true
  end
  if fresh then
    accepted = accepted + 1
    seq = seq + 1
    redis.call('ZADD', KEYS[base + 1], ts_arg, string.format('%016x', seq) .. payload)
    redis.call('SADD', KEYS[base + 2], item)
    touched[j] = true
    -- trending is about now: a timestamp from a skewed clock must not outweigh every real event
    local ts = math.min(tonumber(ts_arg), now + 3600)
    if ref == nil then ref, latest = ts, ts end
    if ts > latest then latest = ts end
    if (ts - ref) / half_life > max_exp then rescale(ts) end
    local w = 2 ^ ((ts - ref) / half_life)
    if w > 0 then redis.call('ZINCRBY', KEYS[2], string.format('%.17g', w), item) end
  else
    dups = dups + 1
  end
end
for j in pairs(touched) do
  redis.call('ZREMRANGEBYRANK', KEYS[4 + 3 * (j - 1) + 1], 0, -(cap + 1))
end
for j in pairs(with_ids) do
  redis.call('EXPIRE', KEYS[4 + 3 * (j - 1) + 3], window)
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
    ) -> None:
        if history_cap < 1 or timeout_s <= 0 or trending_half_life_s <= 0 or dedup_window_s < 1:
            raise ValueError(
                "history_cap, timeout_s, trending_half_life_s and dedup_window_s must be positive"
            )
        self._client = client
        self._prefix = prefix
        self._cap = history_cap
        self._timeout_s = timeout_s
        self._half_life_s = trending_half_life_s
        self._dedup_window_s = dedup_window_s
        self._append_script = client.register_script(_APPEND_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> HistoryStore:
        timeout_s = settings.redis_timeout_ms / 1000.0
        return cls(
            connect(settings.redis_url, timeout_s=timeout_s),
            prefix=settings.redis_prefix,
            history_cap=settings.history_cap,
            timeout_s=timeout_s,
            trending_half_life_s=settings.trending_half_life_s,
        )

    @property
    def client(self) -> Redis:
        """The underlying client (shared with the item catalog)."""
        return self._client

    def _key(self, kind: str, user_id: str = "") -> str:
        return f"{self._prefix}{kind}:{user_id}" if user_id else f"{self._prefix}{kind}"

    async def append(self, events: Sequence[tuple[str, StoredEvent]]) -> tuple[int, int]:
        """(accepted, duplicates). All or nothing, atomic in Redis (one Lua script); an event_id already
        stored for the user is acknowledged as duplicate, not stored twice, also within the batch. Also adds
        to the user's seen-set and to the recency-weighted trending counts. Raises ValueError on an invalid
        event (nothing is written) and StoreUnavailable.

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
            self._key("seq"),
            self._key("trend"),
            self._key("trend:meta"),
            self._key("batch", uuid.uuid4().hex),
        ]
        for user_id in users:
            keys += [self._key("h", user_id), self._key("s", user_id), self._key("e", user_id)]
        head = [
            self._cap,
            repr(self._half_life_s),
            self._dedup_window_s,
            math.ceil(self._timeout_s) + _BATCH_RESULT_GRACE_S,
            _RESCALE_EXPONENT,
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
                    pipe.zrange(self._key("h", user_id), -n, -1, withscores=True)
                if with_seen:
                    pipe.smembers(self._key("s", user_id))
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

        Trending counts are an anonymous aggregate over all users and are left alone."""
        keys = [self._key(kind, user_id) for kind in ("h", "s", "e")]
        return bool(await redis_call("forget", self._client.delete(*keys), self._timeout_s))

    async def trending(self, k: int, exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Top-k items by recency-weighted event count, expressed as the number of events at the time of
        the latest ingested event that carries the same weight (an event one half-life older counts 0.5)."""
        if k <= 0:
            return []
        excluded = exclude if isinstance(exclude, set | frozenset) else set(exclude)

        async def run() -> list:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrevrange(self._key("trend"), 0, k + len(excluded) - 1, withscores=True)
                pipe.hmget(self._key("trend:meta"), "ref", "latest")
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

    async def ping(self) -> None:
        """Raises StoreUnavailable unless Redis answers within the deadline."""
        await redis_call("ping", self._client.ping(), self._timeout_s)

    async def close(self) -> None:
        await self._client.aclose()
