"""A model store: version directories (each an export, ``models/model_dir.py``) and a ``current`` file
naming the one to serve.

    STORE/
      current                         the serving version's name, one line; replaced atomically
      20261203T060000Z-b9bbde45/      an exported model directory (manifest.json, ranker.onnx, ...)
      20261203T070000Z-4f1c2a9e/

``clickrank train --model-dir STORE --store`` adds a version and points ``current`` at it; ``clickrank
promote VERSION`` points it at an existing one after verifying its checksums. The service reads
``CLICKRANK_MODEL_DIR`` through ``resolve``: a model directory is served as it is, a store by its current
version, and a change of ``current`` is noticed and swapped in live (``service/model_reload.py``).
Standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from models.model_dir import MANIFEST, ModelDir, ModelLoadError

CURRENT = "current"
INCOMING_PREFIX = ".incoming-"
"""A version being written (by ``train``) lives under this name until its manifest is complete."""
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class ModelStore:
    """The store at ``path`` (see the module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @staticmethod
    def is_store(path: Path | str) -> bool:
        return (Path(path) / CURRENT).is_file()

    def current_version(self) -> str:
        """The version ``current`` names; ModelLoadError when there is none or it names no version."""
        try:
            version = (self.path / CURRENT).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ModelLoadError(f"model store {self.path}: cannot read {CURRENT} ({exc})") from None
        self.version_dir(version)
        return version

    def version_dir(self, version: str) -> Path:
        """The directory of ``version``; ModelLoadError for a name that is not a version of this store."""
        if not _VERSION.fullmatch(version) or version == CURRENT:
            raise ModelLoadError(f"model store {self.path}: {version!r} is not a version name")
        path = self.path / version
        if not (path / MANIFEST).is_file():
            raise ModelLoadError(f"model store {self.path}: no version {version} ({path / MANIFEST} missing)")
        return path

    def versions(self) -> list[str]:
        """Every complete version, oldest name first (names start with their UTC creation time)."""
        return sorted(
            p.name
            for p in self.path.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
        )

    def point_to(self, version: str) -> None:
        """Make ``version`` current: a new file renamed over ``current`` (atomic on POSIX), so a reader
        sees the old name or the new one, never a partial write. No verification: see ``promote``."""
        self.version_dir(version)
        fd, tmp = tempfile.mkstemp(prefix=".current-", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(version + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path / CURRENT)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def promote(self, version: str) -> None:
        """Verify every served file of ``version`` against its manifest, then make it current."""
        ModelDir(self.version_dir(version)).load()
        self.point_to(version)

    def incoming(self) -> Path:
        """A fresh directory inside the store for a version being written (``add`` moves it in place)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=INCOMING_PREFIX, dir=self.path))

    def add(self, incoming: Path, version: str) -> Path:
        """Move a completely written export from ``incoming`` to its version name; returns its path."""
        target = self.path / version
        if target.exists():
            shutil.rmtree(incoming)
            raise ModelLoadError(f"model store {self.path}: version {version} exists already")
        os.replace(incoming, target)
        return target


def resolve(path: Path | str) -> Path:
    """The model directory to serve for ``CLICKRANK_MODEL_DIR=path``: ``path`` itself when it holds a
    manifest (or is no store), else the store's current version."""
    path = Path(path)
    if (path / MANIFEST).is_file() or not ModelStore.is_store(path):
        return path
    store = ModelStore(path)
    return store.version_dir(store.current_version())
