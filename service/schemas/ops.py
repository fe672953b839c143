"""``GET /v1/model``, the probes, and the error body every failure answers with."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from service.schemas.fields import ApiModel, examples


class BatchingInfo(ApiModel):
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    queue_depth: int


class RefusedVersion(ApiModel):
    version: str = Field(description="the refused version's name ('?' when its manifest could not be read)")
    reason: str
    at: str = Field(description="when it was refused (ISO 8601, UTC)")


class ReloadResponse(ApiModel):
    model_config = examples({"version": "20261203T070000Z-4f1c2a9e", "swapped": True})

    version: str | None = Field(description="the version serving now (null: none could be loaded)")
    swapped: bool = Field(description="whether this call swapped a new version in")
    reason: str | None = Field(
        default=None,
        description="why not: the version serves already, or why the store's version was refused",
    )


class ModelInfo(ApiModel):
    model_config = examples(
        {
            "version": "20261123T101500Z-3f2a9c1d",
            "created": "2026-11-23T10:15:00Z",
            "dim": 128,
            "history_length": 50,
            "catalog_size": 1682,
            "metrics": {"table": [{"model": "clickrank", "HR@10": 0.1}]},
            "calibration": {"slope": 0.88, "intercept": -0.31, "method": "platt-on-log-softmax",
                            "fitted_on": "validation: each user's second-last event", "cases": 866},
            "providers": ["CPUExecutionProvider"],
            "batching": {"max_batch_size": 64, "max_batch_delay_ms": 0.0, "max_queue": 512,
                         "queue_depth": 0},
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
    last_refused: RefusedVersion | None = Field(
        default=None, description="the last version that was not swapped in, and why (none: null)"
    )


class Status(ApiModel):
    model_config = examples({"status": "ok"})

    status: str


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
    model_config = examples(
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
    )  # fmt: skip

    error: ErrorBody
