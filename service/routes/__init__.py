"""The HTTP routes, one module per resource: the versioned API under ``/v1``, and ``ops``."""

from __future__ import annotations

from service.routes import events, items, model, ops, predict, users

ROUTERS = (events.router, predict.router, items.router, users.router, model.router, ops.router)
"""In the order the OpenAPI document lists them."""
