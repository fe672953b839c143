"""``clickrank train`` and ``clickrank evaluate``: data → evaluation harness → final fit → export."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from models.data import Dataset, load_dataset
from models.encoder import ItemTextEncoder, load_minilm, minilm_path, pooled_embeddings
from models.evaluate import evaluate_model, format_table, make_split, popularity_scorer
from models.export import (
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    RANKER_INPUTS,
    RANKER_OUTPUTS,
    export_item_encoder,
    export_ranker,
    ranker_parity,
)
from models.ranker import save_ranker
from models.sequences import make_windows, user_sequences
from models.train import FitConfig, FitResult, fit

PARITY_TOLERANCE = 1e-4
ROW_NAMES = {"id-only": "id-only transformer", "clickrank": "clickrank (BERT + transformer)"}
"""Evaluation-table row of each fitted model (curves and fit times use the short names)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    fit: FitConfig = dataclasses.field(default_factory=FitConfig)
    cold_fraction: float = 0.05
    max_text_tokens: int = 48
    refit_epochs: int = 3
    """After the harness: epochs of warm-started training on *all* events (the held-out last events and
    the withheld cold items included) before export; 0 exports the evaluated model as it is."""
    threads: int = 0  # 0: torch's default

    @classmethod
    def tiny(cls) -> TrainConfig:
        """Seconds, not minutes: for tests and CI (the real encoder and export, a small head)."""
        return cls(
            fit=FitConfig(
                dim=32, history_length=20, epochs=2, batch_size=256, negatives=32, valid_users=100, patience=2
            ),
            refit_epochs=0,
        )

    def replace(self, *, seed: int | None = None, epochs: int | None = None) -> TrainConfig:
        changes = {k: v for k, v in (("seed", seed), ("epochs", epochs)) if v is not None}
        return dataclasses.replace(self, fit=dataclasses.replace(self.fit, **changes))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    windows = make_windows(split.train, cfg.history_length, cfg.stride)
    fits = {}
    if id_only:
        fits["id-only"] = fit("id-only", windows, split.valid, split.train_items, num_items, None, cfg)
    fits["clickrank"] = fit(
        "clickrank", windows, split.valid, split.train_items, num_items, text_features, cfg
    )
    rows = {"popularity": evaluate_model(popularity_scorer(split, num_items), split, num_items)}
    rows |= {ROW_NAMES[name]: evaluate_model(r.model.score_all, split, num_items) for name, r in fits.items()}
    return {
        "rows": rows,
        "curves": {name: result.curve for name, result in fits.items()},
        "best_epoch": fits["clickrank"].best_epoch,
        "split": {
            "train_users": len(split.train),
            "test_cases": len(split.test),
            "cold_items": len(split.cold_items),
            "cold_cases": len(split.cold_cases),
        },
        "fit_seconds": {name: result.seconds for name, result in fits.items()},
        "model": fits["clickrank"].model,
    }


