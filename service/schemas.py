"""Request and response models of the v1 API (pydantic v2).

Validation happens here, before anything touches Redis or the model: a request that fails any rule is
answered 422 and changes nothing. Every model forbids unknown fields so a misspelt field name is an
error rather than a silently ignored option.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    WithJsonSchema,
)

ID_MAX_LENGTH = 128
ID_PATTERN = rf"^[A-Za-z0-9_.:-]{{1,{ID_MAX_LENGTH}}}$"
"""The one rule for user, item, event and request ids."""
MAX_EVENTS = 1000
MAX_CANDIDATES = 1000
MAX_ITEMS = 1000
MAX_CONTEXT = 200
MAX_TEXT_CHARS = 2000
MAX_PREDICT_TOP_K = MAX_CANDIDATES
MAX_RECOMMEND_TOP_K = 100
MAX_TIMESTAMP = 32_503_680_000.0
"""Year 3000 in unix seconds: anything larger is almost surely milliseconds sent by mistake."""

_Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN),
    Field(description=f"1–{ID_MAX_LENGTH} characters of A-Za-z0-9_.:-"),
]
ItemId = Annotated[_Id, Field(examples=["item:42"])]
UserId = Annotated[_Id, Field(examples=["user:7"])]
EventType = Literal["view", "click", "add_to_cart", "purchase", "rate"]
ItemText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS, strip_whitespace=True, pattern=r"\S"),
    Field(description="at least one non-space character; surrounding white space is dropped"),
]


def parse_timestamp(value: Any) -> float:
    """Unix seconds (int or float) or an RFC 3339 string with an offset → float unix seconds."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be unix seconds (number) or an RFC 3339 string, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            text = value.strip()
            # RFC 3339 allows a lower-case "z" (and "t"); fromisoformat before 3.12 refuses the "z"
            parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("z", "Z") else text)
        except ValueError:
            raise ValueError(
                "timestamp must be unix seconds (number) or an RFC 3339 string like 2024-05-01T12:00:00Z"
            ) from None
        if parsed.tzinfo is None:
            raise ValueError("RFC 3339 timestamp needs a UTC offset (Z or +hh:mm)")
        seconds = parsed.timestamp()
    else:
        raise ValueError("timestamp must be unix seconds (number) or an RFC 3339 string")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("timestamp must be a finite, non-negative number of unix seconds")
    if seconds > MAX_TIMESTAMP:
        raise ValueError("timestamp is after the year 3000: send unix seconds, not milliseconds")
    return seconds


Timestamp = Annotated[
    float,
    BeforeValidator(parse_timestamp),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_TIMESTAMP},
                {"type": "string", "format": "date-time"},
            ]
        }
    ),
    Field(
        description="unix seconds, or RFC 3339 with a UTC offset; from 1970 to the year 3000 "
        "(normalised to unix seconds)",
        examples=[1714564800, "2024-05-01T12:00:00Z"],
    ),
]


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- events


