"""Model versions swapped live: the serving model is replaced when the model store's ``current`` changes
(noticed every ``CLICKRANK_MODEL_POLL_INTERVAL_S``, or at once by ``POST /v1/model/reload``).

A new version is built beside the serving one (files verified against its manifest, graphs warmed over
every shape bucket: ``lifespan.build_model``); items added online to the serving version are encoded by
the new one and published under it; then ``Services.model`` is replaced in one assignment. A request
holds the model it started with, so in-flight requests finish on the old version and new ones use the
new. The old version's batcher is stopped only after ``request_timeout_ms`` (+1 s), when no request can
still be using it. A version that fails is refused (logged, counted, ``GET /v1/model`` says why) and the
serving one stays; the same refused files are not tried again by the poll, only when ``current`` or the
version's manifest changes, or on an explicit reload.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from models.model_dir import MANIFEST, ModelDir, ModelLoadError
from models.model_store import CURRENT, resolve
from service.gc_pauses import freeze_survivors
from service.metrics import MODEL_INFO, MODEL_RELOADS, counted_from_start

if TYPE_CHECKING:
    from service.lifespan import LoadedModel, Services

log = logging.getLogger("clickrank.model")

REHOME_CHUNK = 256
"""Online items re-encoded per call when they move to a new version."""

Outcome = Literal["swapped", "unchanged", "refused"]
COUNTED: tuple[Outcome, ...] = ("swapped", "refused")
"""The outcomes ``clickrank_model_reloads_total`` counts, each from start-up (an alert reads the refusals)."""
counted_from_start(MODEL_RELOADS, COUNTED)


@dataclass(frozen=True)
class Refusal:
    """A version that was not swapped in, and why."""

    version: str
    reason: str
    at: str  # ISO 8601, UTC

    def as_dict(self) -> dict[str, str]:
        return {"version": self.version, "reason": self.reason, "at": self.at}


@dataclass(frozen=True)
class Reload:
    outcome: Outcome
    version: str | None  # the serving version after the reload
    refusal: Refusal | None = None


class ModelReloader:
    """Owns the swap of ``services.model`` (see the module docstring)."""

    def __init__(self, services: Services, build: Callable[[Services, Path], Awaitable[LoadedModel]]) -> None:
        self._services = services
        self._build = build
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task[None], LoadedModel] = {}
        self._refused_files: tuple[Path, int | None] | None = None  # what was refused last: not retried
        self.last_refused: Refusal | None = None

    async def load_initial(self) -> None:
        """The model at startup; a failure leaves the service without one (``/readyz`` says why), and
        the watch keeps looking for a version that loads."""
        await self.reload(force=True)

    async def watch(self) -> None:
        """Poll for a new current version forever."""
        interval = self._services.settings.model_poll_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # never let the watch die; the next round tries again
                log.exception("model reload failed unexpectedly")

    async def reload(self, *, force: bool = False) -> Reload:
        """Swap in the store's current version if it is not the one serving. ``force`` retries files that
        were refused before."""
        async with self._lock:
            services = self._services
            serving = services.model
            serving_version = serving.models.version if serving else None
            model_dir = services.settings.model_dir
            try:
                path = await asyncio.to_thread(resolve, model_dir)
            except ModelLoadError as exc:  # a store whose ``current`` names no version
                files = (model_dir, _mtime_ns(model_dir / CURRENT))
                return self._refuse("?", str(exc), files, serving_version, force)
            files = (path, _mtime_ns(path / MANIFEST))
            try:
                version = (await asyncio.to_thread(ModelDir(path).read_manifest))["version"]
            except ModelLoadError as exc:
                return self._refuse("?", str(exc), files, serving_version, force)
            if version == serving_version:
                return Reload("unchanged", version)
            if files == self._refused_files and not force and self.last_refused is not None:
                return Reload("refused", serving_version, self.last_refused)
            try:
                new = await self._build(services, path)
            except Exception as exc:  # ModelLoadError, or a graph ONNX Runtime refuses
                reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
                return self._refuse(version, reason, files, serving_version, force)
            if serving is not None:
                try:
                    await self._rehome_items(serving, new)
                except Exception as exc:  # Redis down: the retirement tries again; the swap goes on
                    log.warning("items added online to %s not moved yet: %s", serving_version, exc)
            services.model, services.model_error = new, None
            MODEL_RELOADS.labels(outcome="swapped").inc()
            # Set here, not at load: a version refused in warm-up never shows. The retired version goes to 0
            # rather than away: with several workers (multiprocess mode) a gauge cannot drop a label, and
            # the page shows the largest value over the live workers, so 1 while any worker serves it.
            if serving is not None:
                MODEL_INFO.labels(version=serving_version, provider=serving.models.providers[0]).set(0)
            MODEL_INFO.labels(version=version, provider=new.models.providers[0]).set(1)
            log.info("now serving model %s (was %s)", version, serving_version)
            freeze_survivors()
            if serving is not None:
                task = asyncio.create_task(self._retire(serving, new), name=f"retire-{serving_version}")
                self._retiring[task] = serving
                task.add_done_callback(self._retired)
            return Reload("swapped", version)

    def _refuse(
        self,
        version: str,
        reason: str,
        files: tuple[Path, int | None],
        serving_version: str | None,
        force: bool,
    ) -> Reload:
        repeated = files == self._refused_files
        self._refused_files = files
        self.last_refused = Refusal(version, reason, datetime.now(UTC).isoformat(timespec="seconds"))
        if self._services.model is None:
            self._services.model_error = reason
        if not repeated or force:
            MODEL_RELOADS.labels(outcome="refused").inc()
            log.error("model %s refused, still serving %s: %s", version, serving_version, reason)
        return Reload("refused", serving_version, self.last_refused)

    async def _rehome_items(self, old: LoadedModel, new: LoadedModel) -> int:
        """Publish under ``new`` (encoded by its encoder) the items added online to ``old`` that ``new``
        lacks; returns how many."""
        published = await old.catalog_sync.published_texts()
        rows = new.catalog.index_of(list(published)) if published else []
        missing = {i: t for (i, t), row in zip(published.items(), rows, strict=True) if row < 0}
        items = list(missing.items())
        for start in range(0, len(items), REHOME_CHUNK):
            await new.items.upsert(dict(items[start : start + REHOME_CHUNK]))
        if missing:
            log.info("%d items added online moved from model %s to %s", len(missing), old.models.version,
                     new.models.version)  # fmt: skip
        return len(missing)

    async def _retire(self, old: LoadedModel, new: LoadedModel) -> None:
        """Once no request can still hold ``old``: move the items added to it meanwhile, stop it."""
        await asyncio.sleep(self._services.settings.request_timeout_ms / 1000.0 + 1.0)
        try:
            await self._rehome_items(old, new)
        except Exception as exc:  # Redis down: those items are posted again by their clients, or lost
            log.warning("items added to model %s during the swap were not moved: %s", old.models.version, exc)
        await old.batcher.stop(drain=True)
        log.info("model %s stopped", old.models.version)

    def _retired(self, task: asyncio.Task[None]) -> None:
        """The last reference to a retired model is dropped: collect it (``service.gc_pauses``)."""
        self._retiring.pop(task, None)
        freeze_survivors()

    async def stop(self) -> None:
        """Stop the versions being retired now (their queued requests finish first)."""
        retiring = dict(self._retiring)
        for task, old in retiring.items():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            await old.batcher.stop(drain=True)


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
