"""Helpers shared by the test modules: the app's settings and the app running in-process, and reading
Prometheus metrics."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings

BASE_URL = "http://clickrank.test"

Labels = tuple[tuple[str, str], ...]


TEST_DEVICE = os.environ.get("CLICKRANK_TEST_DEVICE", "cpu")
"""The device of the apps under test: ``cuda`` when scripts/gpu-check.sh runs the API tests on a GPU."""


def app_settings(redis_url: str, model_dir: Path, **overrides: Any) -> Settings:
    """Settings of an app under test, on ``TEST_DEVICE`` (the CPU), with deadlines generous for the shared
    test machine (2 s for Redis, 20 s for a request) unless ``overrides`` sets them: the fault tests do.
    Co-visitation sets and the trending and fresh lists are read every request unless ``covisit_cache_s``
    and ``lists_cache_s`` are set."""
    return Settings(
        **{
            "redis_url": redis_url,
            "model_dir": model_dir,
            "device": TEST_DEVICE,
            "redis_timeout_ms": 2000.0,
            "request_timeout_ms": 20000.0,
            "covisit_cache_s": 0.0,  # tests read their own writes at once (test_candidates tests the cache)
            "lists_cache_s": 0.0,  # likewise for the trending and fresh lists
            **overrides,
        }
    )


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The app with its lifespan running, and an HTTP client talking to it through ASGI."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30) as client:
            yield client, app


def metric_samples(text: str, name: str) -> dict[Labels, float]:
    """Every sample called ``name`` in a Prometheus text exposition, by its sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when there is none)."""
    return sum(
        value
        for sample_labels, value in metric_samples(text, name).items()
        if labels.items() <= dict(sample_labels).items()
    )


def local_metric(name: str, **labels: str) -> float:
    """:func:`metric` of this process's registry, as its ``/metrics`` would expose it."""
    return metric(generate_latest(REGISTRY).decode(), name, **labels)


async def scraped_metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """:func:`metric` of the service behind ``client``, read through its ``/metrics``."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return metric(response.text, name, **labels)
