"""``GET /v1/users/{user_id}/history``, ``.../profile`` and ``DELETE /v1/users/{user_id}``: what is stored
about a user, what the service learned from it, and its erasure."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Query

from service.deps import ModelDep, ServicesDep, UserIdPath, v1_router, within_deadline
from service.errors import ApiError, documented
from service.schemas.events import ForgetResponse, HistoryResponse
from service.schemas.profiles import ProfileResponse

router = v1_router()
log = logging.getLogger("clickrank.api")


@router.get("/users/{user_id}/history", response_model_exclude_none=True, responses=documented(503, 504))
async def get_history(
    user_id: UserIdPath,
    services: ServicesDep,
    limit: Annotated[int | None, Query(ge=1, description="default: every stored event")] = None,
) -> HistoryResponse:
    """The user's most recent stored events, newest last."""
    n = min(limit or services.settings.history_cap, services.settings.history_cap)
    events, _ = await within_deadline(services, services.store.history(user_id, n))
    return HistoryResponse(user_id=user_id, events=events)


@router.get("/users/{user_id}/profile", responses=documented(404, 503, 504))
async def get_profile(user_id: UserIdPath, services: ServicesDep, model: ModelDep) -> ProfileResponse:
    """What the service has learned about the user: activity, interests (item attributes, recency
    weighted), segment and most representative items (``service/profiles.py``). 404 when nothing is
    stored about the user."""
    profile = await within_deadline(services, model.profiles.profile(user_id))
    if profile is None:
        raise ApiError(404, "not_found", "no stored events for this user")
    return ProfileResponse.model_validate(profile)


@router.delete("/users/{user_id}", responses=documented(503, 504))
async def forget_user(user_id: UserIdPath, services: ServicesDep) -> ForgetResponse:
    """Forget everything stored about the user (history, seen-set, event ids). Idempotent."""
    forgotten = await within_deadline(services, services.store.forget(user_id))
    log.info("erased user %s (anything stored: %s)", services.user_log_names(user_id), forgotten)
    return ForgetResponse(user_id=user_id, forgotten=forgotten)
