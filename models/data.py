"""MovieLens 100K in its GroupLens format: ``u.data`` (ratings) and ``u.item`` (titles, genres).

Accepts the official full ``u.data`` as well as a partial one (any subset of its lines). Torch-free,
so the service's ``load-history`` command reuses it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.features import event_type_id

GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


DATA_DIR_ENV = "CLICKRANK_DATA_DIR"
FALLBACK_DATA_DIR = Path("../shared/data/ml-100k")
"""Where this workspace keeps MovieLens 100K, relative to the repository root."""


def default_data_dir() -> Path:
    """The data set a command reads when it is given none: ``$CLICKRANK_DATA_DIR``, else the fallback."""
    return Path(os.environ.get(DATA_DIR_ENV) or FALLBACK_DATA_DIR)


class DataFormatError(ValueError):
    """A data file is missing or malformed; the message names the file and the line."""


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    release_date: str
    genres: tuple[str, ...]

    @property
    def text(self) -> str:
        """The text the BERT encoder reads: title (with year) and genres."""
        title = self.title
        if (
            self.release_date
            and self.release_date[-4:].isdigit()
            and f"({self.release_date[-4:]})" not in title
        ):
            title = f"{title} ({self.release_date[-4:]})"
        genres = ", ".join(g for g in self.genres if g != "unknown") or "unknown genre"
        return f"{title} | {genres}"


@dataclass(frozen=True)
class Ratings:
    """All events sorted by time: parallel arrays, ids as strings. A data set holds ratings only; events
    exported from the service (``models.events_file``) carry their types and NaN where there is no value."""

    user_ids: np.ndarray  # object array of str
    item_ids: np.ndarray  # object array of str
    ratings: np.ndarray  # float32 value (the star rating), NaN for an event without one
    timestamps: np.ndarray  # int64 unix seconds
    types: np.ndarray | None = None  # int64 event type ids; None: every event is a rating

    def __len__(self) -> int:
        return len(self.timestamps)

    def event_types(self) -> np.ndarray:
        """The event type id of every event."""
        if self.types is None:
            return np.full(len(self), event_type_id("rate"), dtype=np.int64)
        return self.types


@dataclass(frozen=True)
class Dataset:
    items: list[Item]
    ratings: Ratings
    data_hash: str

    @property
    def item_ids(self) -> list[str]:
        return [it.item_id for it in self.items]


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found (expected a GroupLens MovieLens 100K directory)")
    return path


def load_items(path: Path) -> list[Item]:
    """Parse ``u.item`` (latin-1, ``|``-separated, 5 fields then 19 genre flags)."""
    items: list[Item] = []
    seen: set[str] = set()
    with _require(path).open(encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) != 5 + len(GENRES):
                raise DataFormatError(
                    f"{path}:{lineno}: expected {5 + len(GENRES)} '|'-separated fields, got {len(fields)}"
                )
            item_id, title, release_date = fields[0].strip(), fields[1].strip(), fields[2].strip()
            flags = fields[5:]
            if not item_id.isdigit() or any(f not in ("0", "1") for f in flags):
                raise DataFormatError(f"{path}:{lineno}: item id must be an integer and genre flags 0 or 1")
            if item_id in seen:
                raise DataFormatError(f"{path}:{lineno}: duplicate item id {item_id}")
            seen.add(item_id)
            genres = tuple(g for g, f in zip(GENRES, flags, strict=True) if f == "1")
            items.append(Item(item_id, title, release_date, genres))
    if not items:
        raise DataFormatError(f"{path}: no items")
    return items


def load_ratings(path: Path, known_items: set[str] | None = None) -> Ratings:
    """Parse ``u.data`` (tab-separated user, item, rating 1-5, unix seconds), sorted by time."""
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    stamps: list[int] = []
    with _require(path).open(encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 4:
                raise DataFormatError(f"{path}:{lineno}: expected 4 tab-separated fields, got {len(fields)}")
            try:
                user, item, rating, ts = fields[0], fields[1], float(fields[2]), int(fields[3])
            except ValueError as exc:
                raise DataFormatError(f"{path}:{lineno}: {exc}") from None
            if not (1 <= rating <= 5):
                raise DataFormatError(f"{path}:{lineno}: rating {rating} outside 1..5")
            if known_items is not None and item not in known_items:
                raise DataFormatError(f"{path}:{lineno}: item {item} is not in u.item")
            users.append(user)
            items.append(item)
            ratings.append(rating)
            stamps.append(ts)
    if not users:
        raise DataFormatError(f"{path}: no ratings")
    ts_arr = np.asarray(stamps, dtype=np.int64)
    user_arr = np.asarray(users, dtype=object)
    order = np.lexsort((np.arange(len(ts_arr)), ts_arr))  # stable by time, file order breaks ties
    return Ratings(
        user_ids=user_arr[order],
        item_ids=np.asarray(items, dtype=object)[order],
        ratings=np.asarray(ratings, dtype=np.float32)[order],
        timestamps=ts_arr[order],
    )


def data_hash(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("u.item", "u.data"):
        digest.update(_require(data_dir / name).read_bytes())
    return digest.hexdigest()


def load_dataset(data_dir: str | Path) -> Dataset:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataFormatError(f"{data_dir}: data directory not found (pass --data-dir or set {DATA_DIR_ENV})")
    items = load_items(data_dir / "u.item")
    ratings = load_ratings(data_dir / "u.data", {it.item_id for it in items})
    return Dataset(items=items, ratings=ratings, data_hash=data_hash(data_dir))
