"""The Redis connection that the history store and the catalog sharing borrow; the only owner of the client.

Every call goes through one ``RedisConnection`` method, named by an ``op`` (``append``, ``catalog_sync``,
...): it runs under the connection's deadline (``CLICKRANK_REDIS_TIMEOUT_MS`` unless a bulk tool sets a
longer one), its latency goes to ``REDIS_LATENCY`` by op; a connection error, a timeout or a Redis error
is counted in ``REDIS_ERRORS``, logged (one line per op every few seconds) and raised as
``StoreUnavailable``. Lua scripts run by EVALSHA; one that a server answers NOSCRIPT for (a flushed cache,
a new or failed-over cluster node) is loaded (SCRIPT LOAD, on every primary of a cluster) and sent again.

``CLICKRANK_REDIS_MODE=cluster`` makes the client redis-py's cluster client (any node's URL; it learns
the slots and follows MOVED and failovers). Pipelines then go to each node holding their keys, and a
transaction's keys must share one slot: ``service.redis_keys`` tags them so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import redis
import redis.cluster
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from service.logs import ThrottledLog
from service.lua_scripts import LuaScript, ScriptArg
from service.metrics import REDIS_ERRORS, REDIS_LATENCY, counted_from_start, labelled
from service.multiplex import Address, Command, MultiplexedReads

if TYPE_CHECKING:
    from service.settings import Settings


REDIS_OPS = (
    "append", "append_aggregates", "candidates", "catalog_publish", "catalog_sync", "forget", "fresh",
    "history", "ping", "scan", "trending",
)  # fmt: skip
"""The operations the service's calls name (their ``op``): ``clickrank_redis_errors_total`` counts failures
by them, each from 0 at start-up (``tests/test_redis_conn.py`` checks the list against the call sites)."""
counted_from_start(REDIS_ERRORS, REDIS_OPS)

log = logging.getLogger(__name__)
T = TypeVar("T")


OWN_WAIT_LIMIT_FACTOR = 20
"""A call whose wait is this process's own (Redis has answered a call issued after it) waits up to this many
deadlines in all (``RedisConnection._within_deadline``; the request's own timeout cuts it shorter)."""


SPARE_CONNECTIONS = 32
"""Pooled Redis connections beyond one per admitted model request: ingestion, items, probes, the sync."""


class _Deadline:
    """The deadline of one call in flight (``RedisConnection._within_deadline``): a timer, no task of its
    own. When it fires with the call unanswered, ``own_wait()`` says whether the wait is the process's own:
    if so the timer starts again, otherwise the call is cancelled and ``expired`` set."""

    def __init__(
        self, call: asyncio.Future, timeout_s: float, own_wait: Callable[[], Awaitable[bool]]
    ) -> None:
        self._call, self._timeout_s, self._own_wait = call, timeout_s, own_wait
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(timeout_s, self._fire)
        self._check: asyncio.Task | None = None
        self.expired = False

    def _fire(self) -> None:
        if not self._call.done():
            self._check = self._loop.create_task(self._decide())

    async def _decide(self) -> None:
        own = await self._own_wait()
        if self._call.done():
            return
        if own:
            self._timer = self._loop.call_later(self._timeout_s, self._fire)
        else:
            self.expired = True
            self._call.cancel()

    def disarm(self) -> None:
        self._timer.cancel()
        if self._check is not None:
            self._check.cancel()


async def _settled(call: asyncio.Future) -> None:
    """Returns once ``call`` is done; its outcome is left in it, except that a bare future's exception is
    raised. Cancelling the caller cancels ``call``; a task is then left to unwind on its own, so that a
    client slow to give up a command (redis-py's, on a cluster) never holds its caller."""
    if not isinstance(call, asyncio.Task):
        await call
        return
    waiter = asyncio.get_running_loop().create_future()
    call.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))
    try:
        await waiter
    except asyncio.CancelledError:
        call.cancel()
        raise


class StoreUnavailable(Exception):
    """Redis unreachable or past its deadline."""


class NotReplicated(RedisError):
    """WAIT answered fewer replicas than ``CLICKRANK_REDIS_WAIT_REPLICAS`` within its timeout."""


