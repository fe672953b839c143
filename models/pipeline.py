"""``clickrank train`` and ``clickrank evaluate``: data → evaluation harness → final fit → export."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

import clickrank
from models.calibration import Calibration, click_probabilities, fit_platt, log_softmax_scores
from models.covisit import SERVED_WEIGHT, CovisitTable, served_scorer
from models.data import Dataset, load_dataset
from models.encoder import load_minilm, pooled_embeddings
from models.ensemble import fit_members
from models.evaluate import (
    Case,
    Scorer,
    evaluate_cases,
    evaluate_model,
    format_table,
    genre_features,
    make_split,
    popularity_scorer,
)
from models.events_file import EventsReport, with_events
from models.export import PARITY_TOLERANCE, export_model, graph_shapes, item_table
from models.features import EVENT_TYPE_IDS
from models.model_dir import METRICS, RANKER, SEGMENTS, TRAINING_CURVE, ItemTable, ModelDir
from models.segments import find_segments
from models.sequences import UserSequence, user_sequences
from models.train import FitConfig, FitData, FitResult, RecModel, fit

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ROW_NAMES = {"id-only": "id-only transformer", "clickrank": "clickrank (BERT + transformer)"}
"""Evaluation-table row of each fitted model (curves and fit times use the short names)."""
RETRIEVAL_ONLY_ROW = "clickrank, retrieval only"
"""The same clickrank model ranked by its retrieval scores alone (no target-attention re-ranking)."""
SERVED_ROW = "clickrank + co-visitation (served)"
"""The same clickrank model blended with co-visitation as the service ranks (``models.covisit``)."""
COVISIT_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
"""β values whose validation NDCG@10 the harness reports beside the served one."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    fit: FitConfig = dataclasses.field(default_factory=FitConfig)
    cold_fraction: float = 0.05
    max_text_tokens: int = 48
    refit_epochs: int = 3
    """After the harness: epochs of warm-started training on *all* events (the held-out last events and
    the withheld cold items included) before export; 0 exports the evaluated model as it is."""
    threads: int = 0  # 0: torch's default
    member_jobs: int = 0
    """An ensemble's members fitted at once, each in a process with its share of the threads (0: one per
    member, up to the cores)."""

    @classmethod
    def tiny(cls) -> TrainConfig:
        """About 1–1.5 minutes on 2 cores: for tests and CI (the real encoder and export, a small head)."""
        return cls(
            fit=FitConfig(
                dim=32,
                history_length=20,
                stride=20,
                dropout=0.2,
                epochs=3,
                batch_size=128,
                lr=3e-3,
                valid_users=100,
                patience=2,
                min_epochs=0,
            ),
            refit_epochs=0,
        )

    def jobs(self) -> int:
        """How many members are fitted at once (``member_jobs``)."""
        return self.member_jobs or min(self.fit.members, os.cpu_count() or 1)

    def replace(self, *, seed: int | None = None, epochs: int | None = None) -> TrainConfig:
        changes = {k: v for k, v in (("seed", seed), ("epochs", epochs)) if v is not None}
        return dataclasses.replace(self, fit=dataclasses.replace(self.fit, **changes))


