"""The item table: ids ↔ rows, texts, vectors; from the loaded model dir, extended online, shared via Redis.

Concurrency: the arrays are never written in place. An upsert builds a new snapshot (ids, texts, index,
vectors) and swaps it in with one attribute assignment, so the inference thread keeps reading the arrays
it already holds. Rows are only ever appended, never moved or removed, so a row number obtained from
``index_of`` is valid in ``vectors`` read at that moment or any time later.

Sharing: ``publish`` writes each item's *text* vector (float32 bytes) and text to the hash
``{prefix}items:{model_version}`` and bumps the revision ``…:rev``; the log ``…:log`` maps each item id to
the revision of its last publication. ``sync`` pulls the ids logged after the last revision it saw. A
random ``…:epoch`` is set with the first revision, so a replica notices when Redis lost the log (a
restart without persistence, a flush) and re-reads it from the start instead of waiting for revisions
it has already counted. The keys are never evicted by design: run Redis with ``maxmemory-policy
noeviction``.

Every key carries the model version, so vectors of another model never mix in; each replica adds its
own model's ID-embedding offset (``text vector + offset`` for items known at training time).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np
from redis.asyncio import Redis

from models.model_dir import ItemTable
from service.store import redis_call

log = logging.getLogger(__name__)

_SYNC_CHUNK = 2000
_PUBLISH_LUA = r"""#!lua
if redis.call('EXISTS', KEYS[4]) == 0 then redis.call('SET', KEYS[4], ARGV[1]) end
local rev = redis.call('INCR', KEYS[2])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], rev, ARGV[i])
end
return rev
"""


@dataclass(frozen=True, slots=True)
class _Snapshot:
    item_ids: list[str]
    texts: list[str]
    index: dict[str, int]
    vectors: np.ndarray  # [N, D] float32, read-only
    offsets: np.ndarray  # [N, D] float32, read-only


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    array.flags.writeable = False
    return array


class ItemCatalog:
    """Item table of one model version (see the module docstring for the concurrency contract)."""

    def __init__(
        self,
        item_ids: list[str],
        texts: list[str],
        vectors: np.ndarray,
        id_offsets: np.ndarray,
        model_version: str,
        *,
        redis_prefix: str = "cr:",
        timeout_s: float = 1.0,
    ) -> None:
        if vectors.ndim != 2:
            raise ValueError(f"item vectors must be [N, D], got shape {vectors.shape}")
        if id_offsets.shape != vectors.shape:
            raise ValueError(f"id offsets {id_offsets.shape} do not match item vectors {vectors.shape}")
        if not (len(item_ids) == len(texts) == len(vectors)):
            raise ValueError(
                f"{len(item_ids)} ids, {len(texts)} texts and {len(vectors)} vectors differ in count"
            )
        index = {item_id: row for row, item_id in enumerate(item_ids)}
        if len(index) != len(item_ids):
            raise ValueError("duplicate item ids")
        if not np.isfinite(vectors).all() or not np.isfinite(id_offsets).all():
            raise ValueError("item vectors contain NaN or infinity")
        self.model_version = model_version
        self.dim = int(vectors.shape[1])
        vectors, id_offsets = np.array(vectors, np.float32), np.array(id_offsets, np.float32)  # own copies
        self._state = _Snapshot(list(item_ids), list(texts), index, _frozen(vectors), _frozen(id_offsets))
        self._write_lock = threading.Lock()
        self._revision = 0  # last revision of the shared log applied by sync
        self._epoch: bytes | None = None  # identifies the shared log that _revision counts in
        self._timeout_s = timeout_s
        base = f"{redis_prefix}items:{model_version}"
        self._keys = (base, f"{base}:rev", f"{base}:log", f"{base}:epoch")

    @classmethod
    def from_table(
        cls, table: ItemTable, model_version: str, *, redis_prefix: str = "cr:", timeout_s: float = 1.0
    ) -> ItemCatalog:
        """The catalog of a loaded model directory (``ServedModel.items``); a ValueError says what is
        inconsistent."""
        try:
            return cls(
                table.item_ids,
                table.texts,
                table.vectors,
                table.id_offsets,
                model_version,
                redis_prefix=redis_prefix,
                timeout_s=timeout_s,
            )
        except ValueError as exc:
            raise ValueError(f"inconsistent item table: {exc}") from None

    def __len__(self) -> int:
        return len(self._state.item_ids)

    def index_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """int64 rows, -1 for unknown ids."""
        index = self._state.index
        return np.fromiter(map(index.get, item_ids, repeat(-1)), dtype=np.int64, count=len(item_ids))

    @property
    def item_ids(self) -> list[str]:
        """Catalog order; do not mutate (it is shared with the current snapshot)."""
        return self._state.item_ids

    @property
    def vectors(self) -> np.ndarray:
        """[N, D] float32, read-only; replaced (never mutated) on upsert."""
        return self._state.vectors

    def get(self, item_id: str) -> tuple[str, np.ndarray] | None:
        """(text, vector) or None."""
        state = self._state
        row = state.index.get(item_id)
        return None if row is None else (state.texts[row], state.vectors[row])

    def _validate(self, items: Sequence[tuple[str, str, np.ndarray]]) -> list[tuple[str, str, np.ndarray]]:
        out = []
        for i, (item_id, text, vector) in enumerate(items):
            vec = np.asarray(vector, dtype=np.float32)
            if not isinstance(item_id, str) or not item_id or not isinstance(text, str):
                raise ValueError(f"item {i}: item_id must be a non-empty string and text a string")
            if vec.shape != (self.dim,) or not np.isfinite(vec).all():
                raise ValueError(
                    f"item {i} ({item_id}): vector must be {self.dim} finite floats, got {vec.shape}"
                )
            out.append((item_id, text, vec))
        return out

    def upsert_local(self, items: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """Add or update (item_id, text, text_vector) in this process only. A known item's stored vector is
        text_vector + its ID offset, a new item's the text vector. Invalid input raises, changes nothing."""
        self._apply(self._validate(items))

    def _apply(self, items: list[tuple[str, str, np.ndarray]]) -> int:
        """Swap in a snapshot with the validated items; returns how many items changed."""
        if not items:
            return 0
        with self._write_lock:
            old = self._state
            ids, texts, index = list(old.item_ids), list(old.texts), dict(old.index)
            updates: dict[int, np.ndarray] = {}
            new_vectors: list[np.ndarray] = []
            for item_id, text, vec in items:
                row = index.get(item_id)
                if row is None:
                    index[item_id] = len(ids)
                    ids.append(item_id)
                    texts.append(text)
                    new_vectors.append(vec)
                elif row >= len(old.item_ids):  # added earlier in this same call
                    texts[row] = text
                    new_vectors[row - len(old.item_ids)] = vec
                else:
                    vec = vec + old.offsets[row]
                    if text != texts[row] or not np.array_equal(vec, old.vectors[row]):
                        texts[row] = text
                        updates[row] = vec
            if not updates and not new_vectors:
                return 0  # nothing changed (e.g. a replica re-reading its own publication)
            vectors, offsets = old.vectors, old.offsets
            if updates:
                vectors = vectors.copy()
                rows = np.fromiter(updates, dtype=np.int64, count=len(updates))
                vectors[rows] = np.stack(list(updates.values()))
            if new_vectors:
                vectors = np.concatenate([vectors, np.stack(new_vectors)])
                offsets = _frozen(
                    np.concatenate([offsets, np.zeros((len(new_vectors), self.dim), np.float32)])
                )
            self._state = _Snapshot(ids, texts, index, _frozen(vectors), offsets)
            return len(updates) + len(new_vectors)

    async def publish(self, client: Redis, items: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """Persist (item_id, text, text_vector) in Redis for every replica and a restart (one atomic script),
        then apply them locally. Raises ValueError (nothing written) or StoreUnavailable."""
        items = self._validate(items)
        if not items:
            return
        args: list[str | bytes] = [uuid.uuid4().hex]  # the log's epoch, if this starts a new log
        for item_id, text, vec in items:
            args += [item_id, vec.astype("<f4").tobytes() + text.encode("utf-8")]
        script = client.register_script(_PUBLISH_LUA)
        await redis_call("catalog_publish", script(keys=list(self._keys), args=args), self._timeout_s)
        self.upsert_local(items)

    async def sync(self, client: Redis) -> int:
        """Apply the items published by any replica since the last sync; returns how many changed here.

        Reads the log in chunks until it is caught up. If the shared revision went backwards (Redis lost
        its data), everything still there is re-read."""
        applied = 0
        while True:
            n, more = await self._sync_chunk(client)
            applied += n
            if not more:
                return applied

    async def _sync_chunk(self, client: Redis) -> tuple[int, bool]:
        base, _, log_key, epoch_key = self._keys

        async def changes() -> list:
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(epoch_key)
                pipe.zrangebyscore(
                    log_key, f"({self._revision}", "+inf", start=0, num=_SYNC_CHUNK, withscores=True
                )
                return await pipe.execute()

        epoch, changed = await redis_call("catalog_sync", changes(), self._timeout_s)
        if epoch is not None and epoch != self._epoch:
            if self._epoch is not None:
                log.warning("the shared item log of model %s was reset: re-reading it", self.model_version)
            self._epoch, self._revision = epoch, 0
            return 0, True
        if not changed:
            return 0, False
        more = len(changed) == _SYNC_CHUNK
        if more:  # never split one revision across chunks: drop the last, possibly partial, revision
            last = changed[-1][1]
            if changed[0][1] == last:  # one publication larger than a chunk: read it whole
                changed = await redis_call(
                    "catalog_sync",
                    client.zrangebyscore(log_key, last, last, withscores=True),
                    self._timeout_s,
                )
            else:
                changed = [entry for entry in changed if entry[1] != last]
        ids = [member.decode() for member, _ in changed]
        blobs = await redis_call("catalog_sync", client.hmget(base, ids), self._timeout_s)
        items = []
        width = 4 * self.dim
        for item_id, blob in zip(ids, blobs, strict=True):
            if blob is None or len(blob) < width:
                log.warning(
                    "published item %r of model %s is missing or malformed", item_id, self.model_version
                )
                continue
            items.append((item_id, blob[width:].decode("utf-8"), np.frombuffer(blob[:width], dtype="<f4")))
        applied = self._apply(self._validate(items))
        self._revision = int(changed[-1][1])  # the log is read in revision order
        return applied, more
