"""``GET /v1/model``: which model answers, how it was built and how requests are batched."""

from __future__ import annotations

from service.deps import ModelDep, ServicesDep, v1_router
from service.errors import documented
from service.schemas.ops import BatchingInfo, ModelInfo

router = v1_router()


@router.get("/model", responses=documented(503))
async def model_info(services: ServicesDep, model: ModelDep) -> ModelInfo:
    settings, models = services.settings, model.models
    return ModelInfo(
        version=models.version,
        created=models.manifest.get("created"),
        dim=models.dim,
        history_length=model.ranker.history_length,
        catalog_size=len(model.catalog),
        metrics=models.manifest.get("metrics", {}),
        calibration=models.calibration.to_json(),
        providers=list(models.providers),
        batching=BatchingInfo(
            max_batch_size=settings.max_batch_size,
            max_batch_delay_ms=settings.max_batch_delay_ms,
            max_queue=settings.max_queue,
            queue_depth=model.batcher.queue_depth,
        ),
    )
