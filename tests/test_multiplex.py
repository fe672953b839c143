"""MultiplexedReads (``service/multiplex.py``): many concurrent calls on one connection to a real
redis-server, replies matched to their callers, login and database, error replies, callers that give up,
and connections that die or go silent."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.multiplex import Address, MultiplexedReads

pytestmark = pytest.mark.anyio


def reads(url: str, *, stale_after_s: float = 5.0) -> MultiplexedReads:
    address = Address.from_url(url)
    assert address is not None
    return MultiplexedReads(address, connect_timeout_s=1.0, stale_after_s=stale_after_s)


@asynccontextmanager
async def connected_then_stopped(
    url: str, server, *, stale_after_s: float = 5.0
) -> AsyncIterator[MultiplexedReads]:
    """Reads with an open connection to ``server``, which is stopped (SIGSTOP: the socket stays open,
    nothing answers) until the block ends."""
    r = reads(url, stale_after_s=stale_after_s)
    await r.execute([("PING",)])
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield r
    finally:
        os.kill(server.pid, signal.SIGCONT)


def test_address_reads_the_url_forms_it_can_speak_and_refuses_query_options() -> None:
    assert Address.from_url("redis://cache:6380/2") == Address(host="cache", port=6380, db=2)
    assert Address.from_url("redis://u%40x:p%3Aw@h/0") == Address(host="h", username="u@x", password="p:w")
    assert Address.from_url("redis://:secret@h") == Address(host="h", password="secret")
    assert Address.from_url("rediss://h:6390") == Address(host="h", port=6390, tls=True)
    assert Address.from_url("unix:///run/redis.sock") == Address(path="/run/redis.sock")
    assert Address.from_url("rediss://h?ssl_cert_reqs=none") is None  # redis-py's client takes these
    assert Address.from_url("redis+sentinel://h") is None


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    for k in range(200):
        client.zadd(f"z{k}", {f"m{k}-{j}": j for j in range(k % 7 + 1)})
    r = reads(redis_url)
    calls = [
        r.execute([("ZRANGE", f"z{k}", 0, -1, "WITHSCORES"), ("ZCARD", f"z{k}"), ("GET", "missing")])
        for k in range(200)
    ]
    answers = await asyncio.gather(*calls)
    for k, (members, card, missing) in enumerate(answers):
        n = k % 7 + 1
        assert card == n and missing is None
        assert members == [x for j in range(n) for x in (f"m{k}-{j}".encode(), str(j).encode())]
    assert len({id(r._protocol)}) == 1 and client.info("clients")["connected_clients"] == 2
    await r.close()
    client.close()


async def test_an_error_reply_fails_its_call_only(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).set("text", "x")
    r = reads(redis_url)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await r.execute([("GET", "text"), ("ZRANGE", "text", 0, -1)])
    assert await r.execute([("GET", "text")]) == [b"x"]
    await r.close()


async def test_a_caller_that_gives_up_leaves_the_replies_in_step(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).mset({"a": "1", "b": "2"})
    r = reads(redis_url)
    await r.execute([("PING",)])  # connected
    abandoned = asyncio.ensure_future(r.execute([("GET", "a")]))
    await asyncio.sleep(0)  # sent
    abandoned.cancel()
    assert await r.execute([("GET", "b")]) == [b"2"]
    await r.close()


async def test_logs_in_with_user_and_password_and_selects_the_database(redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">s3cret", "~*", "+@all")
    redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3").set("k", "in-db-3")
    base = redis_url.removeprefix("redis://").rsplit("/", 1)[0]
    try:
        r = reads(f"redis://reader:s3cret@{base}/3")
        assert await r.execute([("GET", "k")]) == [b"in-db-3"]
        await r.close()
        wrong = reads(f"redis://reader:nope@{base}/3")
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await wrong.execute([("GET", "k")])
    finally:
        admin.execute_command("ACL", "DELUSER", "reader")
        admin.close()


async def test_a_restart_between_calls_is_absorbed_and_redis_down_fails_fast(
    redis_url: str, redis_server
) -> None:
    r = reads(redis_url)
    assert await r.execute([("PING",)]) == [b"PONG"]
    redis_server.stop()
    redis_server.start()  # the open connection is dead, and nobody has noticed yet
    assert await r.execute([("PING",)]) == [b"PONG"]
    redis_server.stop()
    try:
        start = time.perf_counter()
        with pytest.raises(RedisConnectionError):
            await r.execute([("PING",)])
        assert time.perf_counter() - start < 0.5
    finally:
        redis_server.start()
    assert await r.execute([("PING",)]) == [b"PONG"]
    await r.close()


async def test_a_silent_connection_is_dropped_and_replaced(redis_url: str, redis_server) -> None:
    """A stopped Redis (SIGSTOP: the socket stays open, nothing answers) is a peer gone without a FIN: the
    first call after ``stale_after_s`` of silence drops the connection; the calls waiting on it are sent
    again on a new one (they only read), and all are answered once Redis runs again."""
    async with connected_then_stopped(redis_url, redis_server, stale_after_s=0.2) as r:
        silent = r._protocol
        hung = asyncio.ensure_future(r.execute([("PING",)]))
        await asyncio.sleep(0.3)
        assert not hung.done() and silent is not None and not silent.closed
        again = asyncio.ensure_future(r.execute([("PING",)]))  # past stale_after_s: drops the connection
        await asyncio.sleep(0.05)
        assert silent.closed and r._protocol is not silent
    assert await asyncio.wait_for(asyncio.gather(hung, again), 2.0) == [[b"PONG"], [b"PONG"]]
    await r.close()


async def test_a_call_is_sent_again_once_and_fails_when_its_second_connection_drops_too(
    redis_url: str, redis_server
) -> None:
    """With Redis stopped, each call after ``stale_after_s`` of silence drops the connection: the first
    drop sends the waiting call again on a new connection, the second fails it (a read is retried once,
    never in a loop); the calls sent later are answered once Redis runs again."""
    async with connected_then_stopped(redis_url, redis_server, stale_after_s=0.2) as r:
        first = asyncio.ensure_future(r.execute([("ECHO", "first")]))
        await asyncio.sleep(0.3)
        second = asyncio.ensure_future(r.execute([("ECHO", "second")]))  # drop 1: first is sent again
        await asyncio.sleep(0.3)
        third = asyncio.ensure_future(r.execute([("ECHO", "third")]))  # drop 2: first fails
        with pytest.raises(RedisConnectionError, match="no reply from Redis"):
            await asyncio.wait_for(first, 1.0)
        assert not second.done() and not third.done()
    assert await asyncio.wait_for(asyncio.gather(second, third), 2.0) == [[b"second"], [b"third"]]
    await r.close()


async def test_a_call_waiting_when_the_reads_are_closed_fails_and_nothing_reconnects(
    redis_url: str, redis_server
) -> None:
    """``close`` (the process stopping) fails the calls still waiting instead of sending them again."""
    async with connected_then_stopped(redis_url, redis_server) as r:
        waiting = asyncio.ensure_future(r.execute([("PING",)]))
        await asyncio.sleep(0.05)
        await r.close()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(waiting, 1.0)
        await asyncio.sleep(0.05)
        assert r._protocol is None
