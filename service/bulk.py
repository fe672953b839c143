"""The store as the bulk commands (``load-history``, ``export-events``) use it: a long per-call deadline,
two connections, Redis checked up front, and a Redis failure turned into one readable ConnectionError."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from service.redis_conn import RedisConnection, StoreUnavailable
from service.settings import Settings
from service.store import HistoryStore

CALL_TIMEOUT_S = 30.0
"""Deadline of one bulk call; the request path uses the much shorter ``redis_timeout_ms``."""


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@asynccontextmanager
async def bulk_connection(settings: Settings, retry_hint: str) -> AsyncIterator[RedisConnection]:
    """A connection to the settings' Redis, once it answers PING; a StoreUnavailable inside the block
    becomes a ConnectionError naming the (redacted) address and ``retry_hint``."""
    target = redacted(settings.redis_url)
    redis = RedisConnection.from_settings(settings, timeout_s=CALL_TIMEOUT_S, max_connections=2)
    try:
        try:
            await asyncio.wait_for(redis.ping(), 5.0)
        except (StoreUnavailable, TimeoutError) as exc:
            raise ConnectionError(f"cannot reach Redis at {target} ({exc})") from None
        try:
            yield redis
        except StoreUnavailable as exc:
            raise ConnectionError(f"Redis at {target} failed ({exc}); {retry_hint}") from None
    finally:
        await redis.close()


@asynccontextmanager
async def bulk_store(settings: Settings, retry_hint: str) -> AsyncIterator[HistoryStore]:
    """The settings' store on a ``bulk_connection``."""
    async with bulk_connection(settings, retry_hint) as redis:
        yield HistoryStore.from_settings(settings, redis)
