"""``GET /v1/model``: which model answers, how it was built and how requests are batched;
``POST /v1/model/reload``: swap in the model store's current version now (``service/model_reload.py``)."""

from __future__ import annotations

from service.deps import ModelDep, ServicesDep, v1_router
from service.errors import documented
from service.schemas.ops import BatchingInfo, ModelInfo, RefusedVersion, ReloadResponse

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
        last_refused=_refused(services),
    )


@router.post("/model/reload", response_model_exclude_none=True)
async def reload_model(services: ServicesDep) -> ReloadResponse:
    """Look for a new current version now (the service also polls every ``MODEL_POLL_INTERVAL_S``) and
    swap it in; files refused before are tried again. A refused version leaves the serving one in place:
    ``swapped`` is false and ``reason`` says why (also ``last_refused`` in ``GET /v1/model``)."""
    done = await services.reloader.reload(force=True)
    if done.outcome == "swapped":
        return ReloadResponse(version=done.version, swapped=True)
    if done.outcome == "unchanged":
        return ReloadResponse(version=done.version, swapped=False, reason="this version is serving already")
    refusal = done.refusal
    reason = f"version {refusal.version} refused: {refusal.reason}" if refusal else "refused"
    return ReloadResponse(version=done.version, swapped=False, reason=reason)


def _refused(services: ServicesDep) -> RefusedVersion | None:
    refusal = services.reloader.last_refused
    return None if refusal is None else RefusedVersion(**refusal.as_dict())
