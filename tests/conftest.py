"""Shared fixtures: a real redis-server on a free port, a connection to it, a real trained + exported tiny
model and its catalog, and the anyio backend of the async tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from models.data import DATA_DIR_ENV, FALLBACK_DATA_DIR
from models.model_dir import ModelDir
from models.redis_process import RedisProcess
from service.redis_conn import RedisConnection

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get(DATA_DIR_ENV) or REPO / FALLBACK_DATA_DIR).resolve()
# The shared test machine's loop lags on its own (other tests, training next door): no app under test
# sheds on event-loop lag unless its test asks for it (test_api_faults tests the shedding).
os.environ.setdefault("CLICKRANK_SHED_LOOP_LAG_MS", "0")


RedisServer = RedisProcess
"""A private redis-server in a temp dir; stop() and start() again on the same port."""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module scope, so that module-scoped async fixtures (one app per module) can run on it."""
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A URL of the session's redis-server with an empty database 0 (flushed before each test)."""
    if redis_server.proc is None:
        redis_server.start()
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture()
async def conn(redis_url: str) -> AsyncIterator[RedisConnection]:
    """A RedisConnection to the empty database of ``redis_url``."""
    c = RedisConnection.connect(redis_url, timeout_s=1.0)
    yield c
    await c.close()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "u.data").is_file():
        pytest.fail(f"MovieLens 100K not found at {DATA_DIR} (set {DATA_DIR_ENV})")
    return DATA_DIR


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A real model trained with the tiny config on MovieLens and exported to ONNX.

    Set CLICKRANK_TEST_MODEL_DIR to reuse an existing export while iterating locally.
    """
    reuse = os.environ.get("CLICKRANK_TEST_MODEL_DIR")
    if reuse:
        return Path(reuse)
    from models.pipeline import TrainConfig, train_and_export

    out = tmp_path_factory.mktemp("model")
    train_and_export(data_dir, out, TrainConfig.tiny(), id_only=True)
    return out


@pytest.fixture(scope="module")
def catalog(model_dir: Path) -> list[str]:
    """The item ids of the tiny model, in catalog order."""
    return ModelDir(model_dir).load().items.item_ids
