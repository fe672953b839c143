"""Every Redis key name of the service (``KeyLayout``), on a single Redis and on a Redis Cluster.

On a cluster a key's hash slot is that of its hash tag (the text between its first ``{`` and the next
``}``), so the layout tags keys that one script or transaction touches together:

- a user's history, seen-set and event ids: ``{u:<user id>}`` (one slot per user; a ``}`` in the id ends
  the tag early, identically for the three keys, and the ``u:`` keeps the tag from being empty);
- the item aggregates (trending and its reference time, the items seen in events, fresh items): one of
  ``AGGREGATE_SHARDS`` shards ``{a<k>}`` chosen by the item id's CRC-32, so no slot takes every event;
- an item's co-visitation set and its reference time: ``{c:<item id>}``;
- the sequence counter and the cached batch results of the users of one slot: a tag of that slot
  (``KeyLayout.slot_tag``);
- the shared catalog of one model version: ``{<version>}`` (a publication is one atomic script; the log
  is read once per sync interval per replica and written per item upsert, not per request).

On a single Redis the names are those of earlier releases (no tags), so stored data stays readable.
docs/architecture.md ("Redis keys") says what each key holds.
"""

from __future__ import annotations

import zlib
from functools import cache

from redis.crc import key_slot

AGGREGATE_SHARDS = 16
"""Shards of the item aggregates on a Redis Cluster (trending, fresh items, items seen in events)."""


class KeyKind:
    """The kind segment that follows the prefix in every key name."""

    HISTORY, SEEN, EVENT_IDS = "h", "s", "e"
    TRENDING, TRENDING_META = "trend", "trend:meta"
    COVISIT, COVISIT_REF = "cv", "cvref"
    FRESH, EVENT_ITEMS = "fresh", "iseen"
    SEQUENCE, BATCH = "seq", "batch"
    ITEMS = "items"


@cache
def _slot_tags() -> tuple[str, ...]:
    """For each of the 16,384 hash slots, the shortest decimal string that hashes to it."""
    tags: list[str | None] = [None] * 16384
    missing, n = 16384, 0
    while missing:
        slot = key_slot(str(n).encode())
        if tags[slot] is None:
            tags[slot] = str(n)
            missing -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


class KeyLayout:
    """The key names under ``prefix`` (no ``{`` or ``}``: Settings checks), tagged if ``cluster``."""

    def __init__(self, prefix: str, *, cluster: bool) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain { or } (hash tags)")
        self.prefix, self.cluster = prefix, cluster
        if cluster:
            _slot_tags()  # ~0.1 s of CPU, here at start-up rather than in the first append's event loop turn

    def user(self, kind: str, user_id: str) -> str:
        """One of a user's keys (``KeyKind.HISTORY``, ``SEEN``, ``EVENT_IDS``)."""
        return f"{self.prefix}{kind}:{{u:{user_id}}}" if self.cluster else f"{self.prefix}{kind}:{user_id}"

    def user_of(self, history_key: str) -> str:
        """The user id of a history key (as ``SCAN`` over ``history_match`` lists them)."""
        head = self.user(KeyKind.HISTORY, "")
        if self.cluster:
            return history_key[len(head) - 1 : -1]
        return history_key[len(head) :]

    def history_match(self) -> str:
        """A ``SCAN MATCH`` pattern of every history key."""
        head = self.user(KeyKind.HISTORY, "")
        escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in (head[:-1] if self.cluster else head))
        return f"{escaped}*"

    def shard_of(self, item_id: str) -> int:
        """The aggregate shard of an item (0 on a single Redis)."""
        return zlib.crc32(item_id.encode()) % AGGREGATE_SHARDS if self.cluster else 0

    def aggregate(self, kind: str, shard: int = 0) -> str:
        """An item aggregate (``TRENDING``, ``TRENDING_META``, ``FRESH``, ``EVENT_ITEMS``) or one shard."""
        return f"{self.prefix}{kind}:{{a{shard}}}" if self.cluster else f"{self.prefix}{kind}"

    def aggregate_shards(self, kind: str) -> list[str]:
        """Every shard of an aggregate: one key on a single Redis."""
        return [self.aggregate(kind, k) for k in range(AGGREGATE_SHARDS if self.cluster else 1)]

    def covisit(self, item_id: str) -> str:
        """The co-visitation set of an item (what followed it)."""
        kind = KeyKind.COVISIT
        return f"{self.prefix}{kind}:{{c:{item_id}}}" if self.cluster else f"{self.prefix}{kind}:{item_id}"

    def covisit_ref(self, item_id: str | None = None) -> str:
        """The reference time of an item's co-visitation set: a string key per item on a cluster, a field
        of one hash (``item_id`` None) on a single Redis."""
        if self.cluster:
            return f"{self.prefix}{KeyKind.COVISIT_REF}:{{c:{item_id}}}"
        return f"{self.prefix}{KeyKind.COVISIT_REF}"

    def slot(self, key: str) -> int:
        return key_slot(key.encode())

    def slot_tag(self, slot: int) -> str:
        """A hash tag of ``slot`` (``{...}``); empty on a single Redis."""
        return f"{{{_slot_tags()[slot]}}}" if self.cluster else ""

    def sequence(self, slot: int = 0) -> str:
        """The counter of history members (on a cluster, of the users of ``slot``)."""
        return f"{self.prefix}{KeyKind.SEQUENCE}{self.slot_tag(slot)}"

    def batch(self, token: str, slot: int = 0) -> str:
        """The cached result of one append call (on a cluster, of its part in ``slot``)."""
        return f"{self.prefix}{KeyKind.BATCH}:{self.slot_tag(slot)}{token}"

    def catalog(self, model_version: str) -> str:
        """The shared catalog hash of a model version; its revision, log and epoch add ``:rev`` ... to it."""
        tagged = f"{{{model_version}}}" if self.cluster else model_version
        return f"{self.prefix}{KeyKind.ITEMS}:{tagged}"
