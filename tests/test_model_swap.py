"""Model versions swapped live, against a real redis-server and real exported models: a store of versions
(``models/model_store.py``), a new version promoted under steady predict load on a real ``clickrank serve``
process (no failed request, the answers switch), corrupt and broken versions refused while the old one
keeps serving, and items added online carried over to the new version."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import app_settings, local_metric, metric, running_app, scraped_metric
from served import Service

from models.model_dir import MANIFEST, RANKER, ModelDir, ModelLoadError
from models.model_store import CURRENT, ModelStore, resolve

V1, V2 = "20990101T000000Z-0000000a", "20990102T000000Z-0000000b"
POLL_S = 0.5


def add_version(store: Path, name: str, source: Path, change: Callable[[Path], None] | None = None) -> Path:
    """A copy of the export ``source`` as version ``name`` of ``store`` (its manifest's version set to
    ``name``), changed by ``change`` before the checksums are written again."""
    target = store / name
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["version"] = name
    (target / MANIFEST).write_text(json.dumps(manifest))
    if change is not None:
        change(target)
        ModelDir(target).write_manifest({k: v for k, v in manifest.items() if k != "files"})
    return target


def nan_weights(version_dir: Path) -> None:
    """A ranker that loads and runs but answers NaN: its largest float initializer set to NaN."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(version_dir / RANKER)
    floats = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(target), np.nan), target.name))
    onnx.save(graph, version_dir / RANKER)


def polling_store(redis_url: str, store: Path) -> dict[str, str]:
    """The settings of a ``clickrank serve`` process serving ``store``'s current version and polling it."""
    return {
        "redis_url": redis_url,
        "model_dir": str(store),
        "device": "cpu",
        "intra_op_threads": "1",
        "redis_timeout_ms": "250",  # the test machine is shared: a slow scheduler is not an outage
        "shed_loop_lag_ms": "0",
        "model_poll_interval_s": str(POLL_S),
    }


@pytest.fixture()
def store(tmp_path: Path, model_dir: Path) -> Iterator[Path]:
    path = tmp_path / "store"
    path.mkdir()
    add_version(path, V1, model_dir)
    ModelStore(path).promote(V1)
    yield path


def test_store_points_atomically_and_refuses_what_is_not_a_version(store: Path, model_dir: Path) -> None:
    s = ModelStore(store)
    assert s.current_version() == V1 and resolve(store) == store / V1 and resolve(model_dir) == model_dir
    add_version(store, V2, model_dir)
    assert s.versions() == [V1, V2]
    s.promote(V2)
    assert (store / CURRENT).read_text() == V2 + "\n" and resolve(store) == store / V2
    assert not list(store.glob(".current-*")), "no temp file left"
    for bad in ("../etc", CURRENT, "missing-version"):
        with pytest.raises(ModelLoadError):
            s.promote(bad)
    broken = add_version(store, "20990103T000000Z-broken", model_dir)
    (broken / RANKER).write_bytes(b"not the exported graph")
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        s.promote(broken.name)
    assert s.current_version() == V2, "a refused promotion leaves current as it was"


