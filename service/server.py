"""``clickrank serve``: run the app under uvicorn with settings from the ``CLICKRANK_*`` environment."""

from __future__ import annotations

import logging.config
import os
import signal
import sys
import tempfile
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from models.model_dir import MANIFEST
from models.model_store import ModelStore
from service.logs import install_request_id_factory, log_config
from service.metrics import MULTIPROC_DIR_ENV
from service.settings import Settings

GRACEFUL_SHUTDOWN_S = 30
"""Time uvicorn gives open requests on shutdown; the batcher then drains its queue."""


def load_settings() -> Settings:
    """The environment's settings. A ValidationError names each bad variable without echoing its value:
    pydantic's message includes the input, and CLICKRANK_REDIS_URL may hold a password."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = [
            (f"CLICKRANK_{'_'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "") + e["msg"]
            for e in exc.errors()
        ]
        raise ValueError(f"invalid settings: {'; '.join(problems)}") from None


def share_metrics(settings: Settings) -> Path:
    """Several workers: prometheus client's multiprocess mode in ``metrics_dir`` (else a new temp dir),
    emptied first (files of an earlier run would be summed in), before any worker imports the client."""
    directory = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="clickrank-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_DIR_ENV] = str(directory)
    return directory


def serve(host: str = "127.0.0.1", port: int = 8000, workers: int | None = None) -> None:
    """Serve the API with ``workers`` processes (default ``CLICKRANK_WORKERS``). Invalid settings raise
    ValueError (the CLI prints one line); a missing model directory is only a warning: the service
    starts, ``/readyz`` answers 503 and says why."""
    settings = load_settings()
    workers = workers or settings.workers
    logging_config = log_config(settings.log_level, settings.log_format, secrets=settings.log_secrets())
    logging.config.dictConfig(logging_config)
    install_request_id_factory()
    if not ModelStore.is_store(settings.model_dir) and not (settings.model_dir / MANIFEST).is_file():
        logging.getLogger("clickrank.server").warning(
            "no model at %s (manifest.json missing); starting anyway, /readyz will answer 503 until a model "
            "is deployed there (looked for every CLICKRANK_MODEL_POLL_INTERVAL_S) or POST /v1/model/reload",
            settings.model_dir.resolve(),
        )
    if workers > 1:
        directory = share_metrics(settings)
        logging.getLogger("clickrank.server").info("%d workers share their metrics in %s", workers, directory)
    # uvicorn answers SIGTERM by finishing open requests (up to GRACEFUL_SHUTDOWN_S) and draining the
    # batcher, then re-raises the signal under the handler it found: make that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=logging_config,
        log_level=settings.log_level.lower(),
        access_log=False,  # the app writes one access line per request itself (route template, no query)
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
