"""The FastAPI application: the routes, the error handlers and the middleware, wired to the services.

Where each part lives: ``service.routes`` (one module per resource), ``service.errors`` (every failure's
status, code and ``Retry-After``), ``service.middleware`` (request context, admission control),
``service.deps`` (what routes need), ``service.lifespan`` (the services and their life).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from threadpoolctl import threadpool_limits

from service import lifespan
from service.direct_route import DirectLane, DirectRoute
from service.errors import install_error_handlers
from service.gc_pauses import observe_pauses
from service.logs import UserLogNames, install_request_id_factory
from service.loop_lag import LoopLagMonitor
from service.middleware import AdmissionControl, RequestContextMiddleware
from service.redis_conn import RedisConnection
from service.routes import ROUTERS
from service.settings import Settings
from service.store import HistoryStore


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application; ``settings`` default to the ``CLICKRANK_*`` environment."""
    settings = settings or Settings()
    install_request_id_factory()
    observe_pauses()
    # numpy's BLAS on one thread: a request's products are small, and idle OpenBLAS workers spin on the
    # cores the ranker and the event loop need (a million-item catalog: 27 ms CPU per recommend with the
    # default threads, 6.8 ms with one; docs/benchmarks.md).
    threadpool_limits(limits=1, user_api="blas")

    loop_lag = LoopLagMonitor()  # read by the admission control, run by the services' lifespan

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        redis = RedisConnection.from_settings(settings)
        store = HistoryStore.from_settings(settings, redis)
        user_log_names = UserLogNames(raw=settings.log_user_ids, key=settings.log_hash_key)
        services = lifespan.Services(settings, redis, store, loop_lag=loop_lag, user_log_names=user_log_names)
        app.state.services = services
        try:
            await lifespan.start(services)
            yield
        finally:
            await lifespan.stop(services)

    app = FastAPI(
        title="clickrank",
        version="1",
        summary="Click probability and next-item recommendations from live user histories.",
        lifespan=run,
    )
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    # The last added runs first: request id, metrics and the access line wrap admission control, which
    # wraps the direct lane of predict and recommend.
    # At most max_in_flight, and never more than the batcher can hold: a full queue and the batch being
    # inferred (never larger than the queue).
    capacity = min(
        settings.max_in_flight, settings.max_queue + min(settings.max_batch_size, settings.max_queue)
    )
    direct = [route for router in ROUTERS for route in router.routes if isinstance(route, DirectRoute)]
    app.add_middleware(DirectLane, routes=direct, exception_handlers=app.exception_handlers)
    app.add_middleware(
        AdmissionControl,
        max_in_flight=capacity,
        loop_lag=loop_lag,
        max_loop_lag_s=settings.shed_loop_lag_ms / 1000.0,
    )
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    return app
