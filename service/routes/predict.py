"""``POST /v1/predict`` and ``POST /v1/recommend``: the two answers of the ranker."""

from __future__ import annotations

from service.deps import ModelDep, ServicesDep, v1_router, within_deadline
from service.errors import documented
from service.schemas.ranking import PredictRequest, PredictResponse, RecommendRequest, RecommendResponse

router = v1_router()


@router.post("/predict", response_model_exclude_none=True, responses=documented(503, 504))
async def predict(body: PredictRequest, services: ServicesDep, model: ModelDep) -> PredictResponse:
    """Click probability of each candidate for the user, best first. Candidates unknown to the catalog
    are scored if given with ``text`` (encoded on the fly, not added to the catalog), else listed in
    ``unknown_items``. If Redis is unreachable the answer uses ``context`` alone and says ``degraded``."""
    return await within_deadline(services, model.ranker.predict(body))


@router.post("/recommend", response_model_exclude_none=True, responses=documented(503, 504))
async def recommend(body: RecommendRequest, services: ServicesDep, model: ModelDep) -> RecommendResponse:
    """The user's next items over the whole catalog: the union of vector retrieval, co-visitation of the
    user's latest items, fresh items and trending items, ordered by the ranker. A user without history
    gets trending items (recency-weighted) and fresh items, scored by the ranker."""
    return await within_deadline(services, model.ranker.recommend(body))
