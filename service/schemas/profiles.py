"""``GET /v1/users/{user_id}/profile``: what the service has learned about a user."""

from __future__ import annotations

from pydantic import Field

from service.schemas.fields import ApiModel, examples


class Activity(ApiModel):
    events: int = Field(description="stored events (the last CLICKRANK_HISTORY_CAP)")
    by_type: dict[str, int]
    first_seen: float = Field(description="timestamp of the oldest stored event (unix seconds)")
    last_seen: float = Field(description="timestamp of the newest stored event (unix seconds)")
    active_days: int = Field(description="distinct UTC days with a stored event")
    events_per_active_day: float


class Interest(ApiModel):
    attribute: str
    weight: float = Field(description="recency-weighted share of the history's item attributes (sums ≤ 1)")


class SegmentAttribute(ApiModel):
    attribute: str
    share: float = Field(description="share of the segment members' item attributes")
    lift: float = Field(description="share in the segment / share over all training users")


class Segment(ApiModel):
    id: int
    size: int = Field(description="training users in this segment")
    top_attributes: list[SegmentAttribute]


class RepresentativeItem(ApiModel):
    item_id: str
    text: str
    score: float = Field(description="the item's retrieval logit under the user's vector")


class ProfileResponse(ApiModel):
    model_config = examples(
        {
            "user_id": "196",
            "model_version": "20261203T053951Z-b9bbde45",
            "activity": {"events": 39, "by_type": {"rate": 39}, "first_seen": 881250949.0,
                         "last_seen": 881251274.0, "active_days": 1, "events_per_active_day": 39.0},
            "interests": [{"attribute": "Drama", "weight": 0.28}, {"attribute": "Comedy", "weight": 0.24}],
            "segment": {"id": 4, "size": 108, "top_attributes": [
                {"attribute": "Crime", "share": 0.09, "lift": 1.29}]},
            "representative_items": [{"item_id": "242", "text": "Kolya (1996) | Comedy", "score": 3.1}],
        }
    )  # fmt: skip

    user_id: str
    model_version: str
    activity: Activity
    interests: list[Interest] = Field(description="the attributes (genres) that dominate the recent history")
    segment: Segment | None = Field(
        description="the user's cluster of training users; null: the model has none"
    )
    representative_items: list[RepresentativeItem] = Field(
        description="the history's items that the user's own vector scores highest"
    )
