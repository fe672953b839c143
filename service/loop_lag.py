"""How late the event loop runs: the signal that the process itself, not Redis, is saturated.

A heartbeat task asks to wake every ``interval_s`` and records how much later than asked it woke. When the
loop is busy with the service's own work (parsing, features, responses), every callback waits that long,
a Redis reply included: the admission control sheds new model requests while the lag is high, and the
Redis deadline does not count the loop's own delay as Redis being slow (``RedisConnection``).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress

from service.metrics import LOOP_LAG


class LoopLagMonitor:
    """``lag_s``: the smaller lateness of the last two heartbeats. A loop late beat after beat (saturated by
    its own work) reads its lateness; one pause (a GC, a slow import, a neighbour's burst on a shared core)
    makes one beat late and reads as the beat before it, so the requests that queued during the pause are
    served, not shed."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0
        self._latest_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    def record(self, late_s: float) -> None:
        self.lag_s = min(self._latest_s, late_s)
        self._latest_s = late_s
        LOOP_LAG.observe(late_s)

    async def _beat(self) -> None:
        while True:
            asked = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(max(time.perf_counter() - asked, 0.0))
