"""Per-user event history, seen-sets, idempotency, trending counts, item-to-item co-visitation and fresh
items in Redis (redis.asyncio), on a single Redis or a Redis Cluster.

What each key holds and its memory bound are in docs/architecture.md ("Redis keys"); the key names live
in ``service/redis_keys.py`` only.

On a single Redis ``append`` is one Lua script (``service/lua/append.lua``): the whole batch, atomic. On a
cluster (the connection says which) it runs in two steps: ``append_users.lua`` once per hash slot of the
batch's users (each slot's part atomic, the event ids deduplicated there), then the item aggregates that
step returned, ``aggregate_shard.lua`` per aggregate shard and ``covisit_apply.lua`` per slot of source
items. The scripts' KEYS and ARGV slots are named once, in the ``Layout``s below (``service/lua_scripts.py``
explains how a script reads them). Every call goes through the ``RedisConnection`` that the store borrows
(``service/redis_conn.py``): it has a deadline and raises ``StoreUnavailable`` on a connection error, a
timeout or a Redis error.
"""

from __future__ import annotations

import heapq
import json
import math
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import orjson
from redis.asyncio.client import Pipeline

from service.lua_scripts import Layout, LuaScript
from service.multiplex import Command
from service.redis_conn import RedisConnection, ScriptCall
from service.redis_keys import KeyKind, KeyLayout
from service.schemas.events import ContextEvent, StoredEvent

if TYPE_CHECKING:
    from service.settings import Settings

DEDUP_WINDOW_S = 7 * 86400
_BATCH_RESULT_GRACE_S = 5  # a transparent retry happens within the call's deadline; keep results a bit longer
_SEQ_DIGITS = 16
# Trending scores are stored as 2^((t - ref) / half_life); once an event is this many half-lives past
# ref the whole set is rescaled to a new ref, so stored scores stay below ~2^64 per event.
_RESCALE_EXPONENT = 64.0
TRENDING_OVERFETCH_MAX = 500
"""At most this many extra trending entries are read to make up for excluded (seen) items."""


def trending_depth(trending: int, exclude: int) -> int:
    """How many trending entries a read of the top ``trending`` takes, with up to ``exclude`` more
    (at most ``TRENDING_OVERFETCH_MAX``) to make up for excluded items."""
    return trending + min(exclude, TRENDING_OVERFETCH_MAX) if trending > 0 else 0


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
    libraries=("aggregates",),
)
"""``service/lua/append.lua``: one atomic script per ``append`` call on a single Redis."""

APPEND_USERS = LuaScript.packaged(
    "append_users",
    keys=Layout(head=("seq", "batch"), group_name="user", group=("history", "seen", "event_ids")),
    args=Layout(
        head=("history_cap", "history_ttl_ms", "dedup_window", "batch_ttl", "covisit_window"),
        group_name="event",
        group=("user", "event_id", "timestamp", "item", "payload"),
    ),
    libraries=("aggregates",),
)
"""``service/lua/append_users.lua``: the users of one hash slot (cluster)."""

AGGREGATE_SHARD = LuaScript.packaged(
    "aggregate_shard",
    keys=Layout(head=("trend", "trend_meta", "fresh", "event_items")),
    args=Layout(
        head=("half_life", "rescale_exponent", "fresh_size"), group_name="event", group=("item", "ts")
    ),
    libraries=("aggregates",),
)
"""``service/lua/aggregate_shard.lua``: one shard of the item aggregates (cluster)."""

COVISIT_APPLY = LuaScript.packaged(
    "covisit_apply",
    keys=Layout(head=(), group_name="source", group=("covisit", "covisit_ref")),
    args=Layout(
        head=("half_life", "rescale_exponent", "covisit_size"),
        group_name="pair",
        group=("source", "item", "t", "d"),
    ),
    libraries=("aggregates",),
)
"""``service/lua/covisit_apply.lua``: the co-visitation pairs of the source items of one slot (cluster)."""


def _scored_range(key: str, start: int, end: int, *, newest_first: bool = False) -> Command:
    """``Z[REV]RANGE key start end WITHSCORES``, read back by ``_scored``."""
    return ("ZREVRANGE" if newest_first else "ZRANGE", key, start, end, "WITHSCORES")


def _scored_columns(reply: list) -> tuple[list[bytes], list[float]]:
    """(members, scores) of a raw WITHSCORES reply: RESP3 nests ``[member, score]`` pairs with float
    scores, RESP2 alternates members and score strings."""
    if reply and isinstance(reply[0], list):
        return [member for member, _ in reply], [float(score) for _, score in reply]
    return reply[0::2], list(map(float, reply[1::2]))


