"""Retraining from the service's own events: events posted through HTTP (several types) are exported from
a real redis-server by ``clickrank export-events``, read back by ``models.events_file``, and a real tiny
model is trained on them beside MovieLens; its manifest (what ``GET /v1/model`` shows) says so."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import app_settings, running_app

from clickrank import cli
from models.data import DataFormatError, load_dataset
from models.events_file import read_events, with_events
from models.model_store import ModelStore
from service.export_events import export_events_command
from service.settings import Settings

KINDS = ("view", "click", "add_to_cart", "purchase", "rate")


def posted_events(catalog: list[str], users: int = 12, per_user: int = 8) -> list[dict[str, Any]]:
    now = time.time()
    out = []
    for u in range(users):
        for k in range(per_user):
            kind = KINDS[(u + k) % len(KINDS)]
            out.append(
                {
                    "user_id": f"api-user-{u}",
                    "item_id": catalog[(7 * u + 3 * k) % 200],
                    "type": kind,
                    "timestamp": now - 1000 * (per_user - k) - u,
                    **({"value": 1 + (u + k) % 5} if kind == "rate" else {}),
                    **({"event_id": f"e-{u}-{k}"} if k % 2 else {}),
                }
            )
    return out


def test_export_writes_every_stored_event_of_every_user_and_type(
    redis_url: str, model_dir: Path, catalog: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = posted_events(catalog)

    async def ingest() -> int:
        async with running_app(app_settings(redis_url, model_dir)) as (client, _):
            return (await client.post("/v1/events", json={"events": events})).status_code

    assert asyncio.run(ingest()) == 200
    out = tmp_path / "events.jsonl"
    summary = export_events_command(out, settings=Settings(redis_url=redis_url))
    assert (summary.users, summary.events) == (12, len(events))
    monkeypatch.setenv("CLICKRANK_REDIS_URL", redis_url)
    assert cli.main(["export-events", "--out", str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_text().count("\n") == len(events)
    monkeypatch.setenv("CLICKRANK_REDIS_URL", "redis://127.0.0.1:1/0")
    assert cli.main(["export-events", "--out", str(tmp_path / "none.jsonl")]) == 2, "no Redis: exit 2"
    assert not (tmp_path / "none.jsonl").exists()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert not (tmp_path / "events.jsonl.partial").exists()
    key = lambda e: (e["user_id"], e["timestamp"], e["item_id"])  # noqa: E731
    assert sorted(lines, key=key) == sorted(events, key=key), "every field of every event, as posted"
    for user in {e["user_id"] for e in lines}:
        stamps = [e["timestamp"] for e in lines if e["user_id"] == user]
        assert stamps == sorted(stamps), "each user's events oldest first"


def test_events_file_is_read_with_types_values_and_unknown_items_counted(
    tmp_path: Path, data_dir: Path
) -> None:
    data = load_dataset(data_dir)
    rows = [
        {"user_id": "a", "item_id": "1", "type": "click", "timestamp": 20.0},
        {"user_id": "a", "item_id": "no-such-item", "type": "view", "timestamp": 21.0},
        {"user_id": "a", "item_id": "2", "type": "rate", "timestamp": 10.5, "value": 4.0},
    ]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    events, report = read_events(path, set(data.item_ids))
    assert events.item_ids.tolist() == ["2", "1"], "sorted by time, the unknown item dropped"
    assert (
        events.event_types().tolist() == [5, 2]
        and events.ratings[0] == 4.0
        and events.ratings[1] != events.ratings[1]
    )
    assert (report.lines, report.used, report.unknown_items) == (3, 2, 1)
    assert report.types == {"click": 1, "rate": 1}

    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"user_id": "a", "type": "jump"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2"):
        read_events(tmp_path / "bad.jsonl", set(data.item_ids))


def test_beside_the_ratings_an_exported_rating_counts_once(tmp_path: Path, data_dir: Path) -> None:
    data = load_dataset(data_dir)
    r = data.ratings
    loaded = {  # what `clickrank load-history` stored, exported back
        "user_id": r.user_ids[0], "item_id": r.item_ids[0], "type": "rate",
        "timestamp": float(r.timestamps[0]), "value": float(r.ratings[0]),
    }  # fmt: skip
    click = {**loaded, "type": "click", "timestamp": float(r.timestamps[-1]) + 60}
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(loaded) + "\n" + json.dumps(click) + "\n")
    merged, report = with_events(data, path, events_only=False)
    assert len(merged.ratings) == len(r) + 1 and report.same_as_a_rating == 1
    assert merged.ratings.event_types()[-1] == 2 and merged.data_hash != data.data_hash
    alone, _ = with_events(data, path, events_only=True)
    assert len(alone.ratings) == 2 and alone.items == data.items


def test_serve_ingest_export_train_promote_swap(
    tmp_path: Path, data_dir: Path, model_dir: Path, redis_url: str, catalog: list[str]
) -> None:
    """The whole loop on events posted through the API: the retrained version is promoted into the store
    the service serves from, swapped in, and ``GET /v1/model`` reports that training."""
    store = tmp_path / "store"
    shutil.copytree(model_dir, store / "20990101T000000Z-00000001")
    ModelStore(store).promote("20990101T000000Z-00000001")
    events = posted_events(catalog, users=30, per_user=12)
    exported = tmp_path / "events.jsonl"
    ratings = load_dataset(data_dir).ratings

    async def loop() -> dict[str, Any]:
        settings = app_settings(redis_url, store, model_poll_interval_s=0.0)
        async with running_app(settings) as (client, _):
            assert (await client.post("/v1/events", json={"events": events})).status_code == 200
            summary = await asyncio.to_thread(export_events_command, exported, settings=settings)
            assert summary.events == len(events)
            train = ["train", "--tiny", "--skip-eval", "--data-dir", str(data_dir), "--model-dir", str(store)]
            assert await asyncio.to_thread(cli.main, [*train, "--events", str(exported)]) == 0
            new_version = ModelStore(store).current_version()
            swapped = await client.post("/v1/model/reload")
            assert swapped.json() == {"version": new_version, "swapped": True}
            answer = await client.post(
                "/v1/predict", json={"user_id": "api-user-3", "candidates": catalog[:5]}
            )
            assert answer.json()["model_version"] == new_version and answer.json()["history_length"] == 12
            return (await client.get("/v1/model")).json()

    info = asyncio.run(loop())
    trained = info["metrics"]["training_data"]
    assert trained["events_file"]["used"] == len(events) and trained["data_set_ratings"] is True
    assert set(trained["event_types"]) == set(KINDS) and trained["events"] == len(events) + len(ratings)
    assert trained["users"] == len(set(ratings.user_ids.tolist())) + 30
    assert len(ModelStore(store).versions()) == 2 and not list(store.glob(".incoming-*"))
    assert cli.main(["train", "--tiny", "--model-dir", str(store), "--events-only"]) == 2, "needs --events"
