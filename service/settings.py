"""Service configuration: environment variables prefixed ``CLICKRANK_`` (e.g. ``CLICKRANK_REDIS_URL``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class Settings(BaseSettings):
    """Every knob of the service, each with a production default; invalid values fail at startup."""

    model_config = SettingsConfigDict(env_prefix="CLICKRANK_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # "cluster": a Redis Cluster (redis_url names any node; keys hash-tagged, service/redis_keys.py)
    redis_mode: Literal["single", "cluster"] = "single"
    redis_prefix: str = Field(default="cr:", min_length=1, max_length=64, pattern=r"^[^{}]*$")
    # events are acknowledged only once this many replicas have them (WAIT); 0: off
    redis_wait_replicas: int = Field(default=0, ge=0, le=16)
    model_dir: Path = Path("./artifacts")  # a model directory, or a store of versions (models/model_store.py)
    model_poll_interval_s: float = Field(
        default=5.0, ge=0.0
    )  # how often a new current version is looked for; 0: off
    device: Literal["auto", "cuda", "cpu"] = "auto"
    workers: int = Field(default=1, ge=1, le=64)  # uvicorn worker processes (`clickrank serve --workers`)
    metrics_dir: Path | None = None  # several workers: where they share metrics (default: a new temp dir)
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    max_batch_delay_ms: float = Field(default=0.0, ge=0.0, le=1000.0)  # 0: best on CPU (docs/benchmarks.md)
    max_queue: int = Field(default=512, ge=1)
    # the inference thread's nice value (Linux): under CPU contention the event loop runs first
    inference_nice: int = Field(default=10, ge=0, le=19)
    # model requests admitted at once (more get 503 at once); the Redis pool holds this many plus spares,
    # so an admitted request never waits for a connection
    max_in_flight: int = Field(default=64, ge=1)
    history_length: int = Field(default=50, ge=1)
    history_cap: int = Field(default=200, ge=1)
    # a user's history, seen-set and event ids expire this long after their last stored event (0: kept)
    history_ttl_days: float = Field(default=0.0, ge=0.0, le=36500.0)
    redis_timeout_ms: float = Field(default=50.0, gt=0.0)
    # shed /v1/predict and /v1/recommend with 503 while the event loop runs this late (0: off)
    shed_loop_lag_ms: float = Field(default=30.0, ge=0.0)  # 20 shed at 4 connections (docs/benchmarks.md)
    request_timeout_ms: float = Field(default=2000.0, gt=0.0)
    retrieval_size: int = Field(default=300, ge=1)
    # from this many catalog items on: ANN retrieval (faiss IVF) and an estimated partition
    ann_min_items: int = Field(default=200_000, ge=1)
    ann_nprobe: int = Field(default=128, ge=1)  # inverted lists scanned per query: recall against latency
    trending_half_life_s: float = Field(default=259200.0, gt=0.0)
    # on a Redis Cluster: how long a replica reuses the trending and fresh lists merged from the shards
    shard_merge_cache_s: float = Field(default=1.0, ge=0.0, le=60.0)
    trending_candidates: int = Field(default=10, ge=0)  # with history; without it trending fills top_k
    covisit_window: int = Field(default=5, ge=0, le=50)  # 0 turns co-visitation updates off
    covisit_size: int = Field(default=50, ge=1, le=1000)
    covisit_sources: int = Field(default=3, ge=0, le=50)
    covisit_candidates: int = Field(default=100, ge=0)
    # how long a replica reuses an item's co-visitation set read from Redis (0: read it every request)
    covisit_cache_s: float = Field(default=1.0, ge=0.0, le=60.0)
    # how long a replica reuses the trending and fresh lists (as catalog rows) for recommend (0: never)
    lists_cache_s: float = Field(default=1.0, ge=0.0, le=60.0)
    # β: probability × e^(β·co-visitation); 8 was best of 0, 1, 2, 4, 8 on the validation replay (README)
    covisit_weight: float = Field(default=8.0, ge=0.0, le=50.0)
    fresh_size: int = Field(default=200, ge=1, le=10000)
    fresh_candidates: int = Field(default=20, ge=0)
    api_keys: str = ""
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    intra_op_threads: int = Field(default=1, ge=0)  # 1: measured fastest on CPU (docs/benchmarks.md)
    item_sync_interval_s: float = Field(default=1.0, gt=0.0)
    log_user_ids: bool = False  # false: a log line names a user by a keyed hash (UserLogNames), never raw
    log_hash_key: str = ""  # that hash's key; empty: a random key per process (see docs/operations.md)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(_REDIS_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(_REDIS_SCHEMES)}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}")
        return level

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.history_cap < self.history_length:
            raise ValueError(
                f"history_cap ({self.history_cap}) must be >= history_length ({self.history_length}): "
                "the ranker cannot read more events than Redis keeps"
            )
        if self.fresh_candidates > self.fresh_size:
            raise ValueError(
                f"fresh_candidates ({self.fresh_candidates}) must be <= fresh_size ({self.fresh_size}): "
                "Redis keeps only fresh_size fresh items"
            )
        if self.redis_timeout_ms >= self.request_timeout_ms:
            raise ValueError("redis_timeout_ms must be smaller than request_timeout_ms")
        return self

    def log_secrets(self) -> list[str]:
        """The strings a log line must never show (masked by the formatters)."""
        return [*self.api_key_list(), self.log_hash_key]

    def api_key_list(self) -> list[str]:
        """The accepted API keys; an empty list means authentication is off."""
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]
