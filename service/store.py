"""Per-user event history, seen-sets, idempotency, trending counts, item-to-item co-visitation and fresh
items in Redis (redis.asyncio).

The key layout, what each key holds and its memory bound are in docs/architecture.md ("Redis keys");
the key names live in ``_KIND`` and ``HistoryStore._key`` only.

``append`` is one Lua script (``service/lua/append.lua``); its KEYS and ARGV slots are named once, in
``APPEND`` (``service/lua_scripts.py`` explains how the script reads them). Every call goes through the
``RedisConnection`` that the store borrows (``service/redis_conn.py``): it has a deadline and raises
``StoreUnavailable`` on a connection error, a timeout or a Redis error.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio.client import Pipeline

from service.lua_scripts import Layout, LuaScript
from service.redis_conn import RedisConnection
from service.schemas.events import ContextEvent

if TYPE_CHECKING:
    from service.settings import Settings

DEDUP_WINDOW_S = 7 * 86400
_BATCH_RESULT_GRACE_S = 5  # a transparent retry happens within the call's deadline; keep results a bit longer
_SEQ_DIGITS = 16
# Trending scores are stored as 2^((t - ref) / half_life); once an event is this many half-lives past
# ref the whole set is rescaled to a new ref, so stored scores stay below ~2^64 per event.
_RESCALE_EXPONENT = 64.0
_OVERFETCH_MAX = 500
"""At most this many extra trending entries are read to make up for excluded (seen) items."""


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


class _KIND:
    """Key kinds (the segment after the prefix), in one place: a Redis Cluster layout changes them here."""

    HISTORY, SEEN, EVENT_IDS = "h", "s", "e"
    TRENDING, TRENDING_META = "trend", "trend:meta"
    COVISIT, COVISIT_REF = "cv", "cvref"  # cv:<item> sorted sets; cvref hash (item → reference time)
    FRESH, EVENT_ITEMS = "fresh", "iseen"
    SEQUENCE, BATCH = "seq", "batch"


APPEND = LuaScript.packaged(
    "append",
    keys=Layout(
        head=("seq", "trend", "trend_meta", "batch", "covisit_ref", "fresh", "event_items"),
        group_name="user",
        group=("history", "seen", "event_ids"),
    ),
    args=Layout(
        head=(
            "history_cap",
            "history_ttl_ms",
            "half_life",
            "dedup_window",
            "batch_ttl",
            "rescale_exponent",
            "covisit_prefix",
            "covisit_window",
            "covisit_size",
            "fresh_size",
        ),
        group_name="event",
        group=("user", "event_id", "timestamp", "item", "payload"),
    ),
)
"""``service/lua/append.lua``: one atomic script per ``append`` call."""


@dataclass(frozen=True, slots=True)
class SourceLists:
    """What ``HistoryStore.candidate_lists`` read for one recommend request."""

    covisit: list[list[tuple[str, float]]]  # per source item, best first; scores comparable within a list
    fresh: list[str]  # newest first
    trending: list[str]  # best first


class HistoryStore:
    """Redis-backed user histories; every public call is one round trip under the connection's deadline."""

    def __init__(
        self,
        redis: RedisConnection,
        *,
        prefix: str = "cr:",
        history_cap: int = 200,
        history_ttl_s: float = 0.0,
        trending_half_life_s: float = 259200.0,
        dedup_window_s: int = DEDUP_WINDOW_S,
        covisit_window: int = 5,
        covisit_size: int = 50,
        fresh_size: int = 200,
    ) -> None:
        if history_cap < 1 or trending_half_life_s <= 0 or dedup_window_s < 1:
            raise ValueError("history_cap, trending_half_life_s and dedup_window_s must be positive")
        if history_ttl_s < 0:
            raise ValueError("history_ttl_s must be >= 0 (0: kept)")
        if covisit_window < 0 or covisit_size < 1 or fresh_size < 1:
            raise ValueError("covisit_window must be >= 0, covisit_size and fresh_size positive")
        self._redis = redis
        self._prefix = prefix
        self._cap = history_cap
        self._ttl_ms = round(history_ttl_s * 1000)
        self._half_life_s = trending_half_life_s
        self._dedup_window_s = dedup_window_s
        self._covisit_window = covisit_window
        self._covisit_size = covisit_size
        self._fresh_size = fresh_size

    @classmethod
    def from_settings(cls, settings: Settings, redis: RedisConnection) -> HistoryStore:
        """The store the settings describe, on ``redis`` (which the caller owns and closes)."""
        return cls(
            redis,
            prefix=settings.redis_prefix,
            history_cap=settings.history_cap,
            history_ttl_s=settings.history_ttl_days * 86400.0,
            trending_half_life_s=settings.trending_half_life_s,
            covisit_window=settings.covisit_window,
            covisit_size=settings.covisit_size,
            fresh_size=settings.fresh_size,
        )

    def _key(self, kind: str, name: str | None = None) -> str:
        """``p kind`` or ``p kind:name`` (``name`` a user or item id; ``""`` gives the bare ``p kind:``)."""
        return f"{self._prefix}{kind}" if name is None else f"{self._prefix}{kind}:{name}"

    async def append(self, events: Sequence[tuple[str, ContextEvent]]) -> tuple[int, int]:
        """(accepted, duplicates). All or nothing, atomic in Redis (one Lua script); an event_id already
        stored for the user is acknowledged as duplicate, not stored twice, also within the batch. Also adds
        to the user's seen-set, the recency-weighted trending counts, the co-visitation sets and the fresh
        items (duplicates count nowhere). With a TTL, a user's keys expire that long after the last call that
        stored an event of theirs. The events are validated records (``ContextEvent``); the script
        still refuses a non-finite timestamp before its first write. Raises StoreUnavailable.

        Each call carries a random token under which its result is cached for a few seconds past the
        deadline, so the client's transparent retry after a lost reply cannot store the batch twice.
        """
        if not events:
            return 0, 0
        users: dict[str, int] = {}
        per_event: list[dict[str, str | int]] = []
        for user_id, event in events:
            value = None if event.value is None else float(event.value)
            payload = json.dumps([event.item_id, event.type, value, event.event_id], separators=(",", ":"))
            per_event.append(
                {
                    "user": users.setdefault(user_id, len(users) + 1),  # the user's key group, 1-based
                    "event_id": event.event_id or "",
                    "timestamp": repr(float(event.timestamp)),
                    "item": event.item_id,
                    "payload": payload,
                }
            )
        fixed_keys = {
            "seq": self._key(_KIND.SEQUENCE),
            "trend": self._key(_KIND.TRENDING),
            "trend_meta": self._key(_KIND.TRENDING_META),
            "batch": self._key(_KIND.BATCH, uuid.uuid4().hex),
            "covisit_ref": self._key(_KIND.COVISIT_REF),
            "fresh": self._key(_KIND.FRESH),
            "event_items": self._key(_KIND.EVENT_ITEMS),
        }
        user_keys = [
            {
                "history": self._key(_KIND.HISTORY, user_id),
                "seen": self._key(_KIND.SEEN, user_id),
                "event_ids": self._key(_KIND.EVENT_IDS, user_id),
            }
            for user_id in users
        ]
        params = {
            "history_cap": self._cap,
            "history_ttl_ms": self._ttl_ms,
            "half_life": repr(self._half_life_s),
            "dedup_window": self._dedup_window_s,
            "batch_ttl": math.ceil(self._redis.timeout_s) + _BATCH_RESULT_GRACE_S,
            "rescale_exponent": _RESCALE_EXPONENT,
            "covisit_prefix": self._key(_KIND.COVISIT, ""),
            "covisit_window": self._covisit_window,
            "covisit_size": self._covisit_size,
            "fresh_size": self._fresh_size,
        }
        accepted, duplicates = await self._redis.run_script(
            "append", APPEND, APPEND.keys.build(fixed_keys, user_keys), APPEND.args.build(params, per_event)
        )
        return int(accepted), int(duplicates)

    async def history(
        self, user_id: str, n: int, *, with_seen: bool = False
    ) -> tuple[list[ContextEvent], set[str] | None]:
        """Last n events by timestamp, newest last, plus the seen-set if asked; one pipelined round trip."""
        n = max(int(n), 0)
        if n == 0 and not with_seen:
            return [], None

        def queue(pipe: Pipeline) -> None:
            if n:
                pipe.zrange(self._key(_KIND.HISTORY, user_id), -n, -1, withscores=True)
            if with_seen:
                pipe.smembers(self._key(_KIND.SEEN, user_id))

        replies = await self._redis.pipeline("history", queue, transaction=False)
        events: list[ContextEvent] = []
        if n and replies[0]:
            # One JSON parse for all members, not one per member (a third of this method's time).
            fields = json.loads(b"[" + b",".join(member[_SEQ_DIGITS:] for member, _ in replies[0]) + b"]")
            events = [
                ContextEvent(
                    item_id=item_id, type=kind, timestamp=float(score), value=value, event_id=event_id
                )
                for (item_id, kind, value, event_id), (_, score) in zip(fields, replies[0], strict=True)
            ]
        seen = {m.decode() for m in replies[-1]} if with_seen else None
        return events, seen

    async def users(self, batch: int = 1000) -> AsyncIterator[list[str]]:
        """Every user with a stored history, ``batch`` or so at a time (``SCAN``: a user stored or erased
        meanwhile may be missed or listed; one listed twice is possible and left to the caller)."""
        head = self._key(_KIND.HISTORY, "")
        cursor: int | None = None
        while cursor != 0:
            cursor, keys = await self._redis.call(
                "scan", lambda r, c=cursor or 0: r.scan(c, match=f"{_glob_escape(head)}*", count=batch)
            )
            if keys:
                yield [key.decode()[len(head) :] for key in keys]

    async def forget(self, user_id: str) -> bool:
        """Delete the user's history, seen-set and event ids; True if there was anything.

        Trending counts, co-visitation and fresh items are anonymous aggregates over all users (no key or
        member names a user) and are left alone."""
        keys = [self._key(kind, user_id) for kind in (_KIND.HISTORY, _KIND.SEEN, _KIND.EVENT_IDS)]
        return bool(await self._redis.call("forget", lambda r: r.delete(*keys)))

    async def trending(self, k: int, exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Top-k items by recency-weighted event count, expressed as the number of events at the time of
        the latest ingested event that carries the same weight (an event one half-life older counts 0.5)."""
        if k <= 0:
            return []
        excluded = exclude if isinstance(exclude, set | frozenset) else set(exclude)

        def queue(pipe: Pipeline) -> None:
            pipe.zrevrange(self._key(_KIND.TRENDING), 0, k + len(excluded) - 1, withscores=True)
            pipe.hmget(self._key(_KIND.TRENDING_META), "ref", "latest")

        rows, (ref, latest) = await self._redis.pipeline("trending", queue, transaction=False)
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

        def queue(pipe: Pipeline) -> None:
            pipe.zadd(key, dict.fromkeys(item_ids, now), nx=True)
            pipe.zremrangebyrank(key, 0, -(self._fresh_size + 1))

        await self._redis.pipeline("fresh", queue, transaction=True)

    async def candidate_lists(
        self, sources: Sequence[str], *, trending: int, exclude: int = 0
    ) -> SourceLists:
        """The co-visitation set of each source item, the fresh items and the top ``trending`` (+ up to
        ``exclude`` more, to make up for excluded ones) trending items: one pipelined round trip."""
        extra = min(exclude, _OVERFETCH_MAX) if trending > 0 else 0

        def queue(pipe: Pipeline) -> None:
            for item_id in sources:
                pipe.zrevrange(self._key(_KIND.COVISIT, item_id), 0, -1, withscores=True)
            pipe.zrevrange(self._key(_KIND.FRESH), 0, self._fresh_size - 1)
            if trending > 0:
                pipe.zrevrange(self._key(_KIND.TRENDING), 0, trending + extra - 1)

        replies = await self._redis.pipeline("candidates", queue, transaction=False)
        covisit = [[(m.decode(), float(s)) for m, s in rows] for rows in replies[: len(sources)]]
        fresh = [m.decode() for m in replies[len(sources)]]
        trend = [m.decode() for m in replies[len(sources) + 1]] if trending > 0 else []
        return SourceLists(covisit=covisit, fresh=fresh, trending=trend)
