"""``python -m loadtests.trees OLD NEW``: two checkouts of clickrank side by side under ``wrk``.

What a change did to the served path, measured in one run on one machine: both trees' ``clickrank
serve`` (``loadtests.server.SpawnedServer``, each importing its own tree's code) share one
private redis-server holding the workload users' MovieLens histories and one model directory; ``wrk``
drives ``POST /v1/predict`` (or ``--route recommend``) at each connection count, the trees alternating
at every step. Per step: rate, p50/p99, the server's CPU time and context switches per request (``/proc``:
in the event loop's thread, where each wait for the GIL is one, and in all threads), non-2xx answers,
degraded answers and shed requests (from each server's ``/metrics``), and where a tree times its
refusals (``clickrank_shed_seconds``): the share of them answered within 5 ms in the server and the
admitted requests' p99; and the route's requests as ``/metrics`` counted them, beside those ``wrk``
completed. Writes ``report.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from loadtests.common import log
from loadtests.floor import DEGRADED, metric_sum, metrics_text, route_sum, run_wrk, write_wrk_script
from loadtests.report import admission_delta, machine_info, utc_stamp
from loadtests.server import SpawnedServer, Variant, context_switches, cpu_seconds, switch_deltas
from loadtests.workload import ROUTES, Workload, load_histories
from models.data import default_data_dir
from models.redis_process import RedisProcess

SHED = "clickrank_queue_rejected_total"
"""Requests refused with 503 by the queue or the admission control (every tree has this counter)."""
REQUESTS = "clickrank_requests_total"
"""Requests by route, method and status, as ``/metrics`` counts them (all workers of a server)."""


def measure(
    wrk: str,
    servers: dict[str, SpawnedServer],
    script: Path,
    route: str,
    connections: list[int],
    duration_s: float,
) -> list[dict]:
    steps = []
    for server in servers.values():  # warm both: the first requests pay for lazy imports
        run_wrk(wrk, server.url, script, 2, 2)
    for c in connections:
        for tree, server in servers.items():
            url, pid = server.url, server.proc.pid  # type: ignore[union-attr]
            before, cpu_before, switches_before = metrics_text(url), cpu_seconds(pid), context_switches(pid)
            result = run_wrk(wrk, url, script, c, duration_s)
            cpu = cpu_seconds(pid) - cpu_before
            switches = switch_deltas(switches_before, context_switches(pid))
            after = metrics_text(url)
            admission = admission_delta(before, after, ROUTES[route])
            step = {
                "route": route,
                "tree": tree,
                "connections": c,
                "rps": result.rps,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "requests": result.requests,
                "metrics_requests": int(
                    route_sum(after, REQUESTS, ROUTES[route]) - route_sum(before, REQUESTS, ROUTES[route])
                ),
                "non_2xx": result.non_2xx,
                "socket_errors": result.socket_errors,
                "degraded": int(metric_sum(after, DEGRADED) - metric_sum(before, DEGRADED)),
                "shed": int(metric_sum(after, SHED) - metric_sum(before, SHED)),
                "shed_within_5ms": admission["shed_within_5ms"],
                "admitted_p99_le_ms": admission["admitted_p99_le_ms"],
                "server_cpu_ms_per_request": round(cpu * 1000 / max(result.requests, 1), 3),
                "loop_switches_per_request": round(switches.get(pid, 0) / max(result.requests, 1), 2),
                "switches_per_request": round(sum(switches.values()) / max(result.requests, 1), 2),
            }
            steps.append(step)
            log(f"trees {tree} c={c}: {result.rps:,.0f} rps, p99 {result.p99_ms:.1f} ms, "
                f"{step['server_cpu_ms_per_request']:.2f} ms server CPU a request, "
                f"{step['loop_switches_per_request']:.1f} context switches a request in the loop's thread "
                f"({step['switches_per_request']:.1f} in all), "
                f"{step['degraded']} degraded, {step['shed']} shed ({step['shed_within_5ms']} within 5 ms), "
                f"admitted p99 ≤ {step['admitted_p99_le_ms']} ms")  # fmt: skip
    return steps


def add_side_by_side_options(parser: argparse.ArgumentParser, connections: str) -> None:
    """The options of a side-by-side run (``side_by_side`` reads them): model, data, steps, route, output."""
    parser.add_argument("--model-dir", type=Path, required=True, help="an export every server can serve")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: CLICKRANK_DATA_DIR")
    parser.add_argument("--connections", default=connections, help="comma-separated wrk connection counts")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    parser.add_argument("--route", choices=("predict", "recommend"), default="predict")
    parser.add_argument("--out", type=Path, required=True)


def side_by_side(servers: dict[str, tuple[Variant, Path]], args: argparse.Namespace) -> dict | None:
    """Each named (configuration, checkout) served by ``clickrank serve`` against one private redis-server
    holding the workload users' histories, measured taking turns (``measure``) as ``args`` say
    (``add_side_by_side_options``); the report's common part, steps included. None, with the reason on
    stderr, when ``wrk`` is not installed. Logs and the wrk script go to ``args.out``."""
    wrk = shutil.which("wrk")
    if wrk is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return None
    out, route = args.out, args.route
    out.mkdir(parents=True, exist_ok=True)
    workload = Workload(args.data_dir or default_data_dir(), "predict")
    script = write_wrk_script(workload, route, out)
    connections = [int(c) for c in args.connections.split(",")]
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisProcess(Path(tmp)).running() as redis,
        ExitStack() as stack,
    ):
        load_histories(redis.url, workload)
        spawned = {
            name: stack.enter_context(
                SpawnedServer(
                    variant,
                    model_dir=args.model_dir,
                    redis_url=redis.url,
                    log_path=out / f"{name}.log",
                    tree=tree,
                )
            )
            for name, (variant, tree) in servers.items()
        }
        steps = measure(wrk, spawned, script, route, connections, args.duration)
    return {
        "created": utc_stamp(datetime.now(UTC)),
        "machine": machine_info(),
        "route": ROUTES[route],
        "duration_s": args.duration,
        "workload": workload.describe(),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.trees", description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path, help="a clickrank checkout (e.g. a git worktree of the base)")
    parser.add_argument("new", type=Path, help="another checkout (e.g. this one: .)")
    add_side_by_side_options(parser, connections="8,64,256")
    args = parser.parse_args(argv)
    report = side_by_side({"old": (Variant("old"), args.old), "new": (Variant("new"), args.new)}, args)
    if report is None:
        return 2
    report["trees"] = {"old": str(args.old), "new": str(args.new)}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
