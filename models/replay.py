"""``clickrank evaluate --replay``: online replay of the latest part of the data, through the serving code.

1. The data set's ratings, sorted by time, are cut at a timestamp quantile: the latest ``fraction`` is the
   replay stream, the earlier part is written as a GroupLens data dir (a temp dir) and clickrank is
   trained and exported on it by ``models.pipeline.train_and_export``, the ID-only baseline by
   ``models.train.fit`` on the same pre-cutoff sequences (the same split, windows and refit as the
   harness and the export use).
2. A private ``redis-server`` (temp dir, free port) gets the pre-cutoff history through the service's
   own ``load-history`` code, and the service is built by the app's own lifespan (``create_app``), so
   ``/v1/recommend`` and ``/v1/events`` run exactly the serving code (candidates, ranker, calibration).
3. Event by event, in time order: recommend 20 items for the event's user (``exclude_seen``), record the
   real item's rank and the shown top 10 with their ``click_probability``, then ingest the event as
   ``POST /v1/events`` does, so histories, seen-sets, trending (and any other online state) grow.
4. The same stream is scored by plain-Python baselines under the same exclusion rule (an item the user
   already interacted with is never recommended): decayed popularity, co-occurrence + popularity, and
   the ID-only transformer fed each user's live history.

Every event is a *returning user* (the user has pre-cutoff events) or a *new user*; independently it may
be a *new item* (no pre-cutoff rating of the item).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.calibration_report import calibration_summary, plot_reliability, reliability_bins
from models.data import Dataset, Ratings, load_dataset
from models.evaluate import coverage_at_k, genre_features, intra_list_diversity
from models.features import value_bucket, value_buckets
from models.redis_process import RedisProcess
from models.sequences import UserSequence

TOP_K = 20
"""Items asked of ``/v1/recommend`` per event (a real item beyond it is a miss)."""
SHOWN = 10
"""The shown list: NDCG@10, HR@10, coverage@10, diversity and calibration read its first 10 items."""
HALF_LIFE_S = 3 * 86400.0
"""Decayed popularity: an event one half-life old counts 1/2 (the service's trending uses the same)."""
COOC_WINDOW = 5
"""Co-occurrence: item b *follows* item a when b is among the next 5 events of the same user after a."""
COOC_HISTORY = 10
COOC_DECAY = 0.8
COOC_POP_WEIGHT = 0.5
"""Co-occurrence score = Σ_k 0.8^k · C[h_k] / (Σ C[h_k] + 1) over the user's last 10 items h_0 (newest)
.. h_9, plus 0.5 · (decayed popularity / its sum). Fixed a priori, not tuned on the replay."""
SEGMENTS = ("all", "returning users", "new users", "new items")
CALIBRATION_BINS = 15
CALIBRATION_STRATEGY = "equal-mass"
DIVERSITY = "genre Jaccard"

CLICKRANK = "clickrank (service)"
ID_ONLY = "id-only transformer (SASRec recipe)"
COOC = "co-occurrence + popularity"
POPULARITY = "popularity (decayed)"
MODEL_ORDER = (POPULARITY, COOC, ID_ONLY, CLICKRANK)


# -------------------------------------------------------------------------------------------- the split


def time_cut(timestamps: np.ndarray, fraction: float) -> int:
    """Index of the first replayed rating in time-sorted ``timestamps``: the latest ``fraction`` of the
    ratings by timestamp quantile, moved forward so that a timestamp never straddles the cut."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--replay-fraction must be in (0, 1), got {fraction}")
    n = len(timestamps)
    cut = n - max(1, round(fraction * n))
    cut = int(np.searchsorted(timestamps, timestamps[cut], side="left")) if cut > 0 else 0
    if cut <= 0:
        raise ValueError("the replay fraction leaves no ratings to train on")
    return cut


def slice_ratings(r: Ratings, start: int, stop: int) -> Ratings:
    cut = slice(start, stop)
    return Ratings(r.user_ids[cut], r.item_ids[cut], r.ratings[cut], r.timestamps[cut])


def write_grouplens(source_dir: Path, ratings: Ratings, dest: Path) -> Path:
    """``dest`` as a GroupLens data dir: ``u.data`` of ``ratings`` and a copy of every other file."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in Path(source_dir).iterdir():
        if path.is_file() and path.name != "u.data":
            shutil.copyfile(path, dest / path.name)
    with (dest / "u.data").open("w", encoding="latin-1") as fh:
        for u, i, v, t in zip(
            ratings.user_ids.tolist(),
            ratings.item_ids.tolist(),
            ratings.ratings.tolist(),
            ratings.timestamps.tolist(),
            strict=True,
        ):
            fh.write(f"{u}\t{i}\t{int(v) if float(v).is_integer() else v}\t{t}\n")
    return dest


# ------------------------------------------------------------------------------------------- the stream


@dataclass
class Stream:
    """The replayed events (catalog rows) and what was known before the cutoff."""

    users: list[str]
    items: np.ndarray  # int64 catalog rows
    values: np.ndarray  # float ratings
    timestamps: np.ndarray  # int64
    returning: np.ndarray  # bool: the user has pre-cutoff events
    new_rows: np.ndarray  # int64, ascending: the catalog rows with no pre-cutoff rating
    pre: dict[str, UserSequence]  # pre-cutoff sequence per user (value buckets, as the model reads)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def new_item(self) -> np.ndarray:
        """Per event, bool: its item has no pre-cutoff rating."""
        return np.isin(self.items, self.new_rows)

    def new_item_events(self) -> dict[str, int]:
        """The "new items" segment's events and their distinct items: each item's first event there is its
        first rating ever, so ``items`` of the ``events`` are scored with only the item's text known."""
        new = self.new_item
        return {"events": int(new.sum()), "items": len(np.unique(self.items[new]))}

    def segment_masks(self) -> dict[str, np.ndarray]:
        return {
            "all": np.ones(len(self), dtype=bool),
            "returning users": self.returning,
            "new users": ~self.returning,
            "new items": self.new_item,
        }


def build_stream(data: Dataset, cut: int, limit: int | None) -> Stream:
    r = data.ratings
    row = {item_id: i for i, item_id in enumerate(data.item_ids)}
    stop = len(r) if limit is None else min(len(r), cut + limit)
    pre_rows = np.fromiter((row[i] for i in r.item_ids[:cut]), dtype=np.int64, count=cut)
    per_user: dict[str, list[int]] = defaultdict(list)
    for k, u in enumerate(r.user_ids[:cut].tolist()):
        per_user[u].append(k)
    pre = {
        u: UserSequence(
            u,
            pre_rows[idx],
            value_buckets(r.ratings[idx]),
            r.timestamps[idx].astype(np.float64),
        )
        for u, idx in ((u, np.array(ix)) for u, ix in per_user.items())
    }
    known_items = np.zeros(len(data.items), dtype=bool)
    known_items[pre_rows] = True
    users = r.user_ids[cut:stop].tolist()
    items = np.fromiter((row[i] for i in r.item_ids[cut:stop]), dtype=np.int64, count=stop - cut)
    return Stream(
        users=users,
        items=items,
        values=r.ratings[cut:stop].astype(np.float64),
        timestamps=r.timestamps[cut:stop],
        returning=np.array([u in pre for u in users], dtype=bool),
        new_rows=np.flatnonzero(~known_items),
        pre=pre,
    )


@dataclass
class ModelRun:
    """Per event: the real item's 1-based rank in the answer (0 = not in the top 20) and the shown list
    (top-10 catalog rows, -1 padded); clickrank also has each shown item's click probability."""

    ranks: np.ndarray
    shown: np.ndarray
    probs: np.ndarray | None = None


def _rank_of(target: int, top: np.ndarray) -> int:
    hits = np.flatnonzero(top == target)
    return int(hits[0]) + 1 if hits.size else 0


def _top(scores: np.ndarray, excluded: list[int] | np.ndarray, k: int = TOP_K) -> np.ndarray:
    s = np.array(scores, dtype=np.float64)
    s[np.asarray(excluded, dtype=np.int64)] = -np.inf
    k = min(k, int(np.isfinite(s).sum()))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-s, k - 1)[:k]
    return part[np.lexsort((part, -s[part]))]


