"""A model directory with a synthetic catalog of a million items, for measuring the service at that size.

    python -m loadtests.million --model-dir artifacts --out /tmp/million --items 1000000

The graphs and tokenizer are the real export's; the item table keeps its real items (so MovieLens
histories still refer to catalog items) and adds synthetic ones drawn from a Gaussian with the real item
vectors' mean and covariance, with texts ``synthetic item N | <genre>`` (so profiles and co-visitation see
ordinary items). The manifest is the export's with the new checksums. Then, for example:

    clickrank bench --spawn --model-dir /tmp/million --redis-url redis://127.0.0.1:6390/0 \\
        --load-history --scenario recommend --rates 50 --duration 60 --out reports/million
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from models.data import GENRES
from models.model_dir import MANIFEST, ItemTable, ModelDir


def build(source: Path, out: Path, items: int, seed: int = 0) -> dict:
    started = time.perf_counter()
    served = ModelDir(source).load()
    real = served.items
    extra = items - len(real.item_ids)
    if extra < 0:
        raise ValueError(f"--items must be at least the export's {len(real.item_ids)}")
    rng = np.random.default_rng(seed)
    mean, cov = real.vectors.mean(axis=0), np.cov(real.vectors, rowvar=False)
    vectors = np.vstack([real.vectors, rng.multivariate_normal(mean, cov, size=extra).astype(np.float32)])
    genres = rng.integers(1, len(GENRES), size=extra)
    table = ItemTable(
        item_ids=[*real.item_ids, *(f"syn-{k}" for k in range(extra))],
        texts=[*real.texts, *(f"synthetic item {k} | {GENRES[g]}" for k, g in enumerate(genres.tolist()))],
        vectors=vectors,
        id_offsets=np.vstack([real.id_offsets, np.zeros((extra, vectors.shape[1]), dtype=np.float32)]),
    )
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(
        source, out, ignore=shutil.ignore_patterns("items.json", "item_vectors.npy", "item_id_offsets.npy")
    )
    target = ModelDir(out)
    target.write_item_table(table)
    manifest = json.loads((source / MANIFEST).read_text())
    manifest.pop("files")
    manifest["version"] = f"{manifest['version']}-million"
    manifest["num_items"] = items
    written = target.write_manifest(manifest)
    print(f"{items:,} items ({extra:,} synthetic) written to {out} in {time.perf_counter() - started:.1f} s")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="a real export")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--items", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    build(args.model_dir, args.out, args.items)


if __name__ == "__main__":
    main()
