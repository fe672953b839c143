"""The Redis connection that the history store and the catalog sharing borrow; the only owner of the client.

Every call goes through one ``RedisConnection`` method, named by an ``op`` (``append``, ``catalog_sync``,
...): it runs under the connection's deadline (``CLICKRANK_REDIS_TIMEOUT_MS`` unless a bulk tool sets a
longer one), its latency goes to ``REDIS_LATENCY`` by op; a connection error, a timeout or a Redis error
is counted in ``REDIS_ERRORS``, logged (one line per op every few seconds) and raised as
``StoreUnavailable``. Lua scripts are registered once per connection; redis-py loads one into the server
(SCRIPT LOAD) the first time EVALSHA answers NOSCRIPT, so a flushed script cache heals by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from service.logs import ThrottledLog
from service.lua_scripts import LuaScript, ScriptArg
from service.metrics import REDIS_ERRORS, REDIS_LATENCY

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


LATE_LOOP_EXTENSIONS = 3
"""Fresh deadlines a call gets when the loop itself woke it late (``RedisConnection._within_deadline``)."""


SPARE_CONNECTIONS = 32
"""Pooled Redis connections beyond one per admitted model request: ingestion, items, probes, the sync."""


class StoreUnavailable(Exception):
    """Redis unreachable or past its deadline."""


class RedisConnection:
    """A pooled client plus the per-call deadline ``timeout_s``; see the module docstring."""

    def __init__(self, client: Redis, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._client = client
        self.timeout_s = timeout_s
        self._scripts: dict[LuaScript, AsyncScript] = {}  # by identity
        self._failures = ThrottledLog(log)

    @classmethod
    def connect(cls, url: str, *, timeout_s: float, max_connections: int = 64) -> RedisConnection:
        """A pooled client that reconnects by itself: a dead pooled connection (Redis restarted) is
        replaced and the command retried twice with a short backoff, all within the call's deadline."""
        socket_timeout = max(timeout_s, 1.0)
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,  # wait for a free pooled connection (the call's deadline cuts it shorter)
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            socket_keepalive=True,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.002), retries=2),
        )
        return cls(Redis.from_pool(pool), timeout_s=timeout_s)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, timeout_s: float | None = None, max_connections: int | None = None
    ) -> RedisConnection:
        """The connection the settings describe; ``timeout_s`` overrides ``redis_timeout_ms`` (bulk loads).
        The pool holds one connection per admitted model request (``max_in_flight``, each makes its round
        trips one after another) plus ``SPARE_CONNECTIONS``, unless ``max_connections`` says otherwise."""
        timeout_s = settings.redis_timeout_ms / 1000.0 if timeout_s is None else timeout_s
        if max_connections is None:
            max_connections = settings.max_in_flight + SPARE_CONNECTIONS
        return cls.connect(settings.redis_url, timeout_s=timeout_s, max_connections=max_connections)

    async def call(self, op: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        """One command, e.g. ``call("forget", lambda r: r.delete(*keys))``."""
        return await self._timed(op, command(self._client))

    async def pipeline(self, op: str, queue: Callable[[Pipeline], object], *, transaction: bool) -> list:
        """The replies of the commands ``queue`` adds to a pipeline: one round trip (MULTI/EXEC if
        ``transaction``)."""

        async def run() -> list:
            async with self._client.pipeline(transaction=transaction) as pipe:
                queue(pipe)
                return await pipe.execute()

        return await self._timed(op, run())

    async def run_script(
        self, op: str, script: LuaScript, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]
    ) -> object:
        """EVALSHA ``script`` (registered on first use)."""
        registered = self._scripts.get(script)
        if registered is None:
            registered = self._scripts[script] = self._client.register_script(script.source)
        return await self._timed(op, registered(keys=keys, args=args))

    async def ping(self) -> None:
        """Raises StoreUnavailable unless Redis answers within the deadline."""
        await self._timed("ping", self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()

    async def _timed(self, op: str, awaitable: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            result = await self._within_deadline(awaitable)
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError (the deadline) and socket errors
            REDIS_ERRORS.labels(op).inc()
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self.timeout_s * 1000:.0f} ms"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            elapsed_ms = (time.perf_counter() - start) * 1000
            message = "redis %s failed after %.1f ms: %s"
            self._failures.log(logging.WARNING, op, message, op, elapsed_ms, reason)
            raise StoreUnavailable(f"redis {op}: {reason}") from exc
        REDIS_LATENCY.labels(op).observe(time.perf_counter() - start)
        return result

    async def _within_deadline(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result, or TimeoutError once Redis has had ``timeout_s`` to answer and did not.

        A process saturated by its own requests runs every step of every task late: the command may not
        even have been sent when its deadline passes, and Redis is not slow for it. So when the deadline's
        wake-up itself comes late (by more than a quarter of ``timeout_s``: the loop was busy), the call
        gets a fresh ``timeout_s``, up to ``LATE_LOOP_EXTENSIONS`` times; an idle loop wakes on time and a
        slow Redis fails at its deadline as before (``service.loop_lag`` and the admission control shed
        such load)."""
        task = asyncio.ensure_future(awaitable)
        deadline = time.perf_counter() + self.timeout_s
        try:
            for _ in range(LATE_LOOP_EXTENSIONS + 1):
                done, _ = await asyncio.wait({task}, timeout=max(deadline - time.perf_counter(), 0.0))
                now = time.perf_counter()
                if done or now - deadline < self.timeout_s / 4:
                    break
                deadline = now + self.timeout_s
        except asyncio.CancelledError:  # the caller gave up (request deadline, shutdown): so does the call
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            raise TimeoutError
        return task.result()
