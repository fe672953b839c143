"""MicroBatcher with a real (threaded, deterministic) infer function: batching, bounds, faults, shutdown."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from helpers import local_metric

from service.batcher import BatcherClosed, MicroBatcher, QueueFull

pytestmark = pytest.mark.anyio


def answer(request: int) -> tuple[int, int]:
    """What infer returns for one request: computed from the request alone, so a mix-up shows."""
    return request, request * request + 7


class Model:
    """A thread-side infer that records every batch; optionally holds on a gate or fails on a value."""

    def __init__(self, delay_s: float = 0.0, poison: int | None = None) -> None:
        self.delay_s = delay_s
        self.poison = poison
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch: list[int]) -> list[tuple[int, int]]:
        self.threads.add(threading.get_ident())
        self.batches.append(list(batch))
        self.entered.set()
        if not self.gate.wait(timeout=10):
            raise TimeoutError("test gate never opened")
        time.sleep(self.delay_s)
        if self.poison is not None and self.poison in batch:
            raise ValueError(f"poisoned batch {batch}")
        return [answer(r) for r in batch]


@asynccontextmanager
async def batching(batcher: MicroBatcher) -> AsyncIterator[MicroBatcher]:
    """The batcher between start() and stop()."""
    await batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()


async def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def test_concurrent_requests_share_batches_without_cross_talk() -> None:
    model = Model(delay_s=0.01)
    batches_before = local_metric("clickrank_batch_size_count")
    async with batching(MicroBatcher(model, max_batch_size=8, max_delay_ms=5, max_queue=100)) as batcher:
        requests = list(range(60))
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    assert results == [answer(r) for r in requests]
    sizes = [len(b) for b in model.batches]
    assert sum(sizes) == len(requests)
    assert max(sizes) > 1 and max(sizes) <= 8
    assert sorted(r for b in model.batches for r in b) == requests
    assert threading.get_ident() not in model.threads and len(model.threads) == 1
    assert local_metric("clickrank_batch_size_count") - batches_before == len(model.batches)


async def test_partial_batch_flushes_after_the_delay() -> None:
    model = Model()
    async with batching(MicroBatcher(model, max_batch_size=64, max_delay_ms=40, max_queue=100)) as batcher:
        started = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(r) for r in (3, 4, 5)))
        elapsed = time.perf_counter() - started
    assert results == [answer(3), answer(4), answer(5)]
    assert model.batches == [[3, 4, 5]]
    assert 0.035 <= elapsed < 2.0


async def test_batch_size_one_runs_each_request_alone_and_at_once() -> None:
    model = Model()
    async with batching(MicroBatcher(model, max_batch_size=1, max_delay_ms=500, max_queue=100)) as batcher:
        started = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(r) for r in range(5)))
        elapsed = time.perf_counter() - started
    assert results == [answer(r) for r in range(5)]
    assert model.batches == [[r] for r in range(5)]
    assert elapsed < 0.5  # a full batch never waits for the delay


async def test_full_queue_refuses_at_once() -> None:
    model = Model()
    model.gate.clear()
    rejected_before = local_metric("clickrank_queue_rejected_total")
    async with batching(MicroBatcher(model, max_batch_size=1, max_delay_ms=0, max_queue=2)) as batcher:
        first = asyncio.ensure_future(batcher.submit(1))
        await wait_for(model.entered.is_set)  # request 1 is being inferred, the queue is empty
        queued = [asyncio.ensure_future(batcher.submit(r)) for r in (2, 3)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(4)
        assert refused.value.retry_after_s > 0
        assert local_metric("clickrank_queue_rejected_total") - rejected_before == 1
        model.gate.set()
        assert await asyncio.gather(first, *queued) == [answer(1), answer(2), answer(3)]
        assert await batcher.submit(5) == answer(5)  # room again
    assert [b[0] for b in model.batches] == [1, 2, 3, 5]


async def test_stop_drains_the_queue_then_refuses() -> None:
    model = Model(delay_s=0.005)
    model.gate.clear()
    batcher = MicroBatcher(model, max_batch_size=4, max_delay_ms=1, max_queue=100)
    await batcher.start()
    pending = [asyncio.ensure_future(batcher.submit(r)) for r in range(10)]
    await wait_for(model.entered.is_set)
    stopping = asyncio.ensure_future(batcher.stop(drain=True))
    await asyncio.sleep(0.01)
    with pytest.raises(BatcherClosed):
        await batcher.submit(99)
    assert not stopping.done()  # still draining: the first batch is held on the gate
    model.gate.set()
    await stopping
    assert [p.result() for p in pending] == [answer(r) for r in range(10)]
    assert batcher.queue_depth == 0


async def test_stop_without_drain_fails_the_queued_but_finishes_the_running_batch() -> None:
    model = Model()
    model.gate.clear()
    batcher = MicroBatcher(model, max_batch_size=2, max_delay_ms=1000, max_queue=100)
    await batcher.start()
    pending = [asyncio.ensure_future(batcher.submit(r)) for r in range(5)]
    await wait_for(model.entered.is_set)  # batch [0, 1] is running
    stopping = asyncio.ensure_future(batcher.stop(drain=False))
    await asyncio.sleep(0.01)
    model.gate.set()
    await stopping
    assert [pending[0].result(), pending[1].result()] == [answer(0), answer(1)]
    for p in pending[2:]:
        with pytest.raises(BatcherClosed):
            p.result()
    assert model.batches == [[0, 1]]


async def test_submit_before_start_is_refused() -> None:
    with pytest.raises(BatcherClosed):
        await MicroBatcher(Model(), max_batch_size=2, max_delay_ms=1, max_queue=4).submit(1)


async def test_infer_error_reaches_only_its_batch() -> None:
    model = Model(poison=13)
    async with batching(MicroBatcher(model, max_batch_size=2, max_delay_ms=1000, max_queue=100)) as batcher:
        outcomes = await asyncio.gather(*(batcher.submit(r) for r in (13, 1, 2, 3)), return_exceptions=True)
        assert await batcher.submit(4) == answer(4)  # the batcher keeps serving after a failed batch
    assert model.batches[:2] == [[13, 1], [2, 3]]
    assert isinstance(outcomes[0], ValueError) and isinstance(outcomes[1], ValueError)
    assert outcomes[2:] == [answer(2), answer(3)]


async def test_cancelled_waiters_do_not_disturb_the_others() -> None:
    model = Model()
    model.gate.clear()
    async with batching(MicroBatcher(model, max_batch_size=2, max_delay_ms=1000, max_queue=100)) as batcher:
        tasks = [asyncio.ensure_future(batcher.submit(r)) for r in range(2)]
        await wait_for(model.entered.is_set)  # batch [0, 1] is running
        tasks += [asyncio.ensure_future(batcher.submit(r)) for r in (2, 3, 4)]
        await asyncio.sleep(0.01)
        tasks[1].cancel()  # its batch is in flight
        tasks[3].cancel()  # still queued: never inferred
        model.gate.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError) and isinstance(done[3], asyncio.CancelledError)
    assert [done[0], done[2], done[4]] == [answer(0), answer(2), answer(4)]
    assert model.batches == [[0, 1], [2, 4]]


@pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are set on Linux only")
async def test_the_worker_thread_runs_at_the_given_nice_value_and_the_event_loop_keeps_its_own() -> None:
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    niceness: list[int] = []

    def infer(batch: list[int]) -> list[tuple[int, int]]:
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return [answer(r) for r in batch]

    nice = min(loop_nice + 7, 19)
    async with batching(
        MicroBatcher(infer, max_batch_size=4, max_delay_ms=0, max_queue=10, worker_nice=nice)
    ) as b:
        assert await b.submit(3) == answer(3)
    assert niceness == [nice]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_nice
    with pytest.raises(ValueError, match="worker_nice"):
        MicroBatcher(infer, max_batch_size=1, max_delay_ms=0, max_queue=1, worker_nice=20)
