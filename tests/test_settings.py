"""Settings from the environment: defaults, parsing, validation by field, and a store built from them
against a real redis-server."""

from __future__ import annotations

import os

import pytest
import redis
from pydantic import ValidationError

from service.redis_conn import RedisConnection
from service.schemas.events import ContextEvent
from service.settings import Settings
from service.store import HistoryStore

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CLICKRANK_* variable from the caller's environment leaks into a settings test."""
    for key in [k for k in os.environ if k.startswith("CLICKRANK_")]:
        monkeypatch.delenv(key)
    return monkeypatch


async def test_store_from_settings_uses_the_environment(
    clean_env: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch = clean_env
    monkeypatch.setenv("CLICKRANK_REDIS_URL", redis_url)
    monkeypatch.setenv("CLICKRANK_REDIS_PREFIX", "env:")
    monkeypatch.setenv("CLICKRANK_HISTORY_CAP", "60")
    settings = Settings()
    assert (settings.redis_url, settings.history_cap) == (redis_url, 60)
    conn = RedisConnection.from_settings(settings)
    s = HistoryStore.from_settings(settings, conn)
    await s.append([("u", ContextEvent(item_id="a", type="click", timestamp=T0 + i)) for i in range(70)])
    assert len((await s.history("u", 100))[0]) == 60
    with redis.Redis.from_url(redis_url) as client:
        assert client.exists("env:h:u")
    await conn.close()


@pytest.mark.parametrize(
    "env",
    [
        {"CLICKRANK_MAX_BATCH_SIZE": "0"},
        {"CLICKRANK_REDIS_TIMEOUT_MS": "-1"},
        {"CLICKRANK_TRENDING_HALF_LIFE_S": "0"},
        {"CLICKRANK_DEVICE": "tpu"},
        {"CLICKRANK_REDIS_URL": "http://localhost"},
        {"CLICKRANK_LOG_LEVEL": "loud"},
        {"CLICKRANK_HISTORY_CAP": "10", "CLICKRANK_HISTORY_LENGTH": "50"},
        {"CLICKRANK_MAX_QUEUE": "many"},
    ],
)
def test_invalid_settings_fail_with_the_field_name(
    clean_env: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    for key, value in env.items():
        clean_env.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    field = next(iter(env)).removeprefix("CLICKRANK_").lower()
    assert field in str(info.value) or "history_cap" in str(info.value)


def test_settings_defaults_and_api_keys(clean_env: pytest.MonkeyPatch) -> None:
    monkeypatch = clean_env
    settings = Settings()
    assert settings.api_key_list() == []
    assert (settings.max_batch_size, settings.history_length, settings.log_level) == (64, 50, "INFO")
    monkeypatch.setenv("CLICKRANK_API_KEYS", " k1, ,k2 ")
    monkeypatch.setenv("CLICKRANK_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.api_key_list() == ["k1", "k2"]
    assert settings.log_level == "DEBUG"
