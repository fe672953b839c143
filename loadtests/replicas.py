"""``python -m loadtests.replicas``: two ``clickrank serve`` replicas against one, behind the same proxy.

Starts a private 3-primary, 3-replica Redis Cluster (``--redis single``: one redis-server), stores the
workload users' MovieLens histories, spawns two replicas (``clickrank serve``, one worker each) and an
HAProxy (Debian package ``haproxy``, TCP mode, round robin) with two frontends: one whose backend is
replica A alone, one that balances over A and B. ``wrk`` then drives ``POST /v1/predict`` through each
frontend in turn at rising connection counts, so both setups see the same machine and the same proxy
hop. Reports the best rate with p99 within the bound, no error and no degraded answer, for each, and
their ratio; ``report.json`` and ``report.md`` are written to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from loadtests.common import log
from loadtests.floor import degraded_total, run_wrk, write_wrk_script
from loadtests.report import default_out_dir, machine_info, utc_stamp, write_tables
from loadtests.server import SpawnedServer, Variant, free_port
from loadtests.workload import Workload, load_histories
from models.data import default_data_dir
from models.redis_process import RedisClusterProcess, RedisProcess, port_open


def haproxy_config(frontends: dict[int, list[int]]) -> str:
    """TCP round robin: each frontend port to its backend ports."""
    lines = [
        "global", "  maxconn 4096",
        "defaults", "  mode tcp", "  balance roundrobin",
        "  timeout connect 2s", "  timeout client 60s", "  timeout server 60s",
    ]  # fmt: skip
    for port, backends in frontends.items():
        lines += [f"listen p{port}", f"  bind 127.0.0.1:{port}"]
        lines += [f"  server s{b} 127.0.0.1:{b}" for b in backends]
    return "\n".join(lines) + "\n"


def start_haproxy(binary: str, config: Path, ports: list[int]) -> subprocess.Popen:
    proc = subprocess.Popen([binary, "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not all(port_open(p) for p in ports):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise OSError(f"haproxy did not start with {config}")
        time.sleep(0.05)
    return proc


def measure(
    wrk: str,
    frontends: dict[str, str],
    replicas: list[str],
    script: Path,
    connections: list[int],
    duration_s: float,
) -> list[dict]:
    """Each setup at each connection count, alternating at every step."""
    steps = []
    for url in frontends.values():
        run_wrk(wrk, url, script, 2, 2)  # warm-up: the first requests pay for lazy imports
    for c in connections:
        for setup, url in frontends.items():
            before = sum(degraded_total(r) for r in replicas)
            result = run_wrk(wrk, url, script, c, duration_s)
            degraded = int(sum(degraded_total(r) for r in replicas) - before)
            steps.append({"setup": setup, "connections": c, **asdict(result), "degraded": degraded})
            figures = f"{result.rps:,.0f} rps, p99 {result.p99_ms:.1f} ms, {degraded} degraded"
            log(f"replicas {setup} c={c}: {figures}")
    return steps


def best(steps: list[dict], setup: str, bound_ms: float) -> dict | None:
    ok = [
        s for s in steps
        if s["setup"] == setup and s["p99_ms"] <= bound_ms and not s["non_2xx"] and not s["socket_errors"]
        and not s["degraded"]
    ]  # fmt: skip
    return max(ok, key=lambda s: s["rps"], default=None)


def markdown(report: dict) -> str:
    lines = [
        f"Redis: {report['redis']}; {report['duration_s']:g} s per step; "
        f"p99 bound {report['p99_bound_ms']:g} ms",
        "",
        "| connections | one replica: rps, p99, degraded | two replicas: rps, p99, degraded | ratio |",
        "|---|---|---|---|",
    ]
    by = {(s["setup"], s["connections"]): s for s in report["steps"]}
    for c in sorted({s["connections"] for s in report["steps"]}):
        one, two = by[("one", c)], by[("two", c)]

        def cell(s: dict) -> str:
            errors = s["non_2xx"] + s["socket_errors"]
            return f"{s['rps']:,.1f}, {s['p99_ms']:.1f} ms, {s['degraded']}" + (
                f", {errors} errors" if errors else ""
            )

        lines.append(f"| {c} | {cell(one)} | {cell(two)} | {two['rps'] / one['rps']:.2f}× |")
    b1, b2 = report["best"]["one"], report["best"]["two"]
    if b1 and b2:
        ratio = b2["rps"] / b1["rps"]
        lines += ["", f"Best within the bound: one {b1['rps']:,.1f} rps (c={b1['connections']}), two "
                  f"{b2['rps']:,.1f} rps (c={b2['connections']}): **{ratio:.2f}×**"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.replicas", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("CLICKRANK_MODEL_DIR", "artifacts"))
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="default: CLICKRANK_DATA_DIR")
    parser.add_argument("--redis", choices=("cluster", "single"), default="cluster")
    parser.add_argument("--connections", default="2,4,8,16", help="comma-separated wrk connection counts")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=None, help="default: reports/replicas-<UTC time>")
    args = parser.parse_args(argv)
    wrk, haproxy = shutil.which("wrk"), shutil.which("haproxy", path=f"{os.environ['PATH']}:/usr/sbin")
    if wrk is None or haproxy is None:
        print("replicas: error: needs wrk and haproxy (apt-get install wrk haproxy)", file=sys.stderr)
        return 2
    now = datetime.now(UTC)
    out = args.out or default_out_dir("replicas", now)
    out.mkdir(parents=True, exist_ok=True)
    workload = Workload(args.data_dir or default_data_dir(), "predict")
    script = write_wrk_script(workload, "predict", out)
    os.environ["CLICKRANK_REDIS_MODE"] = args.redis  # the history load and both replicas
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        store = (
            RedisClusterProcess(tmp / "cluster") if args.redis == "cluster" else RedisProcess(tmp / "redis")
        )
        stack.enter_context(store.running())
        load_histories(store.url, workload)
        a, b = (
            stack.enter_context(
                SpawnedServer(
                    Variant(name), model_dir=args.model_dir, redis_url=store.url, log_path=out / f"{name}.log"
                )
            )
            for name in ("a", "b")
        )
        one_port, two_port = free_port(), free_port()
        config = out / "haproxy.cfg"
        config.write_text(haproxy_config({one_port: [a.port], two_port: [a.port, b.port]}))
        proxy = start_haproxy(haproxy, config, [one_port, two_port])
        stack.callback(proxy.kill)
        frontends = {"one": f"http://127.0.0.1:{one_port}", "two": f"http://127.0.0.1:{two_port}"}
        connections = [int(c) for c in args.connections.split(",")]
        steps = measure(wrk, frontends, [a.url, b.url], script, connections, args.duration)
    report = {
        "created": utc_stamp(now),
        "machine": machine_info(),
        "redis": "3-primary 3-replica cluster" if args.redis == "cluster" else "one redis-server",
        "p99_bound_ms": args.p99_ms,
        "duration_s": args.duration,
        "workload": workload.describe(),
        "steps": steps,
        "best": {setup: best(steps, setup, args.p99_ms) for setup in ("one", "two")},
    }
    write_tables(out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
