"""Structured logs: one JSON object per line, each stamped with the id of the request that wrote it.

The request middleware sets ``REQUEST_ID`` for the duration of a request; a log-record factory copies it
onto every record when the record is created, so the id survives handlers that format later (and
``asyncio.to_thread`` work, which inherits the context). ``log_config`` is handed to uvicorn so its own
loggers go through the same formatter. Formatters mask URL passwords and the configured API keys as a
last line of defence: no code path is meant to log them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets as random_secrets
import time
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

REQUEST_ID: ContextVar[str | None] = ContextVar("clickrank_request_id", default=None)
"""The id of the request being served (``X-Request-ID``), ``None`` outside a request."""

LogFormat = Literal["json", "text"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@/\s]+@")
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "color_message",  # uvicorn's copy of the message with terminal colour codes
}


def mask_secrets(text: str, secrets: Sequence[str] = ()) -> str:
    """``redis://user:pw@host`` → ``redis://user:***@host``; every string of ``secrets`` → ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class UserLogNames:
    """How a log line names a user: ``u#`` and 16 hex digits of HMAC-SHA256 under ``key`` (the same user,
    the same name, so an operator can follow one user through the logs without reading their id), or the
    raw id when ``raw`` (``CLICKRANK_LOG_USER_IDS``). An empty key is replaced by a random one: names are
    then comparable within this process only."""

    def __init__(self, *, raw: bool = False, key: str = "") -> None:
        self._raw = raw
        self._key = key.encode() if key else random_secrets.token_bytes(32)

    def __call__(self, user_id: str) -> str:
        if self._raw:
            return user_id
        return "u#" + hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()[:16]


def install_request_id_factory() -> None:
    """Make every new log record carry ``request_id`` (idempotent)."""
    current = logging.getLogRecordFactory()
    if getattr(current, "stamps_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        record.request_id = REQUEST_ID.get()
        return record

    factory.stamps_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class ThrottledLog:
    """At most one line per key every ``every_s`` seconds, saying how many were held back since the last:
    a fault or an overload hit by every request must not flood the log, nor spend the CPU writing it."""

    def __init__(self, logger: logging.Logger, every_s: float = 5.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}  # key -> (monotonic time of the last line, held back)

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last, held = self._last.get(key, (-math.inf, 0))
        if now - last < self.every_s:
            self._last[key] = (last, held + 1)
            return
        self._last[key] = (now, 0)
        if held:
            msg, args = msg + " (%d more since the last report)", (*args, held)
        self.logger.log(level, msg, *args)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id", ...extra fields, "exc"?}`` on one line."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return mask_secrets(json.dumps(entry, default=str, ensure_ascii=False), self.secrets)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal; the same masking as ``JsonFormatter``."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__(TEXT_FORMAT, defaults={"request_id": "-"})
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record), self.secrets)


def log_config(level: str, fmt: LogFormat = "json", secrets: Sequence[str] = ()) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict: everything (uvicorn included) to stderr through one
    formatter. uvicorn's access logger is left without a handler: the app writes its own access line,
    which names the route template instead of the raw URL with its query string."""
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"clickrank": {"()": formatter, "secrets": list(secrets)}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "clickrank",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        },
    }