@pytest.mark.anyio
async def test_refused_versions_keep_the_old_one_serving_and_online_items_survive_a_swap(
    store: Path, model_dir: Path, redis_url: str, catalog: list[str]
) -> None:
    corrupt = add_version(store, "20990103T000000Z-corrupt", model_dir)
    (corrupt / RANKER).write_bytes((corrupt / RANKER).read_bytes()[:-10])  # after the checksums: corrupt
    failing = add_version(store, "20990104T000000Z-nanranker", model_dir, nan_weights)
    add_version(store, V2, model_dir)
    settings = app_settings(redis_url, store, model_poll_interval_s=0.0)  # reloads by the API only here
    async with running_app(settings) as (client, _):
        item = {"item_id": "added-online-1", "text": "Swap Movie (2099) | Drama, Sci-Fi"}
        assert (await client.post("/v1/items", json={"items": [item]})).status_code == 200
        predict = {"user_id": "u", "candidates": [catalog[0], item["item_id"]]}
        assert (await client.post("/v1/predict", json=predict)).json()["model_version"] == V1
        refused_before = await scraped_metric(client, "clickrank_model_reloads_total", outcome="refused")

        for bad, why in ((corrupt, "checksum mismatch"), (failing, "non-finite")):
            ModelStore(store).point_to(bad.name)
            refused = await client.post("/v1/model/reload")
            assert refused.status_code == 200 and refused.json()["swapped"] is False
            assert refused.json()["version"] == V1 and why in refused.json()["reason"]
            info = (await client.get("/v1/model")).json()
            assert info["version"] == V1 and info["last_refused"]["version"] == bad.name
            assert why in info["last_refused"]["reason"]
            answer = await client.post("/v1/predict", json=predict)
            assert answer.status_code == 200 and answer.json()["model_version"] == V1
        refused_after = await scraped_metric(client, "clickrank_model_reloads_total", outcome="refused")
        assert refused_after - refused_before == 2
        assert await scraped_metric(client, "clickrank_model_info", version=V1) == 1
        assert await scraped_metric(client, "clickrank_model_info", version=failing.name) == 0, "refused"

        ModelStore(store).promote(V2)
        swapped = await client.post("/v1/model/reload")
        assert swapped.status_code == 200 and swapped.json() == {"version": V2, "swapped": True}
        again = (await client.post("/v1/model/reload")).json()
        assert again["version"] == V2 and again["swapped"] is False and "serving already" in again["reason"]
        answer = (await client.post("/v1/predict", json=predict)).json()
        assert answer["model_version"] == V2 and answer["unknown_items"] == []
        assert await scraped_metric(client, "clickrank_model_info", version=V2) == 1
        assert await scraped_metric(client, "clickrank_model_info", version=V1) == 0
        assert {p["item_id"] for p in answer["predictions"]} == {catalog[0], item["item_id"]}


def test_promotion_under_predict_load_fails_no_request_and_switches_within_the_poll(
    tmp_path: Path, store: Path, model_dir: Path, redis_url: str, catalog: list[str]
) -> None:
    add_version(store, V2, model_dir)
    svc = Service(tmp_path, polling_store(redis_url, store))
    svc.start()
    try:
        answers, promoted_at = asyncio.run(_load_with_a_promotion(svc.url, store, catalog))
    finally:
        svc.stop()
    failed = [a for a in answers if a["status"] != 200]
    assert not failed, failed[:3]
    versions = [a["version"] for a in answers]
    assert versions[0] == V1 and versions[-1] == V2
    first_new = min(a["received"] for a in answers if a["version"] == V2)
    assert all(a["version"] == V2 for a in answers if a["sent"] > first_new), (
        "a new request got the old model"
    )
    switch_s = first_new - promoted_at
    during = [a["latency"] for a in answers if promoted_at <= a["sent"] <= first_new + 1.0]
    p99_ms = 1000 * float(np.percentile(during, 99))
    print(f"\nswap under load: {len(answers)} requests, 0 failed, switched {switch_s:.2f} s after the "
          f"promotion (poll {POLL_S} s), p99 during the swap {p99_ms:.1f} ms")  # fmt: skip
    assert switch_s < POLL_S + 15.0, "loading and warming a tiny model takes seconds, even on a busy CI"


