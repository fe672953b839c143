"""``clickrank bench``: a bounded load generator for a clickrank service on loopback; open-loop rate
sweeps, closed-loop concurrency steps, batching on/off comparisons on spawned servers, and a memory soak.

This module is the command line: it checks the options, starts the services (``--spawn``) or checks the
given one (``--url``), runs the steps and writes the report folder. The parts: ``loadtests.workload``
(what is sent), ``loadtests.client`` (how it is sent and timed: open loop without coordinated omission,
closed loop), ``loadtests.server`` (the service's process: spawning, CPU and RSS), ``loadtests.measure``
(steps, the interleaved sweep, the soak) and ``loadtests.report`` (figures, summary, plots).
``clickrank bench --help`` lists the options; ``docs/benchmarks.md`` has the commands behind the
published numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from loadtests.common import float_list, int_list, log
from loadtests.measure import BenchConfig, Lane, comparison, open_lane, soak, sweep
from loadtests.report import default_out_dir, load_average, machine_info, utc_stamp, write_report
from loadtests.server import EXTERNAL, REPO, SpawnedServer, Target, Variant, check_loopback
from loadtests.workload import SCENARIOS, Workload, load_histories
from models.data import DATA_DIR_ENV, FALLBACK_DATA_DIR, default_data_dir


def parse_variant(text: str, workers: int) -> Variant:
    """``NAME[:KEY=VALUE,...]``; keys without the ``CLICKRANK_`` prefix get it, ``workers`` is uvicorn's."""
    name, _, spec = text.partition(":")
    if not name:
        raise ValueError(f"--variant {text!r}: a name is required (NAME[:KEY=VALUE,...])")
    env: dict[str, str] = {}
    for pair in filter(None, spec.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--variant {text!r}: {pair!r} is not KEY=VALUE")
        if key.lower() == "workers":
            workers = int(value)
            continue
        key = key.upper()
        env[key if key.startswith("CLICKRANK_") else f"CLICKRANK_{key}"] = value
    return Variant(name, env, workers)


def build_parser(prog: str = "clickrank bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Bounded load generator for a clickrank service on loopback; writes a report folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = parser.add_argument_group("target (one of --url, --spawn)")
    target.add_argument("--url", help="a running service on loopback, e.g. http://127.0.0.1:8000")
    target.add_argument("--pid", type=int, help="with --url: the server's pid, for CPU and RSS figures")
    target.add_argument(
        "--spawn", action="store_true", help="start `clickrank serve` per variant, stop it after"
    )
    target.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("CLICKRANK_MODEL_DIR", "./artifacts"))
    )
    target.add_argument(
        "--redis-url",
        default=os.environ.get("CLICKRANK_REDIS_URL"),
        help="Redis of the spawned servers (and of --load-history)",
    )
    target.add_argument("--workers", type=int, default=1, help="uvicorn workers of spawned servers")
    target.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CLICKRANK_* setting for every spawned server (repeatable)",
    )
    target.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[:KEY=VALUE,...]",
        help="a spawned configuration, e.g. unbatched:MAX_BATCH_SIZE=1 (repeatable; all run side by side, "
        "interleaved step by step; the first is the reference of the throughput ratios)",
    )
    target.add_argument("--api-key", default=os.environ.get("CLICKRANK_BENCH_API_KEY"))

    work = parser.add_argument_group("workload")
    work.add_argument("--scenario", choices=SCENARIOS, default="predict")
    work.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help=f"MovieLens 100K (default: ${DATA_DIR_ENV}, else {FALLBACK_DATA_DIR})",
    )
    work.add_argument("--candidates", type=int, default=100, help="candidates per /v1/predict")
    work.add_argument("--min-events", type=int, default=50, help="only users with at least this many events")
    work.add_argument("--users", type=int, default=None, help="use only the first N such users")
    work.add_argument(
        "--load-history",
        action="store_true",
        help="store the users' histories in --redis-url first (through the service's store)",
    )
    work.add_argument("--seed", type=int, default=0)

    load = parser.add_argument_group("load")
    load.add_argument(
        "--rates", type=float_list, default=[], help="open-loop rates (requests/s), e.g. 50,100,200"
    )
    load.add_argument(
        "--concurrency", type=int_list, default=[], help="closed-loop concurrencies, e.g. 1,8,32"
    )
    load.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    load.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    load.add_argument("--max-requests", type=int, default=20_000, help="request cap per step")
    load.add_argument(
        "--warmup", type=float, default=3.0, help="unrecorded seconds before each variant's steps"
    )
    load.add_argument("--cooldown", type=float, default=1.0, help="pause between steps (s)")
    load.add_argument("--p99-bound-ms", type=float, default=50.0)
    load.add_argument("--refine", type=int, default=2, help="bisection steps after the sweep")
    load.add_argument(
        "--stop-after-failures", type=int, default=2, help="end the sweep after N failing steps in a row"
    )
    load.add_argument(
        "--max-inflight", type=int, default=512, help="open requests at most (more: client_overload)"
    )
    load.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    load.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="client of the measured calls: raw asyncio HTTP/1.1 (~0.1 ms CPU per call) or httpx (~1.5 ms)",
    )

    soak_group = parser.add_argument_group("soak (needs --spawn or --pid)")
    soak_group.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="run a soak this long")
    soak_group.add_argument("--rate", type=float, default=None, help="soak rate (requests/s)")
    soak_group.add_argument(
        "--soak-fraction",
        type=float,
        default=None,
        help="soak at this fraction of the first variant's sustainable rate from the sweep",
    )
    soak_group.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples")
    soak_group.add_argument("--soak-window", type=float, default=10.0, help="seconds per latency window")

    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default reports/bench-<timestamp>)"
    )
    return parser


