"""ModelDir on a real export: checksums verified at load, clear errors naming the file, each served file
read once and handed to the runtime and the catalog, ranker.pt never read by serving."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.model_dir import (
    CHECKSUMMED_FILES,
    ITEM_ENCODER,
    ITEM_ID_OFFSETS,
    ITEM_VECTORS,
    ITEMS,
    MANIFEST,
    OPTIONAL_FILES,
    RANKER,
    RANKER_WEIGHTS,
    SERVED_FILES,
    TOKENIZER,
    ModelDir,
    ModelLoadError,
)
from service.app import create_app
from service.catalog import ItemCatalog
from service.runtime import OnnxModels
from service.settings import Settings

_opened: list[Path] | None = None
"""While a list: every file the process opens (any thread) is appended to it (see ``opened_files``)."""


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str | Path):
        _opened.append(Path(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records nothing outside ``opened_files``


@contextmanager
def opened_files(directory: Path) -> Iterator[Counter[str]]:
    """Counts, by file name, the files opened in ``directory`` inside the ``with`` block."""
    global _opened
    directory, counts, _opened = directory.resolve(), Counter(), []
    try:
        yield counts
    finally:
        opened, _opened = _opened, None
        counts.update(p.name for p in opened if p.parent.resolve() == directory)


@pytest.fixture()
def model_copy(model_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the export (the 90 MB encoder graph is a symlink: ``replace`` it, never write
    through it)."""
    target = tmp_path / "model"
    target.mkdir()
    for path in model_dir.iterdir():
        if path.name == ITEM_ENCODER:
            (target / path.name).symlink_to(path.resolve())
        else:
            shutil.copyfile(path, target / path.name)
    return target


def replace(directory: Path, name: str, data: bytes) -> None:
    (directory / name).unlink()
    (directory / name).write_bytes(data)


def flip_a_byte(directory: Path, name: str) -> None:
    data = bytearray((directory / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    replace(directory, name, bytes(data))


def test_manifest_lists_every_checksummed_file(model_dir: Path) -> None:
    manifest = ModelDir(model_dir).read_manifest()
    assert set(manifest["files"]) == set(CHECKSUMMED_FILES) | set(OPTIONAL_FILES), "segments.json too"
    assert RANKER_WEIGHTS in manifest["files"] and RANKER_WEIGHTS not in SERVED_FILES


def test_manifest_records_what_produced_the_export(model_dir: Path) -> None:
    """The tiny config exports the harness's model as evaluated, so both configs are the harness's."""
    manifest = ModelDir(model_dir).read_manifest()
    assert manifest["created"].endswith("Z") and manifest["package_version"]
    assert len(manifest["data_hash"]) == 64 and manifest["data_hash"][:8] in manifest["version"]
    assert manifest["seed"] == manifest["config"]["seed"]
    assert manifest["fit"]["recipe"] == "the harness's model, as evaluated"
    harness = manifest["harness_config"]
    assert {k: v for k, v in manifest["config"].items() if k in harness} == {
        k: v for k, v in harness.items() if k != "cold_fraction"
    }
    assert manifest["config"]["max_text_tokens"] > 2 and "metrics" in manifest and "calibration" in manifest


@pytest.mark.parametrize("name", [ITEMS, ITEM_VECTORS, ITEM_ID_OFFSETS, RANKER, ITEM_ENCODER, TOKENIZER])
def test_a_tampered_file_is_refused_by_name(model_copy: Path, name: str) -> None:
    flip_a_byte(model_copy, name)
    with pytest.raises(ModelLoadError, match=rf"{name} in .*checksum mismatch"):
        ModelDir(model_copy).load()


@pytest.mark.parametrize("name", [RANKER, TOKENIZER, ITEMS, ITEM_ID_OFFSETS])
def test_a_missing_file_is_refused_by_name(model_copy: Path, name: str) -> None:
    (model_copy / name).unlink()
    with pytest.raises(ModelLoadError, match=rf"{name} is missing"):
        ModelDir(model_copy).load()


def test_the_training_artifact_is_not_needed_to_serve(model_copy: Path) -> None:
    (model_copy / RANKER_WEIGHTS).unlink()
    assert ModelDir(model_copy).load().items.item_ids


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (ITEMS, b"{not json", r"items\.json in .*expected a list of \{item_id, text\}"),
        (ITEMS, b'[{"item_id": "1"}]', r"items\.json in .*expected a list"),
        (ITEM_VECTORS, b"garbage", r"item_vectors\.npy in .*not a numpy array file"),
        (TOKENIZER, b"\xff\xfe", r"tokenizer\.json in .*not UTF-8"),
    ],
)
def test_a_listed_but_unparsable_file_is_refused_by_name(
    model_copy: Path, name: str, content: bytes, message: str
) -> None:
    """Checksums that match a broken file (an export bug, not corruption) still give a clear error."""
    replace(model_copy, name, content)
    target = ModelDir(model_copy)
    target.write_manifest(target.read_manifest())
    with pytest.raises(ModelLoadError, match=message):
        target.load()


def test_missing_or_broken_manifest_is_refused(model_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelDir(tmp_path / "nowhere").load()
    manifest = model_copy / MANIFEST
    content = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be read as JSON"):
        ModelDir(model_copy).load()
    manifest.write_text(json.dumps({**content, "config": {**content["config"], "dim": 0}}))
    with pytest.raises(ModelLoadError, match=r"has invalid config\.dim"):
        ModelDir(model_copy).load()
    del content["files"][RANKER]
    manifest.write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=r"does not list ranker\.onnx"):
        ModelDir(model_copy).load()
    manifest.unlink()
    with pytest.raises(ModelLoadError, match=r"manifest\.json is missing"):
        ModelDir(model_copy).load()


def test_runtime_and_catalog_are_built_from_the_one_verified_read(model_copy: Path) -> None:
    with opened_files(model_copy) as opened:
        served = ModelDir(model_copy).load()
        models = OnnxModels(served, device="cpu")
        catalog = ItemCatalog.from_table(served.items, models.version)
    expected = Counter({MANIFEST: 1} | dict.fromkeys(SERVED_FILES, 1) | dict.fromkeys(OPTIONAL_FILES, 1))
    assert opened == expected, "each file read once"
    expected = served.items.vectors.copy()
    replace(model_copy, ITEM_VECTORS, b"overwritten after the load")  # nobody reads it again
    np.testing.assert_array_equal(catalog.vectors, expected)
    assert catalog.item_ids == served.items.item_ids and len(catalog) == len(expected)


@pytest.mark.anyio
async def test_the_service_reads_each_served_file_once_at_start(model_copy: Path, redis_url: str) -> None:
    app = create_app(Settings(redis_url=redis_url, model_dir=model_copy, device="cpu"))
    with opened_files(model_copy) as opened:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://clickrank.test") as client:
                assert (await client.get("/readyz")).status_code == 200
    # the manifest twice: once to learn which version is current, once in the verified load
    assert opened == Counter(
        {MANIFEST: 2} | dict.fromkeys(SERVED_FILES, 1) | dict.fromkeys(OPTIONAL_FILES, 1)
    )
