"""``clickrank load-items`` against a real redis-server and the real exported model: a file of JSON and
tab-separated items is encoded and published, a running service ranks them after its catalog sync, a
second run skips what is there, and an invalid line stops the load naming it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from helpers import app_settings, running_app

from clickrank import cli
from service.load_items import load_items_command
from service.settings import Settings


def write_items(path: Path, n: int, text: str = "Bulk Movie {k} (2030) | Drama") -> list[str]:
    ids = [f"bulk-{k}" for k in range(n)]
    lines = [
        json.dumps({"item_id": i, "text": text.format(k=k)}) if k % 2 else f"{i}\t{text.format(k=k)}"
        for k, i in enumerate(ids)
    ]
    path.write_text("\n".join(lines) + "\n")
    return ids


def test_load_items_publishes_resumes_and_a_running_service_ranks_them(
    tmp_path: Path, redis_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(redis_url=redis_url, model_dir=model_dir, device="cpu")
    path = tmp_path / "items.txt"
    ids = write_items(path, 300)  # more than one chunk of 256
    first = load_items_command(path, settings=settings)
    assert (first.lines, first.written, first.skipped) == (300, 300, 0)
    again = load_items_command(path, settings=settings)
    assert (again.written, again.skipped) == (0, 300), "resumable: what is published is skipped"
    write_items(path, 300, text="Bulk Movie {k} (2031) | Comedy")
    changed = load_items_command(path, settings=settings)
    assert changed.written == 300

    async def ranked() -> tuple[dict, dict]:
        async with running_app(app_settings(redis_url, model_dir)) as (client, _):
            item = (await client.get(f"/v1/items/{ids[7]}")).json()
            body = {"user_id": "bulk-user", "candidates": ids[:50]}
            return item, (await client.post("/v1/predict", json=body)).json()

    item, predicted = asyncio.run(ranked())
    assert item == {"item_id": "bulk-7", "text": "Bulk Movie 7 (2031) | Comedy"}
    assert predicted["unknown_items"] == [] and len(predicted["predictions"]) == 50

    monkeypatch.setenv("CLICKRANK_REDIS_URL", redis_url)
    monkeypatch.setenv("CLICKRANK_MODEL_DIR", str(model_dir))
    bad = tmp_path / "bad.txt"
    bad.write_text('{"item_id": "ok-1", "text": "fine"}\n{"item_id": "bad id!", "text": "x"}\n')
    assert cli.main(["load-items", str(bad)]) == 2
    assert cli.main(["load-items", str(tmp_path / "missing.txt")]) == 2
