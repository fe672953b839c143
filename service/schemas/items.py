"""``POST /v1/items`` and ``GET /v1/items/{item_id}``."""

from __future__ import annotations

from pydantic import Field

from service.schemas.fields import MAX_ITEMS, ApiModel, examples
from service.schemas.ranking import ItemIn


class ItemsRequest(ApiModel):
    model_config = examples({"items": [{"item_id": "new-1", "text": "Space Heist (2026) | Action, Sci-Fi"}]})

    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS)


class ItemsResponse(ApiModel):
    model_config = examples({"upserted": 1})

    upserted: int


class ItemOut(ApiModel):
    model_config = examples({"item_id": "1", "text": "Toy Story (1995) | Animation, Comedy"})

    item_id: str
    text: str
