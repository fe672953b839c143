"""Bounded load generator for a clickrank service on loopback: open-loop rate sweeps, closed-loop
concurrency steps, batching on/off comparisons on spawned servers, and a memory soak.

Open loop sends each request at its scheduled time whether or not earlier ones were answered, and
measures latency from the *scheduled* time, so a stalled server shows up as latency instead of as
fewer requests (no coordinated omission). Every step is bounded by a duration and a request count and
stops by itself. Spawned variants (e.g. batching on and off) run side by side and take turns at each
rate, so on a shared machine a busy moment does not fall on one of them only. The service's own view
(batch sizes, queue wait, ONNX call time) comes from two ``/metrics`` scrapes per step.
``clickrank bench --help`` lists the options; ``docs/benchmarks.md`` has the commands behind the
published numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from loadtests.report import latency_summary, load_average, machine_info, server_delta, write_report
from models.data import load_dataset

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = os.environ.get("CLICKRANK_DATA_DIR", "../shared/data/ml-100k")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SCENARIOS = ("predict", "recommend", "mixed")
ROUTES = {"predict": "/v1/predict", "recommend": "/v1/recommend", "events": "/v1/events"}
MIXED_WEIGHTS = {"predict": 0.6, "recommend": 0.2, "events": 0.2}
"""Share of each call in the ``mixed`` scenario: mostly scoring, some recommendations and ingestion."""
EVENT_TYPES = ("view", "view", "view", "click", "add_to_cart")
JSON_HEADERS = {"content-type": "application/json"}
OK = "200"
MIB = 2**20
now = time.perf_counter
"""The clock of every measurement (uvloop's ``loop.time()`` has millisecond resolution)."""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- workload


class Workload:
    """Pre-serialised request bodies over real MovieLens users and items.

    Users are those with at least ``min_events`` ratings (whose histories ``clickrank load-history``
    stores); each predict call scores ``candidates`` catalog items drawn at random.
    """

    def __init__(
        self,
        data_dir: str | Path,
        scenario: str,
        *,
        candidates: int = 100,
        min_events: int = 50,
        max_users: int | None = None,
        pool: int = 1024,
        seed: int = 0,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, not {scenario!r}")
        self.data = load_dataset(data_dir)
        self.scenario = scenario
        self.candidates = candidates
        self.min_events = min_events
        counts = Counter(self.data.ratings.user_ids.tolist())
        users = sorted((u for u, n in counts.items() if n >= min_events), key=lambda u: (len(u), u))
        self.users: list[str] = users[:max_users] if max_users else users
        self.items: list[str] = self.data.item_ids
        if not self.users:
            raise ValueError(f"no user in {data_dir} has {min_events} or more events")
        if not 1 <= candidates <= len(self.items):
            raise ValueError(f"--candidates must be between 1 and {len(self.items)}, got {candidates}")
        self._rng = random.Random(seed)
        self._run_id = f"{os.getpid()}-{time.time_ns()}"
        self._events_sent = 0
        self._predict = [self._predict_body() for _ in range(pool)]
        self._recommend = [self._recommend_body() for _ in range(pool)]
        weights = MIXED_WEIGHTS if scenario == "mixed" else {scenario: 1.0}
        self._kinds = self._rng.choices(list(weights), weights=list(weights.values()), k=pool)
        self._next = 0

    def describe(self) -> dict[str, Any]:
        weights = MIXED_WEIGHTS if self.scenario == "mixed" else {self.scenario: 1.0}
        return {
            "users": len(self.users),
            "min_events": self.min_events,
            "candidates": self.candidates,
            "items": len(self.items),
            "mix": weights,
        }

    def _predict_body(self) -> bytes:
        candidates = self._rng.sample(self.items, self.candidates)
        return json.dumps({"user_id": self._rng.choice(self.users), "candidates": candidates}).encode()

    def _recommend_body(self) -> bytes:
        return json.dumps({"user_id": self._rng.choice(self.users), "top_k": 10}).encode()

    def predict_body(self) -> bytes:
        return self._rng.choice(self._predict)

    def recommend_body(self) -> bytes:
        return self._rng.choice(self._recommend)

    def events_body(self) -> bytes:
        """One to three fresh events of one user (unique ``event_id``s: each is really stored)."""
        user = self._rng.choice(self.users)
        stamp = time.time()
        events = []
        for _ in range(self._rng.randint(1, 3)):
            self._events_sent += 1
            events.append(
                {
                    "user_id": user,
                    "item_id": self._rng.choice(self.items),
                    "type": self._rng.choice(EVENT_TYPES),
                    "timestamp": stamp,
                    "event_id": f"bench:{self._run_id}:{self._events_sent}",
                }
            )
        return json.dumps({"events": events}).encode()

    def next_call(self) -> tuple[str, str, bytes]:
        """(kind, path, body) of the scenario's next request."""
        kind = self._kinds[self._next % len(self._kinds)]
        body = self._predict[self._next % len(self._predict)] if kind == "predict" else None
        self._next += 1
        if kind == "recommend":
            body = self.recommend_body()
        elif kind == "events":
            body = self.events_body()
        assert body is not None
        return kind, ROUTES[kind], body

    def history_events(self) -> list:
        """The selected users' ratings as ``rate`` events, in the format ``clickrank load-history`` stores."""
        from service.load_history import rating_events

        wanted = set(self.users)
        return [pair for pair in rating_events(self.data.ratings) if pair[0] in wanted]


def load_histories(redis_url: str, workload: Workload) -> tuple[int, int]:
    """Store the workload users' histories through the service's own store code; (accepted, duplicates)."""
    from service.load_history import CALL_TIMEOUT_S, load_events
    from service.settings import Settings
    from service.store import HistoryStore, connect

    settings = Settings(redis_url=redis_url)
    events = workload.history_events()

    async def go() -> tuple[int, int]:
        store = HistoryStore(
            connect(redis_url, timeout_s=CALL_TIMEOUT_S, max_connections=2),
            prefix=settings.redis_prefix,
            history_cap=settings.history_cap,
            timeout_s=CALL_TIMEOUT_S,
            trending_half_life_s=settings.trending_half_life_s,
        )
        try:
            return await load_events(store, events)
        finally:
            await store.close()

    accepted, duplicates = asyncio.run(go())
    log(
        f"loaded {len(events)} events of {len(workload.users)} users "
        f"({accepted} new, {duplicates} duplicates)"
    )
    return accepted, duplicates


# ------------------------------------------------------------------------------------------- processes


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn ``--workers`` N runs N child processes)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        with suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                stack.extend(
                    int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()
                )
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory (VmRSS) of the process and its descendants."""
    total = 0
    for p in process_tree(pid):
        with suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        with suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Variant:
    """One service configuration: ``CLICKRANK_*`` variables and the uvicorn worker count."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1


class SpawnedServer:
    """``clickrank serve`` as a subprocess on a free loopback port, ready once ``/readyz`` answers 200."""

    def __init__(
        self,
        variant: Variant,
        *,
        model_dir: Path,
        redis_url: str,
        log_path: Path,
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.variant = variant
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CLICKRANK_MODEL_DIR": str(model_dir.resolve()),
            "CLICKRANK_REDIS_URL": redis_url,
            "CLICKRANK_LOG_LEVEL": "WARNING",  # no per-request access log in the measured path
            **variant.env,
        }
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> SpawnedServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "clickrank.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.variant.workers),
        ]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer"
        with httpx.Client(base_url=self.url, timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise ConnectionError(
                        f"clickrank serve exited with status {self.proc.returncode} before it was ready: "
                        f"{self._log_tail()}"
                    )
                try:
                    response = client.get("/readyz")
                except httpx.HTTPError as exc:
                    last = type(exc).__name__  # not listening yet
                else:
                    if response.status_code == 200:
                        return
                    last = response.text[:300]
                    if response.status_code != 503:  # 503 is "still loading"; anything else will not heal
                        raise ConnectionError(f"/readyz answered {response.status_code}: {self._log_tail()}")
                time.sleep(0.2)
        raise ConnectionError(
            f"clickrank serve was not ready after {self.ready_timeout_s:g} s ({last}); "
            f"log: {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        with suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            return " | ".join(line[:400] for line in lines) + f" (full log: {self.log_path})"
        return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the server's process group (graceful drain), SIGKILL if it is still there after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------- load loops


@dataclass(slots=True)
class Sample:
    kind: str
    offset: float  # scheduled (open loop) or actual (closed loop) send time since the step began, s
    latency: float  # s, to the response from the scheduled send (open) or from the send (closed)
    lag: float  # s, actual send − scheduled send (the generator's own lateness)
    outcome: str  # "200", another status, "degraded", "client_timeout", "client_overload", an error name


@dataclass
class StepRun:
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
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = f"HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n{extra}content-type: application/json\r\n"

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
    lags = [s.lag for s in run.samples if not math.isnan(s.lag)]
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
        "send_lag_ms": {k: latency_summary(lags)[k] for k in ("p50", "p99", "max")},
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


# -------------------------------------------------------------------------------------- orchestration


@dataclass
class BenchConfig:
    scenario: str = "predict"
    arrivals: str = "poisson"
    rates: list[float] = field(default_factory=list)
    concurrency: list[int] = field(default_factory=list)
    duration_s: float = 10.0
    max_requests: int = 20_000
    warmup_s: float = 3.0
    cooldown_s: float = 1.0
    p99_bound_ms: float = 50.0
    refine: int = 2
    stop_after_failures: int = 2
    max_inflight: int = 512
    timeout_s: float = 10.0
    soak_s: float = 0.0
    soak_rate: float | None = None
    soak_fraction: float | None = None
    rss_interval_s: float = 5.0
    soak_window_s: float = 10.0
    seed: int = 0
    api_key: str | None = None
    client: str = "raw"


@dataclass
class Target:
    url: str
    pid: int | None = None


def check_loopback(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise ValueError(f"bench only drives a service on loopback (http://127.0.0.1:PORT), not {url!r}")
    return url.rstrip("/")


@dataclass
class Clients:
    control: httpx.AsyncClient  # readiness, model info, histories, /metrics
    load: Poster  # the measured requests


@asynccontextmanager
async def open_clients(url: str, config: BenchConfig) -> AsyncIterator[Clients]:
    headers = {"X-API-Key": config.api_key} if config.api_key else {}
    # trust_env=False: a proxy from the environment must never sit between the generator and loopback.
    control = httpx.AsyncClient(base_url=url, timeout=config.timeout_s, headers=headers, trust_env=False)
    if config.client == "httpx":
        limits = httpx.Limits(
            max_connections=config.max_inflight, max_keepalive_connections=config.max_inflight
        )
        load: Poster = HttpxPoster(
            httpx.AsyncClient(
                base_url=url, limits=limits, timeout=config.timeout_s, headers=headers, trust_env=False
            )
        )
    else:
        load = RawHttpClient(
            url, max_connections=config.max_inflight, timeout_s=config.timeout_s, headers=headers
        )
    try:
        yield Clients(control, load)
    finally:
        await load.aclose()
        await control.aclose()


async def preflight(client: httpx.AsyncClient, workload: Workload) -> dict[str, Any]:
    """The service is ready, and the users' histories are stored; returns the service's model info."""
    try:
        ready = await client.get("/readyz")
        if ready.status_code != 200:
            raise ConnectionError(f"{client.base_url}readyz answers {ready.status_code}: {ready.text[:300]}")
        model = (await client.get("/v1/model")).json()
        for user in workload.users[:3]:  # every scenario expects stored histories
            response = await client.get(f"/v1/users/{user}/history", params={"limit": workload.min_events})
            stored = len(response.json().get("events", [])) if response.status_code == 200 else 0
            if stored < workload.min_events:
                raise ValueError(
                    f"user {user} has {stored} stored events, fewer than {workload.min_events}: load the "
                    "histories first (CLICKRANK_REDIS_URL=... clickrank load-history, or bench "
                    "--load-history)"
                )
    except httpx.HTTPError as exc:
        raise ConnectionError(f"cannot reach the service at {client.base_url}: {exc!r}") from None
    keep = ("version", "dim", "history_length", "catalog_size", "providers", "batching")
    return {k: model.get(k) for k in keep}


async def scrape(client: httpx.AsyncClient) -> str | None:
    with suppress(httpx.HTTPError):
        response = await client.get("/metrics")
        if response.status_code == 200:
            return response.text
    return None


async def measure(
    clients: Clients,
    target: Target,
    workload: Workload,
    config: BenchConfig,
    *,
    rate: float | None = None,
    concurrency: int | None = None,
    duration_s: float | None = None,
    step_index: int = 0,
) -> dict[str, Any]:
    """One bounded step (open loop at ``rate`` or closed loop at ``concurrency``) with its metrics delta."""
    duration = duration_s or config.duration_s
    before = await scrape(clients.control)
    cpu_before = cpu_seconds(target.pid) if target.pid else None
    if rate is not None:
        rng = np.random.default_rng([config.seed, step_index])
        offsets, window = arrival_offsets(rate, duration, config.max_requests, config.arrivals, rng)
        run = await open_loop(
            clients.load,
            workload,
            offsets,
            window,
            max_inflight=config.max_inflight,
            drain_timeout_s=config.timeout_s + 1.0,
        )
    else:
        assert concurrency is not None
        run = await closed_loop(clients.load, workload, concurrency, duration, config.max_requests)
    server_cpu = cpu_seconds(target.pid) - cpu_before if target.pid and cpu_before is not None else None
    after = await scrape(clients.control)
    step = summarize(
        run,
        mode="open" if rate is not None else "closed",
        bound_ms=config.p99_bound_ms,
        target_rps=rate,
        concurrency=concurrency,
        server_cpu_s=server_cpu,
    )
    step["server"] = server_delta(before, after) if before and after else None
    return step


def step_line(name: str, step: dict[str, Any]) -> str:
    lat, server = step["latency_ms"], step.get("server") or {}
    what = f"{step['target_rps']:g} rps" if step["mode"] == "open" else f"concurrency {step['concurrency']}"
    return (
        f"[{name}] {step['mode']} {what}: offered {step['offered_rps']:.1f}, "
        f"achieved {step['achieved_rps']:.1f} rps, p50 {lat['p50']} p99 {lat['p99']} max {lat['max']} ms, "
        f"errors {step['errors'] or 0}, "
        f"mean batch {server.get('mean_batch_size')}, cpu srv {step['server_cpu_pct']}% "
        f"({step['server_cpu_ms_per_request']} ms/req) "
        f"cli {step['client_cpu_pct']}% → {'pass' if step['passed'] else 'FAIL'}"
    )


@dataclass
class Lane:
    """One service under test in a sweep: its configuration, address, clients and measured steps."""

    variant: Variant
    target: Target
    clients: Clients
    model: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0  # failing open-loop steps in a row

    def result(self) -> dict[str, Any]:
        if self.variant.workers > 1:  # each uvicorn worker keeps its own counters; /metrics reaches one
            for step in self.steps:
                if step["server"]:
                    step["server"]["partial"] = f"one of {self.variant.workers} workers' /metrics"
        return {
            "name": self.variant.name,
            "env": self.variant.env,
            "workers": self.variant.workers,
            "url": self.target.url,
            "model": self.model,
            "steps": self.steps,
            "sustainable_rps": sustainable_rps(self.steps),
        }


async def open_lane(
    stack: AsyncExitStack, variant: Variant, target: Target, workload: Workload, config: BenchConfig
) -> Lane:
    """Clients for one service, checked (preflight) and warmed up with unrecorded traffic."""
    clients = await stack.enter_async_context(open_clients(target.url, config))
    model = await preflight(clients.control, workload)
    log(f"[{variant.name}] {target.url}: model {model['version']}, batching {model['batching']}")
    if config.warmup_s > 0:
        rate = min(config.rates) if config.rates else 20.0
        offsets, window = arrival_offsets(rate, config.warmup_s, config.max_requests, "uniform")
        await open_loop(
            clients.load,
            workload,
            offsets,
            window,
            max_inflight=config.max_inflight,
            drain_timeout_s=config.timeout_s,
        )
    return Lane(variant, target, clients, model)


def refine_rate(steps: Sequence[dict[str, Any]]) -> float | None:
    """Midway between the highest passing rate and the lowest failing rate above it (None: nothing to
    refine, or the two are within 4 %)."""
    passed = [s["target_rps"] for s in steps if s["mode"] == "open" and s["passed"]]
    if not passed:
        return None
    best = max(passed)
    above = [
        s["target_rps"] for s in steps if s["mode"] == "open" and not s["passed"] and s["target_rps"] > best
    ]
    if not above or min(above) - best <= max(1.0, 0.04 * best):
        return None
    return round((best + min(above)) / 2.0, 1)


async def sweep(lanes: Sequence[Lane], workload: Workload, config: BenchConfig) -> None:
    """Open-loop steps at each rate, every lane in turn at the same rate with the same arrival schedule
    (interleaved: a busy moment of a shared machine does not fall on one variant only); a lane stops after
    ``stop_after_failures`` failing steps in a row. Then ``refine`` bisection steps per lane, then the
    closed-loop steps."""

    async def step(lane: Lane, **kwargs: Any) -> dict[str, Any]:
        result = await measure(
            lane.clients, lane.target, workload, config, step_index=len(lane.steps), **kwargs
        )
        lane.steps.append(result)
        log(step_line(lane.variant.name, result))
        await asyncio.sleep(config.cooldown_s)
        return result

    for rate in sorted(config.rates):
        for lane in lanes:
            if lane.failures < config.stop_after_failures:
                lane.failures = 0 if (await step(lane, rate=rate))["passed"] else lane.failures + 1
    for _ in range(config.refine):
        for lane in lanes:
            rate = refine_rate(lane.steps)
            if rate is not None:
                await step(lane, rate=rate)
    for concurrency in config.concurrency:
        for lane in lanes:
            await step(lane, concurrency=concurrency)


def sustainable_rps(steps: Sequence[dict[str, Any]]) -> float | None:
    """The highest offered rate of a passing open-loop step."""
    passed = [s["target_rps"] for s in steps if s["mode"] == "open" and s["passed"]]
    return max(passed) if passed else None


async def soak(
    target: Target, workload: Workload, config: BenchConfig, rate: float, variant: Variant
) -> dict:
    """Open loop at ``rate`` for ``soak_s`` seconds, sampling the server's RSS every ``rss_interval_s``.

    The RSS growth compares the sample at the end with the one after the first minute (or after half
    the run, for runs shorter than two minutes): the issue's target is growth within 5 %.
    """
    pid = target.pid
    assert pid is not None
    rss: list[tuple[float, float]] = []
    done = asyncio.Event()
    started = now()

    async def sample_rss() -> None:
        while True:
            rss.append((round(now() - started, 2), round(rss_bytes(pid) / MIB, 2)))
            with suppress(TimeoutError):
                async with asyncio.timeout(config.rss_interval_s):
                    await done.wait()
            if done.is_set():
                rss.append((round(now() - started, 2), round(rss_bytes(pid) / MIB, 2)))
                return

    async with open_clients(target.url, config) as clients:
        await preflight(clients.control, workload)
        sampler = asyncio.create_task(sample_rss())
        rng = np.random.default_rng([config.seed, 999])
        max_requests = int(rate * config.soak_s * 1.5) + 100
        offsets, window = arrival_offsets(rate, config.soak_s, max_requests, config.arrivals, rng)
        before = await scrape(clients.control)
        run = await open_loop(
            clients.load,
            workload,
            offsets,
            window,
            max_inflight=config.max_inflight,
            drain_timeout_s=config.timeout_s + 1.0,
        )
        after = await scrape(clients.control)
        done.set()
        await sampler
    step = summarize(run, mode="open", bound_ms=config.p99_bound_ms, target_rps=rate)
    step["server"] = server_delta(before, after) if before and after else None
    windows = []
    for start in np.arange(0.0, run.window_s, config.soak_window_s).tolist():
        part = [s for s in run.samples if start <= s.offset < start + config.soak_window_s]
        windows.append(
            {
                "start_s": round(start, 1),
                "requests": len(part),
                "latency_ms": latency_summary([s.latency for s in part if s.outcome == OK]),
                "errors": dict(Counter(s.outcome for s in part if s.outcome != OK)),
            }
        )
    baseline_at = min(60.0, config.soak_s / 2.0)
    baseline = next((m for t, m in rss if t >= baseline_at), rss[-1][1])
    end = rss[-1][1]
    growth = 100.0 * (end - baseline) / baseline if baseline else None
    return {
        "variant": variant.name,
        "env": variant.env,
        "target_rps": rate,
        "duration_s": config.soak_s,
        "step": step,
        "windows": windows,
        "rss": {
            "samples": rss,
            "baseline_at_s": baseline_at,
            "baseline_mib": baseline,
            "end_mib": end,
            "max_mib": max(m for _, m in rss),
            "growth_pct": None if growth is None else round(growth, 2),
            "target_pct": 5.0,
            "within_target": growth is not None and growth <= 5.0,
        },
    }


def comparison(variants: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Sustainable rate of the first variant divided by each other's (None where one found none)."""
    if len(variants) < 2:
        return None
    reference = variants[0]
    ratios = {}
    for other in variants[1:]:
        a, b = reference["sustainable_rps"], other["sustainable_rps"]
        ratios[other["name"]] = round(a / b, 3) if a and b else None
    return {"reference": reference["name"], "ratios": ratios}


# ------------------------------------------------------------------------------------------------ CLI


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    return [int(v) for v in _floats(text)]


def parse_variant(text: str, workers: int) -> Variant:
    """``NAME[:KEY=VALUE,...]``; keys without the ``CLICKRANK_`` prefix get it, ``workers`` is uvicorn's."""
    name, _, spec = text.partition(":")
    if not name:
        raise ValueError(f"--variant {text!r}: a name is required (NAME[:KEY=VALUE,...])")
    env: dict[str, str] = {}
    for pair in filter(None, spec.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--variant {text!r}: {pair!r} is not KEY=VALUE")
        if key.lower() == "workers":
            workers = int(value)
            continue
        key = key.upper()
        env[key if key.startswith("CLICKRANK_") else f"CLICKRANK_{key}"] = value
    return Variant(name, env, workers)


def build_parser(prog: str = "clickrank bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Bounded load generator for a clickrank service on loopback; writes a report folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = parser.add_argument_group("target (one of --url, --spawn)")
    target.add_argument("--url", help="a running service on loopback, e.g. http://127.0.0.1:8000")
    target.add_argument("--pid", type=int, help="with --url: the server's pid, for CPU and RSS figures")
    target.add_argument(
        "--spawn", action="store_true", help="start `clickrank serve` per variant, stop it after"
    )
    target.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("CLICKRANK_MODEL_DIR", "./artifacts"))
    )
    target.add_argument(
        "--redis-url",
        default=os.environ.get("CLICKRANK_REDIS_URL"),
        help="Redis of the spawned servers (and of --load-history)",
    )
    target.add_argument("--workers", type=int, default=1, help="uvicorn workers of spawned servers")
    target.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CLICKRANK_* setting for every spawned server (repeatable)",
    )
    target.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[:KEY=VALUE,...]",
        help="a spawned configuration, e.g. unbatched:MAX_BATCH_SIZE=1 (repeatable; all run side by side, "
        "interleaved step by step; the first is the reference of the throughput ratios)",
    )
    target.add_argument("--api-key", default=os.environ.get("CLICKRANK_BENCH_API_KEY"))

    work = parser.add_argument_group("workload")
    work.add_argument("--scenario", choices=SCENARIOS, default="predict")
    work.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="MovieLens 100K (env CLICKRANK_DATA_DIR)")
    work.add_argument("--candidates", type=int, default=100, help="candidates per /v1/predict")
    work.add_argument("--min-events", type=int, default=50, help="only users with at least this many events")
    work.add_argument("--users", type=int, default=None, help="use only the first N such users")
    work.add_argument(
        "--load-history",
        action="store_true",
        help="store the users' histories in --redis-url first (through the service's store)",
    )
    work.add_argument("--seed", type=int, default=0)

    load = parser.add_argument_group("load")
    load.add_argument(
        "--rates", type=_floats, default=[], help="open-loop rates (requests/s), e.g. 50,100,200"
    )
    load.add_argument("--concurrency", type=_ints, default=[], help="closed-loop concurrencies, e.g. 1,8,32")
    load.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    load.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    load.add_argument("--max-requests", type=int, default=20_000, help="request cap per step")
    load.add_argument(
        "--warmup", type=float, default=3.0, help="unrecorded seconds before each variant's steps"
    )
    load.add_argument("--cooldown", type=float, default=1.0, help="pause between steps (s)")
    load.add_argument("--p99-bound-ms", type=float, default=50.0)
    load.add_argument("--refine", type=int, default=2, help="bisection steps after the sweep")
    load.add_argument(
        "--stop-after-failures", type=int, default=2, help="end the sweep after N failing steps in a row"
    )
    load.add_argument(
        "--max-inflight", type=int, default=512, help="open requests at most (more: client_overload)"
    )
    load.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    load.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="client of the measured calls: raw asyncio HTTP/1.1 (~0.1 ms CPU per call) or httpx (~1.5 ms)",
    )

    soak_group = parser.add_argument_group("soak (needs --spawn or --pid)")
    soak_group.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="run a soak this long")
    soak_group.add_argument("--rate", type=float, default=None, help="soak rate (requests/s)")
    soak_group.add_argument(
        "--soak-fraction",
        type=float,
        default=None,
        help="soak at this fraction of the first variant's sustainable rate from the sweep",
    )
    soak_group.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples")
    soak_group.add_argument("--soak-window", type=float, default=10.0, help="seconds per latency window")

    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default reports/bench-<timestamp>)"
    )
    return parser


