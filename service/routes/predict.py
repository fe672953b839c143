"""``POST /v1/predict`` and ``POST /v1/recommend``: the two answers of the ranker.

The ranker builds each answer as plain JSON-ready values and it is serialised once, in C (``orjson``: a
third of ``pydantic_core.to_json``'s time on a 100-prediction answer): no pydantic object per prediction
and no second validation of an answer the service built itself (``response_model`` still documents it).
The contract tests check the answers against the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response

from service.deps import ModelDep, ServicesDep, v1_router, within_deadline
from service.direct_route import DirectRoute
from service.errors import documented
from service.schemas.ranking import PredictRequest, PredictResponse, RecommendRequest, RecommendResponse

router = v1_router(DirectRoute)


def json_answer(answer: dict[str, Any]) -> Response:
    return Response(orjson.dumps(answer), media_type="application/json")


@router.post("/predict", response_model=PredictResponse, responses=documented(503, 504))
async def predict(body: PredictRequest, services: ServicesDep, model: ModelDep) -> Response:
    """Click probability of each candidate for the user, best first. Candidates unknown to the catalog
    are scored if given with ``text`` (encoded on the fly, not added to the catalog), else listed in
    ``unknown_items``. If Redis is unreachable the answer uses ``context`` alone and says ``degraded``."""
    return json_answer(await within_deadline(services, model.ranker.predict(body)))


@router.post("/recommend", response_model=RecommendResponse, responses=documented(503, 504))
async def recommend(body: RecommendRequest, services: ServicesDep, model: ModelDep) -> Response:
    """The user's next items over the whole catalog: the union of vector retrieval, co-visitation of the
    user's latest items, fresh items and trending items, ordered by the ranker. A user without history
    gets trending items (recency-weighted) and fresh items, scored by the ranker."""
    return json_answer(await within_deadline(services, model.ranker.recommend(body)))