def test_two_workers_show_only_the_promoted_version_once_both_swapped(
    tmp_path: Path, store: Path, model_dir: Path, redis_url: str
) -> None:
    """With two workers ``/metrics`` is the multiprocess page, whose gauges cannot drop a label: the
    version both workers retired must read 0 there, not stay at 1 beside the new one."""
    add_version(store, V2, model_dir)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    svc = Service(
        tmp_path, polling_store(redis_url, store) | {"workers": "2", "metrics_dir": str(metrics_dir)}
    )
    svc.start()
    try:

        def model_info(page: str, **labels: str) -> float:
            return metric(page, "clickrank_model_info", **labels)

        page = httpx.get(f"{svc.url}/metrics", timeout=10).text
        assert model_info(page, version=V1) == 1 and model_info(page) == 1, "V1 alone, before the swap"
        ModelStore(store).promote(V2)
        deadline = time.monotonic() + POLL_S + 30.0
        while True:
            page = httpx.get(f"{svc.url}/metrics", timeout=10).text
            if model_info(page, version=V2) == 1 and not model_info(page, version=V1):
                break
            assert time.monotonic() < deadline, f"V1 still shown after the swap: {page}"
            time.sleep(POLL_S)
        assert "Clearing labels" not in svc.log_path.read_text(), "a metric cleared in multiprocess mode"
    finally:
        svc.stop()


async def _load_with_a_promotion(
    url: str, store: Path, catalog: list[str]
) -> tuple[list[dict[str, Any]], float]:
    """Four clients predicting back to back for the whole run; the promotion 1.5 s in; stops 3 s after
    the first answer of the new version."""
    answers: list[dict[str, Any]] = []
    promoted_at = 0.0
    switched_at: float | None = None

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal switched_at
        rng = np.random.default_rng(c)
        while switched_at is None or time.monotonic() < switched_at + 3.0:
            rows = rng.choice(len(catalog), size=20, replace=False).tolist()
            body = {"user_id": f"load-{c}", "candidates": [catalog[r] for r in rows]}
            sent = time.monotonic()
            response = await http.post(f"{url}/v1/predict", json=body)
            received = time.monotonic()
            version = response.json().get("model_version") if response.status_code == 200 else None
            answers.append({"sent": sent, "received": received, "latency": received - sent,
                            "status": response.status_code, "version": version})  # fmt: skip
            if version == V2 and switched_at is None:
                switched_at = received
            if received > sent + 60:
                raise AssertionError("a request took a minute")

    async def promote() -> None:
        nonlocal promoted_at
        await asyncio.sleep(1.5)
        await asyncio.to_thread(ModelStore(store).promote, V2)
        promoted_at = time.monotonic()

    async with httpx.AsyncClient(timeout=30.0) as http:
        await asyncio.wait_for(asyncio.gather(promote(), *(client(c, http) for c in range(4))), timeout=120)
    return answers, promoted_at


def _frozen(obj: object) -> bool:
    """Whether the cyclic collector skips ``obj``: tracked, yet in none of its three generations."""
    return gc.is_tracked(obj) and not any(
        any(o is obj for o in gc.get_objects(generation)) for generation in range(3)
    )


@pytest.mark.anyio
async def test_a_served_model_is_frozen_out_of_collections_and_a_retired_one_is_released(
    store: Path, model_dir: Path, redis_url: str
) -> None:
    """``service.gc_pauses``: full collections skip the serving model's objects (they walked all of them,
    39 ms each under load), the next version's too, and a retired version is not kept alive."""
    add_version(store, V2, model_dir)
    settings = app_settings(
        redis_url, store, model_poll_interval_s=0.0, redis_timeout_ms=200.0, request_timeout_ms=300.0
    )
    async with running_app(settings) as (client, app):
        first = app.state.services.model
        assert _frozen(first.catalog.item_ids) and _frozen(first.catalog)
        old = weakref.ref(first.catalog)
        del first

        pauses = local_metric("clickrank_gc_pause_seconds_count", generation="2")
        gc.collect()
        assert local_metric("clickrank_gc_pause_seconds_count", generation="2") == pauses + 1

        ModelStore(store).promote(V2)
        assert (await client.post("/v1/model/reload")).json() == {"version": V2, "swapped": True}
        assert _frozen(app.state.services.model.catalog.item_ids)
        deadline = time.monotonic() + 10.0  # the old version retires request_timeout_ms + 1 s after the swap
        while old() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert old() is None, "the retired model's catalog is still alive"
        assert _frozen(app.state.services.model.catalog.item_ids), "still frozen after the retirement"
