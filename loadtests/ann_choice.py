"""Which approximate nearest-neighbour library serves retrieval over a million items: faiss-cpu (HNSW and
IVF), hnswlib and usearch, measured side by side on one synthetic catalog at the model's width.

    python -m loadtests.ann_choice --model-dir artifacts --items 1000000 --out docs/ann-choice.json

The catalog is drawn from a Gaussian with the exported item vectors' mean and covariance (so inner
products are distributed as in the real catalog); the queries are real user vectors (``ranker.onnx`` on
MovieLens users' last 50 ratings). Retrieval is maximum inner product, top 300, recall against exact
search. Build time, index memory (RSS growth) and single-query search latency (one thread) are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.data import default_data_dir, load_dataset
from models.model_dir import ModelDir
from models.segments import user_vectors
from models.sequences import user_sequences

K = 300


def synthetic_catalog(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mean, cov = vectors.mean(axis=0), np.cov(vectors, rowvar=False)
    return rng.multivariate_normal(mean, cov, size=n, method="cholesky").astype(np.float32)


def real_queries(model_dir: Path, n: int) -> np.ndarray:
    import onnxruntime as ort

    served = ModelDir(model_dir).load()
    sequences = user_sequences(load_dataset(default_data_dir()))[:n]
    histories = [(s.items, s.event_types(), s.values, s.timestamps) for s in sequences]
    session = ort.InferenceSession(served.ranker_onnx, providers=["CPUExecutionProvider"])
    return user_vectors(session, histories, served.items.vectors, 50).astype(np.float32)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def faiss_hnsw(data: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    import faiss

    index = faiss.IndexHNSWFlat(data.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(data)
    index.hnsw.efSearch = 400
    return lambda q: index.search(q[None], K)[1][0]


def faiss_ivf(data: np.ndarray, augment: bool = False) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """One IVF-Flat index (4·√N lists) on the inner product, or on L2 over augmented vectors (the
    service's choice, ``service/retrieval.py``), searched with several ``nprobe``."""
    import faiss

    nlist = int(4 * np.sqrt(len(data)))
    base = augmented(data) if augment else data
    dim = base.shape[1]
    if augment:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(base[np.random.default_rng(0).choice(len(base), min(len(base), 64 * nlist), replace=False)])
    index.add(base)

    def searcher(nprobe: int) -> Callable[[np.ndarray], np.ndarray]:
        def search(q: np.ndarray) -> np.ndarray:
            index.nprobe = nprobe
            query = np.append(q, np.float32(0.0)).astype(np.float32) if augment else q
            return index.search(query[None], K)[1][0]

        return search

    return {f"nprobe={n}": searcher(n) for n in (32, 64, 128, 256)}


def hnswlib_index(data: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=data.shape[1])
    index.init_index(max_elements=len(data), ef_construction=80, M=16)
    index.add_items(data, num_threads=2)
    index.set_ef(400)
    index.set_num_threads(1)
    return lambda q: index.knn_query(q[None], k=K)[0][0]


def usearch_index(data: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    from usearch.index import Index

    index = Index(ndim=data.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=80,
                  expansion_search=400)  # fmt: skip
    index.add(np.arange(len(data)), data, threads=2)
    return lambda q: index.search(q, K, threads=1).keys


def augmented(data: np.ndarray) -> np.ndarray:
    """Inner product → Euclidean distance: each item gains a coordinate sqrt(M² − |x|²) (M the largest
    norm) and a query a 0, so the nearest augmented item is the one with the largest inner product."""
    norms = np.linalg.norm(data, axis=1)
    extra = np.sqrt(np.maximum(norms.max() ** 2 - norms**2, 0.0))
    return np.hstack([data, extra[:, None]]).astype(np.float32)


def on_augmented(build: Callable[[np.ndarray, str], Callable[[np.ndarray], np.ndarray]]) -> Callable:
    def make(data: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        search = build(augmented(data), "l2")
        return lambda q: search(np.append(q, np.float32(0.0)).astype(np.float32))

    return make


def faiss_hnsw_l2(data: np.ndarray, _: str) -> Callable[[np.ndarray], np.ndarray]:
    import faiss

    index = faiss.IndexHNSWFlat(data.shape[1], 32)
    index.hnsw.efConstruction = 80
    index.add(data)
    index.hnsw.efSearch = 400
    return lambda q: index.search(q[None], K)[1][0]


def hnswlib_l2(data: np.ndarray, space: str) -> Callable[[np.ndarray], np.ndarray]:
    import hnswlib

    index = hnswlib.Index(space=space, dim=data.shape[1])
    index.init_index(max_elements=len(data), ef_construction=80, M=16)
    index.add_items(data, num_threads=2)
    index.set_ef(400)
    index.set_num_threads(1)
    return lambda q: index.knn_query(q[None], k=K)[0][0]


def usearch_l2(data: np.ndarray, _: str) -> Callable[[np.ndarray], np.ndarray]:
    from usearch.index import Index

    index = Index(ndim=data.shape[1], metric="l2sq", dtype="f32", connectivity=16, expansion_add=80,
                  expansion_search=400)  # fmt: skip
    index.add(np.arange(len(data)), data, threads=2)
    return lambda q: index.search(q, K, threads=1).keys


CANDIDATES = {
    "faiss HNSW32 ip": faiss_hnsw,
    "faiss IVF ip": faiss_ivf,
    "hnswlib M16 ip": hnswlib_index,
    "usearch M16 ip": usearch_index,
    "faiss IVF l2+aug": lambda data: faiss_ivf(data, augment=True),
    "faiss HNSW32 l2+aug": on_augmented(faiss_hnsw_l2),
    "hnswlib M16 l2+aug": on_augmented(hnswlib_l2),
    "usearch M16 l2+aug": on_augmented(usearch_l2),
}


def measure(data: np.ndarray, queries: np.ndarray, names: list[str]) -> dict[str, Any]:
    exact = [set(np.argpartition(-(data @ q), K)[:K].tolist()) for q in queries]
    started = time.perf_counter()
    for q in queries[:50]:
        np.argpartition(-(data @ q), K)
    exact_ms = (time.perf_counter() - started) / 50 * 1000
    out: dict[str, Any] = {"exact numpy": {"search_ms_p50": exact_ms, "recall_at_300": 1.0}}
    for name in names:
        before = rss_mb()
        started = time.perf_counter()
        built = CANDIDATES[name](data)
        build_s = time.perf_counter() - started
        memory_mb = rss_mb() - before
        searches = built if isinstance(built, dict) else {"": built}
        for setting, search in searches.items():
            label = f"{name} {setting}".strip()
            times, recalls = [], []
            for q, truth in tqdm(list(zip(queries, exact, strict=True)), desc=label, unit="query"):
                t0 = time.perf_counter()
                found = search(q)
                times.append(time.perf_counter() - t0)
                recalls.append(len(truth & set(np.asarray(found).tolist())) / K)
            out[label] = {
                "build_s": round(build_s, 1),
                "memory_mb": round(memory_mb, 1),
                "search_ms_p50": round(1000 * float(np.median(times)), 3),
                "search_ms_p99": round(1000 * float(np.percentile(times, 99)), 3),
                "recall_at_300": round(float(np.mean(recalls)), 4),
                "recall_at_300_min": round(float(np.min(recalls)), 4),
            }
            print(label, out[label], flush=True)
        del built, searches
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated candidates")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    vectors = ModelDir(args.model_dir).load().items.vectors
    data = synthetic_catalog(vectors, args.items, seed=0)
    queries = real_queries(args.model_dir, args.queries)
    result = measure(data, queries, [n for n in args.only.split(",") if n])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"items": args.items, "dim": int(data.shape[1]), "k": K, "queries": len(queries),
              "peak_rss_mb": peak_mb, "results": result}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
