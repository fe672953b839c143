"""Retention and privacy through HTTP (ASGI app, real redis-server, real exported model): a user's keys
expire ``CLICKRANK_HISTORY_TTL_DAYS`` after their last event, ``DELETE /v1/users/{id}`` leaves no key and
no stored value naming them (a ``SCAN`` of the whole database proves it), and log lines name a user by a
keyed hash unless ``CLICKRANK_LOG_USER_IDS`` is set."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from helpers import app_settings, running_app

from service.logs import JsonFormatter, UserLogNames

pytestmark = pytest.mark.anyio

USER = "privacy-subject-7f3a"
TTL_S = 1.5


def events(catalog: list[str], user: str, n: int, first_id: int = 0) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {
            "user_id": user,
            "item_id": catalog[i],
            "type": "rate" if i % 2 else "click",
            "timestamp": now - 100 + i,
            "event_id": f"{user}-e{first_id + i}",
            **({"value": 4} if i % 2 else {}),
        }
        for i in range(n)
    ]


def everything_naming(url: str, needle: str) -> list[str]:
    """Every key whose name, or one of whose stored members, fields or values, contains ``needle``."""
    found = []
    with redis.Redis.from_url(url) as r:
        for key in r.scan_iter(count=1000):
            kind = r.type(key).decode()
            if kind == "string":
                values = [r.get(key)]
            elif kind == "zset":
                values = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
            elif kind == "set":
                values = list(r.smembers(key))
            elif kind == "hash":
                values = [part for pair in r.hgetall(key).items() for part in pair]
            else:
                values = r.lrange(key, 0, -1) if kind == "list" else []
            if needle.encode() in key or any(needle.encode() in (v or b"") for v in values):
                found.append(f"{key.decode()} ({kind})")
    return found


async def exercise(client: httpx.AsyncClient, catalog: list[str], user: str) -> None:
    """Everything a user can do that writes or reads their state: events, predict, recommend, history."""
    assert (await client.post("/v1/events", json={"events": events(catalog, user, 6)})).status_code == 200
    predict = await client.post("/v1/predict", json={"user_id": user, "candidates": catalog[10:20]})
    assert predict.status_code == 200 and predict.json()["history_length"] == 6
    recommend = await client.post("/v1/recommend", json={"user_id": user, "top_k": 5})
    assert recommend.status_code == 200
    assert len((await client.get(f"/v1/users/{user}/history")).json()["events"]) == 6


async def test_history_seen_set_and_event_ids_expire_after_the_last_event(
    redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    settings = app_settings(redis_url, model_dir, history_ttl_days=TTL_S / 86400)
    async with running_app(settings) as (client, _):
        await exercise(client, catalog, USER)
        with redis.Redis.from_url(redis_url) as r:
            keys = [k for k in r.scan_iter(count=1000) if USER.encode() in k]
            assert len(keys) == 3, keys  # history, seen-set, event ids
            assert all(0 < r.pttl(k) <= TTL_S * 1000 for k in keys)
        time.sleep(TTL_S * 0.6)
        # a new event restarts the clock: the keys outlive the first deadline
        later = events(catalog, USER, 7, first_id=100)[6:]
        assert (await client.post("/v1/events", json={"events": later})).status_code == 200
        time.sleep(TTL_S * 0.6)
        assert len((await client.get(f"/v1/users/{USER}/history")).json()["events"]) == 7
        time.sleep(TTL_S * 0.6)
        assert everything_naming(redis_url, USER) == []
        assert (await client.get(f"/v1/users/{USER}/history")).json()["events"] == []


async def test_delete_leaves_no_key_or_stored_value_naming_the_user(
    redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    settings = app_settings(redis_url, model_dir)  # the default: no TTL
    async with running_app(settings) as (client, _):
        await exercise(client, catalog, USER)
        await exercise(client, catalog, "someone-else")
        assert len(everything_naming(redis_url, USER)) == 3
        with redis.Redis.from_url(redis_url) as r:
            ttls = sorted(r.pttl(k) for k in r.scan_iter(match=f"*{USER}*"))
        assert ttls[:2] == [-1, -1] and ttls[2] > 0, "no TTL by default but the event ids' dedup window"
        deleted = await client.delete(f"/v1/users/{USER}")
        assert deleted.status_code == 200 and deleted.json() == {"user_id": USER, "forgotten": True}
        assert everything_naming(redis_url, USER) == []
        assert len(everything_naming(redis_url, "someone-else")) == 3, "other users are left alone"
        again = await client.delete(f"/v1/users/{USER}")
        assert again.status_code == 200 and again.json()["forgotten"] is False


@pytest.mark.parametrize("raw", [False, True])
async def test_logs_name_a_user_by_keyed_hash_unless_raw_ids_are_asked_for(
    raw: bool, redis_url: str, model_dir: Path, catalog: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    key = "log-hash-key-for-the-test"
    settings = app_settings(redis_url, model_dir, log_user_ids=raw, log_hash_key=key, log_level="DEBUG")
    with caplog.at_level(logging.DEBUG):
        async with running_app(settings) as (client, _):
            await exercise(client, catalog, USER)
            bad = await client.post("/v1/predict", json={"user_id": USER, "candidates": "x"})
            assert bad.status_code == 422
            assert (await client.delete(f"/v1/users/{USER}")).status_code == 200
    service_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    text = "\n".join(JsonFormatter(secrets=[key]).format(r) for r in service_records)
    erased = [json.loads(JsonFormatter().format(r)) for r in service_records if "erased user" in r.message]
    assert len(erased) == 1
    name = UserLogNames(raw=raw, key=key)(USER)
    assert name in erased[0]["message"]
    if raw:
        assert name == USER
    else:
        assert USER not in text, "a raw user id in the log"
        assert name.startswith("u#") and name != UserLogNames(key="another key")(USER)
