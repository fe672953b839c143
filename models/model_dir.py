"""The model directory: the one contract between the export (``models/``) and serving (``service/``).

``ModelDir`` knows every file name, writes the item table and the manifest (with each file's sha256) at
export time, and at load time reads each *served* file once, checks it against the manifest and hands
over the parsed content (``ServedModel``): nobody downstream reads the directory again. ``ranker.pt`` is
a training artifact: its checksum is in the manifest for provenance, serving never reads it.

Imports only the standard library and numpy, so the service can use it without torch.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
RANKER = "ranker.onnx"
ITEM_ENCODER = "item_encoder.onnx"
TOKENIZER = "tokenizer.json"
ITEMS = "items.json"
ITEM_VECTORS = "item_vectors.npy"
ITEM_ID_OFFSETS = "item_id_offsets.npy"
RANKER_WEIGHTS = "ranker.pt"
SEGMENTS = "segments.json"
METRICS = "metrics.json"
TRAINING_CURVE = "training_curve.png"

SERVED_FILES: tuple[str, ...] = (RANKER, ITEM_ENCODER, TOKENIZER, ITEMS, ITEM_VECTORS, ITEM_ID_OFFSETS)
"""What the service reads, each verified against the manifest at load."""
CHECKSUMMED_FILES: tuple[str, ...] = (*SERVED_FILES, RANKER_WEIGHTS)
"""What the manifest lists with its sha256 (the reports, metrics.json and the curve, are not listed)."""
OPTIONAL_FILES: tuple[str, ...] = (SEGMENTS,)
"""Served and checksummed when the export has them (user segments: exports before them lack the file)."""


class ModelLoadError(Exception):
    """The model directory is missing, incomplete or corrupt; the message says which file and why."""


@dataclass(frozen=True)
class ItemTable:
    """The exported catalog, in catalog order: ids, texts, final vectors [N, D] and their ID-embedding part
    [N, D] (zero rows for items never seen in training)."""

    item_ids: list[str]
    texts: list[str]
    vectors: np.ndarray
    id_offsets: np.ndarray


@dataclass(frozen=True)
class ServedModel:
    """Everything the service needs from one model directory, verified against its manifest."""

    source: Path
    manifest: dict[str, Any]
    ranker_onnx: bytes
    item_encoder_onnx: bytes
    tokenizer_json: str
    items: ItemTable
    segments: dict[str, Any] | None = None  # segments.json, when the export has it


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelDir:
    """One exported model directory (see the module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------------------------- export side

    def write_item_table(self, table: ItemTable) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        items = [{"item_id": i, "text": t} for i, t in zip(table.item_ids, table.texts, strict=True)]
        self.file(ITEMS).write_text(json.dumps(items), encoding="utf-8")
        np.save(self.file(ITEM_VECTORS), np.asarray(table.vectors, dtype=np.float32))
        np.save(self.file(ITEM_ID_OFFSETS), np.asarray(table.id_offsets, dtype=np.float32))

    def write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write ``manifest`` with the sha256 of every checksummed file (all must exist); returns it."""
        names = [*CHECKSUMMED_FILES, *(n for n in OPTIONAL_FILES if self.file(n).is_file())]
        manifest = {**manifest, "files": {name: sha256(self.file(name)) for name in names}}
        self.file(MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return manifest

    # --------------------------------------------------------------------------------------- load side

    def read_manifest(self) -> dict[str, Any]:
        """The parsed manifest with the fields the service relies on checked."""
        path = self.file(MANIFEST)
        if not self.path.is_dir():
            raise ModelLoadError(f"model directory {self.path} does not exist")
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing: {self.path} is not an exported model directory")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            config = manifest["config"]
            checks = {
                "version": isinstance(manifest["version"], str) and manifest["version"] != "",
                "files": isinstance(manifest["files"], dict),
                "config.dim": isinstance(config["dim"], int) and config["dim"] > 0,
                "config.history_length": isinstance(config["history_length"], int)
                and config["history_length"] > 0,
                "config.max_text_tokens": isinstance(config["max_text_tokens"], int)
                and config["max_text_tokens"] > 2,
            }
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path} cannot be read as JSON: {exc}") from exc
        except (KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path} lacks the field {exc}") from exc
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ModelLoadError(f"{path} has invalid {', '.join(bad)}")
        return manifest

    def load(self) -> ServedModel:
        """Read every served file once, verify it against the manifest, parse it."""
        manifest = self.read_manifest()
        served = [*SERVED_FILES, *(n for n in OPTIONAL_FILES if n in manifest["files"])]
        blobs = {name: self._read_verified(name, manifest["files"]) for name in served}
        return ServedModel(
            source=self.path,
            manifest=manifest,
            ranker_onnx=blobs[RANKER],
            item_encoder_onnx=blobs[ITEM_ENCODER],
            tokenizer_json=self._text(TOKENIZER, blobs[TOKENIZER]),
            items=self._item_table(blobs),
            segments=self._json(SEGMENTS, blobs[SEGMENTS]) if SEGMENTS in blobs else None,
        )

    def _read_verified(self, name: str, digests: dict[str, Any]) -> bytes:
        if name not in digests:
            raise ModelLoadError(f"{MANIFEST} in {self.path} does not list {name}")
        try:
            data = self.file(name).read_bytes()
        except FileNotFoundError:
            raise ModelLoadError(f"{name} is missing from {self.path} (listed in {MANIFEST})") from None
        except OSError as exc:
            raise ModelLoadError(f"{name} in {self.path} cannot be read: {exc}") from exc
        expected, actual = str(digests[name]).lower(), hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ModelLoadError(
                f"{name} in {self.path}: checksum mismatch (manifest sha256 {expected}, file sha256 "
                f"{actual}); the model directory is corrupt or was partly overwritten"
            )
        return data

    def _text(self, name: str, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"{name} in {self.path} is not UTF-8 text: {exc}") from None

    def _json(self, name: str, data: bytes) -> Any:
        try:
            return json.loads(self._text(name, data))
        except ValueError as exc:
            raise ModelLoadError(f"{name} in {self.path} is not JSON: {exc}") from None

    def _item_table(self, blobs: dict[str, bytes]) -> ItemTable:
        """The parsed item files; their mutual consistency is ``ItemCatalog``'s to check."""
        try:
            items = json.loads(self._text(ITEMS, blobs[ITEMS]))
            ids = [str(item["item_id"]) for item in items]
            texts = [str(item["text"]) for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                f"{ITEMS} in {self.path}: expected a list of {{item_id, text}} objects ({exc})"
            ) from None
        vectors, offsets = (self._array(name, blobs[name]) for name in (ITEM_VECTORS, ITEM_ID_OFFSETS))
        return ItemTable(ids, texts, vectors, offsets)

    def _array(self, name: str, data: bytes) -> np.ndarray:
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise ModelLoadError(f"{name} in {self.path}: not a numpy array file ({exc})") from None
