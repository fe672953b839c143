"""The measured requests: HTTP posters, open- and closed-loop senders, and the figures of one step.

Open loop sends each request at its scheduled time whether or not earlier ones were answered, and
measures latency from the *scheduled* time, so a stalled server shows up as latency instead of as
fewer requests (no coordinated omission). Closed loop keeps a fixed number of requests in flight.
Both are bounded by a duration and a request count and stop by themselves.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from loadtests.report import latency_summary
from loadtests.workload import JSON_HEADERS, Workload

OK = "200"
now = time.perf_counter
"""The clock of every measurement (uvloop's ``loop.time()`` has millisecond resolution)."""


@dataclass(slots=True)
class Sample:
    """One request of a step."""

    kind: str
    offset: float  # scheduled (open loop) or actual (closed loop) send time since the step began, s
    latency: float  # s, to the response from the scheduled send (open) or from the send (closed)
    lag: float  # s, actual send − scheduled send (the generator's own lateness)
    outcome: str  # "200", another status, "degraded", "client_timeout", "client_overload", an error name


@dataclass
class StepRun:
    """The raw result of one step, before :func:`summarize`."""

    samples: list[Sample]
    scheduled: int
    window_s: float  # the span requests were offered over
    elapsed_s: float  # step start → last answer (>= window_s)
    client_cpu_s: float


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as this client reads it."""


class RawHttpClient:
    """A minimal HTTP/1.1 keep-alive client for the measured requests only.

    It costs about 0.1 ms of CPU per call where httpx costs about 1.5 ms (measured on this project's
    2-core box); the generator runs beside the server, so every millisecond it spends is taken from
    the server under test. Control calls (readiness, histories, /metrics) use httpx.
    """

    def __init__(self, url: str, *, max_connections: int, timeout_s: float, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        extra = "".join(f"{k}: {v}\r\n" for k, v in {**headers, **JSON_HEADERS}.items())
        self._head = f"HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n{extra}"

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body). A kept-alive connection the server closed meanwhile is replaced once."""
        async with self._slots, asyncio.timeout(self.timeout_s):
            request = f"POST {path} {self._head}content-length: {len(body)}\r\n\r\n".encode() + body
            while self._idle:
                conn = self._idle.pop()
                if conn[0].at_eof():
                    conn[1].close()
                    continue
                try:
                    return await self._exchange(conn, request)
                except (ConnectionError, asyncio.IncompleteReadError):
                    break  # closed by the server while idle: one retry on a fresh connection
            conn = await asyncio.open_connection(self.host, self.port)
            return await self._exchange(conn, request)

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if sep:
                    headers[name.strip().lower()] = value.strip().lower()
            if b"content-length" not in headers:
                raise ProtocolError(f"answer without content-length: {lines[0]!r}")
            content = await reader.readexactly(int(headers[b"content-length"]))
        except BaseException:
            writer.close()
            raise
        if headers.get(b"connection") == b"close":
            writer.close()
        else:
            self._idle.append(conn)
        return status, content

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class HttpxPoster:
    """The measured requests through httpx (``--client httpx``), for comparison with the raw client."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        response = await self.client.post(path, content=body, headers=JSON_HEADERS)
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self.client.aclose()


Poster = RawHttpClient | HttpxPoster


async def send(poster: Poster, kind: str, path: str, body: bytes) -> str:
    """POST one call; its outcome. A 200 computed without the stored history counts as ``degraded``."""
    try:
        status, content = await poster.post(path, body)
    except (TimeoutError, httpx.TimeoutException):
        return "client_timeout"
    except (OSError, asyncio.IncompleteReadError, ProtocolError, ValueError, httpx.HTTPError) as exc:
        return type(exc).__name__
    if status == 200 and kind != "events" and b'"degraded":true' in content:
        return "degraded"
    return str(status)


def arrival_offsets(
    rate: float, duration_s: float, max_requests: int, arrivals: str, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, float]:
    """Send times (s since the start) of one open-loop step, and the window they span."""
    if rate <= 0 or duration_s <= 0 or max_requests < 1:
        raise ValueError("rate, duration and max requests must be positive")
    if arrivals == "uniform":
        n = max(1, min(max_requests, math.floor(rate * duration_s)))
        return np.arange(n) / rate, n / rate
    if arrivals != "poisson":
        raise ValueError(f"arrivals must be poisson or uniform, not {arrivals!r}")
    gaps = (rng or np.random.default_rng()).exponential(1.0 / rate, size=int(rate * duration_s * 1.3) + 50)
    offsets = np.concatenate([[0.0], np.cumsum(gaps)])
    offsets = offsets[offsets < duration_s]
    if len(offsets) > max_requests:
        offsets = offsets[:max_requests]
        return offsets, float(offsets[-1] + 1.0 / rate)
    return offsets, duration_s


async def open_loop(
    poster: Poster,
    workload: Workload,
    offsets: np.ndarray,
    window_s: float,
    *,
    max_inflight: int,
    drain_timeout_s: float,
) -> StepRun:
    """Send at the scheduled offsets regardless of answers; a request that would exceed ``max_inflight``
    open requests is not sent and counts as ``client_overload``."""
    samples: list[Sample] = []
    inflight: set[asyncio.Task[None]] = set()
    cpu_before = time.process_time()
    start = now() + 0.01
    last_answer = start

    async def fire(kind: str, path: str, body: bytes, at: float) -> None:
        nonlocal last_answer
        sent = now()
        try:
            outcome = await send(poster, kind, path, body)
        except asyncio.CancelledError:
            samples.append(Sample(kind, at - start, math.nan, sent - at, "client_timeout"))
            raise
        answered = now()
        last_answer = max(last_answer, answered)
        samples.append(Sample(kind, at - start, answered - at, sent - at, outcome))

    for offset in offsets.tolist():
        at = start + offset
        delay = at - now()
        if delay > 0:
            await asyncio.sleep(delay)
        kind, path, body = workload.next_call()
        if len(inflight) >= max_inflight:
            samples.append(Sample(kind, offset, math.nan, now() - at, "client_overload"))
            continue
        task = asyncio.create_task(fire(kind, path, body, at))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        _, pending = await asyncio.wait(set(inflight), timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return StepRun(
        samples=samples,
        scheduled=len(offsets),
        window_s=window_s,
        elapsed_s=max(window_s, last_answer - start),
        client_cpu_s=time.process_time() - cpu_before,
    )


async def closed_loop(
    poster: Poster, workload: Workload, concurrency: int, duration_s: float, max_requests: int
) -> StepRun:
    """``concurrency`` users each sending their next request as soon as the last one is answered."""
    samples: list[Sample] = []
    cpu_before = time.process_time()
    start = now()
    deadline = start + duration_s
    budget = max_requests

    async def user() -> None:
        nonlocal budget
        while budget > 0 and now() < deadline:
            budget -= 1
            kind, path, body = workload.next_call()
            sent = now()
            outcome = await send(poster, kind, path, body)
            samples.append(Sample(kind, sent - start, now() - sent, 0.0, outcome))

    await asyncio.gather(*(user() for _ in range(concurrency)))
    elapsed = now() - start
    return StepRun(samples, len(samples), elapsed, elapsed, time.process_time() - cpu_before)


def summarize(
    run: StepRun,
    *,
    mode: str,
    bound_ms: float,
    target_rps: float | None = None,
    concurrency: int | None = None,
    server_cpu_s: float | None = None,
) -> dict[str, Any]:
    """The figures of one step. Offered = scheduled / window; achieved = answered 200s / (start → last
    answer), so achieved ≤ offered by construction. Latency percentiles are over the 200 answers."""
    ok = [s.latency for s in run.samples if s.outcome == OK]
    errors = Counter(s.outcome for s in run.samples if s.outcome != OK)
    latency = latency_summary(ok)
    lag = latency_summary([s.lag for s in run.samples if not math.isnan(s.lag)])
    kinds = sorted({s.kind for s in run.samples})
    passed = (
        not errors and len(ok) == run.scheduled and latency["p99"] is not None and latency["p99"] <= bound_ms
    )
    step: dict[str, Any] = {
        "mode": mode,
        "target_rps": target_rps,
        "concurrency": concurrency,
        "window_s": round(run.window_s, 3),
        "elapsed_s": round(run.elapsed_s, 3),
        "scheduled": run.scheduled,
        "answered": sum(1 for s in run.samples if not math.isnan(s.latency)),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_rate": round(sum(errors.values()) / run.scheduled, 6) if run.scheduled else 0.0,
        "offered_rps": round(run.scheduled / run.window_s, 2),
        "achieved_rps": round(len(ok) / run.elapsed_s, 2),
        "latency_ms": latency,
        "send_lag_ms": {k: lag[k] for k in ("p50", "p99", "max")},
        "client_cpu_pct": round(100.0 * run.client_cpu_s / run.elapsed_s, 1),
        "server_cpu_pct": None if server_cpu_s is None else round(100.0 * server_cpu_s / run.elapsed_s, 1),
        # CPU the service spent per answered request: far less sensitive to a busy machine than latency.
        "server_cpu_ms_per_request": (
            None if server_cpu_s is None or not ok else round(1000.0 * server_cpu_s / len(ok), 3)
        ),
        "passed": passed,
    }
    if len(kinds) > 1:
        step["latency_ms_by_kind"] = {
            k: latency_summary([s.latency for s in run.samples if s.kind == k and s.outcome == OK])
            for k in kinds
        }
    return step
