"""Behaviour events in (``POST /v1/events``, a request's ``context``) and out (a user's history)."""

from __future__ import annotations

from typing import NamedTuple

from pydantic import ConfigDict, Field

from service.schemas.fields import MAX_EVENTS, ApiModel, EventType, ItemId, Timestamp, UserId, examples


# The one event record of the service: a request's context, what the store keeps, what the ranker's window
# is built from (``Event`` adds the user for ingestion; ``StoredEvent`` is how the store returns it;
# ``HistoryEvent`` documents it out).
class ContextEvent(ApiModel):
    """An event of the user that the request carries itself (not stored, or not stored yet)."""

    model_config = examples({"item_id": "50", "type": "click", "timestamp": 1714564800})

    item_id: ItemId
    type: EventType
    timestamp: Timestamp
    value: float | None = Field(
        default=None, allow_inf_nan=False, description="optional number, e.g. the stars of a rate event"
    )
    event_id: ItemId | None = Field(default=None, description="idempotency key: a repeated id is stored once")


class StoredEvent(NamedTuple):
    """A ``ContextEvent`` as the store reads it back: validated when it was posted, so not again (building
    50 pydantic events took 40 % of a history read's CPU, measured)."""

    item_id: str
    type: str
    timestamp: float
    value: float | None
    event_id: str | None


EventRecord = ContextEvent | StoredEvent
"""An event a request's ranking reads: from its context or from the store (the same fields)."""


class Event(ContextEvent):
    model_config = examples(
        {"user_id": "7", "item_id": "50", "type": "rate", "timestamp": 1714564800, "value": 4,
         "event_id": "e-0001"}
    )  # fmt: skip

    user_id: UserId


class EventsRequest(ApiModel):
    model_config = examples(
        {
            "events": [
                {"user_id": "7", "item_id": "50", "type": "click", "timestamp": 1714564800,
                 "event_id": "e-0001"},
                {"user_id": "7", "item_id": "181", "type": "rate",
                 "timestamp": "2024-05-01T12:05:00Z", "value": 5, "event_id": "e-0002"},
            ]
        }
    )  # fmt: skip

    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsResponse(ApiModel):
    model_config = examples({"accepted": 2, "duplicates": 0})

    accepted: int = Field(description="events stored by this request")
    duplicates: int = Field(description="events whose event_id was already stored: acknowledged, not stored")


class HistoryEvent(ApiModel):
    model_config = ConfigDict(from_attributes=True)  # built from the ``StoredEvent`` records

    item_id: str
    type: str
    timestamp: float
    value: float | None = None
    event_id: str | None = None


class HistoryResponse(ApiModel):
    model_config = examples(
        {"user_id": "7", "events": [{"item_id": "50", "type": "click", "timestamp": 1714564800.0}]}
    )

    user_id: str
    events: list[HistoryEvent] = Field(description="most recent stored events, newest last")


class ForgetResponse(ApiModel):
    model_config = examples({"user_id": "7", "forgotten": True})

    user_id: str
    forgotten: bool = Field(description="false when nothing was stored for this user")
