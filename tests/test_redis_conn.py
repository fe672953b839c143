"""RedisConnection (errors, metrics, the throttled failure log) and the named KEYS/ARGV slots of the Lua
scripts, against a real redis-server."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from importlib.resources import files
from pathlib import Path

import pytest
import redis.asyncio
import redis.cluster
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from models.redis_process import free_port
from service.catalog_sync import PUBLISH
from service.lua_scripts import Layout, LuaScript
from service.redis_conn import REDIS_OPS, RedisConnection, StoreUnavailable
from service.store import AGGREGATE_SHARD, APPEND, APPEND_USERS, COVISIT_APPLY

pytestmark = pytest.mark.anyio


def errors(op: str) -> float:
    return REGISTRY.get_sample_value("clickrank_redis_errors_total", {"op": op}) or 0.0


async def test_failures_are_counted_by_op_and_logged_once_per_op(caplog: pytest.LogCaptureFixture) -> None:
    conn = RedisConnection.connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)  # nobody listens
    before = errors("ping"), errors("forget")
    with caplog.at_level(logging.WARNING, logger="service.redis_conn"):
        for _ in range(3):
            with pytest.raises(StoreUnavailable, match="redis ping: ConnectionError"):
                await conn.ping()
        with pytest.raises(StoreUnavailable, match="redis forget"):
            await conn.call("forget", lambda r: r.delete("k"))
    await conn.close()
    assert (errors("ping"), errors("forget")) == (before[0] + 3, before[1] + 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "service.redis_conn"]
    assert len(lines) == 2  # the 2nd and 3rd ping failures are held back
    assert lines[0].startswith("redis ping failed after") and lines[1].startswith("redis forget failed")


async def test_a_loop_busy_past_the_deadline_is_not_a_slow_redis(redis_url: str) -> None:
    """The reply is in the socket but the loop was blocked past the deadline by the process's own work: the
    call still returns it (the deadline counts Redis's time, not the loop's)."""
    fast = RedisConnection.connect(redis_url, timeout_s=0.02)
    await fast.ping()  # a pooled connection, the handshake done
    before = errors("ping")
    for _ in range(3):
        call = asyncio.ensure_future(fast.ping())
        await asyncio.sleep(0)  # PING sent
        time.sleep(0.1)  # five deadlines of the loop's own work
        await call
    assert errors("ping") == before
    await fast.close()


async def _held_in_process(client: Redis, hold_s: float) -> bool:
    """A PING that waits ``hold_s`` in this process before it is sent (as for a busy loop's queue)."""
    await asyncio.sleep(hold_s)
    return await client.ping()


async def test_a_call_held_in_the_process_past_its_deadline_is_not_a_slow_redis(redis_url: str) -> None:
    """A call held in this process past its deadline (not yet sent, as behind a busy loop's queue) is not
    failed: Redis answers a call issued after it (another request's, or the deadline's PING), so the wait
    is the process's own."""
    conn = RedisConnection.connect(redis_url, timeout_s=0.05)
    await conn.ping()
    before = errors("held")
    held = asyncio.ensure_future(conn.call("held", lambda r: _held_in_process(r, 0.12)))
    await asyncio.sleep(0.01)
    await conn.ping()  # issued after the held call, answered at once
    assert await held is True
    start = time.perf_counter()
    assert await conn.call("held", lambda r: _held_in_process(r, 0.12)) is True  # alone: the PING answers
    assert time.perf_counter() - start >= 0.12
    assert errors("held") == before
    await conn.close()


BUSY_SCRIPT = """
local function now_ms() local t = redis.call('TIME'); return t[1] * 1000 + t[2] / 1000 end
local stop = now_ms() + tonumber(ARGV[1])
while now_ms() < stop do end
return 1
"""
"""Keeps Redis busy for ARGV[1] ms (a script blocks the server)."""


async def test_a_stalled_redis_fails_its_calls_at_the_deadline(redis_url: str) -> None:
    """Redis itself busy (a 0.4 s script on another connection): every call, those issued later included,
    fails after its deadline and the deadline's PING (about two deadlines), long before Redis wakes."""
    conn = RedisConnection.connect(redis_url, timeout_s=0.05)
    await conn.ping()
    blocker = Redis.from_url(redis_url)
    stall = asyncio.ensure_future(blocker.eval(BUSY_SCRIPT, 0, 400))
    await asyncio.sleep(0.02)
    start = time.perf_counter()
    calls = [asyncio.ensure_future(conn.ping()) for _ in range(5)]
    for call in calls:
        with pytest.raises(StoreUnavailable, match="no answer within 50 ms"):
            await call
        await asyncio.sleep(0.005)
    assert time.perf_counter() - start < 0.3  # not when Redis woke (0.4 s)
    await stall
    await blocker.aclose()
    await conn.close()


async def test_a_multiplexed_read_is_a_bare_future_and_keeps_its_deadline(redis_url: str) -> None:
    """On an open shared connection a read is the call's own future (no task, no event-loop turn of its
    own); a stalled Redis still fails it after its deadline and the deadline's PING, and once Redis wakes
    the next read gets its own reply, the abandoned one's dropped."""
    conn = RedisConnection.connect(redis_url, timeout_s=0.05)
    assert await conn.read("read", [("PING",)]) == [b"PONG"]
    assert conn._reads is not None
    sent = conn._reads.submit([("ECHO", "x")])
    assert isinstance(sent, asyncio.Future) and not isinstance(sent, asyncio.Task)
    assert await sent == [b"x"]
    blocker = Redis.from_url(redis_url)
    stall = asyncio.ensure_future(blocker.eval(BUSY_SCRIPT, 0, 400))
    await asyncio.sleep(0.02)
    start = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="no answer within 50 ms"):
        await conn.read("read", [("ECHO", "abandoned")])
    assert time.perf_counter() - start < 0.3  # not when Redis woke (0.4 s)
    await stall
    assert await conn.read("read", [("ECHO", "next")]) == [b"next"]
    await blocker.aclose()
    await conn.close()


