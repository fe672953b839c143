"""``POST /v1/items`` and ``GET /v1/items/{item_id}``: the catalog, extended online."""

from __future__ import annotations

from service.deps import ItemIdPath, ModelDep, ServicesDep, v1_router, within_deadline
from service.errors import ApiError, documented
from service.metrics import ITEMS_UPSERTED
from service.schemas.items import ItemOut, ItemsRequest, ItemsResponse

router = v1_router()


@router.post("/items", responses=documented(503, 504))
async def post_items(body: ItemsRequest, services: ServicesDep, model: ModelDep) -> ItemsResponse:
    """Add or update items: the text is encoded by the BERT encoder, published to Redis, then applied
    locally: this replica ranks the item from the very next request, the others within
    ``item_sync_interval_s``. An item known at training time keeps its learned ID embedding. Items new
    to the catalog join the fresh items that ``/v1/recommend`` draws from."""
    texts = {item.item_id: item.text for item in body.items}  # a repeated id: the last text wins
    upserted = await within_deadline(services, model.items.upsert(texts))
    ITEMS_UPSERTED.inc(upserted)
    return ItemsResponse(upserted=upserted)


@router.get("/items/{item_id}", responses=documented(404, 503))
async def get_item(item_id: ItemIdPath, model: ModelDep) -> ItemOut:
    found = model.catalog.get(item_id)
    if found is None:
        raise ApiError(404, "not_found", f"item {item_id!r} is not in the catalog")
    return ItemOut(item_id=item_id, text=found[0])
