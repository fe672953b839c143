"""What the service's retrieval (``service.retrieval.Retrieval``, approximate from ``ann_min_items``) gives
at a catalog's size against exact search: recall of the top 300, the log-partition's error (the
normaliser of ``click_probability``), the time of a query (``scores`` + ``top``) with the caches warm and
after a 64 MB write has evicted them, the build time and the index's memory.

    python -m loadtests.retrieval_accuracy --model-dir artifacts --items 1000000 --out report.json

Catalog and queries as in ``loadtests.ann_choice`` (a Gaussian with the export's item statistics; real
user vectors); with ``--items 0`` the catalog is the model directory's own (``loadtests.million``'s, as the
service serves it). Run it with another checkout first on ``PYTHONPATH`` to measure that checkout's
retrieval.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loadtests.ann_choice import K, real_queries, rss_mb, synthetic_catalog
from models.calibration import logsumexp
from models.model_dir import ModelDir
from service.catalog import ItemCatalog
from service.retrieval import Retrieval


def measure(vectors: np.ndarray, queries: np.ndarray, nprobe: int) -> dict[str, float]:
    ids = [f"i{k}" for k in range(len(vectors))]
    catalog = ItemCatalog(ids, ids, vectors, np.zeros_like(vectors), "synthetic")
    before, started = rss_mb(), time.perf_counter()
    retrieval = Retrieval(catalog, ann_min_items=1, nprobe=nprobe)
    build_s, memory_mb = time.perf_counter() - started, rss_mb() - before
    none, evict = np.empty(0, dtype=np.int64), np.ones(16_000_000, dtype=np.float32)
    recalls, errors, warm, cold = [], [], [], []
    for q in tqdm(queries, desc="queries", unit="query"):
        logits = catalog.vectors @ q
        truth = set(np.argpartition(-logits, K)[:K].tolist())
        for times in (warm, cold):
            if times is cold:
                evict += 1.0
            started = time.perf_counter()
            scores = retrieval.scores(q)
            found = retrieval.top(scores, K, none)
            times.append(time.perf_counter() - started)
        recalls.append(len(truth & set(found.tolist())) / K)
        errors.append(abs(scores.log_partition - float(logsumexp(logits))))

    def ms(times: list[float], q: int) -> float:
        return round(1000 * float(np.percentile(times, q)), 3)

    return {
        "build_s": round(build_s, 1),
        "index_memory_mb": round(memory_mb, 1),
        "recall_at_300": round(float(np.mean(recalls)), 4),
        "recall_at_300_min": round(float(np.min(recalls)), 4),
        "log_partition_error_mean": round(float(np.mean(errors)), 4),
        "log_partition_error_p99": round(float(np.percentile(errors, 99)), 4),
        "log_partition_error_max": round(float(np.max(errors)), 4),
        "query_ms_p50_warm": ms(warm, 50),
        "query_ms_p50_evicted": ms(cold, 50),
        "query_ms_p99_evicted": ms(cold, 99),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--items", type=int, default=1_000_000, help="0: the model directory's catalog")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, default=128, help="as CLICKRANK_ANN_NPROBE")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    vectors = ModelDir(args.model_dir).load().items.vectors
    if args.items:
        vectors = synthetic_catalog(vectors, args.items, seed=0)
    queries = real_queries(args.model_dir, args.queries)
    report = {"items": len(vectors), "dim": int(vectors.shape[1]), "queries": len(queries)}
    report |= {"nprobe": args.nprobe, **measure(vectors, queries, args.nprobe)}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