LAYOUT_KEYS = Layout(head=("one", "two"), group_name="pair", group=("left", "right"))
LAYOUT_ARGS = Layout(head=("n",), group_name="row", group=("a", "b", "c"))


def script(body: str) -> LuaScript:
    return LuaScript("probe", "#!lua flags=no-writes\n" + body, keys=LAYOUT_KEYS, args=LAYOUT_ARGS)


async def test_a_script_reads_its_slots_by_name(conn: RedisConnection) -> None:
    probe = script(
        "return {KEYS[KEY.two], PAIRS, pair_key(2, PAIR.left), ARGV[ARG.n], ROWS, row_arg(1, ROW.c)}"
    )
    keys = LAYOUT_KEYS.build(
        {"two": "k2", "one": "k1"}, [{"left": "l1", "right": "r1"}, {"right": "r2", "left": "l2"}]
    )
    args = LAYOUT_ARGS.build({"n": 7}, [{"a": "a1", "b": "b1", "c": "c1"}])
    assert keys == ["k1", "k2", "l1", "r1", "l2", "r2"]
    assert await conn.run_script("probe", probe, keys, args) == [b"k2", 2, b"l2", b"7", 1, b"c1"]


async def test_a_misspelt_slot_fails_the_call(conn: RedisConnection) -> None:
    probe = script("return KEYS[KEY.three]")
    with pytest.raises(StoreUnavailable, match="KEYS has no slot three"):
        await conn.run_script("probe", probe, ["k1", "k2"], [1])


def test_build_takes_exactly_the_layouts_slots() -> None:
    with pytest.raises(ValueError, match="head slots"):
        LAYOUT_KEYS.build({"one": "k1"})
    with pytest.raises(ValueError, match="pair slots"):
        LAYOUT_KEYS.build({"one": "k1", "two": "k2"}, [{"left": "l", "right": "r", "extra": "x"}])
    with pytest.raises(ValueError, match="identifiers"):
        Layout(head=("end",))  # a Lua keyword
    with pytest.raises(ValueError, match="shebang"):
        LuaScript("bad", "return 1\n", keys=LAYOUT_KEYS, args=LAYOUT_ARGS)


@pytest.mark.parametrize(
    "packaged", [APPEND, APPEND_USERS, AGGREGATE_SHARD, COVISIT_APPLY, PUBLISH], ids=lambda s: s.name
)
def test_a_packaged_script_reads_exactly_its_layouts_slots_and_no_bare_index(packaged: LuaScript) -> None:
    """Every slot the .lua file names is in the Python layout and every layout slot is read; positions
    are never written as numbers."""
    text = files("service").joinpath("lua", f"{packaged.name}.lua").read_text(encoding="utf-8")
    code = "\n".join(line.split("--", 1)[0] for line in text.splitlines()[1:])  # without comments
    tables = {"KEY": packaged.keys.head, "ARG": packaged.args.head}
    for layout in (packaged.keys, packaged.args):
        if layout.group:
            tables[layout.group_name.upper()] = layout.group
    for table, slots in tables.items():
        used = set(re.findall(rf"\b{table}\.(\w+)", code))
        assert used == set(slots), table
    assert not re.search(r"\b(KEYS|ARGV)\[\s*[\d(]", code)


async def test_a_probe_that_cannot_reach_redis_fails_the_call_cleanly(redis_url: str) -> None:
    """The deadline's PING cannot even connect (a cluster client whose start node is down raises
    RedisClusterException, not a RedisError): the call fails as StoreUnavailable, never with that error."""
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    conn = RedisConnection(
        redis.asyncio.Redis.from_url(redis_url),
        timeout_s=0.05,
        probe=lambda: redis.cluster.RedisCluster.from_url(nobody, socket_connect_timeout=0.05),
    )
    with pytest.raises(StoreUnavailable, match="no answer within 50 ms"):
        await conn.call("held", lambda r: _held_in_process(r, 0.12))
    await conn.close()


def test_the_ops_counted_from_start_up_are_those_the_service_names() -> None:
    """Every ``op`` a call in ``service/`` names is one of ``REDIS_OPS`` (created at 0 at start-up), and
    every one of them is named somewhere: a new operation cannot be left out of the list."""
    call = re.compile(r'\.(?:read|call|pipeline|run_script|run_scripts|scan|_timed)\(\s*"([a-z_]+)"')
    service = Path(__file__).resolve().parent.parent / "service"
    named = {op for path in service.rglob("*.py") for op in call.findall(path.read_text())}
    assert named == set(REDIS_OPS)
