"""What ``explain: true`` costs: one request at a time through the ASGI app (a private redis-server, a real
model directory), the same users and candidates with and without explanations, interleaved.

    python -m loadtests.explain_cost --model-dir artifacts --out docs/explain-cost.json

The influences are leave-one-out effects (``service.ranking.Ranker._explain``): one extra ranker request
per distinct history item, so the cost grows with the history (50 events here) and the number of answered
candidates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from models.model_dir import ModelDir
from models.redis_process import RedisProcess
from service.app import create_app
from service.settings import Settings

CASES = {
    "predict, 100 candidates, top 10": ("/v1/predict", {"top_k": 10}),
    "predict, 100 candidates, all answered": ("/v1/predict", {}),
    "recommend, top 10": ("/v1/recommend", {"top_k": 10}),
}


async def measure(model_dir: Path, redis_url: str, users: int, rounds: int, seed: int) -> dict[str, dict]:
    item_ids = ModelDir(model_dir).load().items.item_ids
    rng = np.random.default_rng(seed)
    settings = Settings(redis_url=redis_url, model_dir=model_dir, device="cpu", shed_loop_lag_ms=0)
    app = create_app(settings)
    timings: dict[tuple[str, bool], list[float]] = {(case, e): [] for case in CASES for e in (False, True)}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://explain", timeout=60) as client:
            now = time.time()
            for u in range(users):
                items = rng.choice(len(item_ids), size=50, replace=False).tolist()
                events = [
                    {"user_id": f"x{u}", "item_id": item_ids[r], "type": "rate", "value": 4,
                     "timestamp": now - 3600 * (50 - k)}
                    for k, r in enumerate(items)
                ]  # fmt: skip
                assert (await client.post("/v1/events", json={"events": events})).status_code == 200
            for _ in tqdm(range(rounds), desc="explain cost", unit="round"):
                user = f"x{int(rng.integers(users))}"
                rows = rng.choice(len(item_ids), size=100, replace=False).tolist()
                candidates = [item_ids[r] for r in rows]
                for case, (path, extra) in CASES.items():
                    body = {"user_id": user, **extra}
                    if path == "/v1/predict":
                        body["candidates"] = candidates
                    for explain in (False, True):
                        started = time.perf_counter()
                        answer = await client.post(path, json={**body, "explain": explain})
                        timings[(case, explain)].append(time.perf_counter() - started)
                        assert answer.status_code == 200, answer.text
    out: dict[str, dict] = {}
    for case in CASES:
        plain, explained = (np.array(timings[(case, e)]) * 1000 for e in (False, True))
        out[case] = {
            "plain_ms": {"p50": float(np.median(plain)), "p99": float(np.percentile(plain, 99))},
            "explain_ms": {"p50": float(np.median(explained)), "p99": float(np.percentile(explained, 99))},
            "ratio_p50": float(np.median(explained) / np.median(plain)),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="explain-cost-") as workdir:
        redis = RedisProcess(Path(workdir))
        redis.start()
        try:
            result = asyncio.run(measure(args.model_dir, redis.url, args.users, args.rounds, args.seed))
        finally:
            redis.stop()
    for case, figures in result.items():
        plain, explained = figures["plain_ms"], figures["explain_ms"]
        print(
            f"{case:40s} plain p50 {plain['p50']:6.2f} ms p99 {plain['p99']:6.2f} ms | explain p50 "
            f"{explained['p50']:6.2f} ms p99 {explained['p99']:6.2f} ms | ×{figures['ratio_p50']:.1f}"
        )
    if args.out:
        report = {"model_dir": str(args.model_dir), "history_events": 50, "rounds": args.rounds, **result}
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
