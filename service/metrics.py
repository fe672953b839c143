"""Prometheus metrics of the service (process-wide, exposed at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
DEGRADED = Counter("clickrank_degraded_total", "answers computed without the stored history", ["route"])

BATCH_SIZE = Histogram(
    "clickrank_batch_size", "requests per ONNX Runtime call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
QUEUE_DEPTH = Gauge("clickrank_queue_depth", "requests waiting in the micro-batcher")
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
INFERENCE_SECONDS = Histogram(
    "clickrank_inference_seconds", "ONNX Runtime call duration", ["graph"], buckets=_FAST_BUCKETS
)

REDIS_LATENCY = Histogram("clickrank_redis_seconds", "Redis round trip", ["op"], buckets=_FAST_BUCKETS)
REDIS_ERRORS = Counter(
    "clickrank_redis_errors_total", "Redis calls that failed or passed their deadline", ["op"]
)

EVENTS_INGESTED = Counter("clickrank_events_total", "events acknowledged", ["result"])  # stored | duplicate
ITEMS_UPSERTED = Counter("clickrank_items_upserted_total", "items encoded and upserted")
MODEL_INFO = Gauge("clickrank_model_info", "the loaded model (value 1)", ["version", "provider"])
CANDIDATES = Histogram(
    "clickrank_candidates",
    "candidates per /v1/recommend request by source (after exclusions; 'union' = what the ranker scored)",
    ["source"],  # retrieval | covisit | fresh | trending | prior | union
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000),
)
