"""Adding and updating catalog items online: encode the texts, mark new items fresh, publish to Redis."""

from __future__ import annotations

from service.catalog_sync import CatalogSync
from service.runtime import OnnxModels, encode_off_loop
from service.store import HistoryStore


class ItemWriter:
    """``POST /v1/items``: the item is ranked by this replica from the very next request, by the others
    once their catalog sync picks the publication up."""

    def __init__(self, models: OnnxModels, sharing: CatalogSync, store: HistoryStore) -> None:
        self._models, self._sharing, self._store = models, sharing, store

    async def upsert(self, texts: dict[str, str]) -> int:
        """Encode and publish ``item id → text``; returns how many items were written."""
        vectors = await encode_off_loop(self._models, list(texts.values()))
        items = [(item_id, text, vectors[i]) for i, (item_id, text) in enumerate(texts.items())]
        rows = self._sharing.catalog.index_of(list(texts))
        new = [item_id for item_id, row in zip(texts, rows, strict=True) if row < 0]
        # Fresh first: a retry after a failed publish still finds the items new (the write is idempotent).
        await self._store.add_fresh(new)
        await self._sharing.publish(items)  # also applies them locally
        return len(items)
