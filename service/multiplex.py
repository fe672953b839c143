"""Read-only Redis commands of every concurrent request, pipelined on one connection.

redis-py's asyncio client checks a connection out of its pool for every call and spends about 140 µs of
event-loop CPU on one round trip (a quarter of a predict's CPU went to its two reads, measured). Here each
call's commands go out in one write on a single connection that every request shares, replies are parsed
by hiredis as they arrive and handed out in order (Redis answers a connection's commands in the order it
received them), so under load one socket read and one event-loop wakeup serve many requests. On an open
connection a call is a bare future (``submit``): no task and no event-loop turn of its own.

Only for the hot reads of a single Redis (``RedisConnection.read``); writes, scripts and a cluster keep
redis-py's client. When a connection drops, the calls waiting on it are sent once more on a new one (they
only read); a call that loses that one too fails. A connection that has had calls waiting and received
nothing for ``stale_after_s`` (a peer gone without a FIN, a network partition) is dropped the same way by
the next call, so the reads never wait on a dead socket for good.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
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
    packed: bytes  # the commands as written
    expected: int
    future: asyncio.Future[list]
    resend: bool  # written again on a new connection if this one drops (once)
    sent: float = 0.0
    replies: list = field(default_factory=list)


LostCalls = Callable[["_RespProtocol", list[_Call], str], None]
"""What a dropped connection does with the calls that were waiting on it, given why it dropped."""


def _fail(calls: list[_Call], reason: str) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(RedisConnectionError(reason))


class _RespProtocol(asyncio.Protocol):
    """One connection: commands out, RESP2 replies in, matched to calls in order."""

    def __init__(self, lost: LostCalls) -> None:
        self._parser = hiredis.Reader(replyError=ResponseError)
        self._lost = lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self.waiting: deque[_Call] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_received = time.monotonic()

    def silent_for(self, now: float) -> float:
        """Seconds that calls have waited with nothing received (0 when none waits)."""
        return now - max(self.waiting[0].sent, self.last_received) if self.waiting else 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def send(self, commands: Sequence[Command], *, resend: bool = True) -> asyncio.Future[list]:
        """The future of the replies of ``commands``, written to the socket now."""
        packed = b"".join(hiredis.pack_command(c) for c in commands)
        call = _Call(packed, len(commands), self._loop.create_future(), resend)  # type: ignore[union-attr]
        self.send_call(call)
        return call.future

    def send_call(self, call: _Call) -> None:
        """Write ``call`` (a new one, or one whose connection dropped) and wait for its replies here."""
        call.sent, call.replies = time.monotonic(), []
        self.transport.write(call.packed)  # type: ignore[union-attr]
        self.waiting.append(call)

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
        calls = [call for call in self.waiting if not call.future.done()]
        self.waiting.clear()
        if calls:
            self._lost(self, calls, reason)


class MultiplexedReads:
    """Calls of read-only commands on one shared, self-healing connection; see the module docstring."""

    def __init__(self, address: Address, *, connect_timeout_s: float, stale_after_s: float) -> None:
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.stale_after_s = stale_after_s
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._resending: set[asyncio.Task] = set()

    def submit(self, commands: Sequence[Command]) -> Awaitable[list]:
        """The replies of ``commands``, raw as RESP2 gives them (bytes, ints, lists), in one round trip: on
        an open connection the call's own future, else ``execute``. Raises redis-py's ``ConnectionError``
        (no connection) or ``ResponseError`` (an error reply)."""
        protocol = self._protocol
        if protocol is None or protocol.closed or protocol.silent_for(time.monotonic()) > self.stale_after_s:
            return self.execute(commands)
        return protocol.send(commands)

    async def execute(self, commands: Sequence[Command]) -> list:
        """``submit``'s replies, after connecting first if need be (or dropping a connection that has been
        silent for too long)."""
        protocol = self._protocol
        if protocol is not None and protocol.silent_for(time.monotonic()) > self.stale_after_s:
            protocol.abort(f"no reply from Redis for {self.stale_after_s:g} s: connection dropped")
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await protocol.send(commands)

    def _lost(self, protocol: _RespProtocol, calls: list[_Call], reason: str) -> None:
        """The calls that were waiting on a dropped connection: those written once go out again on a new
        connection (Redis restarted since, or the connection went silent), the others fail, and so do all
        of them when the connection was closed here (``close``: the process is stopping)."""
        resend = protocol is self._protocol
        _fail([call for call in calls if not (resend and call.resend)], reason)
        again = [call for call in calls if resend and call.resend]
        if again:
            task = asyncio.ensure_future(self._resend(again))
            self._resending.add(task)
            task.add_done_callback(self._resending.discard)

    async def _resend(self, calls: list[_Call]) -> None:
        try:
            protocol = await self._connect()
        except RedisConnectionError as exc:
            _fail(calls, str(exc))
            return
        for call in calls:
            if not call.future.done():  # its caller may have given up meanwhile
                call.resend = False
                protocol.send_call(call)

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
                        await protocol.send(handshake, resend=False)
            except (OSError, TimeoutError, ResponseError, RedisConnectionError) as exc:
                if protocol is not None:
                    protocol.abort("login failed")
                raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc
            self._protocol = protocol
            return protocol

    async def _open(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        a = self.address

        def protocol() -> _RespProtocol:
            return _RespProtocol(self._lost)

        if a.path is not None:
            _, opened = await loop.create_unix_connection(protocol, a.path)
        else:
            context = ssl.create_default_context() if a.tls else None
            _, opened = await loop.create_connection(protocol, a.host, a.port, ssl=context)
        return opened

    def _handshake(self) -> list[Command]:
        a = self.address
        commands: list[Command] = []
        if a.password is not None:
            commands.append(("AUTH", a.username, a.password) if a.username else ("AUTH", a.password))
        if a.db:
            commands.append(("SELECT", a.db))
        return commands