def train_and_export(
    data_dir: Path, model_dir: Path, config: TrainConfig, skip_eval: bool = False, id_only: bool = False
) -> dict:
    """The ``train`` command. Returns the manifest it wrote.

    By default the harness fits clickrank on the split (early stopping, metrics against popularity and on
    cold items) and a warm-started refit on all data is exported; ``id_only`` also fits the ID-only
    baseline (``clickrank evaluate`` always does); ``skip_eval`` fits on all data only."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    data = load_dataset(data_dir)
    num_items = len(data.items)
    texts = [it.text for it in data.items]
    print(f"data: {len(data.ratings)} ratings, {num_items} items, from {data_dir}")
    bert, tokenizer = load_minilm()
    text_features = pooled_embeddings(bert, tokenizer, texts, config.max_text_tokens)
    cfg = config.fit

    metrics: dict = {}
    curves: dict = {}
    init, epochs = None, cfg.epochs
    if not skip_eval:
        harness = run_harness(data, config, text_features, id_only=id_only)
        print(format_table(harness["rows"]))
        metrics = {
            "table": harness["rows"],
            "split": harness["split"],
            "fit_seconds": harness["fit_seconds"],
            "best_epoch": harness["best_epoch"],
        }
        curves = harness["curves"]
        init, epochs = harness["model"], config.refit_epochs
    if init is not None and epochs == 0:
        final = FitResult(init, best_epoch=harness["best_epoch"])
    else:
        all_windows = make_windows(user_sequences(data), cfg.history_length, cfg.stride)
        # A warm start only needs a gentle nudge: a quarter of the learning rate.
        refit = dataclasses.replace(cfg, epochs=epochs, lr=cfg.lr * (0.25 if init is not None else 1.0))
        final = fit(
            "clickrank (all data)",
            all_windows,
            [],
            np.arange(num_items),
            num_items,
            text_features,
            refit,
            init=init,
        )
        curves["clickrank (all data)"] = final.curve

    model_dir.mkdir(parents=True, exist_ok=True)
    model = final.model.eval()
    with torch.no_grad():
        text_vectors = model.tower.text_vectors().numpy()
        id_offsets = model.tower.id_embedding.weight.numpy().copy()
    seen = np.zeros(num_items, dtype=bool)
    seen[np.concatenate([s.items for s in user_sequences(data)])] = True
    id_offsets[~seen] = 0.0
    np.save(model_dir / "item_vectors.npy", (text_vectors + id_offsets).astype(np.float32))
    np.save(model_dir / "item_id_offsets.npy", id_offsets.astype(np.float32))
    (model_dir / "items.json").write_text(
        json.dumps([{"item_id": it.item_id, "text": it.text} for it in data.items])
    )
    shutil.copyfile(minilm_path() / "tokenizer.json", model_dir / "tokenizer.json")
    export_ranker(model.ranker, model_dir / "ranker.onnx")
    save_ranker(model.ranker, model_dir / "ranker.pt")
    export_item_encoder(
        ItemTextEncoder(bert, model.tower.projection),
        tokenizer,
        model_dir / "item_encoder.onnx",
        config.max_text_tokens,
    )
    parity = ranker_parity(model.ranker, model_dir / "ranker.onnx")
    if parity > PARITY_TOLERANCE:
        raise RuntimeError(
            f"ONNX ranker disagrees with PyTorch: max |Δp| = {parity:.2e} > {PARITY_TOLERANCE}"
        )
    if curves:
        _plot_curves(curves, model_dir / "training_curve.png")
    if metrics:
        (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    created = datetime.now(UTC).replace(microsecond=0)
    d = cfg.dim
    manifest = {
        "version": f"{created:%Y%m%dT%H%M%SZ}-{data.data_hash[:8]}",
        "created": created.isoformat().replace("+00:00", "Z"),
        "data_hash": data.data_hash,
        "config": {
            **dataclasses.asdict(cfg),
            "max_text_tokens": config.max_text_tokens,
            "cold_fraction": config.cold_fraction,
            "refit_epochs": config.refit_epochs,
            "final_epochs": final.best_epoch,
            "encoder": "sentence-transformers/all-MiniLM-L6-v2",
        },
        "metrics": metrics,
        "parity": {"ranker_max_abs_prob_diff": parity, "tolerance": PARITY_TOLERANCE},
        "graphs": {
            "ranker.onnx": {
                "inputs": dict(
                    zip(
                        RANKER_INPUTS,
                        (["B", "L", d], ["B", "L"], ["B", "L"], ["B", "L"], ["B", "L"], ["B", "C", d]),
                        strict=True,
                    )
                ),
                "outputs": dict(zip(RANKER_OUTPUTS, (["B", "C"], ["B", "C", "L"], ["B", d]), strict=True)),
            },
            "item_encoder.onnx": {
                "inputs": {name: ["B", "T"] for name in ENCODER_INPUTS},
                "outputs": {name: ["B", d] for name in ENCODER_OUTPUTS},
            },
        },
        "num_items": num_items,
    }
    files = [
        "ranker.onnx",
        "ranker.pt",
        "item_encoder.onnx",
        "item_vectors.npy",
        "item_id_offsets.npy",
        "items.json",
        "tokenizer.json",
    ]
    manifest["files"] = {name: _sha256(model_dir / name) for name in files}
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"exported model {manifest['version']} to {model_dir} (ONNX parity max |Δp| = {parity:.1e})")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return manifest


def evaluate_command(
    data_dir: Path,
    model_dir: Path,
    json_path: str | None,
    seeds: int,
    epochs: int | None,
    config: TrainConfig | None = None,
) -> None:
    """Run the whole harness (popularity, ID-only, clickrank) for ``seeds`` seeds and print the means, or
    with ``seeds == 0`` print the table saved at train time."""
    if seeds <= 0:
        path = model_dir / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `clickrank train` first (or pass --seeds N)")
        result = json.loads(path.read_text())
        print(format_table(result["table"]))
    else:
        data = load_dataset(data_dir)
        config = config or TrainConfig()
        runs = [run_harness(data, config.replace(seed=s, epochs=epochs)) for s in range(seeds)]
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
        result = {"seeds": seeds, "mean": mean, "std": std, "per_seed": [r["rows"] for r in runs]}
        print(f"mean over {seeds} seeds:")
        print(format_table(mean))
        for n in names:
            warm, cold = std[n]["warm"]["NDCG@10"], std[n]["cold"]["AUC"]
            print(f"  {n}: NDCG@10 std {warm:.4f}, cold AUC std {cold:.4f}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
