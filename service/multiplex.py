"""Read-only Redis commands of every concurrent request, pipelined on one connection.

redis-py's asyncio client checks a connection out of its pool for every call and spends about 140 µs of
event-loop CPU on one round trip (a quarter of a predict's CPU went to its two reads, measured). Here each
call's commands go out in one write on a single connection that every request shares, replies are parsed
by hiredis as they arrive and handed out in order (Redis answers a connection's commands in the order it
received them), so under load one socket read and one event-loop wakeup serve many requests.

Only for the hot reads of a single Redis (``RedisConnection.read``); writes, scripts and a cluster keep
redis-py's client. A connection that drops fails the calls waiting on it and is reopened by the next call;
one that has had calls waiting and received nothing for ``stale_after_s`` (a peer gone without a FIN, a
network partition) is dropped the same way, so the reads never wait on a dead socket for good.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

Command = tuple[str | bytes | int | float, ...]
"""One Redis command and its arguments, e.g. ``("ZRANGE", key, -50, -1, "WITHSCORES")``."""


@dataclass(frozen=True, slots=True)
class Address:
    """Where the connection goes and how it logs in: what a ``redis://``, ``rediss://`` or ``unix://`` URL
    without query options says."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a unix socket
    tls: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Address | None:
        """The address of ``url``; None for a URL with query options (``?ssl_cert_reqs=none``, ...), whose
        meaning only redis-py's client knows."""
        parts = urlsplit(url)
        if parts.query or parts.scheme not in ("redis", "rediss", "unix"):
            return None
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        login = {"username": username or None, "password": password}
        if parts.scheme == "unix":
            return cls(path=parts.path, **login)
        db = parts.path.strip("/")
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or 6379,
            tls=parts.scheme == "rediss",
            db=int(db) if db else 0,
            **login,
        )


@dataclass(slots=True)
class _Call:
    expected: int
    future: asyncio.Future[list]
    sent: float
    replies: list = field(default_factory=list)


class _RespProtocol(asyncio.Protocol):
    """One connection: commands out, RESP2 replies in, matched to calls in order."""

    def __init__(self) -> None:
        self._parser = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[_Call] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_received = time.monotonic()

    def silent_for(self, now: float) -> float:
        """Seconds that calls have waited with nothing received (0 when none waits)."""
        return now - max(self.waiting[0].sent, self.last_received) if self.waiting else 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, commands: Sequence[Command]) -> asyncio.Future[list]:
        future = asyncio.get_running_loop().create_future()
        self.transport.write(b"".join(hiredis.pack_command(c) for c in commands))  # type: ignore[union-attr]
        self.waiting.append(_Call(len(commands), future, time.monotonic()))
        return future

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        self._parser.feed(data)
        try:
            while (reply := self._parser.gets()) is not False:
                call = self.waiting[0]
                call.replies.append(reply)
                if len(call.replies) == call.expected:
                    self.waiting.popleft()
                    if call.future.done():  # the caller gave up (its deadline): the replies are dropped
                        continue
                    error = next((r for r in call.replies if isinstance(r, ResponseError)), None)
                    if error is None:
                        call.future.set_result(call.replies)
                    else:
                        call.future.set_exception(error)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.abort(f"Redis sent an unreadable reply: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_waiting(f"connection to Redis lost: {exc or 'closed'}")

    def abort(self, reason: str) -> None:
        self._fail_waiting(reason)
        if self.transport is not None:
            self.transport.abort()

    def _fail_waiting(self, reason: str) -> None:
        self.closed = True
        while self.waiting:
            call = self.waiting.popleft()
            if not call.future.done():
                call.future.set_exception(RedisConnectionError(reason))


class MultiplexedReads:
    """Calls of read-only commands on one shared, self-healing connection; see the module docstring."""

    def __init__(self, address: Address, *, connect_timeout_s: float, stale_after_s: float) -> None:
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.stale_after_s = stale_after_s
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def execute(self, commands: Sequence[Command]) -> list:
        """The replies of ``commands``, raw as RESP2 gives them (bytes, ints, lists), in one round trip.
        A connection found dead on the way (Redis restarted since the last call) is replaced and the
        commands sent again: they only read. Raises redis-py's ``ConnectionError`` (no connection) or
        ``ResponseError`` (an error reply)."""
        protocol = self._protocol
        if protocol is not None and protocol.silent_for(time.monotonic()) > self.stale_after_s:
            protocol.abort(f"no reply from Redis for {self.stale_after_s:g} s: connection dropped")
        if protocol is None or protocol.closed:
            return await (await self._connect()).send(commands)
        try:
            return await protocol.send(commands)
        except RedisConnectionError:
            return await (await self._connect()).send(commands)

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def _connect(self) -> _RespProtocol:
        """The open connection, opened (and logged in) by the first caller that finds none."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            protocol = None
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    protocol = await self._open()
                    handshake = self._handshake()
                    if handshake:
                        await protocol.send(handshake)
            except (OSError, TimeoutError, ResponseError, RedisConnectionError) as exc:
                if protocol is not None:
                    protocol.abort("login failed")
                raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc
            self._protocol = protocol
            return protocol

    async def _open(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        a = self.address
        if a.path is not None:
            _, protocol = await loop.create_unix_connection(_RespProtocol, a.path)
        else:
            context = ssl.create_default_context() if a.tls else None
            _, protocol = await loop.create_connection(_RespProtocol, a.host, a.port, ssl=context)
        return protocol

    def _handshake(self) -> list[Command]:
        a = self.address
        commands: list[Command] = []
        if a.password is not None:
            commands.append(("AUTH", a.username, a.password) if a.username else ("AUTH", a.password))
        if a.db:
            commands.append(("SELECT", a.db))
        return commands
