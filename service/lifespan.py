"""The services the routes use, and their life: built at startup, the model loaded (or its absence
reported), the catalog kept in sync with other replicas, everything stopped in order at shutdown.

``Services`` owns the Redis connection (the store borrows it) and, once a model is loaded, one
``LoadedModel`` that owns the parts built from it. The ranker and the item writer borrow those parts;
they never build or stop them.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from models.model_dir import ModelDir
from models.segments import Segments
from service.batcher import MicroBatcher
from service.candidates import CandidateSources
from service.catalog import ItemCatalog
from service.catalog_sync import CatalogSync
from service.inference import BatchInference
from service.items import ItemWriter
from service.logs import UserLogNames
from service.loop_lag import LoopLagMonitor
from service.metrics import worker_exit
from service.model_reload import ModelReloader
from service.profiles import Profiles
from service.ranking import Ranker
from service.redis_conn import RedisConnection
from service.retrieval import Retrieval
from service.runtime import OnnxModels
from service.settings import Settings
from service.store import HistoryStore

log = logging.getLogger("clickrank.api")


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """One model version being served: its graphs, its catalog and the catalog's sharing with other
    replicas, the batcher in front of the ranker graph, and the request handlers built on them."""

    models: OnnxModels
    catalog: ItemCatalog
    catalog_sync: CatalogSync
    batcher: MicroBatcher
    ranker: Ranker
    items: ItemWriter
    profiles: Profiles


@dataclass
class Services:
    """Everything the routes use; reachable as ``app.state.services``. ``model`` is replaced only by
    ``reloader`` (a new version swapped in live); a request keeps the one it started with."""

    settings: Settings
    redis: RedisConnection
    store: HistoryStore
    loop_lag: LoopLagMonitor = field(default_factory=LoopLagMonitor)
    user_log_names: UserLogNames = field(default_factory=UserLogNames)
    model: LoadedModel | None = None
    model_error: str | None = "model not loaded yet"
    reloader: ModelReloader = field(init=False)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reloader = ModelReloader(self, build_model)


async def start(services: Services) -> None:
    """Start watching the event loop's lag, load the model if there is one (a model directory, or a
    store's current version), start the catalog sync that keeps it current and the watch for new
    versions (``CLICKRANK_MODEL_POLL_INTERVAL_S``)."""
    services.loop_lag.start()
    await services.reloader.load_initial()
    failing = await _sync_catalog(services, failing=False) if services.model is not None else False
    services.tasks.append(asyncio.create_task(_sync_catalog_forever(services, failing), name="catalog-sync"))
    if services.settings.model_poll_interval_s > 0:
        services.tasks.append(asyncio.create_task(services.reloader.watch(), name="model-watch"))


async def build_model(services: Services, model_dir: Path) -> LoadedModel:
    """The model at ``model_dir`` ready to serve: its files verified against the manifest, the ONNX graphs
    loaded and warmed over every shape bucket (a self-test, too), the batcher started, the catalog synced
    with the items published for this version. Raises when any of it fails (nothing is left running)."""
    settings, store = services.settings, services.store
    models, catalog, segments = await _read(settings, model_dir)
    await asyncio.to_thread(models.warm_up)
    retrieval = await asyncio.to_thread(
        Retrieval, catalog, ann_min_items=settings.ann_min_items, nprobe=settings.ann_nprobe
    )
    batcher = MicroBatcher(
        BatchInference(models, retrieval),
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_batch_delay_ms,
        max_queue=settings.max_queue,
        worker_nice=settings.inference_nice,
    )
    await batcher.start()
    sources = CandidateSources(
        catalog=catalog,
        store=store,
        covisit_sources=settings.covisit_sources,
        covisit_candidates=settings.covisit_candidates,
        fresh_candidates=settings.fresh_candidates,
        trending_candidates=settings.trending_candidates,
        covisit_cache_s=settings.covisit_cache_s,
        lists_cache_s=settings.lists_cache_s,
    )
    ranker = Ranker(
        models=models,
        catalog=catalog,
        retrieval=retrieval,
        store=store,
        batcher=batcher,
        history_length=min(settings.history_length, models.history_length),
        retrieval_size=settings.retrieval_size,
        sources=sources,
        covisit_weight=settings.covisit_weight,
    )
    try:
        await ranker.prior_logits()  # the prior of users without history, over the whole catalog: once, here
    except BaseException:
        await batcher.stop(drain=False)  # a refused version leaves nothing running
        raise
    log.info("model %s loaded (%d items, providers %s)", models.version, len(catalog), models.providers)
    catalog_sync = CatalogSync(services.redis, catalog, prefix=settings.redis_prefix)
    items = ItemWriter(models, catalog_sync, store)
    profiles = Profiles(store, catalog, ranker, segments, settings.history_cap)
    return LoadedModel(models, catalog, catalog_sync, batcher, ranker, items, profiles)


async def _read(settings: Settings, model_dir: Path) -> tuple[OnnxModels, ItemCatalog, Segments | None]:
    """The graphs, the catalog and the segments of ``model_dir``. What was read goes out of scope on
    return: the catalog holds its own copy of the item table (1 GB of vectors and ID offsets at a million
    items), and the read one would otherwise stay alive through the index build."""
    served = await asyncio.to_thread(ModelDir(model_dir).load)
    models = await asyncio.to_thread(
        OnnxModels, served, device=settings.device, intra_op_threads=settings.intra_op_threads
    )
    catalog = await asyncio.to_thread(ItemCatalog.from_table, served.items, models.version)
    return models, catalog, Segments.from_json(served.segments) if served.segments else None


async def _sync_catalog(services: Services, *, failing: bool) -> bool:
    """One sync round; returns whether it failed. A failure is logged when it starts, and the recovery."""
    if services.model is None:
        return failing
    try:
        applied = await services.model.catalog_sync.sync()
    except (
        Exception
    ) as exc:  # Redis down or slow, a malformed entry: retried next round, the catalog stays usable
        if not failing:
            log.warning(
                "catalog sync failing, retrying every %gs: %s", services.settings.item_sync_interval_s, exc
            )
        return True
    if failing:
        log.info("catalog sync recovered")
    if applied:
        log.info("catalog sync applied %d items published by other replicas", applied)
    return False


async def _sync_catalog_forever(services: Services, failing: bool) -> None:
    """Pick up items that other replicas (or a previous run) published, every ``item_sync_interval_s``."""
    while True:
        await asyncio.sleep(services.settings.item_sync_interval_s)
        failing = await _sync_catalog(services, failing=failing)


async def stop(services: Services) -> None:
    """Stop taking work, finish queued requests (of a version being retired too), stop background tasks."""
    if services.model is not None:
        await services.model.batcher.stop(drain=True)
    await services.reloader.stop()
    for task in services.tasks:
        task.cancel()
    for task in services.tasks:
        with suppress(asyncio.CancelledError):
            await task
    await services.loop_lag.stop()
    await services.redis.close()
    worker_exit()
