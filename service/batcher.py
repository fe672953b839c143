"""Dynamic micro-batcher: many concurrent requests → one inference call, run off the event loop.

A single collector task takes the oldest waiting request, then keeps taking until the batch holds
``max_batch_size`` requests or ``max_delay_ms`` have passed since that request was enqueued, whichever
comes first, and runs ``infer(batch)`` on a dedicated worker thread. While one batch runs the next one
accumulates in the queue, so under load batches grow by themselves and an idle service adds at most
``max_delay_ms`` of latency. The queue is bounded: when it is full ``submit`` refuses at once
(``QueueFull``) instead of letting latency grow without bound.

The worker thread may run at a lower scheduling priority (``worker_nice``, Linux): when the cores are
contended, the event loop, the serial part of every request, runs first, and the batches grow instead,
which a batched graph pays less for per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.metrics import BATCH_SIZE, QUEUE_DEPTH, QUEUE_REJECTED, QUEUE_WAIT

log = logging.getLogger("clickrank.batcher")

Req = TypeVar("Req")
Res = TypeVar("Res")

_EWMA_ALPHA = 0.2
"""Weight of the newest batch in the running estimate of the batch duration (for ``retry_after_s``)."""


class QueueFull(Exception):
    """The batcher's queue is full; ``retry_after_s`` estimates when there will be room again."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"inference queue is full, retry in {retry_after_s:.3f}s")
        self.retry_after_s = retry_after_s


class BatcherClosed(Exception):
    """The batcher is not running (not started yet, or stopping): it takes no new work."""


@dataclass(slots=True)
class _Pending(Generic[Req, Res]):
    request: Req
    future: asyncio.Future[Res]
    enqueued: float = field(default=0.0)


class MicroBatcher(Generic[Req, Res]):
    """Bounded queue + one collector task + one inference thread; see the module docstring."""

    def __init__(
        self,
        infer: Callable[[list[Req]], list[Res]],
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue: int,
        worker_nice: int = 0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_ms < 0 or not 0 <= worker_nice <= 19:
            raise ValueError(
                "max_batch_size and max_queue must be >= 1, max_delay_ms >= 0 and worker_nice 0 to 19"
            )
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.worker_nice = worker_nice
        self._pending: deque[_Pending[Req, Res]] = deque()
        self._wakeup = asyncio.Event()
        self._accepting = False
        self._collector: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batch_seconds = 0.0  # running estimate of one infer() call

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch being inferred)."""
        return len(self._pending)

    async def start(self) -> None:
        if self._collector is not None:
            raise RuntimeError("MicroBatcher.start() called twice")
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="clickrank-infer", initializer=self._lower_priority
        )
        self._accepting = True
        self._collector = asyncio.get_running_loop().create_task(self._collect(), name="microbatcher")

    async def submit(self, request: Req) -> Res:
        """Queue one request and wait for its result (or the exception its batch raised)."""
        if not self._accepting:
            raise BatcherClosed("the inference batcher is not accepting requests")
        if len(self._pending) >= self.max_queue:
            QUEUE_REJECTED.inc()
            raise QueueFull(self._retry_after())
        loop = asyncio.get_running_loop()
        item = _Pending(request, loop.create_future(), loop.time())
        self._pending.append(item)
        QUEUE_DEPTH.set(len(self._pending))
        self._wakeup.set()
        # If the caller is cancelled, awaiting cancels the future too; the collector then skips it.
        return await item.future

    async def stop(self, *, drain: bool = True) -> None:
        """Stop taking work; with ``drain`` finish everything queued, else fail it with ``BatcherClosed``.

        The batch already running always completes. Returns when the worker thread is gone.
        """
        self._accepting = False
        if not drain:
            self._fail_pending()
        self._wakeup.set()
        if self._collector is not None:
            await self._collector
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _lower_priority(self) -> None:
        """Runs in the worker thread: its nice value becomes ``worker_nice`` (Linux schedules threads one
        by one; elsewhere the call would apply to the whole process, so it is skipped)."""
        if not self.worker_nice:
            return
        if sys.platform != "linux":
            log.info("worker_nice=%d ignored: thread priorities are set on Linux only", self.worker_nice)
            return
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.worker_nice)
        except OSError as exc:
            log.warning("could not lower the inference thread's priority: %s", exc)

    def _retry_after(self) -> float:
        """Time to work through the current queue at the recent batch rate (at least one delay window)."""
        batches = math.ceil(len(self._pending) / self.max_batch_size)
        return max(batches * self._batch_seconds, self.max_delay_s, 0.001)

    def _fail_pending(self) -> None:
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosed("the inference batcher stopped"))
        QUEUE_DEPTH.set(0)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._pending:
                    if not self._accepting:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._fill(loop, self._pending[0].enqueued + self.max_delay_s)
                batch = self._take()
                if batch:
                    await self._run(loop, batch)
        finally:
            # Whatever ends the collector (stop, cancellation, a bug), no caller is left waiting forever.
            self._accepting = False
            self._fail_pending()

    async def _fill(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Wait until a full batch is queued, the deadline passes, or the batcher is stopping."""
        while len(self._pending) < self.max_batch_size and self._accepting:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Pending[Req, Res]]:
        """Pop up to ``max_batch_size`` live requests (callers that went away are dropped)."""
        batch: list[_Pending[Req, Res]] = []
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending.popleft()
            if not item.future.done():
                batch.append(item)
        QUEUE_DEPTH.set(len(self._pending))
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[Req, Res]]) -> None:
        started = loop.time()
        for item in batch:
            QUEUE_WAIT.observe(started - item.enqueued)
        BATCH_SIZE.observe(len(batch))
        requests = [item.request for item in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._infer, requests)
            if len(results) != len(batch):
                raise RuntimeError(f"infer returned {len(results)} results for {len(batch)} requests")
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherClosed("the inference batcher was cancelled"))
            raise
        except Exception as exc:
            log.warning("inference failed for a batch of %d: %r", len(batch), exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
        elapsed = loop.time() - started
        previous = self._batch_seconds or elapsed
        self._batch_seconds = _EWMA_ALPHA * elapsed + (1 - _EWMA_ALPHA) * previous