def _plot_curves(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ndcg) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        epochs = [c["epoch"] for c in curve]
        ax_loss.plot(epochs, [c["loss"] for c in curve], marker="o", label=name)
        if curve and "valid_ndcg10" in curve[0]:
            ax_ndcg.plot(epochs, [c["valid_ndcg10"] for c in curve], marker="o", label=name)
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_ndcg.set(title="validation NDCG@10 (full ranking)", xlabel="epoch")
    for ax in (ax_loss, ax_ndcg):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a fit on all data has no validation curve
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_harness(
    data: Dataset, config: TrainConfig, text_features: torch.Tensor | None = None, id_only: bool = True
) -> dict:
    """Fit popularity, ID-only (unless ``id_only`` is False) and clickrank on one split and evaluate them
    in the same harness."""
    num_items = len(data.items)
    sequences = user_sequences(data)
    if text_features is None:
        bert, tokenizer = load_minilm()
        text_features = pooled_embeddings(
            bert, tokenizer, [it.text for it in data.items], config.max_text_tokens
        )
    cfg = config.fit
    split = make_split(sequences, num_items, config.cold_fraction, cfg.seed)
    windows = cfg.windows(split.train)
    fits = {}
    if id_only:
        ids_only = FitData(windows, split.valid, split.train_items, num_items, None)
        fits["id-only"] = fit("id-only", ids_only, cfg.baseline())
    with_text = FitData(windows, split.valid, split.train_items, num_items, text_features)
    fits["clickrank"] = fit_members("clickrank", with_text, cfg, config.jobs())
    model = fits["clickrank"].model
    genres = genre_features(data.items)
    scorers = {"popularity": popularity_scorer(split, num_items)}
    scorers |= {ROW_NAMES[name]: r.model.score_all for name, r in fits.items()}
    if cfg.rerank:
        scorers[RETRIEVAL_ONLY_ROW] = lambda h: model.score_all(h, rerank_size=0)
    calibration = fit_calibration(model, split.valid, split.train_items, num_items)
    covisit = CovisitTable.from_sequences(split.train, num_items)

    def served(weight: float) -> Scorer:
        return served_scorer(model.scores, covisit, calibration, weight, num_items)

    scorers[SERVED_ROW] = served(SERVED_WEIGHT)
    rows = {
        name: evaluate_model(scorer, split, num_items, item_features=genres)
        for name, scorer in scorers.items()
    }
    covisit_valid = {
        f"{weight:g}": evaluate_cases(served(weight), split.valid, split.train_items, num_items)["NDCG@10"]
        for weight in COVISIT_WEIGHTS
    }
    return {
        "rows": rows,
        "curves": {label: curve for name, result in fits.items() for label, curve in curves(name, result)},
        "best_epoch": best_epochs(fits["clickrank"]),
        "split": {
            "train_users": len(split.train),
            "test_cases": len(split.test),
            "cold_items": len(split.cold_items),
            "cold_cases": len(split.cold_cases),
        },
        "fit_seconds": {name: result.seconds for name, result in fits.items()},
        "calibration": calibration,
        "covisit": {"served_weight": SERVED_WEIGHT, "valid_ndcg10_by_weight": covisit_valid},
        "test_calibration": calibration_on_cases(
            model, calibration, split.test, split.train_items, num_items
        ),
        "fit": fits["clickrank"],
    }


def curves(name: str, result: FitResult) -> list[tuple[str, list[dict[str, float]]]]:
    """(label, training curve) of each model a fit trained: the fit's, or each ensemble member's."""
    if not result.members:
        return [(name, result.curve)]
    return [(f"{name} {k + 1}/{len(result.members)}", m.curve) for k, m in enumerate(result.members)]


def best_epochs(result: FitResult) -> list[int]:
    """The epoch kept of each model a fit trained (one per ensemble member)."""
    return [part.best_epoch for part in result.parts()]


def refit_on_all_events(
    name: str,
    sequences: list[UserSequence],
    num_items: int,
    text_features: torch.Tensor | None,
    config: TrainConfig,
    epochs: int,
    init: FitResult | None = None,
) -> FitResult:
    """``epochs`` of training on every event (no validation): the model that gets exported, warm-started
    from ``init`` (the harness's fit, member by member) at a quarter of the learning rate, a gentle nudge,
    or from scratch. Only items with events are softmax targets: the others keep their text vectors
    untouched."""
    cfg = config.fit
    windows = cfg.windows(sequences)
    refit = dataclasses.replace(cfg, epochs=epochs, lr=cfg.lr * (0.25 if init is not None else 1.0))
    rated = items_with_events(sequences)
    data = FitData(windows, [], rated, num_items, text_features)
    return fit_members(f"{name} (all data)", data, refit, config.jobs(), init)


def _case_scores(
    model: RecModel, cases: list[Case], train_items: np.ndarray, num_items: int, batch: int = 256
):
    """Per chunk of cases: (log-softmax scores z [n, N], target rows [n], allowed [n, N] = training items
    the user has not interacted with, target included), as the harness ranks them."""
    candidates = np.zeros(num_items, dtype=bool)
    candidates[train_items] = True
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        served, retrieval = model.scores([c.history for c in chunk])
        targets = np.array([c.target for c in chunk])
        allowed = np.tile(candidates, (len(chunk), 1))
        for i, c in enumerate(chunk):
            allowed[i, c.history.items] = False
        allowed[np.arange(len(chunk)), targets] = True
        yield log_softmax_scores(served, retrieval), targets, allowed


