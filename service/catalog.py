"""The item table: ids ↔ rows, texts, vectors; loaded from the model dir, extended online, in memory only
(``service.catalog_sync`` shares its upserts between replicas through Redis).

Concurrency: the arrays are never written in place. An upsert builds a new snapshot (ids, texts, index,
vectors) and swaps it in with one attribute assignment, so the inference thread keeps reading the arrays
it already holds. Rows are only ever appended, never moved or removed, so a row number obtained from
``index_of`` is valid in ``vectors`` read at that moment or any time later.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from models.model_dir import ItemTable


@dataclass(frozen=True, slots=True)
class _Snapshot:
    item_ids: list[str]
    texts: list[str]
    index: dict[str, int]
    vectors: np.ndarray  # [N, D] float32, read-only
    offsets: np.ndarray  # [N, D] float32, read-only
    revision: int = 0  # upserts applied so far


@dataclass(frozen=True, slots=True)
class Changes:
    """What a caller that kept results per row must redo since the revision it last saw."""

    vectors: np.ndarray  # the current snapshot's
    revision: int
    updated: np.ndarray  # rows that existed at the caller's revision and whose vector changed since


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
        return len(self._state.item_ids)

    def index_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """int64 rows, -1 for unknown ids."""
        index = self._state.index
        return np.fromiter(map(index.get, item_ids, repeat(-1)), dtype=np.int64, count=len(item_ids))

    def known_rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """int64 rows of the ids in the catalog, in their order (unknown ids dropped)."""
        rows = self.index_of(item_ids)
        return rows[rows >= 0]

    @property
    def item_ids(self) -> list[str]:
        """Catalog order; do not mutate (it is shared with the current snapshot)."""
        return self._state.item_ids

    @property
    def vectors(self) -> np.ndarray:
        """[N, D] float32, read-only; replaced (never mutated) on upsert."""
        return self._state.vectors

    def texts_of(self, item_ids: Sequence[str]) -> list[str | None]:
        """Each item's text, None for an unknown id; read from one snapshot."""
        state = self._state
        return [None if (row := state.index.get(i)) is None else state.texts[row] for i in item_ids]

    def get(self, item_id: str) -> tuple[str, np.ndarray] | None:
        """(text, vector) or None."""
        state = self._state
        row = state.index.get(item_id)
        return None if row is None else (state.texts[row], state.vectors[row])

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
            revision = old.revision + 1
            if updates:
                vectors = vectors.copy()
                rows = np.fromiter(updates, dtype=np.int64, count=len(updates))
                vectors[rows] = np.stack(list(updates.values()))
                self._updated.append((revision, rows))
            if new_vectors:
                vectors = np.concatenate([vectors, np.stack(new_vectors)])
                offsets = _frozen(
                    np.concatenate([offsets, np.zeros((len(new_vectors), self.dim), np.float32)])
                )
            self._state = _Snapshot(ids, texts, index, _frozen(vectors), offsets, revision)
            return len(updates) + len(new_vectors)

    def changes_since(self, revision: int) -> Changes:
        """The current vectors and revision, and the rows updated after ``revision`` (rows appended since
        are the ones past the caller's row count): read from one snapshot."""
        state = self._state
        rows = [r for rev, r in self._updated if revision < rev <= state.revision]
        updated = np.unique(np.concatenate(rows)) if rows else np.empty(0, dtype=np.int64)
        return Changes(state.vectors, state.revision, updated)
