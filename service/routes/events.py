"""``POST /v1/events``: behaviour events into the history store."""

from __future__ import annotations

from service.deps import ServicesDep, v1_router, within_deadline
from service.errors import documented
from service.metrics import EVENTS_INGESTED, counted_from_start, labelled
from service.schemas.events import EventsRequest, EventsResponse

router = v1_router()

STORED, DUPLICATE = "stored", "duplicate"
"""``clickrank_events_total``'s results: the dashboard's events panel reads both from start-up."""
counted_from_start(EVENTS_INGESTED, (STORED, DUPLICATE))


@router.post("/events", responses=documented(503, 504))
async def post_events(body: EventsRequest, services: ServicesDep) -> EventsResponse:
    """Store behaviour events, all or nothing; acknowledged only once Redis has them. A repeated
    ``event_id`` is acknowledged as a duplicate and not stored twice, so after a 503 or 504 (which may
    come after Redis applied the batch) the client can safely resend the same batch."""
    events = [(e.user_id, e) for e in body.events]
    accepted, duplicates = await within_deadline(services, services.store.append(events))
    labelled(EVENTS_INGESTED, STORED).inc(accepted)
    labelled(EVENTS_INGESTED, DUPLICATE).inc(duplicates)
    return EventsResponse(accepted=accepted, duplicates=duplicates)
