"""The v1 contract as clients see it: the OpenAPI document must stay byte-for-byte the committed copy.

A deliberate change to the API regenerates ``docs/openapi-v1.json`` with
``python -m tests.test_openapi`` and lists the difference in the change's note.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.app import create_app
from service.settings import Settings

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "openapi-v1.json"


def current_document() -> str:
    """The app's OpenAPI document, serialised the way the committed copy is."""
    doc = create_app(Settings()).openapi()
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_openapi_document_is_the_committed_v1_contract() -> None:
    assert current_document() == COMMITTED.read_text(encoding="utf-8"), (
        "the OpenAPI document changed: if on purpose, run `python -m tests.test_openapi` and list why"
    )


if __name__ == "__main__":
    COMMITTED.write_text(current_document(), encoding="utf-8")