ScriptCall = tuple[LuaScript, Sequence[ScriptArg], Sequence[ScriptArg]]
"""A script and its KEYS and ARGV."""

ProbeClient = redis.Redis | redis.cluster.RedisCluster
"""A blocking client for the deadline's PING (``RedisConnection._ping_off_loop``)."""

REDIS_FAULTS = (RedisError, RedisClusterException, OSError)
"""What a Redis call can raise when Redis is unreachable, slow or failing over (OSError covers timeouts and
socket errors; the cluster client's "cannot be connected" is not a RedisError)."""


class RedisConnection:
    """A pooled client plus the per-call deadline ``timeout_s``; see the module docstring."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        timeout_s: float,
        probe: Callable[[], ProbeClient],
        wait_replicas: int = 0,
        reads: MultiplexedReads | None = None,
    ) -> None:
        """``reads``: where ``read`` sends its commands (else a redis-py pipeline)."""
        if timeout_s <= 0 or wait_replicas < 0:
            raise ValueError("timeout_s must be positive and wait_replicas >= 0")
        self._client = client
        self._reads = reads
        self.timeout_s = timeout_s
        self.wait_replicas = wait_replicas
        self.cluster = isinstance(client, RedisCluster)
        self._failures = ThrottledLog(log)
        self._newest_answered = 0.0
        """When the newest call that Redis has answered was issued (``time.perf_counter``)."""
        self._probe: asyncio.Future[bool] | None = None
        self._make_probe_client = probe
        self._probe_client: ProbeClient | None = None

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        timeout_s: float,
        max_connections: int = 64,
        cluster: bool = False,
        wait_replicas: int = 0,
    ) -> RedisConnection:
        """A pooled client that reconnects by itself: a dead pooled connection (Redis restarted) is
        replaced and the command retried twice with a short backoff, all within the call's deadline.
        With ``cluster`` a cluster client (``max_connections`` per node) that also re-reads the slots
        after a failover."""
        socket_timeout = max(timeout_s, 1.0)
        retry = Retry(ExponentialBackoff(cap=0.05, base=0.002), retries=2)
        probe_options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        if cluster:
            client = RedisCluster.from_url(
                url,
                max_connections=max_connections,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                socket_keepalive=True,
                retry=retry,
            )

            def cluster_probe() -> ProbeClient:
                """Started from every node the client knows (the URL's node may be the one down)."""
                try:  # in a worker thread: the event loop may be updating the node table meanwhile
                    nodes = [redis.cluster.ClusterNode(n.host, n.port) for n in client.get_nodes()]
                except RuntimeError:
                    nodes = []
                if not nodes:
                    return redis.cluster.RedisCluster.from_url(url, **probe_options)
                return redis.cluster.RedisCluster(startup_nodes=nodes, **probe_options)

            return cls(client, timeout_s=timeout_s, probe=cluster_probe, wait_replicas=wait_replicas)
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,  # wait for a free pooled connection (the call's deadline cuts it shorter)
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            socket_keepalive=True,
            health_check_interval=30,
            retry=retry,
        )
        address = Address.from_url(url)
        reads = (
            None
            if address is None
            else MultiplexedReads(
                address,
                connect_timeout_s=socket_timeout,
                stale_after_s=max(1.0, timeout_s * OWN_WAIT_LIMIT_FACTOR),
            )
        )
        return cls(
            Redis.from_pool(pool),
            timeout_s=timeout_s,
            probe=lambda: redis.Redis.from_url(url, **probe_options),
            wait_replicas=wait_replicas,
            reads=reads,
        )

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
        return cls.connect(
            settings.redis_url,
            timeout_s=timeout_s,
            max_connections=max_connections,
            cluster=settings.redis_mode == "cluster",
            wait_replicas=settings.redis_wait_replicas,
        )

    async def call(self, op: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        """One command, e.g. ``call("forget", lambda r: r.delete(*keys))``."""
        return await self._timed(op, command(self._client))

    async def read(self, op: str, commands: Sequence[Command]) -> list:
        """The raw replies of read-only ``commands`` (RESP2 as hiredis gives it: bytes, ints, lists), in one
        round trip: on a single Redis multiplexed with every concurrent read on one connection
        (``service.multiplex``), on a cluster (or a URL with query options) a redis-py pipeline."""
        if self._reads is not None:
            return await self._timed(op, self._reads.submit(commands))

        def queue(pipe: Pipeline) -> None:
            for command in commands:
                pipe.execute_command(*command)

        return await self.pipeline(op, queue, transaction=False)

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
        """EVALSHA ``script`` (see ``run_scripts``)."""
        return (await self.run_scripts(op, [(script, keys, args)]))[0]

    async def run_scripts(self, op: str, calls: Sequence[ScriptCall], *, replicated: bool = False) -> list:
        """The replies of ``calls``, sent as EVALSHAs in one pipeline (on a cluster, one per node). A call
        the server answers NOSCRIPT (it ran nothing) is sent again after SCRIPT LOAD. With ``replicated``
        and ``wait_replicas`` set, each node's part is followed by WAIT on the same connection, and
        ``StoreUnavailable`` (from ``NotReplicated``) is raised unless that many replicas acknowledged it."""
        wait = self.wait_replicas if replicated else 0

        async def run() -> list:
            results: list = [None] * len(calls)
            pending = list(range(len(calls)))
            for _ in range(2):
                replies = await self._evalsha(calls, pending, wait)
                missing = [
                    i for i, reply in zip(pending, replies, strict=True) if isinstance(reply, NoScriptError)
                ]
                for i, reply in zip(pending, replies, strict=True):
                    if isinstance(reply, Exception) and i not in missing:
                        raise reply
                    results[i] = reply
                if not missing:
                    return results
                for script in {calls[i][0] for i in missing}:
                    await self._client.script_load(script.source)
                pending = missing
            raise NoScriptError(
                f"scripts still missing after SCRIPT LOAD: {sorted(calls[i][0].name for i in pending)}"
            )

        return await self._timed(op, run())

    async def _evalsha(self, calls: Sequence[ScriptCall], which: list[int], wait: int) -> list:
        """One pipeline of the EVALSHAs ``which``; with ``wait``, a WAIT after each node's (or the one
        server's) commands, its reply checked here and left out of the list."""
        wait_ms = max(int(self.timeout_s * 500), 1)  # half the deadline, so the answer comes within it
        async with self._client.pipeline(transaction=False) as pipe:
            for i in which:
                script, keys, args = calls[i]
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            if wait and isinstance(self._client, RedisCluster):
                written = (self._client.get_node_from_key(calls[i][1][0]) for i in which)
                for node in {node.name: node for node in written}.values():
                    pipe.execute_command("WAIT", wait, wait_ms, target_nodes=node)
            elif wait:
                pipe.execute_command("WAIT", wait, wait_ms)
            replies = await pipe.execute(raise_on_error=False)
        acknowledged = replies[len(which) :]
        for count in acknowledged:
            if isinstance(count, Exception):
                raise count
            if int(count) < wait:
                raise NotReplicated(f"WAIT: {count} of {wait} replicas acknowledged within {wait_ms} ms")
        return replies[: len(which)]

    async def scan(self, op: str, match: str, count: int) -> AsyncIterator[list[bytes]]:
        """Every key matching ``match``, about ``count`` per reply (on a cluster, node after node). A key
        written or deleted meanwhile may be missed or listed, and one may be listed twice."""
        if not isinstance(self._client, RedisCluster):
            async for keys in self._scan_node(op, match, count, {}):
                yield keys
            return
        for node in self._client.get_primaries():
            async for keys in self._scan_node(op, match, count, {"target_nodes": node}):
                yield keys

    async def _scan_node(self, op: str, match: str, count: int, target: dict) -> AsyncIterator[list[bytes]]:
        cursor: int | None = None
        while cursor != 0:
            command = ("SCAN", cursor or 0, "MATCH", match, "COUNT", count)
            reply = await self.call(op, lambda r, c=command: r.execute_command(*c, **target))
            cursor, keys = reply
            if isinstance(cursor, dict):  # the cluster client answers {node: cursor}
                (cursor,) = cursor.values()
            if keys:
                yield keys

    async def ping(self) -> None:
        """Raises StoreUnavailable unless Redis answers within the deadline."""
        await self._timed("ping", self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()
        if self._reads is not None:
            await self._reads.close()
        if self._probe_client is not None:
            self._probe_client.close()

    async def _timed(self, op: str, awaitable: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            result = await self._within_deadline(awaitable)
        except REDIS_FAULTS as exc:
            REDIS_ERRORS.labels(op).inc()
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self.timeout_s * 1000:.0f} ms"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            elapsed_ms = (time.perf_counter() - start) * 1000
            message = "redis %s failed after %.1f ms: %s"
            self._failures.log(logging.WARNING, op, message, op, elapsed_ms, reason)
            raise StoreUnavailable(f"redis {op}: {reason}") from exc
        labelled(REDIS_LATENCY, op).observe(time.perf_counter() - start)
        return result

    async def _within_deadline(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result, or TimeoutError once Redis has had ``timeout_s`` to answer and did not.

        A process saturated by its own requests runs every step of every task late: the command may wait
        for the loop to send it, or its reply for the loop to read it, while Redis answers on time. So at
        its deadline a call asks whether Redis has answered any call issued *after* it, and if none has,
        PINGs Redis from a worker thread with a blocking client whose socket timeout is ``timeout_s``
        (one PING shared by every call reaching its deadline meanwhile): off the event loop, the PING's
        time is Redis's, not the loop's. Redis runs commands one at a time, so an answer proves that it is
        serving and that the call's wait is this process's: the call gets a fresh ``timeout_s``, up to
        ``OWN_WAIT_LIMIT_FACTOR`` deadlines in all. A stalled, slow or unreachable Redis leaves the PING
        unanswered too, and the call fails about one deadline later (``service.loop_lag`` and the admission
        control shed the process's own overload).

        A multiplexed read is a bare future, awaited as it is, and the deadline is a timer (``_Deadline``):
        such a read costs no task and no event-loop turn beyond its reply's. Any other call runs as a task,
        which a cancelled caller leaves to unwind on its own (``_settled``)."""
        issued = time.perf_counter()
        call = asyncio.ensure_future(awaitable)  # a multiplexed read's future as it is, else a task
        call.add_done_callback(lambda done: self._answered(done, issued))
        deadline = _Deadline(call, self.timeout_s, lambda: self._own_wait(issued))
        try:
            await _settled(call)  # cancelling the caller (request deadline, shutdown) cancels the call
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if deadline.expired and not (current is not None and current.cancelling()):
                raise TimeoutError from None
            raise
        finally:
            deadline.disarm()
        if call.cancelled():  # by the deadline: the caller was still waiting
            raise TimeoutError
        return call.result()

    async def _redis_answered_after(self, issued: float) -> bool:
        """Whether Redis has answered a call issued after ``issued``; while none has, it PINGs (the probe in
        flight if there is one), until a PING issued after ``issued`` is answered or one goes unanswered."""
        while self._newest_answered <= issued:
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._ping_once())
            if not await asyncio.shield(self._probe):
                return False
        return True

    async def _ping_once(self) -> bool:
        issued = time.perf_counter()
        answered = await asyncio.to_thread(self._ping_off_loop)
        if answered:
            self._newest_answered = max(self._newest_answered, issued)
        return answered

    def _ping_off_loop(self) -> bool:
        """In a worker thread: PING with the blocking probe client (made on first use)."""
        try:
            if self._probe_client is None:
                self._probe_client = self._make_probe_client()
            return bool(self._probe_client.ping())
        except REDIS_FAULTS:  # a probe that cannot reach Redis proves nothing: the call fails
            return False

    async def _own_wait(self, issued: float) -> bool:
        """At a call's deadline: whether its wait is this process's own and it may wait one more deadline
        (``_within_deadline``)."""
        try:
            answered = await self._redis_answered_after(issued)
        except Exception:  # a bug, not a Redis fault (the probe answers those False): the call fails
            log.exception("redis deadline probe failed")
            return False
        return answered and time.perf_counter() - issued < self.timeout_s * OWN_WAIT_LIMIT_FACTOR

    def _answered(self, task: asyncio.Future, issued: float) -> None:
        if not task.cancelled() and task.exception() is None:
            self._newest_answered = max(self._newest_answered, issued)