def _config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        scenario=args.scenario,
        arrivals=args.arrivals,
        rates=args.rates,
        concurrency=args.concurrency,
        duration_s=args.duration,
        max_requests=args.max_requests,
        warmup_s=args.warmup,
        cooldown_s=args.cooldown,
        p99_bound_ms=args.p99_bound_ms,
        refine=args.refine,
        stop_after_failures=args.stop_after_failures,
        max_inflight=args.max_inflight,
        timeout_s=args.timeout,
        soak_s=args.soak,
        soak_rate=args.rate,
        soak_fraction=args.soak_fraction,
        rss_interval_s=args.rss_interval,
        soak_window_s=args.soak_window,
        seed=args.seed,
        api_key=args.api_key,
        client=args.client,
    )


def _check(args: argparse.Namespace) -> list[Variant]:
    """Validate the combination of options; the spawned variants (empty with --url)."""
    if bool(args.url) == bool(args.spawn):
        raise ValueError("give exactly one of --url URL (a running service) and --spawn")
    if not (args.rates or args.concurrency or args.soak):
        raise ValueError("nothing to run: give --rates, --concurrency and/or --soak SECONDS")
    if args.soak and not (args.rate or (args.soak_fraction and args.rates)):
        raise ValueError("--soak needs --rate R, or --soak-fraction F together with a --rates sweep")
    if args.soak and not (args.spawn or args.pid):
        raise ValueError("--soak reads the server's RSS: use --spawn, or --url with --pid")
    if min(args.duration, args.max_requests, args.max_inflight, args.timeout) <= 0:
        raise ValueError("--duration, --max-requests, --max-inflight and --timeout must be positive")
    if (args.spawn or args.load_history) and not args.redis_url:
        raise ValueError("--spawn and --load-history need --redis-url (or CLICKRANK_REDIS_URL)")
    if args.url:
        check_loopback(args.url)
        if args.variant:
            raise ValueError("--variant needs --spawn")
        return []
    if not (args.model_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{args.model_dir}/manifest.json not found (--model-dir)")
    common = dict(parse_variant("common:" + ",".join(args.env), args.workers).env) if args.env else {}
    variants = [parse_variant(v, args.workers) for v in args.variant] or [
        Variant("default", {}, args.workers)
    ]
    return [Variant(v.name, {**common, **v.env}, v.workers) for v in variants]


async def _run(
    args: argparse.Namespace, config: BenchConfig, workload: Workload, variants: list[Variant], out: Path
) -> dict[str, Any]:
    """The sweep over every variant (spawned side by side, or the one --url service), then the soak."""
    lanes: list[Lane] = []
    if config.rates or config.concurrency:
        async with AsyncExitStack() as stack:
            if args.url:
                targets = [(Variant("service", {}, 0), Target(check_loopback(args.url), args.pid))]
            else:
                targets = []
                for i, variant in enumerate(variants):
                    server = stack.enter_context(
                        SpawnedServer(
                            variant,
                            model_dir=args.model_dir,
                            redis_url=args.redis_url,
                            log_path=out / f"server-{i}-{variant.name}.log",
                        )
                    )
                    targets.append((variant, Target(server.url, server.pid)))
            for variant, target in targets:
                lanes.append(await open_lane(stack, variant, target, workload, config))
            await sweep(lanes, workload, config)
    results = [lane.result() for lane in lanes]
    soak_result = None
    if config.soak_s:
        rate = config.soak_rate
        if rate is None and results and results[0]["sustainable_rps"]:
            rate = round((config.soak_fraction or 0.0) * results[0]["sustainable_rps"], 1)
        if not rate:
            log("soak skipped: the sweep found no sustainable rate to take a fraction of")
        elif args.url:
            soak_result = await soak(
                Target(args.url, args.pid), workload, config, rate, Variant("service", {}, 0)
            )
        else:
            with SpawnedServer(
                variants[0],
                model_dir=args.model_dir,
                redis_url=args.redis_url,
                log_path=out / "server-soak.log",
            ) as server:
                log(f"soak: {config.soak_s:g} s at {rate:g} rps on {variants[0].name} (pid {server.pid})")
                soak_result = await soak(Target(server.url, server.pid), workload, config, rate, variants[0])
    return {"variants": results, "comparison": comparison(results), "soak": soak_result}


def _git_commit() -> str | None:
    with suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return done.stdout.strip() or None
    return None


def run(argv: Sequence[str]) -> Path:
    """Parse ``argv``, run the benchmark, write the report folder and return its path."""
    args = build_parser().parse_args(list(argv))
    variants = _check(args)
    config = _config(args)
    created = datetime.now(UTC).replace(microsecond=0)
    out = args.out or Path("reports") / f"bench-{created:%Y%m%dT%H%M%SZ}"
    workload = Workload(
        args.data_dir,
        config.scenario,
        candidates=args.candidates,
        min_events=args.min_events,
        max_users=args.users,
        seed=config.seed,
    )
    if args.load_history:
        load_histories(args.redis_url, workload)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        results = runner.run(_run(args, config, workload, variants, out))
    report = {
        "meta": {
            "created": created.isoformat().replace("+00:00", "Z"),
            "command": "clickrank bench " + shlex.join(argv),
            "git_commit": _git_commit(),
            "machine": machine,
            "scenario": config.scenario,
            "workload": workload.describe(),
            "arrivals": config.arrivals,
            "p99_bound_ms": config.p99_bound_ms,
            "step_duration_s": config.duration_s,
            "max_requests_per_step": config.max_requests,
            "model_dir": str(args.model_dir) if args.spawn else None,
            "loadavg_at_end": load_average(),
            "client": (
                (
                    "raw asyncio HTTP/1.1 keep-alive"
                    if config.client == "raw"
                    else f"httpx {httpx.__version__}"
                )
                + f" on the {'uvloop' if loop_factory else 'asyncio'} event loop, same machine as the server"
            ),
        },
        **results,
    }
    write_report(out, report)
    for variant in results["variants"]:
        log(
            f"[{variant['name']}] sustainable rate at p99 ≤ {config.p99_bound_ms:g} ms: "
            f"{variant['sustainable_rps']}"
        )
    if results["comparison"]:
        log(f"throughput ratios: {results['comparison']['ratios']}")
    log(f"report: {out}/summary.md")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, ConnectionError) as exc:
        print(f"clickrank bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