def _pad(top: np.ndarray, n: int = SHOWN) -> np.ndarray:
    out = np.full(n, -1, dtype=np.int64)
    out[: min(n, len(top))] = top[:n]
    return out


# ------------------------------------------------------------------------------------------- baselines


def replay_baselines(
    stream: Stream, num_items: int, id_only_top: dict[int, np.ndarray] | None = None
) -> dict[str, ModelRun]:
    """Decayed popularity and co-occurrence + popularity, updated as events arrive; the ID-only model's
    precomputed top lists (``id_only_top``: event index → top rows) where the user had a usable history,
    decayed popularity where not (as the service falls back to trending)."""
    n = len(stream)
    # Pre-cutoff state, in time order.
    pre_seqs = list(stream.pre.values())
    all_items = np.concatenate([s.items for s in pre_seqs])
    all_ts = np.concatenate([s.timestamps for s in pre_seqs])
    now = float(all_ts.max())
    pop = np.zeros(num_items)
    np.add.at(pop, all_items, np.exp2((all_ts - now) / HALF_LIFE_S))
    cooc = np.zeros((num_items, num_items), dtype=np.float64)
    for s in pre_seqs:
        for d in range(1, COOC_WINDOW + 1):
            if len(s) > d:
                np.add.at(cooc, (s.items[:-d], s.items[d:]), 1.0)
    row_sums = cooc.sum(1)
    recent: dict[str, list[int]] = {u: s.items[-COOC_HISTORY:].tolist() for u, s in stream.pre.items()}
    seen: dict[str, set[int]] = {u: set(s.items.tolist()) for u, s in stream.pre.items()}
    decay = COOC_DECAY ** np.arange(COOC_HISTORY)

    names = [POPULARITY, COOC] + ([ID_ONLY] if id_only_top is not None else [])
    ranks = {m: np.zeros(n, dtype=np.int64) for m in names}
    shown = {m: np.full((n, SHOWN), -1, dtype=np.int64) for m in names}
    for j in tqdm(range(n), desc="replay baselines", unit="ev", disable=None):
        user, target, t = stream.users[j], int(stream.items[j]), float(stream.timestamps[j])
        pop *= 2.0 ** (-(t - now) / HALF_LIFE_S)
        now = max(now, t)
        excluded = list(seen.get(user, ()))
        pop_top = _top(pop, excluded)
        hist = recent.get(user, [])
        if hist:
            rows = np.array(hist[::-1])  # newest first
            w = decay[: len(rows)] / (row_sums[rows] + 1.0)
            cooc_scores = w @ cooc[rows] + COOC_POP_WEIGHT * pop / max(pop.sum(), 1e-12)
            cooc_top = _top(cooc_scores, excluded)
        else:
            cooc_top = pop_top
        tops = {POPULARITY: pop_top, COOC: cooc_top}
        if id_only_top is not None:
            tops[ID_ONLY] = id_only_top.get(j, pop_top)
        for m, top in tops.items():
            ranks[m][j] = _rank_of(target, top)
            shown[m][j] = _pad(top)
        # Ingest the event.
        pop[target] += 1.0
        for a in hist[-COOC_WINDOW:]:
            cooc[a, target] += 1.0
            row_sums[a] += 1.0
        recent[user] = [*hist, target][-COOC_HISTORY:]
        seen.setdefault(user, set()).add(target)
    return {m: ModelRun(ranks[m], shown[m]) for m in names}


