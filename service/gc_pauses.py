"""Short garbage-collector pauses: what survives a model swap is frozen out of every later collection.

CPython's cyclic collector stops the process for a full (generation 2) collection while it walks every
tracked object, and a loaded service holds many that live as long as its model: the catalog, the
tokenizer, FastAPI's and pydantic's schemas, every imported module. Measured under ``wrk -c12`` on
``/v1/predict`` (the full-size export, 2026-12-05): 18 full collections in 30 s, 39 ms each (at most
45 ms), about as long as the service's p99 at 12 to 16 connections (45 to 65 ms, against 20 ms at 8).

None of those objects is garbage while its model serves, so after each swap the model reloader calls
``freeze_survivors``: one collection, then every survivor moves to the permanent generation
(``gc.freeze``), which collections skip. The next swap unfreezes them first, so the cycles of a retired
model are collected then. ``observe_pauses`` times every collection into ``clickrank_gc_pause_seconds``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from service.metrics import GC_PAUSE

_PAUSES = tuple(GC_PAUSE.labels(generation=str(g)) for g in range(3))


def freeze_survivors() -> None:
    """Collect everything, the last frozen objects included, and freeze what survives."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class _PauseTimer:
    """A ``gc.callbacks`` entry: the duration of each collection, by generation."""

    def __init__(self) -> None:
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            _PAUSES[info["generation"]].observe(time.perf_counter() - self.started)


_TIMER = _PauseTimer()


def observe_pauses() -> None:
    """Time this process's collections from now on (once, however often it is called)."""
    if _TIMER not in gc.callbacks:
        gc.callbacks.append(_TIMER)
