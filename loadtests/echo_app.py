"""The HTTP floor of the served routes: the same FastAPI, uvicorn and pydantic request and response models
as ``clickrank serve``, answering ``/v1/predict`` and ``/v1/recommend`` with answers of the same shape and
size, without a model, Redis or the service's middleware. What the service adds on top is its own cost.

Run: ``python -m uvicorn loadtests.echo_app:app --no-access-log`` (``loadtests.floor`` does it).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.schemas.ranking import (
    Prediction,
    PredictRequest,
    PredictResponse,
    RecommendRequest,
    RecommendResponse,
)

VERSION = "echo"
app = FastAPI(title="clickrank echo floor")


def _predictions(item_ids: list[str]) -> list[Prediction]:
    """Built like the service's (``model_construct``, rank order), with made-up probabilities."""
    n = len(item_ids)
    return [
        Prediction.model_construct(item_id=item_id, click_probability=(n - rank) / (n + 1), rank=rank + 1)
        for rank, item_id in enumerate(item_ids)
    ]


def _answered(body: PredictRequest | RecommendRequest) -> dict[str, Any]:
    """The ``RankedAnswer`` fields, as the service fills them for a user with no stored history."""
    return {
        "user_id": body.user_id,
        "model_version": VERSION,
        "history_length": len(body.context),
        "degraded": False,
    }


@app.post("/v1/predict", response_model_exclude_none=True)
async def predict(body: PredictRequest) -> PredictResponse:
    item_ids = [c if isinstance(c, str) else c.item_id for c in body.candidates][: body.top_k]
    return PredictResponse(**_answered(body), predictions=_predictions(item_ids), unknown_items=[])


@app.post("/v1/recommend", response_model_exclude_none=True)
async def recommend(body: RecommendRequest) -> RecommendResponse:
    item_ids = [f"echo-{i}" for i in range(body.top_k)]
    return RecommendResponse(**_answered(body), items=_predictions(item_ids))