def _config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        scenario=args.scenario,
        arrivals=args.arrivals,
        rates=args.rates,
        concurrency=args.concurrency,
        duration_s=args.duration,
        max_requests=args.max_requests,
        warmup_s=args.warmup,
        cooldown_s=args.cooldown,
        p99_bound_ms=args.p99_bound_ms,
        refine=args.refine,
        stop_after_failures=args.stop_after_failures,
        max_inflight=args.max_inflight,
        timeout_s=args.timeout,
        soak_s=args.soak,
        soak_rate=args.rate,
        soak_fraction=args.soak_fraction,
        rss_interval_s=args.rss_interval,
        soak_window_s=args.soak_window,
        seed=args.seed,
        api_key=args.api_key,
        client=args.client,
    )


def _check(args: argparse.Namespace) -> list[Variant]:
    """Validate the combination of options; the spawned variants (empty with --url)."""
    if bool(args.url) == bool(args.spawn):
        raise ValueError("give exactly one of --url URL (a running service) and --spawn")
    if not (args.rates or args.concurrency or args.soak):
        raise ValueError("nothing to run: give --rates, --concurrency and/or --soak SECONDS")
    if args.soak and not (args.rate or (args.soak_fraction and args.rates)):
        raise ValueError("--soak needs --rate R, or --soak-fraction F together with a --rates sweep")
    if args.soak and not (args.spawn or args.pid):
        raise ValueError("--soak reads the server's RSS: use --spawn, or --url with --pid")
    if min(args.duration, args.max_requests, args.max_inflight, args.timeout) <= 0:
        raise ValueError("--duration, --max-requests, --max-inflight and --timeout must be positive")
    if (args.spawn or args.load_history) and not args.redis_url:
        raise ValueError("--spawn and --load-history need --redis-url (or CLICKRANK_REDIS_URL)")
    if args.url:
        check_loopback(args.url)
        if args.variant:
            raise ValueError("--variant needs --spawn")
        return []
    if not (args.model_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{args.model_dir}/manifest.json not found (--model-dir)")
    common = dict(parse_variant("common:" + ",".join(args.env), args.workers).env) if args.env else {}
    variants = [parse_variant(v, args.workers) for v in args.variant] or [
        Variant("default", {}, args.workers)
    ]
    return [Variant(v.name, {**common, **v.env}, v.workers) for v in variants]


async def _run(
    args: argparse.Namespace, config: BenchConfig, workload: Workload, variants: list[Variant], out: Path
) -> dict[str, Any]:
    """The sweep over every variant (spawned side by side, or the one --url service), then the soak."""

    def spawn(variant: Variant, log_name: str) -> SpawnedServer:
        return SpawnedServer(
            variant, model_dir=args.model_dir, redis_url=args.redis_url, log_path=out / log_name
        )

    external = Target(check_loopback(args.url), args.pid) if args.url else None
    lanes: list[Lane] = []
    if config.rates or config.concurrency:
        async with AsyncExitStack() as stack:
            if external:
                targets = [(EXTERNAL, external)]
            else:
                targets = [
                    (variant, stack.enter_context(spawn(variant, f"server-{i}-{variant.name}.log")).target)
                    for i, variant in enumerate(variants)
                ]
            for variant, target in targets:
                lanes.append(await open_lane(stack, variant, target, workload, config))
            await sweep(lanes, workload, config)
    results = [lane.result() for lane in lanes]
    soak_result = None
    if config.soak_s:
        rate = config.soak_rate
        if rate is None and results and results[0]["sustainable_rps"]:
            rate = round((config.soak_fraction or 0.0) * results[0]["sustainable_rps"], 1)
        if not rate:
            log("soak skipped: the sweep found no sustainable rate to take a fraction of")
        elif external:
            soak_result = await soak(external, workload, config, rate, EXTERNAL)
        else:
            with spawn(variants[0], "server-soak.log") as server:
                log(f"soak: {config.soak_s:g} s at {rate:g} rps on {variants[0].name} (pid {server.pid})")
                soak_result = await soak(server.target, workload, config, rate, variants[0])
    return {"variants": results, "comparison": comparison(results), "soak": soak_result}


def _git_commit() -> str | None:
    with suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return done.stdout.strip() or None
    return None


def run(argv: Sequence[str]) -> Path:
    """Parse ``argv``, run the benchmark, write the report folder and return its path."""
    args = build_parser().parse_args(list(argv))
    variants = _check(args)
    config = _config(args)
    created = datetime.now(UTC)
    out = args.out or default_out_dir("bench", created)
    workload = Workload(
        args.data_dir,
        config.scenario,
        candidates=args.candidates,
        min_events=args.min_events,
        max_users=args.users,
        seed=config.seed,
    )
    if args.load_history:
        load_histories(args.redis_url, workload)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        results = runner.run(_run(args, config, workload, variants, out))
    report = {
        "meta": {
            "created": utc_stamp(created),
            "command": "clickrank bench " + shlex.join(argv),
            "git_commit": _git_commit(),
            "machine": machine,
            "scenario": config.scenario,
            "workload": workload.describe(),
            "arrivals": config.arrivals,
            "p99_bound_ms": config.p99_bound_ms,
            "step_duration_s": config.duration_s,
            "max_requests_per_step": config.max_requests,
            "model_dir": str(args.model_dir) if args.spawn else None,
            "loadavg_at_end": load_average(),
            "client": (
                (
                    "raw asyncio HTTP/1.1 keep-alive"
                    if config.client == "raw"
                    else f"httpx {httpx.__version__}"
                )
                + f" on the {'uvloop' if loop_factory else 'asyncio'} event loop, same machine as the server"
            ),
        },
        **results,
    }
    write_report(out, report)
    for variant in results["variants"]:
        log(
            f"[{variant['name']}] sustainable rate at p99 ≤ {config.p99_bound_ms:g} ms: "
            f"{variant['sustainable_rps']}"
        )
    if results["comparison"]:
        log(f"throughput ratios: {results['comparison']['ratios']}")
    log(f"report: {out}/summary.md")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:  # ConnectionError is an OSError
        print(f"clickrank bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
