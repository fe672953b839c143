"""``python -m loadtests.variants``: two configurations of this checkout side by side under ``wrk``.

``--variant NAME[:KEY=VALUE,...]`` twice (``clickrank bench``'s syntax: ``CLICKRANK_*`` settings and
``workers``); by default one uvicorn worker against two (issue 11's "two workers in one container"), or
e.g. ``--variant batched --variant unbatched:MAX_BATCH_SIZE=1``. Measured the way the floor is: both
servers share one private redis-server holding the workload users' MovieLens histories and one model
directory; ``wrk -t1`` drives ``POST /v1/predict`` (or ``--route recommend``) at each connection count, the
two taking turns at every step (``loadtests.trees.measure``). Each step also sets what ``/metrics`` counted
for the route (``clickrank_requests_total``; Prometheus multiprocess mode with several workers) beside the
requests ``wrk`` completed: a page that showed one worker's share would fall short by about half. The
summary is each variant's best rate with p99 within the bound, no error, no degraded answer, and the second's
rate over the first's. Writes ``report.json`` and ``summary.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from loadtests.bench import parse_variant
from loadtests.common import log
from loadtests.floor import best
from loadtests.server import REPO
from loadtests.trees import add_side_by_side_options, side_by_side

DEFAULT_VARIANTS = ("one:workers=1", "two:workers=2")


def summary(steps: list[dict], names: tuple[str, str], bound_ms: float) -> dict:
    """Each variant's best step, the second's rate over the first's, and the largest shortfall of
    ``/metrics`` against ``wrk`` over every step (requests ``wrk`` completed that the page did not count)."""
    first, second = (best(steps, name, bound_ms, key="tree") for name in names)
    return {
        "best": {names[0]: first, names[1]: second},
        "ratio": second["rps"] / first["rps"] if first and second else None,
        "metrics_shortfall_max": max((s["requests"] - s["metrics_requests"] for s in steps), default=0),
    }


def markdown(report: dict) -> str:
    s, bound = report["summary"], report["p99_bound_ms"]
    first, second = s["best"]

    def cell(step: dict | None) -> str:
        if step is None:
            return "none within the bound"
        return f"{step['rps']:,.0f} ({step['connections']}, {step['p99_ms']:.1f})"

    ratio = "n/a" if s["ratio"] is None else f"{s['ratio']:.2f}×"
    lines = [
        f"# {first} against {second} ({report['created']}, `{report['route']}`)",
        "",
        f"Best rate with p99 ≤ {bound:g} ms, no error, no degraded answer "
        f"(`wrk -t1`, {report['duration_s']:g} s a step).",
        "",
        f"| {first}: rps (conns, p99 ms) | {second} | ratio |",
        "| --- | --- | --- |",
        f"| {cell(s['best'][first])} | {cell(s['best'][second])} | {ratio} |",
        "",
        "| variant | conns | rps | p99 ms | server CPU ms a request | wrk requests | /metrics | degraded |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for step in report["steps"]:
        lines.append(
            f"| {step['tree']} | {step['connections']} | {step['rps']:,.0f} | {step['p99_ms']:.1f} | "
            f"{step['server_cpu_ms_per_request']:.2f} | {step['requests']:,} | "
            f"{step['metrics_requests']:,} | {step['degraded']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.variants", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help="NAME[:KEY=VALUE,...], twice (default: one worker, two)",
    )
    parser.add_argument("--p99-ms", type=float, default=50.0)
    add_side_by_side_options(parser, connections="4,8,16,32")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v, 1) for v in args.variant or DEFAULT_VARIANTS]
    except ValueError as exc:
        parser.error(str(exc))
    if len(variants) != 2 or variants[0].name == variants[1].name:
        parser.error("give --variant twice, with two names")
    report = side_by_side({v.name: (v, REPO) for v in variants}, args)
    if report is None:
        return 2
    steps = report["steps"]
    for step in steps:
        log(f"variants {step['tree']} c={step['connections']}: wrk {step['requests']:,} requests, "
            f"/metrics {step['metrics_requests']:,}")  # fmt: skip
    report |= {
        "variants": [asdict(v) for v in variants],
        "p99_bound_ms": args.p99_ms,
        "summary": summary(steps, (variants[0].name, variants[1].name), args.p99_ms),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "summary.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