def id_only_top_lists(
    model, stream: Stream, candidates: np.ndarray, num_items: int, batch: int = 128
) -> dict[int, np.ndarray]:
    """Top-20 rows of the ID-only model for every event whose user has a history of trained items: the
    user's live history (pre-cutoff + replayed so far; items the model never trained on dropped, the
    model reads its last ``history_length``), every item the user interacted with excluded, ranked over
    ``candidates`` (the items it trained on)."""
    allowed = np.zeros(num_items, dtype=bool)
    allowed[candidates] = True
    live: dict[str, UserSequence] = dict(stream.pre)
    cases: list[tuple[int, UserSequence, np.ndarray]] = []
    empty = UserSequence("", np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))
    for j, user in enumerate(stream.users):
        seq = live.get(user, empty)
        usable = seq.without(np.flatnonzero(~allowed))
        if len(usable):
            cases.append((j, usable, seq.items))
        live[user] = UserSequence(
            user,
            np.append(seq.items, stream.items[j]),
            np.append(seq.values, value_bucket(float(stream.values[j]))),
            np.append(seq.timestamps, float(stream.timestamps[j])),
        )
    out: dict[int, np.ndarray] = {}
    for start in tqdm(range(0, len(cases), batch), desc="replay id-only scores", unit="batch", disable=None):
        chunk = cases[start : start + batch]
        scores = model.score_all([c[1] for c in chunk])
        for (j, _, seen), s in zip(chunk, scores, strict=True):
            s = np.where(allowed & np.isfinite(s), s, -np.inf)
            out[j] = _top(s, seen)
    return out


