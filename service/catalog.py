"""The item table: ids ↔ rows, texts, vectors; loaded from the model dir, extended online, in memory only
(``service.catalog_sync`` shares its upserts between replicas through Redis).

Concurrency: a vectors array once handed out is never written. An upsert swaps in a new snapshot with
one attribute assignment, so the inference thread keeps reading the arrays it already holds. Rows are only
ever appended, never moved or removed, so a row number obtained from ``index_of`` is valid in ``vectors``
read at that moment or any time later.

Cost: appending k items costs O(k), whatever the catalog's size. The vectors live in a buffer with room to
grow (``HEADROOM``); a snapshot's ``vectors`` is a read-only view of its first ``size`` rows, so rows
appended past it are never seen by an array already handed out. The ids, texts and the id → row index are
shared by every snapshot and only appended to (an id is in the index once the current vectors hold its
row; a known item's new text replaces its old one in place). Two things copy the vectors: the buffer's
growth, once every size / ``HEADROOM`` appended items, and an update of a known item's vector (a
copy-on-write of the rows in use). Upserts run on the event loop; when every upsert copied everything, one
single-item upsert held it for 0.3–1.2 s at a million items (``docs/benchmarks.md``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from models.model_dir import ItemTable

HEADROOM = 8
"""The vectors' buffer grows by a 1/``HEADROOM`` of its rows (at least ``MIN_GROWTH``) when an append
overflows it: 12.5 % more memory at most, and one copy of the catalog every size / 8 appended items."""
MIN_GROWTH = 1024


@dataclass(frozen=True, slots=True)
class _Snapshot:
    vectors: np.ndarray  # the first rows of a [capacity, D] float32 buffer (``backing``), read-only
    revision: int = 0  # upserts applied so far


@dataclass(frozen=True, slots=True)
class Changes:
    """What a caller that kept results per row must redo since the revision it last saw."""

    vectors: np.ndarray  # the current snapshot's
    revision: int
    updated: np.ndarray  # rows that existed at the caller's revision and whose vector changed since


def backing(vectors: np.ndarray) -> np.ndarray:
    """The buffer a catalog's ``vectors`` array views. Two arrays handed out on one buffer hold the same
    rows up to the shorter one's length: only appends happened between them (an update of a row, or the
    buffer's growth, makes a new buffer). Its length is the catalog's capacity."""
    return vectors if vectors.base is None else vectors.base


def _snapshot(buffer: np.ndarray, size: int, revision: int) -> _Snapshot:
    """The first ``size`` rows of ``buffer``: rows below ``size`` are never written again."""
    view = buffer[:size]
    view.flags.writeable = False
    return _Snapshot(view, revision)


def _buffer(vectors: np.ndarray, capacity: int) -> np.ndarray:
    """A new [capacity, D] buffer starting with ``vectors``."""
    buffer = np.empty((capacity, vectors.shape[1]), np.float32)
    buffer[: len(vectors)] = vectors
    return buffer


def _capacity(rows: int) -> int:
    return rows + max(rows // HEADROOM, MIN_GROWTH)


class ItemCatalog:
    """Item table of one model version (see the module docstring for the concurrency contract)."""

    def __init__(
        self,
        item_ids: list[str],
        texts: list[str],
        vectors: np.ndarray,
        id_offsets: np.ndarray,
        model_version: str,
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
        self._item_ids, self._texts, self._index = list(item_ids), list(texts), index
        self._offsets = np.array(id_offsets, np.float32)  # own copy; rows appended later have none
        self._offsets.flags.writeable = False
        self._state = _snapshot(_buffer(vectors, _capacity(len(vectors))), len(vectors), 0)
        self._write_lock = threading.Lock()
        self._updated: list[tuple[int, np.ndarray]] = []  # (revision, rows whose vector it changed)

    @classmethod
    def from_table(cls, table: ItemTable, model_version: str) -> ItemCatalog:
        """The catalog of a loaded model directory (``ServedModel.items``); a ValueError says what is
        inconsistent."""
        try:
            return cls(
                table.item_ids,
                table.texts,
                table.vectors,
                table.id_offsets,
                model_version,
            )
        except ValueError as exc:
            raise ValueError(f"inconsistent item table: {exc}") from None

    def __len__(self) -> int:
        return len(self._state.vectors)

    def index_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """int64 rows, -1 for unknown ids."""
        index = self._index
        return np.fromiter(map(index.get, item_ids, repeat(-1)), dtype=np.int64, count=len(item_ids))

    def known_rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """int64 rows of the ids in the catalog, in their order (unknown ids dropped)."""
        rows = self.index_of(item_ids)
        return rows[rows >= 0]

    @property
    def item_ids(self) -> list[str]:
        """Catalog order; do not mutate. Shared and appended to by later upserts: a row of ``vectors`` read
        before or after this call has its id here."""
        return self._item_ids

    @property
    def revision(self) -> int:
        """Upserts applied so far (``changes_since`` tells what they changed)."""
        return self._state.revision

    @property
    def vectors(self) -> np.ndarray:
        """[N, D] float32, read-only; replaced (never mutated) on upsert."""
        return self._state.vectors

    def texts_of(self, item_ids: Sequence[str]) -> list[str | None]:
        """Each item's text, None for an unknown id."""
        rows = self.index_of(item_ids).tolist()
        return [None if row < 0 else self._texts[row] for row in rows]

    def get(self, item_id: str) -> tuple[str, np.ndarray] | None:
        """(text, vector) or None."""
        row = self._index.get(item_id)
        return None if row is None else (self._texts[row], self._state.vectors[row])

    def validate(self, items: Sequence[tuple[str, str, np.ndarray]]) -> list[tuple[str, str, np.ndarray]]:
        """(item_id, text, float32 vector) of each item; a ValueError names the first invalid one."""
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

    def upsert_local(self, items: Sequence[tuple[str, str, np.ndarray]]) -> int:
        """Add or update (item_id, text, text_vector) in this process only; returns how many items changed.
        A known item's stored vector is text_vector + its ID offset, a new item's the text vector. Invalid
        input raises, changes nothing."""
        return self._apply(self.validate(items))

    def _apply(self, items: list[tuple[str, str, np.ndarray]]) -> int:
        """Swap in a snapshot with the validated items; returns how many items changed. New items cost
        O(their number); an update of a known item's vector copies the rows in use (module docstring)."""
        if not items:
            return 0
        with self._write_lock:
            old, index, offsets = self._state, self._index, self._offsets
            new: dict[str, tuple[str, np.ndarray]] = {}  # item id → (text, vector), in arrival order
            texts: dict[int, str] = {}
            updates: dict[int, np.ndarray] = {}
            for item_id, text, vec in items:
                row = index.get(item_id)
                if row is None:
                    new[item_id] = (text, vec)
                    continue
                texts[row] = text  # the last of an id's entries wins
                updates[row] = vec + offsets[row] if row < len(offsets) else vec
            texts = {row: text for row, text in texts.items() if text != self._texts[row]}
            updates = {row: vec for row, vec in updates.items() if not np.array_equal(vec, old.vectors[row])}
            if not (new or texts or updates):
                return 0  # nothing changed (e.g. a replica re-reading its own publication)
            old_size, buffer, revision = len(old.vectors), backing(old.vectors), old.revision + 1
            size = old_size + len(new)
            if updates:  # rows a handed-out array holds change: copy-on-write
                buffer = _buffer(old.vectors, max(len(buffer), _capacity(size)))
                rows = np.fromiter(updates, dtype=np.int64, count=len(updates))
                buffer[rows] = np.stack(list(updates.values()))
                self._updated.append((revision, rows))
            elif size > len(buffer):
                buffer = _buffer(old.vectors, _capacity(size))
            if new:  # past every handed-out view: written in place
                buffer[old_size:size] = np.stack([vec for _, vec in new.values()])
            for row, text in texts.items():
                self._texts[row] = text
            for item_id, (text, _) in new.items():
                self._item_ids.append(item_id)
                self._texts.append(text)
            # In this order: a row has its id before any vectors array holds it, and is in the index only
            # once the current vectors do.
            self._state = _snapshot(buffer, size, revision)
            index.update(zip(new, range(old_size, size), strict=True))
            return len(new) + len(set(texts) | set(updates))

    def changes_since(self, revision: int) -> Changes:
        """The current vectors and revision, and the rows updated after ``revision`` (rows appended since
        are the ones past the caller's row count): read from one snapshot."""
        state = self._state
        rows = [r for rev, r in self._updated if revision < rev <= state.revision]
        updated = np.unique(np.concatenate(rows)) if rows else np.empty(0, dtype=np.int64)
        return Changes(state.vectors, state.revision, updated)
