"""``clickrank load-items FILE``: add or update catalog items in bulk, as ``POST /v1/items`` does.

The file holds one item per line: JSON ``{"item_id": ..., "text": ...}`` (the ``POST /v1/items`` item) or
``item_id<TAB>text``. Each chunk is validated like the API's items (an invalid line stops the load naming
the line, before anything of its chunk is written), encoded by the model's BERT encoder and published
under the model's version in Redis (``CatalogSync``), so every running replica of that version ranks the
items within ``ITEM_SYNC_INTERVAL_S``; new items also join the fresh items. Resumable: an item already
published with the same text is skipped without encoding, so an interrupted load is simply run again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from models.model_dir import ModelDir
from models.model_store import resolve
from service.bulk import bulk_connection
from service.catalog import ItemCatalog
from service.catalog_sync import CatalogSync
from service.items import ItemWriter
from service.runtime import OnnxModels
from service.schemas.ranking import ItemIn
from service.settings import Settings
from service.store import HistoryStore

CHUNK = 256
"""Items encoded and published per round trip."""


@dataclass(frozen=True)
class ItemsSummary:
    lines: int
    written: int
    skipped: int
    seconds: float

    def line(self, version: str) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"load-items: {self.lines} items for model {version}: {self.written} encoded and published, "
            f"{self.skipped} already there, in {self.seconds:.1f} s ({rate:,.0f} items/s)"
        )


def read_items(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, item id, text) of every non-empty line; ValueError names a line that is not an item."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                if line.lstrip().startswith("{"):
                    item = ItemIn.model_validate_json(line)
                else:
                    item_id, sep, text = line.rstrip("\n").partition("\t")
                    if not sep:
                        raise ValueError("expected a JSON object or item_id<TAB>text")
                    item = ItemIn(item_id=item_id, text=text)
            except (ValidationError, ValueError) as exc:
                reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
                raise ValueError(f"{path}:{lineno}: not an item ({reason})") from None
            yield lineno, item.item_id, item.text


async def load(
    settings: Settings, path: Path, models: OnnxModels, catalog: ItemCatalog
) -> tuple[int, int, int]:
    """Publish every item of ``path``; returns (lines, written, skipped)."""
    total = sum(1 for line in path.open(encoding="utf-8") if line.strip())
    lines = written = skipped = 0
    async with bulk_connection(settings, "run the load again: items already published are skipped") as redis:
        sharing = CatalogSync(redis, catalog, prefix=settings.redis_prefix)
        writer = ItemWriter(models, sharing, HistoryStore.from_settings(settings, redis))
        chunk: dict[str, str] = {}
        with tqdm(total=total, unit="item", desc="load-items", disable=None) as bar:
            for _, item_id, text in read_items(path):
                chunk[item_id] = text
                lines += 1
                if len(chunk) == CHUNK:
                    w, s = await _publish(sharing, writer, chunk)
                    written, skipped = written + w, skipped + s
                    bar.update(len(chunk))
                    chunk = {}
            if chunk:
                w, s = await _publish(sharing, writer, chunk)
                written, skipped = written + w, skipped + s
                bar.update(len(chunk))
    return lines, written, skipped


async def _publish(sharing: CatalogSync, writer: ItemWriter, chunk: dict[str, str]) -> tuple[int, int]:
    published = await sharing.published_texts_of(list(chunk))
    todo = {i: t for i, t in chunk.items() if published.get(i) != t}
    if todo:
        await writer.upsert(todo)
    return len(todo), len(chunk) - len(todo)


def load_items_command(path: str | Path, *, settings: Settings | None = None) -> ItemsSummary:
    """Load the items of ``path`` for the model at ``CLICKRANK_MODEL_DIR`` and print a summary."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    settings = settings or Settings()
    served = ModelDir(resolve(settings.model_dir)).load()
    models = OnnxModels(served, device=settings.device, intra_op_threads=settings.intra_op_threads)
    catalog = ItemCatalog.from_table(served.items, models.version)
    started = time.perf_counter()
    lines, written, skipped = asyncio.run(load(settings, path, models, catalog))
    summary = ItemsSummary(lines, written, skipped, time.perf_counter() - started)
    print(summary.line(models.version))
    return summary