def fit_calibration(
    model: RecModel, cases: list[Case], train_items: np.ndarray, num_items: int
) -> Calibration:
    """Platt scaling of the log-softmax score on validation cases (see ``models.calibration``)."""
    parts = list(_case_scores(model, cases, train_items, num_items))
    z = np.concatenate([p[0] for p in parts])
    targets = np.concatenate([p[1] for p in parts])
    positive = np.zeros_like(z, dtype=bool)
    positive[np.arange(len(targets)), targets] = True
    a, b = fit_platt(z, positive, np.concatenate([p[2] for p in parts]))
    return Calibration(
        slope=a, intercept=b, fitted_on="validation: each user's second-last event", cases=len(z)
    )


def calibration_on_cases(
    model: RecModel,
    calibration: Calibration,
    cases: list[Case],
    train_items: np.ndarray,
    num_items: int,
    k: int = 10,
) -> dict[str, float]:
    """On held-out cases: mean click_probability of each top-k list against its hit rate, and the sum of
    the probabilities over the allowed catalog (about 1 when calibrated)."""
    shown, hits, totals = [], [], []
    for z, targets, allowed in _case_scores(model, cases, train_items, num_items):
        p = np.where(allowed, click_probabilities(z, calibration), 0.0)
        top = np.argsort(-p, axis=1)[:, :k]
        shown.append(np.take_along_axis(p, top, 1))
        hits.append(top == targets[:, None])
        totals.append(p.sum(1))
    shown_p, hit = np.concatenate(shown), np.concatenate(hits)
    return {
        f"mean_p_top{k}": float(shown_p.mean()),
        f"hit_rate_top{k}": float(hit.mean()),
        "ratio": float(shown_p.mean() / max(hit.mean(), 1e-12)),
        "mean_catalog_sum": float(np.concatenate(totals).mean()),
    }


def train_and_export(
    data_dir: Path,
    model_dir: Path,
    config: TrainConfig,
    skip_eval: bool = False,
    id_only: bool = False,
    events: Path | None = None,
    events_only: bool = False,
) -> dict:
    """The ``train`` command. Returns the manifest it wrote.

    By default the harness fits clickrank on the split (early stopping, metrics against popularity and on
    cold items) and a warm-started refit on all data is exported; ``id_only`` also fits the ID-only
    baseline (``clickrank evaluate`` always does); ``skip_eval`` fits on all data only. ``events`` (an
    ``export-events`` file) is trained on beside the data set's ratings, or instead of them with
    ``events_only``; the catalog is the data set's either way (``models.events_file``)."""
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_dataset(data_dir)
    events_report = None
    if events is not None:
        data, events_report = with_events(data, events, events_only=events_only)
        report = events_report
        print(
            f"events: {report.used} of {report.lines} from {events} ({report.types}); "
            f"{report.unknown_items} on items outside the catalog and {report.same_as_a_rating} equal to a "
            "rating were dropped"
        )
    print(f"data: {len(data.ratings)} events, {len(data.items)} items, from {data_dir}")
    bert, tokenizer = load_minilm()
    text_features = pooled_embeddings(bert, tokenizer, [it.text for it in data.items], config.max_text_tokens)
    harness = None if skip_eval else evaluate_in_harness(data, config, text_features, id_only)
    sequences = user_sequences(data)
    final, recipe = fit_exported_model(sequences, len(data.items), text_features, config, harness)
    out = ModelDir(model_dir)
    table = item_table(final.model, data.items, items_with_events(sequences))
    parity = export_model(out, final.model, table, bert, tokenizer, config.max_text_tokens)
    write_segments(out, sequences, table, final.config.history_length, final.config.seed)
    write_reports(out, harness, final)
    manifest = export_manifest(data, data_dir, config, harness, final, recipe, parity)
    manifest["metrics"]["training_data"] = training_data(data, events_report, events_only)
    manifest = out.write_manifest(manifest)
    print(f"exported model {manifest['version']} to {model_dir} (ONNX parity max |Δp| = {parity:.1e})")
    print(f"wall time: {time.perf_counter() - started:.1f} s")
    return manifest