class ContextEvent(ApiModel):
    """An event of the user that the request carries itself (not stored, or not stored yet)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"item_id": "50", "type": "click", "timestamp": 1714564800}]},
    )

    item_id: ItemId
    type: EventType
    timestamp: Timestamp
    value: float | None = Field(
        default=None, allow_inf_nan=False, description="optional number, e.g. the stars of a rate event"
    )
    event_id: ItemId | None = Field(default=None, description="idempotency key: a repeated id is stored once")


class Event(ContextEvent):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": "7", "item_id": "50", "type": "rate", "timestamp": 1714564800, "value": 4,
                 "event_id": "e-0001"}
            ]
        },
    )  # fmt: skip

    user_id: UserId


class EventsRequest(ApiModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {"user_id": "7", "item_id": "50", "type": "click", "timestamp": 1714564800,
                         "event_id": "e-0001"},
                        {"user_id": "7", "item_id": "181", "type": "rate",
                         "timestamp": "2024-05-01T12:05:00Z", "value": 5, "event_id": "e-0002"},
                    ]
                }
            ]
        },
    )  # fmt: skip

    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsResponse(ApiModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"accepted": 2, "duplicates": 0}]})

    accepted: int = Field(description="events stored by this request")
    duplicates: int = Field(description="events whose event_id was already stored: acknowledged, not stored")


# ---------------------------------------------------------------------------------------------- predict


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
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "7",
                    "candidates": ["50", "181", {"item_id": "new-1", "text": "Space Heist (2026) | Sci-Fi"}],
                    "context": [{"item_id": "172", "type": "view", "timestamp": 1714564900}],
                    "top_k": 10,
                    "explain": True,
                }
            ]
        },
    )

    user_id: UserId
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
    context: list[ContextEvent] = Field(default_factory=list, max_length=MAX_CONTEXT)
    top_k: int | None = Field(default=None, ge=1, le=MAX_PREDICT_TOP_K, description="default: all")
    explain: bool = False


class Influence(ApiModel):
    item_id: str
    weight: float = Field(description="attention weight of this history item for the candidate (sums ≤ 1)")


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


class PredictResponse(RankedAnswer):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "7",
                    "model_version": "20261123T101500Z-3f2a9c1d",
                    "history_length": 12,
                    "degraded": False,
                    "predictions": [
                        {"item_id": "181", "click_probability": 0.91, "rank": 1,
                         "influences": [{"item_id": "172", "weight": 0.41}]},
                        {"item_id": "50", "click_probability": 0.62, "rank": 2,
                         "influences": [{"item_id": "172", "weight": 0.38}]},
                    ],
                    "unknown_items": ["gone-1"],
                }
            ]
        }
    )  # fmt: skip

    predictions: list[Prediction]
    unknown_items: list[str] = Field(description="candidates not in the catalog and given without text")


# -------------------------------------------------------------------------------------------- recommend


class RecommendRequest(ApiModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": "7", "top_k": 10, "exclude_seen": True}]},
    )

    user_id: UserId
    top_k: int = Field(default=10, ge=1, le=MAX_RECOMMEND_TOP_K)
    exclude_seen: bool = Field(default=True, description="drop every item the user ever interacted with")
    context: list[ContextEvent] = Field(default_factory=list, max_length=MAX_CONTEXT)
    explain: bool = False


class RecommendResponse(RankedAnswer):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "7",
                    "model_version": "20261123T101500Z-3f2a9c1d",
                    "history_length": 12,
                    "degraded": False,
                    "items": [{"item_id": "98", "click_probability": 0.87, "rank": 1}],
                }
            ]
        }
    )

    items: list[Prediction]


# ------------------------------------------------------------------------------------------------ items


class ItemsRequest(ApiModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"items": [{"item_id": "new-1", "text": "Space Heist (2026) | Action, Sci-Fi"}]}]
        },
    )

    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS)


class ItemsResponse(ApiModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"upserted": 1}]})

    upserted: int


class ItemOut(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"item_id": "1", "text": "Toy Story (1995) | Animation, Comedy"}]}
    )

    item_id: str
    text: str


# ------------------------------------------------------------------------------------------------ users


class HistoryEvent(ApiModel):
    item_id: str
    type: str
    timestamp: float
    value: float | None = None
    event_id: str | None = None


class HistoryResponse(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"user_id": "7", "events": [{"item_id": "50", "type": "click", "timestamp": 1714564800.0}]}
            ]
        }
    )

    user_id: str
    events: list[HistoryEvent] = Field(description="most recent stored events, newest last")


class ForgetResponse(ApiModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"user_id": "7", "forgotten": True}]})

    user_id: str
    forgotten: bool = Field(description="false when nothing was stored for this user")


# ----------------------------------------------------------------------------------------- model, health


class BatchingInfo(ApiModel):
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    queue_depth: int


class ModelInfo(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "version": "20261123T101500Z-3f2a9c1d",
                    "created": "2026-11-23T10:15:00Z",
                    "dim": 64,
                    "history_length": 50,
                    "catalog_size": 1682,
                    "metrics": {"table": [{"model": "clickrank", "HR@10": 0.1}]},
                    "calibration": {"slope": 0.88, "intercept": -0.31, "method": "platt-on-log-softmax",
                                    "fitted_on": "validation: each user's second-last event", "cases": 866},
                    "providers": ["CPUExecutionProvider"],
                    "batching": {"max_batch_size": 64, "max_batch_delay_ms": 0.0, "max_queue": 512,
                                 "queue_depth": 0},
                }
            ]
        }
    )  # fmt: skip

    version: str
    created: str | None
    dim: int
    history_length: int = Field(description="history events the ranker reads per request")
    catalog_size: int
    metrics: dict[str, Any]
    calibration: dict[str, Any] = Field(
        description="how click_probability is computed from the model's scores (models/calibration.py)"
    )
    providers: list[str] = Field(description="ONNX Runtime execution providers actually in use")
    batching: BatchingInfo


class Status(ApiModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str


# ----------------------------------------------------------------------------------------------- errors


class ErrorDetail(ApiModel):
    field: str | None = Field(default=None, description="path of the offending field, e.g. events[3].type")
    message: str
    type: str | None = None


class ErrorBody(ApiModel):
    code: str = Field(description="stable machine-readable code, e.g. validation_error, store_unavailable")
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)
    request_id: str | None = None


class ErrorResponse(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "validation_error",
                        "message": "events[0].type: Input should be 'view', 'click', 'add_to_cart', "
                        "'purchase' or 'rate'",
                        "details": [
                            {"field": "events[0].type", "message": "Input should be 'view', ...",
                             "type": "literal_error"}
                        ],
                        "request_id": "5f0c2a4e9b1d4c7e",
                    }
                }
            ]
        }
    )  # fmt: skip

    error: ErrorBody
