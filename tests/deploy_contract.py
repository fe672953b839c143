"""What every deployment file (Dockerfile, compose file, Kubernetes manifests) is checked against: the
settings the code reads, the routes it serves, and the linters CI installs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.routing import Match

from service.settings import Settings

PREFIX = "CLICKRANK_"


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a container with exactly ``env`` (its CLICKRANK_* variables) would read."""
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def setting_names() -> set[str]:
    return {PREFIX + name.upper() for name in Settings.model_fields}


def is_get_route(app: FastAPI, path: str) -> bool:
    """True when ``GET path`` reaches one of the app's routes (a probe's or health check's URL)."""
    scope = {
        "type": "http",
        "path": path,
        "method": "GET",
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def tool(name: str) -> str | None:
    """A linter or renderer on PATH or in the venv, or None."""
    return shutil.which(name) or next(
        (str(p) for p in [Path(sys.executable).parent / name] if p.is_file() and os.access(p, os.X_OK)), None
    )
