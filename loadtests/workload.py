"""What the load generator sends: pre-serialised request bodies over real MovieLens users and items.

The scenarios (``predict``, ``recommend``, ``mixed``), their routes and mix are defined here, and
:func:`load_histories` stores the chosen users' histories so the service has something to score
against. ``loadtests/locustfile.py`` reuses :class:`Workload` for its traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loadtests.common import log
from models.data import load_dataset

SCENARIOS = ("predict", "recommend", "mixed")
ROUTES = {"predict": "/v1/predict", "recommend": "/v1/recommend", "events": "/v1/events"}
MIXED_WEIGHTS = {"predict": 0.6, "recommend": 0.2, "events": 0.2}
"""Share of each call in the ``mixed`` scenario: mostly scoring, some recommendations and ingestion."""
EVENT_TYPES = ("view", "view", "view", "click", "add_to_cart")
JSON_HEADERS = {"content-type": "application/json"}
"""The content type of every body a :class:`Workload` makes."""


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
        self.mix = MIXED_WEIGHTS if scenario == "mixed" else {scenario: 1.0}
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
        self._kinds = self._rng.choices(list(self.mix), weights=list(self.mix.values()), k=pool)
        self._next = 0

    def describe(self) -> dict[str, Any]:
        return {
            "users": len(self.users),
            "min_events": self.min_events,
            "candidates": self.candidates,
            "items": len(self.items),
            "mix": self.mix,
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
    from service.bulk import bulk_store
    from service.load_history import load_events
    from service.settings import Settings

    settings = Settings(redis_url=redis_url)
    events = workload.history_events()

    async def go() -> tuple[int, int]:
        async with bulk_store(settings, "the load can be repeated") as store:
            return await load_events(store, events)

    accepted, duplicates = asyncio.run(go())
    log(
        f"loaded {len(events)} events of {len(workload.users)} users "
        f"({accepted} new, {duplicates} duplicates)"
    )
    return accepted, duplicates
