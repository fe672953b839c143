"""The HTTP floor of the served routes: the same FastAPI, uvicorn and pydantic request models as
``clickrank serve``, answering ``/v1/predict`` and ``/v1/recommend`` with answers of the same shape and
size, without a model, Redis or the service's middleware. What the service adds on top is its own cost.

Two floors, one per way of building the answer:

- ``pydantic_app``: ``Prediction`` objects validated by FastAPI against the response model, FastAPI's
  default and how the service answered when issue 11 set its target: the floor that ``docs/benchmarks.md``
  takes the 0.5× target against;
- ``app``: plain dicts serialised once by the service's own ``json_answer``, as ``clickrank serve`` answers
  now: a leaner floor (about 2.5× the rate of ``pydantic_app`` on predict), reported beside it.

Run: ``python -m uvicorn loadtests.echo_app:app --no-access-log`` (``loadtests.floor`` does it).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Response

from service.routes.predict import json_answer
from service.schemas.ranking import (
    Prediction,
    PredictRequest,
    PredictResponse,
    RecommendRequest,
    RecommendResponse,
)

VERSION = "echo"


def _rows(item_ids: list[str]) -> list[dict[str, Any]]:
    """Predictions in rank order with made-up probabilities."""
    n = len(item_ids)
    return [
        {"item_id": item_id, "click_probability": (n - rank) / (n + 1), "rank": rank + 1}
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


def _predicted(body: PredictRequest) -> list[str]:
    return [c if isinstance(c, str) else c.item_id for c in body.candidates][: body.top_k]


def make_app(answers: Literal["json", "pydantic"]) -> FastAPI:
    """The echo floor whose answers are built the ``answers`` way (see the module docstring)."""
    app = FastAPI(title=f"clickrank echo floor ({answers} answers)")
    if answers == "json":

        @app.post("/v1/predict", response_model=PredictResponse)
        async def predict(body: PredictRequest) -> Response:
            return json_answer(
                {**_answered(body), "predictions": _rows(_predicted(body)), "unknown_items": []}
            )

        @app.post("/v1/recommend", response_model=RecommendResponse)
        async def recommend(body: RecommendRequest) -> Response:
            items = _rows([f"echo-{i}" for i in range(body.top_k)])
            return json_answer({**_answered(body), "items": items})

    else:

        @app.post("/v1/predict", response_model_exclude_none=True)
        async def predict_validated(body: PredictRequest) -> PredictResponse:
            rows = [Prediction.model_construct(**row) for row in _rows(_predicted(body))]
            return PredictResponse(**_answered(body), predictions=rows, unknown_items=[])

        @app.post("/v1/recommend", response_model_exclude_none=True)
        async def recommend_validated(body: RecommendRequest) -> RecommendResponse:
            rows = [
                Prediction.model_construct(**row) for row in _rows([f"echo-{i}" for i in range(body.top_k)])
            ]
            return RecommendResponse(**_answered(body), items=rows)

    return app


app = make_app("json")
pydantic_app = make_app("pydantic")
