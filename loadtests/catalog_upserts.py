"""What one single-item upsert costs the catalog (``ItemCatalog.upsert_local``, which ``POST /v1/items`` and
every replica's catalog sync run on the event loop), by catalog size, for this tree and others.

    python -m loadtests.catalog_upserts --items 100000,1000000 --repeat 50 --tree before=<worktree> \
        --out docs/catalog-upserts

Each tree is measured in a process of its own (its ``service.catalog`` imported from the tree), on a
synthetic catalog of random vectors at the model's width, ``--repeat`` new items one at a time.

With ``--model-dir`` (a catalog of that size, ``loadtests.million``), the served effect instead: each
tree's ``clickrank serve`` under ``wrk`` on ``/v1/recommend`` (the floor's MovieLens users), once alone and
once while ``POST /v1/items`` adds one item every ``--post-interval`` seconds; recommend's rate and
percentiles, and each POST's latency:

    python -m loadtests.catalog_upserts --model-dir /tmp/million --data-dir <ml-100k> \
        --tree before=<worktree> --out docs/catalog-upserts/served
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from loadtests.floor import run_wrk, write_wrk_script
from loadtests.report import machine_info, write_tables
from loadtests.server import SpawnedServer, Variant
from loadtests.workload import Workload, load_histories
from models.redis_process import RedisProcess

REPO = Path(__file__).resolve().parent.parent
DIM = 128
"""The width of the two-model export's item vectors."""


def time_upserts(tree: Path, items: int, repeat: int) -> dict:
    """Milliseconds of each of ``repeat`` single-item upserts into a catalog of ``items`` items, with the
    ``ItemCatalog`` of ``tree``."""
    sys.path.insert(0, str(tree))
    from service.catalog import ItemCatalog

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((items, DIM), dtype=np.float32)
    catalog = ItemCatalog(
        [f"i{k}" for k in range(items)], ["t"] * items, vectors, np.zeros_like(vectors), "m"
    )
    del vectors
    new = rng.standard_normal((repeat, DIM), dtype=np.float32)
    ms = []
    for k in range(repeat):
        started = time.perf_counter()
        catalog.upsert_local([(f"new-{k}", f"New item {k}", new[k])])
        ms.append(1e3 * (time.perf_counter() - started))
    assert len(catalog) == items + repeat
    return {"items": items, "repeat": repeat, "ms": ms}


def measure(tree: Path, items: int, repeat: int) -> dict:
    """``time_upserts`` in a process of its own (a fresh heap, and the tree's modules alone)."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(tree), str(items), str(repeat)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    run = json.loads(out)
    ms = np.asarray(run["ms"])
    return {
        **run,
        "median_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def post_items(url: str, interval_s: float, stop: threading.Event, tag: str, latencies: list[float]) -> None:
    """``POST /v1/items`` of one new item every ``interval_s`` until ``stop``; each call's milliseconds
    into ``latencies``."""
    with httpx.Client(base_url=url, timeout=30.0, trust_env=False) as client:
        while not stop.wait(interval_s):
            item = {"item_id": f"{tag}-{len(latencies)}", "text": f"Upserted {len(latencies)} (2026) | Drama"}
            started = time.perf_counter()
            client.post("/v1/items", json={"items": [item]}).raise_for_status()
            latencies.append(1e3 * (time.perf_counter() - started))


def served(args: argparse.Namespace, trees: dict[str, Path]) -> list[dict]:
    """Recommend under ``wrk`` alone and beside a trickle of single-item upserts, for each tree."""
    workload = Workload(args.data_dir, "predict")
    script = write_wrk_script(workload, "recommend", args.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp)).running() as redis:
        load_histories(redis.url, workload)
        for name, tree in trees.items():
            log_path = args.out / f"{name}.log"
            with SpawnedServer(
                Variant(name), model_dir=args.model_dir, redis_url=redis.url, log_path=log_path, tree=tree
            ) as server:
                run_wrk("wrk", server.url, script, args.connections, 5)  # warm-up
                for posting in (False, True):
                    stop, posts = threading.Event(), []
                    tag = f"{name}-{time.time_ns()}"
                    poster = threading.Thread(
                        target=post_items, args=(server.url, args.post_interval, stop, tag, posts)
                    )
                    if posting:
                        poster.start()
                    run = run_wrk("wrk", server.url, script, args.connections, args.duration)
                    stop.set()
                    if posting:
                        poster.join()
                    rows.append(
                        {
                            "tree": name,
                            "posting": posting,
                            "recommend": run.__dict__,
                            "post_ms": posts,
                            "post_median_ms": float(np.median(posts)) if posts else None,
                            "post_max_ms": max(posts, default=None),
                        }
                    )
    return rows


def served_markdown(report: dict) -> str:
    lines = [
        f"`wrk -t1 -c{report['connections']}` on `/v1/recommend` for {report['duration_s']:g} s, "
        f"one `POST /v1/items` of one item every {report['post_interval_s']:g} s beside it or not.",
        "",
        "| tree | items posted | recommend rps | p50 ms | p99 ms | non-2xx | POST median ms | POST max ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["served"]:
        r = row["recommend"]
        post = f"{row['post_median_ms']:.1f} | {row['post_max_ms']:.1f}" if row["post_ms"] else "– | –"
        lines.append(
            f"| {row['tree']} | {len(row['post_ms'])} | {r['rps']:,.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['non_2xx']} | {post} |"
        )
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    lines = [
        "| tree | items | single-item upserts | median ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["runs"]:
        lines.append(
            f"| {row['tree']} | {row['items']:,} | {row['repeat']} | {row['median_ms']:.3f} | "
            f"{row['p99_ms']:.3f} | {row['max_ms']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        print(json.dumps(time_upserts(Path(argv[1]), int(argv[2]), int(argv[3]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m loadtests.catalog_upserts", description=__doc__)
    parser.add_argument("--items", default="100000,1000000", help="comma-separated catalog sizes")
    parser.add_argument("--repeat", type=int, default=50, help="single-item upserts timed per size")
    parser.add_argument(
        "--tree", action="append", default=[], metavar="NAME=PATH", help="another checkout to measure"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, help="served mode: a model directory to serve")
    parser.add_argument("--data-dir", type=Path, help="served mode: MovieLens 100K (the users' histories)")
    parser.add_argument("--connections", type=int, default=8, help="served mode: wrk connections")
    parser.add_argument("--duration", type=float, default=20.0, help="served mode: seconds per wrk run")
    parser.add_argument("--post-interval", type=float, default=0.5, help="served mode: seconds between POSTs")
    args = parser.parse_args(argv)
    trees = {"this": REPO, **{name: Path(path) for name, path in (t.split("=", 1) for t in args.tree)}}
    base = {"machine": machine_info(), "trees": {k: str(v) for k, v in trees.items()}}
    if args.model_dir is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {
            **base,
            "model_dir": str(args.model_dir),
            "connections": args.connections,
            "duration_s": args.duration,
            "post_interval_s": args.post_interval,
            "served": served(args, trees),
        }
        write_tables(args.out, report, served_markdown(report))
        return 0
    runs = [
        {"tree": name, **measure(tree, int(items), args.repeat)}
        for items in args.items.split(",")
        for name, tree in trees.items()
    ]
    report = {**base, "dim": DIM, "runs": runs}
    write_tables(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
