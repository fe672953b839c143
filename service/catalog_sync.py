"""Sharing the item catalog's online upserts between replicas (and across restarts) through Redis.

``publish`` writes each item's *text* vector (float32 bytes) and text to the hash
``{prefix}items:{model_version}`` (on a Redis Cluster the version is a hash tag, so the four keys of a
version share one slot: ``service/redis_keys.py``) and bumps the revision ``…:rev``; the log ``…:log`` maps
each item id to the revision of its last publication (one atomic script,
``service/lua/catalog_publish.lua``). ``sync`` pulls the ids logged after the last revision it saw. A random
``…:epoch`` is set with the first revision, so a replica notices when Redis lost the log (a restart without
persistence, a flush) and re-reads it from the start instead of waiting for revisions it has already
counted. The keys are never evicted by design: run Redis with ``maxmemory-policy noeviction``.

Every key carries the model version, so vectors of another model never mix in; each replica adds its
own model's ID-embedding offset when it applies an item (``ItemCatalog.upsert_local``). Calls run under
the shared connection's deadline (``CLICKRANK_REDIS_TIMEOUT_MS``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from redis.asyncio.client import Pipeline

from service.catalog import ItemCatalog
from service.lua_scripts import Layout, LuaScript
from service.redis_conn import RedisConnection
from service.redis_keys import KeyLayout

log = logging.getLogger(__name__)

_SYNC_CHUNK = 2000
PUBLISH = LuaScript.packaged(
    "catalog_publish",
    keys=Layout(head=("items", "revision", "log", "epoch")),
    args=Layout(head=("epoch",), group_name="item", group=("id", "blob")),
)
"""``service/lua/catalog_publish.lua``: one publication, atomic."""


class _Keys(NamedTuple):
    """The shared keys of one model version; the field names are PUBLISH's key slots."""

    items: str  # hash: item id → text vector (float32 bytes) + text (UTF-8)
    revision: str  # counter of publications
    log: str  # sorted set: item id → revision of its last publication
    epoch: str  # random id of the log, set with its first revision


class CatalogSync:
    """Publishes ``catalog``'s upserts to Redis and applies those of other replicas; holds the position
    (epoch, revision) of the shared log that this replica has applied."""

    def __init__(self, redis: RedisConnection, catalog: ItemCatalog, *, prefix: str = "cr:") -> None:
        self.catalog = catalog
        self._redis = redis
        base = KeyLayout(prefix, cluster=redis.cluster).catalog(catalog.model_version)
        self._keys = _Keys(base, f"{base}:rev", f"{base}:log", f"{base}:epoch")
        self._revision = 0  # last revision of the shared log applied by sync
        self._epoch: bytes | None = None  # identifies the shared log that _revision counts in

    async def publish(self, items: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """Persist (item_id, text, text_vector) in Redis for every replica and a restart (one atomic script),
        then apply them locally. Raises ValueError (nothing written) or StoreUnavailable."""
        items = self.catalog.validate(items)
        if not items:
            return
        published = [
            {"id": item_id, "blob": vec.astype("<f4").tobytes() + text.encode("utf-8")}
            for item_id, text, vec in items
        ]
        keys = PUBLISH.keys.build(self._keys._asdict())
        args = PUBLISH.args.build({"epoch": uuid.uuid4().hex}, published)  # the epoch, if a new log starts
        await self._redis.run_script("catalog_publish", PUBLISH, keys, args)
        self.catalog.upsert_local(items)

    async def published_texts(self) -> dict[str, str]:
        """Every item published for this model version: item id → text (what another version re-encodes)."""
        blobs = await self._redis.call("catalog_sync", lambda r: r.hgetall(self._keys.items))
        return self._texts({item_id.decode(): blob for item_id, blob in blobs.items()})

    async def published_texts_of(self, item_ids: Sequence[str]) -> dict[str, str]:
        """The published text of each of ``item_ids`` that has one."""
        blobs = await self._redis.call("catalog_sync", lambda r: r.hmget(self._keys.items, list(item_ids)))
        return self._texts(dict(zip(item_ids, blobs, strict=True)))

    def _texts(self, blobs: dict[str, bytes | None]) -> dict[str, str]:
        width = 4 * self.catalog.dim
        return {i: blob[width:].decode("utf-8") for i, blob in blobs.items() if blob and len(blob) >= width}

    async def sync(self) -> int:
        """Apply the items published by any replica since the last sync; returns how many changed here.

        Reads the log in chunks until it is caught up. If the shared revision went backwards (Redis lost
        its data), everything still there is re-read."""
        applied = 0
        while True:
            n, more = await self._sync_chunk()
            applied += n
            if not more:
                return applied

    async def _sync_chunk(self) -> tuple[int, bool]:
        keys, catalog = self._keys, self.catalog

        def changes(pipe: Pipeline) -> None:
            pipe.get(keys.epoch)
            pipe.zrangebyscore(
                keys.log, f"({self._revision}", "+inf", start=0, num=_SYNC_CHUNK, withscores=True
            )

        epoch, changed = await self._redis.pipeline("catalog_sync", changes, transaction=True)
        if epoch is not None and epoch != self._epoch:
            if self._epoch is not None:
                log.warning("the shared item log of model %s was reset: re-reading it", catalog.model_version)
            self._epoch, self._revision = epoch, 0
            return 0, True
        if not changed:
            return 0, False
        more = len(changed) == _SYNC_CHUNK
        if more:  # never split one revision across chunks: drop the last, possibly partial, revision
            last = changed[-1][1]
            if changed[0][1] == last:  # one publication larger than a chunk: read it whole
                changed = await self._redis.call(
                    "catalog_sync", lambda r: r.zrangebyscore(keys.log, last, last, withscores=True)
                )
            else:
                changed = [entry for entry in changed if entry[1] != last]
        ids = [member.decode() for member, _ in changed]
        blobs = await self._redis.call("catalog_sync", lambda r: r.hmget(keys.items, ids))
        items = []
        width = 4 * catalog.dim
        for item_id, blob in zip(ids, blobs, strict=True):
            if blob is None or len(blob) < width:
                log.warning(
                    "published item %r of model %s is missing or malformed", item_id, catalog.model_version
                )
                continue
            items.append((item_id, blob[width:].decode("utf-8"), np.frombuffer(blob[:width], dtype="<f4")))
        applied = catalog.upsert_local(items)
        self._revision = int(changed[-1][1])  # the log is read in revision order
        return applied, more
