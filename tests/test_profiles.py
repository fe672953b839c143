"""User interest profiles through HTTP (ASGI app, real redis-server, the real exported tiny model): a
MovieLens user, a user created only through the API, an unknown user (404), and the segments that
training wrote into the model directory, described by genres."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import app_settings, running_app
from oracle import ModelFiles

from models.data import GENRES, load_dataset
from models.model_dir import SEGMENTS
from models.segments import item_attributes

pytestmark = pytest.mark.anyio
DAY = 86400.0


@pytest.fixture()
async def client(redis_url: str, model_dir: Path) -> Any:
    async with running_app(app_settings(redis_url, model_dir)) as (http, _):
        yield http


def genres_of(files: ModelFiles, item_id: str) -> list[str]:
    return item_attributes(files.texts[files.row[item_id]])


def test_training_wrote_segments_described_by_genres(model_dir: Path) -> None:
    segments = json.loads((model_dir / SEGMENTS).read_text())
    assert len(segments["segments"]) == len(segments["centroids"]) >= 2
    assert sum(s["size"] for s in segments["segments"]) == len(set(load_dataset_users(model_dir)))
    for segment in segments["segments"]:
        assert segment["top_attributes"], segment
        assert {a["attribute"] for a in segment["top_attributes"]} <= set(GENRES)
        assert all(a["share"] >= 0.03 and a["lift"] >= 1 for a in segment["top_attributes"])
    norms = np.linalg.norm(np.asarray(segments["centroids"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)
    assert SEGMENTS in json.loads((model_dir / "manifest.json").read_text())["files"], "checksummed"


def load_dataset_users(model_dir: Path) -> list[str]:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    return load_dataset(manifest["data_dir"]).ratings.user_ids.tolist()


async def test_profile_of_a_movielens_user(
    client: httpx.AsyncClient, model_dir: Path, data_dir: Path
) -> None:
    files = ModelFiles(model_dir)
    ratings = load_dataset(data_dir).ratings
    mine = [i for i, u in enumerate(ratings.user_ids.tolist()) if u == "196"]
    events = [
        {"user_id": "196", "item_id": ratings.item_ids[i], "type": "rate", "value": float(ratings.ratings[i]),
         "timestamp": float(ratings.timestamps[i])}
        for i in mine
    ]  # fmt: skip
    assert (await client.post("/v1/events", json={"events": events})).status_code == 200
    response = await client.get("/v1/users/196/profile")
    assert response.status_code == 200, response.text
    profile = response.json()
    activity = profile["activity"]
    assert activity["events"] == len(events) and activity["by_type"] == {"rate": len(events)}
    assert activity["first_seen"] == min(e["timestamp"] for e in events)
    assert activity["last_seen"] == max(e["timestamp"] for e in events)
    assert activity["events_per_active_day"] == pytest.approx(len(events) / activity["active_days"], abs=1e-3)
    history_genres = {g for e in events for g in genres_of(files, e["item_id"])}
    weights = [i["weight"] for i in profile["interests"]]
    assert {i["attribute"] for i in profile["interests"]} <= history_genres
    assert weights == sorted(weights, reverse=True) and sum(weights) <= 1.0001

    segments = json.loads((model_dir / SEGMENTS).read_text())
    user_vector = files._run(events, files.vectors[:1])[1]
    centroids = np.asarray(segments["centroids"])
    expected = int(np.argmax(centroids @ (user_vector / np.linalg.norm(user_vector))))
    assert profile["segment"] == segments["segments"][expected]

    items = profile["representative_items"]
    assert len(items) == 5 and {i["item_id"] for i in items} <= {e["item_id"] for e in events}
    scores = {e["item_id"]: float(files.vectors[files.row[e["item_id"]]] @ user_vector) for e in events}
    assert [i["item_id"] for i in items] == sorted(scores, key=lambda k: -scores[k])[:5]
    assert all(i["text"] == files.texts[files.row[i["item_id"]]] for i in items)


async def test_profile_of_an_api_user_weights_recent_interests_and_404_for_an_unknown_one(
    client: httpx.AsyncClient, model_dir: Path, catalog: list[str]
) -> None:
    files = ModelFiles(model_dir)
    horror = [i for i in catalog if genres_of(files, i) == ["Horror"]][:6]
    comedy = [i for i in catalog if genres_of(files, i) == ["Comedy"]][:3]
    now = time.time()
    old = [{"user_id": "api-7", "item_id": i, "type": "view", "timestamp": now - 365 * DAY + k}
           for k, i in enumerate(horror)]  # fmt: skip
    kinds = ["click", "purchase", "add_to_cart"]
    recent = [{"user_id": "api-7", "item_id": i, "type": kind, "timestamp": now - 2 * DAY + k}
              for k, (i, kind) in enumerate(zip(comedy, kinds, strict=True))]  # fmt: skip
    unknown = [{"user_id": "api-7", "item_id": "not-in-catalog", "type": "click", "timestamp": now}]
    body = {"events": old + recent + unknown}
    assert (await client.post("/v1/events", json=body)).status_code == 200
    profile = (await client.get("/v1/users/api-7/profile")).json()
    assert profile["activity"]["by_type"] == {"view": 6, "click": 2, "purchase": 1, "add_to_cart": 1}
    assert profile["activity"]["active_days"] == 3
    interests = {i["attribute"]: i["weight"] for i in profile["interests"]}
    assert interests["Comedy"] > 0.9 > interests.get("Horror", 0.0), (
        "three recent events outweigh six a year old"
    )
    assert profile["segment"] is not None
    assert {i["item_id"] for i in profile["representative_items"]} <= set(horror + comedy)

    missing = await client.get("/v1/users/nobody-here/profile")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
