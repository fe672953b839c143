"""Locust traffic for clickrank: scoring, recommendations and event ingestion by real MovieLens users.

Locust is not a project dependency (it pulls in gevent, Flask and more): ``pip install locust``, store
the histories (``CLICKRANK_REDIS_URL=... clickrank load-history``), then for example::

    CLICKRANK_DATA_DIR=../shared/data/ml-100k locust -f loadtests/locustfile.py \\
        --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 2m

Each simulated user thinks 0.5–2 s between calls; the mix is 60 % ``/v1/predict`` (100 random catalog
items for a user with at least 50 stored events), 20 % ``/v1/recommend`` (top 10) and 20 % ``/v1/events``
(one to three fresh events). A 200 computed without the stored history (``"degraded": true``) is
reported as a failure. ``CLICKRANK_BENCH_API_KEY`` is sent as ``X-API-Key`` when set. For latency
percentiles at a fixed arrival rate (open loop) use ``clickrank bench`` instead: Locust is closed-loop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from locust import FastHttpUser, between, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # locust loads this file by path

from loadtests.workload import JSON_HEADERS, MIXED_WEIGHTS, ROUTES, Workload
from models.data import default_data_dir

WORKLOAD = Workload(default_data_dir(), "mixed", pool=4096)
API_KEY = os.environ.get("CLICKRANK_BENCH_API_KEY")
HEADERS = {**JSON_HEADERS, **({"X-API-Key": API_KEY} if API_KEY else {})}
WEIGHT = {kind: round(10 * share) for kind, share in MIXED_WEIGHTS.items()}


class ClickrankUser(FastHttpUser):
    wait_time = between(0.5, 2.0)

    def _post(self, kind: str, body: bytes) -> None:
        with self.client.post(ROUTES[kind], data=body, headers=HEADERS, catch_response=True) as response:
            if response.status_code == 200 and kind != "events" and b'"degraded":true' in response.content:
                response.failure("degraded answer (computed without the stored history)")

    @task(WEIGHT["predict"])
    def predict(self) -> None:
        self._post("predict", WORKLOAD.predict_body())

    @task(WEIGHT["recommend"])
    def recommend(self) -> None:
        self._post("recommend", WORKLOAD.recommend_body())

    @task(WEIGHT["events"])
    def events(self) -> None:
        self._post("events", WORKLOAD.events_body())
