"""Prometheus metrics of the service, exposed at ``GET /metrics``.

One worker: the process's own registry. Several uvicorn workers (``CLICKRANK_WORKERS`` > 1): prometheus
client's multiprocess mode, set up by ``service.server`` before the workers start: each worker writes its
samples to files in ``PROMETHEUS_MULTIPROC_DIR`` and a scrape, whichever worker answers it, sums them
over every worker (gauges: ``multiprocess_mode`` below), so ``/metrics`` is whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.metrics import MetricWrapperBase

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1.0,
    2.5,
)
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)

REQUESTS = Counter("clickrank_requests_total", "HTTP requests", ["route", "method", "status"])
REQUEST_LATENCY = Histogram(
    "clickrank_request_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS
)
SHED_LATENCY = Histogram(
    "clickrank_shed_seconds",
    "latency of the model requests shed at admission (also in clickrank_request_seconds: the difference is "
    "the admitted requests' latency)",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
MODEL_RELOADS = Counter(
    "clickrank_model_reloads_total", "new model versions swapped in or refused", ["outcome"]
)
DEGRADED = Counter("clickrank_degraded_total", "answers computed without the stored history", ["route"])

BATCH_SIZE = Histogram(
    "clickrank_batch_size", "requests per ONNX Runtime call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
QUEUE_DEPTH = Gauge(
    "clickrank_queue_depth", "requests waiting in the micro-batcher", multiprocess_mode="livesum"
)
QUEUE_WAIT = Histogram(
    "clickrank_queue_wait_seconds", "time from enqueue to batch start", buckets=_FAST_BUCKETS
)
QUEUE_REJECTED = Counter("clickrank_queue_rejected_total", "requests refused because the queue was full")
SHED = Counter(
    "clickrank_shed_total",
    "model requests refused at admission (also in clickrank_queue_rejected_total)",
    ["reason"],  # in_flight | loop_lag
)
LOOP_LAG = Histogram(
    "clickrank_event_loop_lag_seconds",
    "how much later than asked the event loop's heartbeat woke (service.loop_lag)",
    buckets=_FAST_BUCKETS,
)
GC_PAUSE = Histogram(
    "clickrank_gc_pause_seconds",
    "the cyclic garbage collector's pauses of this process, by generation (service.gc_pauses)",
    ["generation"],
    buckets=_FAST_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "clickrank_inference_seconds", "ONNX Runtime call duration", ["graph"], buckets=_FAST_BUCKETS
)

REDIS_LATENCY = Histogram("clickrank_redis_seconds", "Redis round trip", ["op"], buckets=_FAST_BUCKETS)
REDIS_ERRORS = Counter(
    "clickrank_redis_errors_total", "Redis calls that failed or passed their deadline", ["op"]
)

EVENTS_INGESTED = Counter("clickrank_events_total", "events acknowledged", ["result"])  # stored | duplicate
ITEMS_UPSERTED = Counter("clickrank_items_upserted_total", "items encoded and upserted")
MODEL_INFO = Gauge(
    "clickrank_model_info", "the loaded model (value 1)", ["version", "provider"], multiprocess_mode="livemax"
)
CANDIDATES = Histogram(
    "clickrank_candidates",
    "candidates per /v1/recommend request by source (after exclusions; 'union' = what the ranker scored)",
    ["source"],  # retrieval | covisit | fresh | trending | prior | union
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000),
)

COVISIT_CACHE = Counter(
    "clickrank_covisit_cache_total",
    "co-visitation sets a request needed, by where they came from (CLICKRANK_COVISIT_CACHE_S)",
    ["result"],  # hit | miss (read from Redis)
)


M = TypeVar("M", bound=MetricWrapperBase)


@cache
def labelled(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, the child kept for every later call. ``labels()`` takes a lock and checks
    its values each time (about 2 µs), and a request reaches it up to ten times; the label values passed
    here come from small fixed sets (routes, statuses, ops, sources), so the cache stays small. Nothing in
    the service removes a child, which would leave a stale one here."""
    return metric.labels(*values)


def counted_from_start(metric: Counter, values: Iterable[str]) -> None:
    """Create ``metric``'s series for each of ``values`` (its one label) now, at 0: a series born at its
    first count shows no ``increase()`` for it, and a dashboard shows "no data" instead of 0 until then."""
    for value in values:
        metric.labels(value)


def exposition() -> bytes:
    """The text exposition of every metric: this process's, or every worker's in multiprocess mode."""
    if os.environ.get(MULTIPROC_DIR_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def worker_exit() -> None:
    """In multiprocess mode, drop this worker's live gauges (its queue depth, its model) on shutdown."""
    if os.environ.get(MULTIPROC_DIR_ENV):
        multiprocess.mark_process_dead(os.getpid())
