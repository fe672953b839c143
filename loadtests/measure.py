"""Measured steps against services: one bounded step, the interleaved rate sweep, and the memory soak.

Spawned variants (e.g. batching on and off) run side by side and take turns at each rate, so on a
shared machine a busy moment does not fall on one of them only. The service's own view (batch sizes,
queue wait, ONNX call time) comes from two ``/metrics`` scrapes per step.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from loadtests.client import (
    OK,
    HttpxPoster,
    Poster,
    RawHttpClient,
    StepRun,
    arrival_offsets,
    closed_loop,
    now,
    open_loop,
    summarize,
)
from loadtests.common import log
from loadtests.report import latency_summary, server_delta
from loadtests.server import Target, Variant, cpu_seconds, rss_bytes
from loadtests.workload import Workload

MIB = 2**20


@dataclass
class BenchConfig:
    """What to run and how hard: the load options of ``clickrank bench``."""

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
class Clients:
    control: httpx.AsyncClient  # readiness, model info, histories, /metrics
    load: Poster  # the measured requests


@asynccontextmanager
async def open_clients(url: str, config: BenchConfig) -> AsyncIterator[Clients]:
    headers = {"X-API-Key": config.api_key} if config.api_key else {}
    # trust_env=False: a proxy from the environment must never sit between the generator and loopback.
    options: dict[str, Any] = {
        "base_url": url,
        "timeout": config.timeout_s,
        "headers": headers,
        "trust_env": False,
    }
    control = httpx.AsyncClient(**options)
    if config.client == "httpx":
        limits = httpx.Limits(
            max_connections=config.max_inflight, max_keepalive_connections=config.max_inflight
        )
        load: Poster = HttpxPoster(httpx.AsyncClient(limits=limits, **options))
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


def _server_view(before: str | None, after: str | None) -> dict[str, Any] | None:
    """The ``/metrics`` delta of a step, or None when a scrape failed."""
    return server_delta(before, after) if before and after else None


async def scheduled_run(
    clients: Clients,
    workload: Workload,
    config: BenchConfig,
    rate: float,
    duration_s: float,
    max_requests: int,
    stream: int,
) -> StepRun:
    """One open-loop run at ``rate``; ``stream`` picks its arrival schedule (same for every variant)."""
    rng = np.random.default_rng([config.seed, stream])
    offsets, window = arrival_offsets(rate, duration_s, max_requests, config.arrivals, rng)
    return await open_loop(
        clients.load,
        workload,
        offsets,
        window,
        max_inflight=config.max_inflight,
        drain_timeout_s=config.timeout_s + 1.0,
    )


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
        run = await scheduled_run(clients, workload, config, rate, duration, config.max_requests, step_index)
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
    step["server"] = _server_view(before, after)
    return step


def step_line(name: str, step: dict[str, Any]) -> str:
    """One step as a progress line."""
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


def sustainable_rps(steps: Sequence[dict[str, Any]]) -> float | None:
    """The highest offered rate of a passing open-loop step."""
    passed = [s["target_rps"] for s in steps if s["mode"] == "open" and s["passed"]]
    return max(passed) if passed else None


def refine_rate(steps: Sequence[dict[str, Any]]) -> float | None:
    """Midway between the highest passing rate and the lowest failing rate above it (None: nothing to
    refine, or the two are within 4 %)."""
    best = sustainable_rps(steps)
    if best is None:
        return None
    above = [
        s["target_rps"] for s in steps if s["mode"] == "open" and not s["passed"] and s["target_rps"] > best
    ]
    if not above or min(above) - best <= max(1.0, 0.04 * best):
        return None
    return round((best + min(above)) / 2.0, 1)


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


async def soak(
    target: Target, workload: Workload, config: BenchConfig, rate: float, variant: Variant
) -> dict[str, Any]:
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
        """One sample now, then one per interval, and a last one as soon as the load has ended."""
        while True:
            rss.append((round(now() - started, 2), round(rss_bytes(pid) / MIB, 2)))
            if done.is_set():
                return
            with suppress(TimeoutError):
                async with asyncio.timeout(config.rss_interval_s):
                    await done.wait()

    async with open_clients(target.url, config) as clients:
        await preflight(clients.control, workload)
        sampler = asyncio.create_task(sample_rss())
        max_requests = int(rate * config.soak_s * 1.5) + 100
        before = await scrape(clients.control)
        run = await scheduled_run(clients, workload, config, rate, config.soak_s, max_requests, 999)
        after = await scrape(clients.control)
        done.set()
        await sampler
    step = summarize(run, mode="open", bound_ms=config.p99_bound_ms, target_rps=rate)
    step["server"] = _server_view(before, after)
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
