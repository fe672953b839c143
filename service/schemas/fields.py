"""The field types and limits every API model is built from: ids, texts, timestamps, event types."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
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


def examples(*values: dict[str, Any]) -> ConfigDict:
    """The ``model_config`` of a model documented with these example values (unknown fields stay forbidden:
    pydantic merges it with ``ApiModel``'s)."""
    return ConfigDict(json_schema_extra={"examples": list(values)})