def write_segments(
    out: ModelDir, sequences: list[UserSequence], table: ItemTable, length: int, seed: int
) -> None:
    """``segments.json``: the training users clustered by their served user vectors (``models.segments``)."""
    histories = [(s.items, s.event_types(), s.values, s.timestamps) for s in sequences if len(s)]
    segments = find_segments(
        out.file(RANKER).read_bytes(), histories, table.vectors, table.texts, length, seed
    )
    out.file(SEGMENTS).write_text(json.dumps(segments.to_json()), encoding="utf-8")
    sizes = ", ".join(
        f"{n} ({'/'.join(a['attribute'] for a in top[:2])})"
        for n, top in zip(segments.sizes, segments.top_attributes, strict=True)
    )
    print(f"segments: {len(segments.sizes)} clusters of users: {sizes}")


def training_data(data: Dataset, events: EventsReport | None, events_only: bool) -> dict:
    """What the exported model was trained on, for the manifest's ``metrics`` (``GET /v1/model``)."""
    types = data.ratings.event_types()
    counts = {name: int((types == i).sum()) for name, i in EVENT_TYPE_IDS.items() if (types == i).any()}
    return {
        "events": len(data.ratings),
        "users": len(set(data.ratings.user_ids.tolist())),
        "event_types": counts,
        "data_set_ratings": not events_only,
        "events_file": None if events is None else dataclasses.asdict(events),
    }


def evaluate_in_harness(
    data: Dataset, config: TrainConfig, text_features: torch.Tensor, id_only: bool
) -> dict:
    """``run_harness``, with its table and calibration printed."""
    harness = run_harness(data, config, text_features, id_only=id_only)
    print(format_table(harness["rows"]))
    print(f"calibration: {harness['calibration']} → on test: {harness['test_calibration']}")
    return harness


def items_with_events(sequences: list[UserSequence]) -> np.ndarray:
    return np.unique(np.concatenate([s.items for s in sequences]))


def fit_exported_model(
    sequences: list[UserSequence],
    num_items: int,
    text_features: torch.Tensor | None,
    config: TrainConfig,
    harness: dict | None,
) -> tuple[FitResult, str]:
    """The model to export and how it was fitted: the harness's model refitted on all events for
    ``refit_epochs`` (kept as evaluated when that is 0), or without a harness one fit on all events."""
    if harness is None:
        final = refit_on_all_events(
            "clickrank", sequences, num_items, text_features, config, config.fit.epochs
        )
        return final, "fit on all events"
    if config.refit_epochs == 0:
        return harness["fit"], "the harness's model, as evaluated"
    final = refit_on_all_events(
        "clickrank", sequences, num_items, text_features, config, config.refit_epochs, harness["fit"]
    )
    return final, "the harness's model, refitted on all events"


def write_reports(out: ModelDir, harness: dict | None, final: FitResult) -> None:
    """``training_curve.png`` (every fit's curve) and, after a harness, ``metrics.json``."""
    plotted = dict(harness["curves"]) if harness else {}
    if harness is None or final is not harness["fit"]:
        plotted |= dict(curves("clickrank (all data)", final))
    _plot_curves(plotted, out.file(TRAINING_CURVE))
    if harness:
        out.file(METRICS).write_text(json.dumps(harness_metrics(harness), indent=2))


def harness_metrics(harness: dict | None) -> dict:
    """What the harness measured, as ``metrics.json`` and the manifest's ``metrics`` hold it."""
    if harness is None:
        return {}
    keys = ("split", "fit_seconds", "best_epoch", "test_calibration", "covisit")
    return {"table": harness["rows"]} | {k: harness[k] for k in keys}