# ----------------------------------------------------------------------------------- the service replay


async def _replay_service(settings, stream: Stream, item_ids: list[str]) -> tuple[ModelRun, dict]:
    """Recommend then ingest, event by event, through the app's own routes and lifespan."""
    from service.app import create_app
    from service.routes.events import post_events
    from service.routes.predict import recommend
    from service.schemas.events import Event, EventsRequest
    from service.schemas.ranking import RecommendRequest, RecommendResponse

    row = {item_id: i for i, item_id in enumerate(item_ids)}
    n = len(stream)
    ranks = np.zeros(n, dtype=np.int64)
    shown = np.full((n, SHOWN), -1, dtype=np.int64)
    probs = np.full((n, SHOWN), np.nan)
    stats = {"degraded": 0, "short_answers": 0, "model_version": None, "latency_ms": []}
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        services = app.state.services
        model = services.model
        if model is None:
            raise RuntimeError(f"the service did not load the replay model: {services.model_error}")
        stats["model_version"] = model.models.version
        for j in tqdm(range(n), desc="replay clickrank (service)", unit="ev", disable=None):
            user, target = stream.users[j], int(stream.items[j])
            started = time.perf_counter()
            request = RecommendRequest(user_id=user, top_k=TOP_K, exclude_seen=True)
            answer = RecommendResponse.model_validate_json((await recommend(request, services, model)).body)
            stats["latency_ms"].append((time.perf_counter() - started) * 1000)
            stats["degraded"] += bool(answer.degraded)
            stats["short_answers"] += len(answer.items) < TOP_K
            top = np.array([row.get(p.item_id, -1) for p in answer.items], dtype=np.int64)
            ranks[j] = _rank_of(target, top)
            shown[j] = _pad(top)
            k = min(SHOWN, len(answer.items))
            probs[j, :k] = [p.click_probability for p in answer.items[:k]]
            ts = int(stream.timestamps[j])
            event = Event(
                user_id=user,
                item_id=item_ids[target],
                type="rate",
                timestamp=ts,
                value=float(stream.values[j]),
                event_id=f"ml:{user}:{item_ids[target]}:{ts}",
            )
            await post_events(EventsRequest(events=[event]), services)
    lat = np.array(stats.pop("latency_ms"))
    stats["recommend_ms_p50"] = float(np.percentile(lat, 50)) if lat.size else float("nan")
    stats["recommend_ms_p99"] = float(np.percentile(lat, 99)) if lat.size else float("nan")
    return ModelRun(ranks, shown, probs), stats


# ---------------------------------------------------------------------------------------------- metrics


def accuracy(ranks: np.ndarray) -> dict[str, float]:
    """NDCG@10 (one relevant item: 1/log2(1 + rank) if rank <= 10) and HR@10 of 1-based ranks (0 = miss)."""
    ranks = np.asarray(ranks)
    hit = (ranks >= 1) & (ranks <= SHOWN)
    gain = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)
    return {
        "events": len(ranks),
        "NDCG@10": float(gain.mean()) if len(ranks) else float("nan"),
        "HR@10": float(hit.mean()) if len(ranks) else float("nan"),
    }


