"""``/v1/recommend``'s ranking alone: ``Ranker.recommend`` called in-process, no HTTP, no middleware.

    python -m loadtests.ranking_alone --model-dir <export> --data-dir <ml-100k> --out reports/ranking-alone

A private redis-server gets the histories of ``loadtests.floor``'s workload (the users with 50 or more
events, through the service's own store code), the app's lifespan builds the service, and for each
``--concurrency`` that many coroutines call the ranker for random users of that workload, as the floor's
recommend body asks (``exclude_seen``, top 10), until ``--requests`` are answered: the history read, candidate
gathering, the batched ONNX run and the blend, as a request runs them. Each round reports the rate, the
process's CPU a recommend (every thread) and the event loop's thread's CPU a recommend. Once enough
coroutines keep the loop busy, the rate is what one process could answer if HTTP cost nothing, to set
beside the HTTP floor (``loadtests.floor``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loadtests.common import int_list, log, run_main
from loadtests.workload import Workload, load_histories
from models.redis_process import RedisProcess
from service.app import create_app
from service.schemas.ranking import RecommendRequest
from service.settings import Settings


async def measure(
    settings: Settings, users: list[str], requests: int, concurrencies: list[int], rounds: int
) -> dict[int, list[dict]]:
    """Rounds of ``requests`` recommends at each concurrency (after one warm-up round each)."""
    app = create_app(settings)
    rng = np.random.default_rng(0)
    results: dict[int, list[dict]] = {}
    async with app.router.lifespan_context(app):
        ranker = app.state.services.model.ranker

        async def worker(chunk: list[RecommendRequest]) -> None:
            for request in chunk:
                await ranker.recommend(request)

        for concurrency in concurrencies:
            results[concurrency] = []
            for round_ in range(rounds + 1):  # round 0 warms up
                batch = [RecommendRequest(user_id=str(u)) for u in rng.choice(users, size=requests)]
                wall, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()
                await asyncio.gather(*(worker(batch[i::concurrency]) for i in range(concurrency)))
                wall = time.perf_counter() - wall
                cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
                if round_:
                    figures = {
                        "recommends_per_s": round(requests / wall, 1),
                        "process_cpu_us": round(1e6 * cpu / requests, 1),
                        "loop_thread_cpu_us": round(1e6 * loop_cpu / requests, 1),
                    }
                    results[concurrency].append(figures)
                    log(f"concurrency {concurrency}, round {round_}: {figures}")
    return results


def run(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.ranking_alone",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=6000, help="recommends a round")
    parser.add_argument("--concurrency", type=int_list, default=[4, 16, 64], help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write report.json here")
    args = parser.parse_args(argv)
    workload = Workload(args.data_dir, "recommend")
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp)).running() as redis:
        load_histories(redis.url, workload)
        settings = Settings(redis_url=redis.url, model_dir=args.model_dir, device="cpu")
        rounds = asyncio.run(measure(settings, workload.users, args.requests, args.concurrency, args.rounds))
    report = {
        "what": "Ranker.recommend in-process (top 10, exclude_seen), no HTTP",
        "model_dir": str(args.model_dir),
        "workload": workload.describe(),
        "requests_a_round": args.requests,
        "rounds_by_concurrency": rounds,
    }
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("loadtests.ranking_alone", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
