"""``clickrank serve``: run the app under uvicorn with settings from the ``CLICKRANK_*`` environment."""

from __future__ import annotations

import logging
import sys

import uvicorn

from service.settings import Settings

GRACEFUL_SHUTDOWN_S = 30
"""Time uvicorn gives open requests on shutdown; the batcher then drains its queue."""


def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve the API. Invalid settings raise ValueError (the CLI prints one line); a missing model
    directory is only a warning: the service starts, ``/readyz`` answers 503 and says why."""
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not (settings.model_dir / "manifest.json").is_file():
        print(
            f"clickrank serve: warning: no model at {settings.model_dir.resolve()} (manifest.json missing); "
            "starting anyway, /readyz will answer 503 until a model is deployed and the service restarted "
            "(set CLICKRANK_MODEL_DIR)",
            file=sys.stderr,
        )
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