def shown_calibration(run: ModelRun, targets: np.ndarray) -> dict:
    """Each shown (event, item) pair: its click probability against whether it was the real next item."""
    assert run.probs is not None
    valid = run.shown >= 0
    outcomes = (run.shown == np.asarray(targets)[:, None]) & valid
    summary = calibration_summary(run.probs[valid], outcomes[valid], CALIBRATION_BINS, CALIBRATION_STRATEGY)
    summary["shown_per_event"] = float(valid.sum(1).mean()) if len(valid) else 0.0
    return summary


def new_items_shown(shown: np.ndarray, new_rows: np.ndarray) -> dict[str, int | float]:
    """How far the items without a pre-cutoff rating (``new_rows``) reach the shown lists (``shown``:
    [events, 10] catalog rows, -1 padded): the distinct ones shown at least once, and the share of lists
    that show one."""
    is_new = np.isin(shown, new_rows)
    return {
        "distinct": len(np.unique(shown[is_new])),
        "of": len(new_rows),
        "lists": float(is_new.any(1).mean()) if len(shown) else 0.0,
    }


def summarize(runs: dict[str, ModelRun], stream: Stream, features: np.ndarray, catalog_size: int) -> dict:
    masks = stream.segment_masks()
    out = {}
    for name in [m for m in MODEL_ORDER if m in runs] + [m for m in runs if m not in MODEL_ORDER]:
        run = runs[name]
        out[name] = {
            "segments": {seg: accuracy(run.ranks[mask]) for seg, mask in masks.items()},
            "coverage@10": coverage_at_k(run.shown, catalog_size, SHOWN),
            "ILD@10": intra_list_diversity(run.shown, features, SHOWN, metric="jaccard"),
            "new items shown": new_items_shown(run.shown, stream.new_rows),
        }
    return out


def format_replay_table(result: dict) -> str:
    models, counts = result["models"], result["segments"]
    lines = ["| segment | events | model | NDCG@10 | HR@10 |", "|---|---|---|---|---|"]
    for seg in SEGMENTS:
        for name, res in models.items():
            m = res["segments"][seg]
            lines.append(f"| {seg} | {counts[seg]} | {name} | {m['NDCG@10']:.4f} | {m['HR@10']:.4f} |")
    lines += [
        "",
        f"| model | coverage@10 | ILD@10 ({DIVERSITY} distance) | new items shown | lists showing one |",
        "|---|---|---|---|---|",
    ]
    for name, res in models.items():
        new = res["new items shown"]
        lines.append(
            f"| {name} | {res['coverage@10']:.4f} | {res['ILD@10']:.4f} "
            f"| {new['distinct']} of {new['of']} | {new['lists']:.4f} |"
        )
    cal = result.get("calibration")
    if cal:
        lines += [
            "",
            "| clickrank calibration (shown top 10) | mean click_probability | observed hit rate | ratio "
            f"| ECE ({cal['n_bins']} {cal['bins_strategy']} bins) |",
            "|---|---|---|---|---|",
            f"| {cal['predictions']} shown items | {cal['mean_probability']:.5f} "
            f"| {cal['observed_rate']:.5f} | {cal['ratio']:.3f} | {cal['ece']:.5f} |",
        ]
    return "\n".join(lines)


def _plot_segments(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(SEGMENTS))
    for ax, key in zip(axes, ("NDCG@10", "HR@10"), strict=True):
        for k, name in enumerate(models):
            values = [result["models"][name]["segments"][s][key] for s in SEGMENTS]
            ax.bar(x + k * width, np.nan_to_num(values), width, label=name)
        labels = [f"{s}\n({result['segments'][s]} events)" for s in SEGMENTS]
        ax.set_xticks(x + width * (len(models) - 1) / 2, labels, fontsize=8)
        ax.set(title=f"replay {key}")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the command