def export_manifest(
    data: Dataset,
    data_dir: Path,
    config: TrainConfig,
    harness: dict | None,
    final: FitResult,
    recipe: str,
    parity: float,
) -> dict:
    """The manifest, but the file checksums: what the export is and what produced it. ``config`` is the
    exported model's own fit (the refit's, when there was one); ``harness_config`` the evaluated fit's."""
    created = datetime.now(UTC).replace(microsecond=0)
    # without the harness there is no validation split to fit the calibration on
    calibration = harness["calibration"] if harness else Calibration()
    return {
        "version": f"{created:%Y%m%dT%H%M%SZ}-{data.data_hash[:8]}",
        "created": created.isoformat().replace("+00:00", "Z"),
        "package_version": clickrank.__version__,
        "data_dir": str(data_dir),
        "data_hash": data.data_hash,
        "seed": final.config.seed,
        "fit": {"recipe": recipe, "final_epoch": best_epochs(final)},
        "config": {
            **dataclasses.asdict(final.config),
            "max_text_tokens": config.max_text_tokens,
            "encoder": ENCODER_NAME,
        },
        "harness_config": (
            {**dataclasses.asdict(harness["fit"].config), "cold_fraction": config.cold_fraction}
            if harness
            else None
        ),
        "metrics": harness_metrics(harness),
        "calibration": calibration.to_json(),
        "parity": {"ranker_max_abs_prob_diff": parity, "tolerance": PARITY_TOLERANCE},
        "graphs": graph_shapes(final.model.ranker.config.dim),
        "num_items": len(data.items),
    }


def _seed_rows(data_dir: Path, config: TrainConfig) -> dict:
    """One seed of the harness, reduced to what the 3-seed table needs (picklable, for worker processes)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    harness = run_harness(load_dataset(data_dir), config)
    keep = ("rows", "best_epoch", "test_calibration", "covisit")
    return {k: harness[k] for k in keep} | {"calibration": harness["calibration"].to_json()}


def evaluate_command(
    data_dir: Path,
    model_dir: Path,
    json_path: str | None,
    seeds: int,
    epochs: int | None,
    config: TrainConfig | None = None,
    jobs: int = 1,
) -> None:
    """Run the whole harness (popularity, ID-only, clickrank) for ``seeds`` seeds and print the means, or
    with ``seeds == 0`` print the table saved at train time. ``jobs`` > 1 runs seeds in parallel processes."""
    if seeds <= 0:
        path = ModelDir(model_dir).file(METRICS)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `clickrank train` first (or pass --seeds N)")
        result = json.loads(path.read_text())
        print(format_table(result["table"]))
    else:
        config = config or TrainConfig()
        configs = [config.replace(seed=s, epochs=epochs) for s in range(seeds)]
        if jobs > 1:
            # One process per seed, one torch thread each: seeds are independent, the harness (and its
            # ensemble's members) serial.
            configs = [dataclasses.replace(c, threads=1, member_jobs=1) for c in configs]
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(jobs, seeds), mp_context=context) as pool:
                runs = list(pool.map(_seed_rows, [data_dir] * seeds, configs))
        else:
            runs = [_seed_rows(data_dir, c) for c in configs]
        names = list(runs[0]["rows"])
        mean = {
            n: {
                part: {
                    k: float(np.mean([r["rows"][n][part][k] for r in runs])) for k in runs[0]["rows"][n][part]
                }
                for part in ("warm", "cold")
            }
            for n in names
        }
        std = {
            n: {
                part: {k: float(np.std([r["rows"][n][part][k] for r in runs])) for k in ("NDCG@10", "AUC")}
                for part in ("warm", "cold")
            }
            for n in names
        }
        result = {
            "seeds": seeds,
            "mean": mean,
            "std": std,
            "per_seed": [r["rows"] for r in runs],
            "best_epoch": [r["best_epoch"] for r in runs],
            "calibration": [r["calibration"] for r in runs],
            "test_calibration": [r["test_calibration"] for r in runs],
            "covisit": [r["covisit"] for r in runs],
        }
        print(f"mean over {seeds} seeds:")
        print(format_table(mean))
        for n in names:
            warm, cold = std[n]["warm"]["NDCG@10"], std[n]["cold"]["AUC"]
            print(f"  {n}: NDCG@10 std {warm:.4f}, cold AUC std {cold:.4f}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
