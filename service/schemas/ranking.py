"""``POST /v1/predict`` and ``POST /v1/recommend``: candidates in, ranked click probabilities out."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag

from service.schemas.events import ContextEvent
from service.schemas.fields import (
    MAX_CANDIDATES,
    MAX_CONTEXT,
    MAX_PREDICT_TOP_K,
    MAX_RECOMMEND_TOP_K,
    ApiModel,
    ItemId,
    ItemText,
    UserId,
    examples,
)


class ItemIn(ApiModel):
    item_id: ItemId
    text: ItemText


class CandidateItem(ItemIn):
    """A candidate given with its text: an item unknown to the catalog is encoded on the fly and scored
    (it is not added to the catalog; use POST /v1/items for that). A known item is scored with its
    catalog vector and the text is ignored."""


def _candidate_tag(value: Any) -> str:
    return "item_id" if isinstance(value, str) else "object"


CANDIDATE_TAGS = frozenset({"item_id", "object"})
"""Union tags pydantic puts in error locations of a candidate; dropped when errors are formatted."""

Candidate = Annotated[
    Annotated[ItemId, Tag("item_id")] | Annotated[CandidateItem, Tag("object")],
    Discriminator(_candidate_tag),
]


class PredictRequest(ApiModel):
    model_config = examples(
        {
            "user_id": "7",
            "candidates": ["50", "181", {"item_id": "new-1", "text": "Space Heist (2026) | Sci-Fi"}],
            "context": [{"item_id": "172", "type": "view", "timestamp": 1714564900}],
            "top_k": 10,
            "explain": True,
        }
    )

    user_id: UserId
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
    context: list[ContextEvent] = Field(default_factory=list, max_length=MAX_CONTEXT)
    top_k: int | None = Field(default=None, ge=1, le=MAX_PREDICT_TOP_K, description="default: all")
    explain: bool = False


class Influence(ApiModel):
    item_id: str
    weight: float = Field(
        description="the candidate's probability change when this history item is left out, divided by the "
        "sum of every item's absolute change (signed; absolute weights of all items sum to 1)"
    )


class Prediction(ApiModel):
    item_id: str
    click_probability: float
    rank: int
    influences: list[Influence] | None = None


class RankedAnswer(ApiModel):
    """What predict and recommend answers share: whose answer, from which model, on how much history."""

    user_id: str
    model_version: str
    history_length: int = Field(description="history events the ranker read for this answer")
    degraded: bool = Field(
        description="true: computed without the stored history (Redis unreachable or slow)"
    )


_ANSWERED = {"user_id": "7", "model_version": "20261123T101500Z-3f2a9c1d", "history_length": 12,
             "degraded": False}  # fmt: skip
"""The ``RankedAnswer`` part of the answer examples."""


class PredictResponse(RankedAnswer):
    model_config = examples(
        {
            **_ANSWERED,
            "predictions": [
                {"item_id": "181", "click_probability": 0.91, "rank": 1,
                 "influences": [{"item_id": "172", "weight": 0.41}]},
                {"item_id": "50", "click_probability": 0.62, "rank": 2,
                 "influences": [{"item_id": "172", "weight": 0.38}]},
            ],
            "unknown_items": ["gone-1"],
        }
    )  # fmt: skip

    predictions: list[Prediction]
    unknown_items: list[str] = Field(description="candidates not in the catalog and given without text")


class RecommendRequest(ApiModel):
    model_config = examples({"user_id": "7", "top_k": 10, "exclude_seen": True})

    user_id: UserId
    top_k: int = Field(default=10, ge=1, le=MAX_RECOMMEND_TOP_K)
    exclude_seen: bool = Field(default=True, description="drop every item the user ever interacted with")
    context: list[ContextEvent] = Field(default_factory=list, max_length=MAX_CONTEXT)
    explain: bool = False


class RecommendResponse(RankedAnswer):
    model_config = examples({**_ANSWERED, "items": [{"item_id": "98", "click_probability": 0.87, "rank": 1}]})

    items: list[Prediction]