def _fit_id_only(pre: Dataset, config) -> tuple[object, np.ndarray]:
    """The ID-only baseline on the pre-cutoff data, by the recipe that exports clickrank: fit on the
    harness split with early stopping, then (``refit_epochs`` > 0) a warm-started refit on all events.
    Returns the model and the items it trained on (its candidates)."""
    from models.evaluate import make_split
    from models.pipeline import refit_on_all_events
    from models.sequences import user_sequences
    from models.train import FitData, fit

    num_items = len(pre.items)
    sequences = user_sequences(pre)
    cfg = config.fit.baseline()  # the harness fits its ID-only row with this recipe too
    split = make_split(sequences, num_items, config.cold_fraction, cfg.seed)
    windows = cfg.windows(split.train)
    result = fit("id-only", FitData(windows, split.valid, split.train_items, num_items, None), cfg)
    if config.refit_epochs <= 0:
        return result.model, split.train_items
    baseline = dataclasses.replace(config, fit=cfg)
    final = refit_on_all_events("id-only", sequences, num_items, None, baseline, config.refit_epochs, result)
    trained = np.unique(np.concatenate([s.items for s in sequences]))
    return final.model, trained


def run_replay(
    data_dir: Path,
    config,
    *,
    fraction: float = 0.1,
    limit: int | None = None,
    report_dir: Path = Path("reports/replay"),
    device: str = "auto",
    holdout: float = 0.0,
    covisit_weights: Sequence[float] = (),
) -> dict:
    """The whole replay; writes ``replay.json``, ``reliability.png`` and ``segments.png`` into
    ``report_dir``, prints the table and returns the result.

    ``holdout`` > 0 first drops the latest ``holdout`` of the ratings entirely, so the replay runs on
    data before them: a validation replay, for choosing serving settings without touching the test one.
    ``covisit_weights`` replays the service once per ``CLICKRANK_COVISIT_WEIGHT`` (each from a fresh Redis);
    empty: once, with the service's default."""
    import torch

    from models.pipeline import train_and_export
    from service import app as _app  # noqa: F401  (fail before training, not after, if it cannot load)
    from service.load_history import load_history_command
    from service.settings import Settings

    if limit is not None and limit < 1:
        raise ValueError(f"--replay-limit must be at least 1, got {limit}")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    data = load_dataset(data_dir)
    if holdout > 0:
        kept = time_cut(data.ratings.timestamps, holdout)
        data = dataclasses.replace(data, ratings=slice_ratings(data.ratings, 0, kept))
    cut = time_cut(data.ratings.timestamps, fraction)
    stream = build_stream(data, cut, limit)
    num_items = len(data.items)
    cutoff = datetime.fromtimestamp(int(data.ratings.timestamps[cut]), UTC).isoformat()
    print(
        f"replay: {cut} ratings before {cutoff} for training, {len(data.ratings) - cut} after it "
        f"({len(stream)} replayed; {int((~stream.returning).sum())} events of new users, "
        f"{int(stream.new_item.sum())} of new items)"
    )
    if config.threads:
        torch.set_num_threads(config.threads)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    redis_info: dict = {}
    with tempfile.TemporaryDirectory(prefix="clickrank-replay-") as tmp_name:
        tmp = Path(tmp_name)
        pre_dir = write_grouplens(Path(data_dir), slice_ratings(data.ratings, 0, cut), tmp / "data")
        t0 = time.perf_counter()
        manifest = train_and_export(pre_dir, tmp / "model", config)
        seconds["train clickrank"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        id_model, id_candidates = _fit_id_only(load_dataset(pre_dir), config)
        seconds["train id-only"] = time.perf_counter() - t0

        service_runs: dict[str, ModelRun] = {}
        for weight in list(covisit_weights) or [None]:
            redis = RedisProcess(tmp / "redis")
            redis_info = {"port": redis.port}
            with redis.running():
                redis_info["pid"] = redis.pid
                settings = Settings(
                    redis_url=redis.url,
                    model_dir=tmp / "model",
                    device=device,
                    redis_timeout_ms=5000.0,  # a replay on a busy machine must not turn into degraded answers
                    request_timeout_ms=60000.0,
                    covisit_cache_s=0.0,  # replayed time runs far faster than the wall clock a cache counts
                    lists_cache_s=0.0,
                    log_format="text",
                    **({} if weight is None else {"covisit_weight": weight}),
                )
                name = CLICKRANK if weight is None else f"{CLICKRANK}, covisit weight {weight:g}"
                t0 = time.perf_counter()
                load_history_command(pre_dir, settings=settings)
                t1 = time.perf_counter()
                service_run, service_stats = asyncio.run(_replay_service(settings, stream, data.item_ids))
                service_runs[name] = service_run
                seconds[f"load history ({name})"] = t1 - t0
                seconds[f"replay {name}"] = time.perf_counter() - t1
        t0 = time.perf_counter()
        id_top = id_only_top_lists(id_model, stream, id_candidates, num_items)
        runs = replay_baselines(stream, num_items, id_top)
        seconds["replay baselines"] = time.perf_counter() - t0
    runs |= service_runs

    features = genre_features(data.items)
    result = {
        "data_dir": str(data_dir),
        "fraction": fraction,
        "cutoff": cutoff,
        "train_ratings": cut,
        "replayed": len(stream),
        "withheld": len(data.ratings) - cut,
        "model_version": manifest["version"],
        "catalog_size": num_items,
        "segments": {seg: int(mask.sum()) for seg, mask in stream.segment_masks().items()},
        "new item events": stream.new_item_events(),
        "definitions": {
            "returning users": "events of users with at least one rating before the cutoff",
            "new users": "events of users first seen after the cutoff",
            "new items": "events of items with no rating before the cutoff (either kind of user)",
            "new item events": "the new-items segment's events and their distinct items; each item's "
            "first event there is its first rating ever (only its text known when it is scored)",
            "NDCG@10": "mean of 1/log2(1 + rank) of the real item if ranked 1..10, else 0",
            "HR@10": "fraction of events whose real item is among the 10 shown",
            "coverage@10": "distinct items ever shown in a top 10 / catalog size",
            "ILD@10": "mean over shown lists of the mean pairwise genre Jaccard distance "
            "1 - |G_a & G_b| / |G_a | G_b| of the 10 shown items",
            "new items shown": "distinct catalog items without a rating before the cutoff shown in any top "
            "10 (of how many there are), and the fraction of top-10 lists that show at least one",
            "calibration": "shown (event, item) pairs: click_probability vs 1 if the item was the real "
            f"next item; ECE over {CALIBRATION_BINS} {CALIBRATION_STRATEGY} bins of the pairs sorted "
            "by probability, sum_b n_b/N |mean p_b - hit rate_b|; ratio = mean p / hit rate",
            "exclusion": "every model: items the user interacted with before the event are never shown",
            "id-only": "ranks the items it trained on; a user without such history gets decayed popularity",
            "co-occurrence": f"b follows a within {COOC_WINDOW} events of a user; score over the last "
            f"{COOC_HISTORY} items with weights {COOC_DECAY}^age / (row sum + 1) plus "
            f"{COOC_POP_WEIGHT} x popularity share",
            "popularity": f"counts with a {HALF_LIFE_S / 86400:g}-day half-life, updated per event",
        },
        "models": summarize(runs, stream, features, num_items),
        "calibration": shown_calibration(service_run, stream.items),
        "service": service_stats,
        "redis": redis_info,
        "seconds": seconds,
    }
    bins = reliability_bins(
        service_run.probs[service_run.shown >= 0],
        (service_run.shown == stream.items[:, None])[service_run.shown >= 0],
        CALIBRATION_BINS,
        CALIBRATION_STRATEGY,
    )
    plot_reliability(
        bins,
        report_dir / "reliability.png",
        title=f"clickrank replay: shown top 10 ({CALIBRATION_BINS} {CALIBRATION_STRATEGY} bins)",
    )
    _plot_segments(result, report_dir / "segments.png")
    result["seconds"]["total"] = time.perf_counter() - started
    result["files"] = {
        name: str(report_dir / name) for name in ("replay.json", "reliability.png", "segments.png")
    }
    (report_dir / "replay.json").write_text(json.dumps(json_safe(result), indent=2))
    print(format_replay_table(result))
    print(f"report: {report_dir}/replay.json, reliability.png, segments.png")
    return result


def json_safe(value):
    """JSON has no NaN/inf: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