def _scored(reply: list) -> list[tuple[bytes, float]]:
    """(member, score) pairs of a raw WITHSCORES reply."""
    return list(zip(*_scored_columns(reply), strict=True))


_stored_event = partial(tuple.__new__, StoredEvent)
"""A ``StoredEvent`` from a tuple of its fields, built in C: ``StoredEvent(*fields)`` runs the named
tuple's ``__new__`` in Python (50 events: 33 µs that way, 18 µs this way, measured)."""


@dataclass(frozen=True, slots=True)
class SourceLists:
    """What ``HistoryStore.candidate_lists`` read for one recommend request."""

    covisit: list[list[tuple[str, float]]]  # per source item, best first; scores comparable within a list
    fresh: list[str]  # newest first
    trending: list[str]  # best first


class HistoryStore:
    """Redis-backed user histories; every public call is one round trip under the connection's deadline
    (on a cluster ``append`` takes two, and the trending and fresh lists merged from the shards are reused
    for ``merge_cache_s``)."""

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
        merge_cache_s: float = 1.0,
    ) -> None:
        if history_cap < 1 or trending_half_life_s <= 0 or dedup_window_s < 1:
            raise ValueError("history_cap, trending_half_life_s and dedup_window_s must be positive")
        if history_ttl_s < 0:
            raise ValueError("history_ttl_s must be >= 0 (0: kept)")
        if covisit_window < 0 or covisit_size < 1 or fresh_size < 1 or merge_cache_s < 0:
            raise ValueError(
                "covisit_window, merge_cache_s must be >= 0, covisit_size and fresh_size positive"
            )
        self._redis = redis
        self.keys = KeyLayout(prefix, cluster=redis.cluster)
        self._cap = history_cap
        self._ttl_ms = round(history_ttl_s * 1000)
        self._half_life_s = trending_half_life_s
        self._dedup_window_s = dedup_window_s
        self._covisit_window = covisit_window
        self._covisit_size = covisit_size
        self._fresh_size = fresh_size
        self._merge_cache_s = merge_cache_s if self.keys.cluster else 0.0
        # per merged list ("trending", "fresh"): when it was merged, how many entries were asked, the list
        self._merged: dict[str, tuple[float, int, list[tuple[str, float]]]] = {}

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
            merge_cache_s=settings.shard_merge_cache_s,
        )

    async def append(self, events: Sequence[tuple[str, ContextEvent]]) -> tuple[int, int]:
        """(accepted, duplicates). An event_id already stored for the user is acknowledged as duplicate, not
        stored twice, also within the batch. Also adds to the user's seen-set, the recency-weighted trending
        counts, the co-visitation sets and the fresh items (duplicates count nowhere). With a TTL, a user's
        keys expire that long after the last call that stored an event of theirs. The events are validated
        records (``ContextEvent``); the scripts still refuse a non-finite timestamp before their first
        write. With ``wait_replicas`` on the connection, an answer means that many replicas have the
        histories. Raises StoreUnavailable.

        On a single Redis the call is all or nothing (one script). On a cluster each hash slot's users are
        stored atomically, and the item aggregates follow; a fault part-way raises StoreUnavailable, and a
        retry with the same event ids stores every event once, though the aggregates may then miss the
        events that the failed call had stored (docs/operations.md, "Redis Cluster").

        Each call carries a random token under which its result is cached for a few seconds past the
        deadline, so the client's transparent retry after a lost reply cannot store the batch twice.
        """
        if not events:
            return 0, 0
        if self.keys.cluster:
            return await self._append_cluster(events)
        users: dict[str, int] = {}
        per_event = [
            self._event_args(event, users.setdefault(user_id, len(users) + 1)) for user_id, event in events
        ]
        keys = self.keys
        fixed_keys = {
            "seq": keys.sequence(),
            "trend": keys.aggregate(KeyKind.TRENDING),
            "trend_meta": keys.aggregate(KeyKind.TRENDING_META),
            "batch": keys.batch(uuid.uuid4().hex),
            "covisit_ref": keys.covisit_ref(),
            "fresh": keys.aggregate(KeyKind.FRESH),
            "event_items": keys.aggregate(KeyKind.EVENT_ITEMS),
        }
        params = {
            **self._user_params(),
            "half_life": repr(self._half_life_s),
            "rescale_exponent": _RESCALE_EXPONENT,
            "covisit_prefix": keys.covisit(""),
            "covisit_size": self._covisit_size,
            "fresh_size": self._fresh_size,
        }
        call = (
            APPEND,
            APPEND.keys.build(fixed_keys, map(self._user_keys, users)),
            APPEND.args.build(params, per_event),
        )
        ((accepted, duplicates),) = await self._redis.run_scripts("append", [call], replicated=True)
        return int(accepted), int(duplicates)

    def _event_args(self, event: ContextEvent, user: int) -> dict[str, str | int]:
        """An event's ARGV group; ``user`` is the number of its user's key group (1-based)."""
        value = None if event.value is None else float(event.value)
        return {
            "user": user,
            "event_id": event.event_id or "",
            "timestamp": repr(float(event.timestamp)),
            "item": event.item_id,
            "payload": json.dumps([event.item_id, event.type, value, event.event_id], separators=(",", ":")),
        }

    def _user_keys(self, user_id: str) -> dict[str, str]:
        return {
            "history": self.keys.user(KeyKind.HISTORY, user_id),
            "seen": self.keys.user(KeyKind.SEEN, user_id),
            "event_ids": self.keys.user(KeyKind.EVENT_IDS, user_id),
        }

    def _user_params(self) -> dict[str, str | int]:
        return {
            "history_cap": self._cap,
            "history_ttl_ms": self._ttl_ms,
            "dedup_window": self._dedup_window_s,
            "batch_ttl": math.ceil(self._redis.timeout_s) + _BATCH_RESULT_GRACE_S,
            "covisit_window": self._covisit_window,
        }

    async def _append_cluster(self, events: Sequence[tuple[str, ContextEvent]]) -> tuple[int, int]:
        """``append`` on a cluster: the users' parts per slot, then the aggregates they return."""
        keys, token = self.keys, uuid.uuid4().hex
        parts: dict[int, tuple[dict[str, int], list[dict[str, str | int]]]] = {}
        for user_id, event in events:
            users, per_event = parts.setdefault(keys.slot(keys.user(KeyKind.HISTORY, user_id)), ({}, []))
            per_event.append(self._event_args(event, users.setdefault(user_id, len(users) + 1)))
        params = self._user_params()
        calls: list[ScriptCall] = [
            (
                APPEND_USERS,
                APPEND_USERS.keys.build(
                    {"seq": keys.sequence(slot), "batch": keys.batch(token, slot)},
                    map(self._user_keys, users),
                ),
                APPEND_USERS.args.build(params, per_event),
            )
            for slot, (users, per_event) in parts.items()
        ]
        replies = await self._redis.run_scripts("append", calls, replicated=True)
        accepted = duplicates = 0
        stored: list[tuple[str, str]] = []  # (item, t) of every stored event
        pairs: list[tuple[str, str, str, str]] = []  # co-visitation (src, item, t, d)
        for reply in replies:
            fields = [f.decode() if isinstance(f, bytes) else str(f) for f in reply]
            accepted, duplicates, n = accepted + int(fields[0]), duplicates + int(fields[1]), int(fields[2])
            stored += zip(fields[3 : 3 + 2 * n : 2], fields[4 : 4 + 2 * n : 2], strict=True)
            rest = fields[3 + 2 * n :]
            pairs += zip(rest[0::4], rest[1::4], rest[2::4], rest[3::4], strict=True)
        if stored:
            await self._redis.run_scripts("append_aggregates", self._aggregate_calls(stored, pairs))
            self._merged.clear()  # this replica reads its own writes at once, other replicas' within the TTL
        return accepted, duplicates

    def _aggregate_calls(
        self, stored: list[tuple[str, str]], pairs: list[tuple[str, str, str, str]]
    ) -> list[ScriptCall]:
        keys = self.keys
        shards: dict[int, list[dict[str, str]]] = defaultdict(list)
        for item, t in stored:
            shards[keys.shard_of(item)].append({"item": item, "ts": t})
        decay = {"half_life": repr(self._half_life_s), "rescale_exponent": _RESCALE_EXPONENT}
        shard_params = {**decay, "fresh_size": self._fresh_size}
        calls: list[ScriptCall] = [
            (
                AGGREGATE_SHARD,
                AGGREGATE_SHARD.keys.build(
                    {
                        "trend": keys.aggregate(KeyKind.TRENDING, shard),
                        "trend_meta": keys.aggregate(KeyKind.TRENDING_META, shard),
                        "fresh": keys.aggregate(KeyKind.FRESH, shard),
                        "event_items": keys.aggregate(KeyKind.EVENT_ITEMS, shard),
                    }
                ),
                AGGREGATE_SHARD.args.build(shard_params, rows),
            )
            for shard, rows in shards.items()
        ]
        by_slot: dict[int, tuple[dict[str, int], list[dict[str, str | int]]]] = {}
        for src, item, t, d in pairs:
            sources, rows = by_slot.setdefault(keys.slot(keys.covisit(src)), ({}, []))
            rows.append({"source": sources.setdefault(src, len(sources) + 1), "item": item, "t": t, "d": d})
        covisit_params = {**decay, "covisit_size": self._covisit_size}
        for sources, rows in by_slot.values():
            source_keys = [
                {"covisit": keys.covisit(src), "covisit_ref": keys.covisit_ref(src)} for src in sources
            ]
            calls.append(
                (
                    COVISIT_APPLY,
                    COVISIT_APPLY.keys.build({}, source_keys),
                    COVISIT_APPLY.args.build(covisit_params, rows),
                )
            )
        return calls

    async def history(
        self, user_id: str, n: int, *, with_seen: bool = False
    ) -> tuple[list[StoredEvent], set[str] | None]:
        """Last n events by timestamp, newest last, plus the seen-set if asked; one pipelined round trip."""
        n = max(int(n), 0)
        if n == 0 and not with_seen:
            return [], None

        commands = [_scored_range(self.keys.user(KeyKind.HISTORY, user_id), -n, -1)] if n else []
        if with_seen:
            commands.append(("SMEMBERS", self.keys.user(KeyKind.SEEN, user_id)))
        replies = await self._redis.read("history", commands)
        events: list[StoredEvent] = []
        members, timestamps = _scored_columns(replies[0]) if n else ([], [])
        if members:
            # One JSON parse for all members, not one per member (a third of this method's time), in C.
            fields = orjson.loads(b"[" + b",".join([member[_SEQ_DIGITS:] for member in members]) + b"]")
            item_ids, kinds, values, event_ids = zip(*fields, strict=True)
            columns = zip(item_ids, kinds, timestamps, values, event_ids, strict=True)
            events = list(map(_stored_event, columns))
        seen = {m.decode() for m in replies[-1]} if with_seen else None
        return events, seen

    async def users(self, batch: int = 1000) -> AsyncIterator[list[str]]:
        """Every user with a stored history, ``batch`` or so at a time (``SCAN``: a user stored or erased
        meanwhile may be missed or listed; one listed twice is possible and left to the caller)."""
        async for keys in self._redis.scan("scan", self.keys.history_match(), batch):
            yield [self.keys.user_of(key.decode()) for key in keys]

    async def forget(self, user_id: str) -> bool:
        """Delete the user's history, seen-set and event ids (one slot on a cluster); True if there was
        anything.

        Trending counts, co-visitation and fresh items are anonymous aggregates over all users (no key or
        member names a user) and are left alone."""
        keys = [self.keys.user(kind, user_id) for kind in (KeyKind.HISTORY, KeyKind.SEEN, KeyKind.EVENT_IDS)]
        return bool(await self._redis.call("forget", lambda r: r.delete(*keys)))

    async def trending(self, k: int, exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Top-k items by recency-weighted event count, expressed as the number of events at the time of
        the latest ingested event that carries the same weight (an event one half-life older counts 0.5).
        On a cluster the shards' lists are merged, and the merge reused for ``merge_cache_s`` (until this
        store appends)."""
        if k <= 0:
            return []
        excluded = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        ranked = await self._ranked_trending(k + len(excluded))
        return [(item_id, score) for item_id, score in ranked if item_id not in excluded][:k]

    def _cached(self, name: str, n: int) -> list[tuple[str, float]] | None:
        """The first ``n`` entries of a merged list, if merged with at least ``n`` within the TTL."""
        cached = self._merged.get(name)
        if cached is not None and cached[1] >= n and time.monotonic() - cached[0] < self._merge_cache_s:
            return cached[2][:n]
        return None

    def _remember(self, name: str, n: int, merged: list[tuple[str, float]]) -> list[tuple[str, float]]:
        if self._merge_cache_s > 0:
            self._merged[name] = (time.monotonic(), n, merged)
        return merged

    async def _ranked_trending(self, n: int) -> list[tuple[str, float]]:
        """The top ``n`` trending items with their scores (see ``trending``), best first."""
        if (cached := self._cached("trending", n)) is not None:
            return cached
        trend_keys = self.keys.aggregate_shards(KeyKind.TRENDING)
        meta_keys = self.keys.aggregate_shards(KeyKind.TRENDING_META)

        commands: list[Command] = []
        for trend, meta in zip(trend_keys, meta_keys, strict=True):
            commands += [_scored_range(trend, 0, n - 1, newest_first=True), ("HMGET", meta, "ref", "latest")]
        replies = await self._redis.read("trending", commands)
        shards = [
            (_scored(rows), ref, latest)
            for rows, (ref, latest) in zip(replies[0::2], replies[1::2], strict=True)
        ]
        latest_of_all = max(
            (float(latest) for _, ref, latest in shards if ref is not None and latest is not None),
            default=None,
        )
        ranked: list[tuple[str, float]] = []
        if latest_of_all is not None:
            for rows, ref, latest in shards:
                if ref is None or latest is None:
                    continue
                scale = 2.0 ** ((float(ref) - latest_of_all) / self._half_life_s)
                ranked += [(member.decode(), score * scale) for member, score in rows]
        return self._remember("trending", n, heapq.nlargest(n, ranked, key=lambda entry: entry[1]))

    async def _newest_fresh(self) -> list[tuple[str, float]]:
        """The newest ``fresh_size`` fresh items over the shards, with their time first seen (cluster)."""
        if (cached := self._cached("fresh", self._fresh_size)) is not None:
            return cached

        commands = [
            _scored_range(key, 0, self._fresh_size - 1, newest_first=True)
            for key in self.keys.aggregate_shards(KeyKind.FRESH)
        ]
        replies = await self._redis.read("fresh", commands)
        rows = [(member.decode(), t) for shard in replies for member, t in _scored(shard)]
        return self._remember(
            "fresh", self._fresh_size, heapq.nlargest(self._fresh_size, rows, key=lambda r: r[1])
        )

    async def add_fresh(self, item_ids: Sequence[str]) -> None:
        """Record items new to the catalog as fresh (time first seen = now, kept if already there), keeping
        the newest ``fresh_size`` (per shard on a cluster); one round trip."""
        if not item_ids:
            return
        now = time.time()
        by_shard: dict[int, list[str]] = defaultdict(list)
        for item_id in item_ids:
            by_shard[self.keys.shard_of(item_id)].append(item_id)

        def queue(pipe: Pipeline) -> None:
            for shard, items in by_shard.items():
                key = self.keys.aggregate(KeyKind.FRESH, shard)
                pipe.zadd(key, dict.fromkeys(items, now), nx=True)
                pipe.zremrangebyrank(key, 0, -(self._fresh_size + 1))

        await self._redis.pipeline("fresh", queue, transaction=False)
        self._merged.pop("fresh", None)

    async def candidate_lists(
        self, sources: Sequence[str], *, trending: int, exclude: int = 0, fresh: bool = True
    ) -> SourceLists:
        """The co-visitation set of each source item, the fresh items (unless ``fresh`` is False) and the
        top ``trending`` (+ up to ``exclude`` more, to make up for excluded ones) trending items: one
        pipelined round trip (on a cluster the fresh and trending lists come from the merge cache, or a
        round trip each)."""
        depth = trending_depth(trending, exclude)
        cluster = self.keys.cluster
        commands = [_scored_range(self.keys.covisit(i), 0, -1, newest_first=True) for i in sources]
        if not cluster:
            if fresh:
                commands.append(("ZREVRANGE", self.keys.aggregate(KeyKind.FRESH), 0, self._fresh_size - 1))
            if depth > 0:
                commands.append(("ZREVRANGE", self.keys.aggregate(KeyKind.TRENDING), 0, depth - 1))
        replies = await self._redis.read("candidates", commands) if commands else []
        covisit = [[(m.decode(), s) for m, s in _scored(rows)] for rows in replies[: len(sources)]]
        rest = iter(replies[len(sources) :])
        if cluster:
            fresh_ids = [item_id for item_id, _ in await self._newest_fresh()] if fresh else []
            ranked = await self._ranked_trending(depth) if depth > 0 else []
            trend = [item_id for item_id, _ in ranked]
        else:
            fresh_ids = [m.decode() for m in next(rest)] if fresh else []
            trend = [m.decode() for m in next(rest)] if depth > 0 else []
        return SourceLists(covisit=covisit, fresh=fresh_ids, trending=trend)
