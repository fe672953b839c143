"""Shared fixtures: a real redis-server on a free port, a real 3-primary 3-replica Redis Cluster, a
connection to either, a real trained + exported tiny model and its catalog, and the anyio backend of the
async tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from models.data import DATA_DIR_ENV, FALLBACK_DATA_DIR
from models.model_dir import ModelDir
from models.redis_process import RedisClusterProcess, RedisProcess
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
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    """A private Redis Cluster of 3 primaries with a replica each (started when a test first asks)."""
    with RedisClusterProcess(tmp_path_factory.mktemp("cluster")).running() as cluster:
        yield cluster


@dataclass
class RedisTarget:
    """The Redis an app under test runs on: the single server or the cluster (``mode`` as in
    ``CLICKRANK_REDIS_MODE``)."""

    mode: str
    url: str

    def client(self) -> redis.Redis | redis.RedisCluster:
        """A synchronous client (close it)."""
        return (
            redis.RedisCluster.from_url(self.url)
            if self.mode == "cluster"
            else redis.Redis.from_url(self.url)
        )

    def flush(self) -> None:
        with self.client() as client:
            if self.mode == "cluster":
                client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
            else:
                client.flushall()

    def dbsize(self) -> int:
        """Keys stored (on every primary of a cluster)."""
        with self.client() as client:
            return (
                client.dbsize(target_nodes=redis.RedisCluster.PRIMARIES)
                if self.mode == "cluster"
                else client.dbsize()
            )


@pytest.fixture(scope="module", params=["single", "cluster"])
def redis_target(request: pytest.FixtureRequest, redis_server: RedisServer) -> RedisTarget:
    """Each Redis mode in turn, for the modules whose contract must hold on both (one app per mode)."""
    if request.param == "cluster":
        return RedisTarget("cluster", request.getfixturevalue("redis_cluster").url)
    if redis_server.proc is None:
        redis_server.start()
    return RedisTarget("single", redis_server.url)


@pytest.fixture()
def empty_redis(redis_target: RedisTarget) -> RedisTarget:
    """``redis_target`` emptied before the test."""
    redis_target.flush()
    return redis_target


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
