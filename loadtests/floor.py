"""``python -m loadtests.floor``: the served routes beside their bare HTTP floor, measured with ``wrk``.

On two cores a Python load generator takes a core from the server; ``wrk`` (C, Debian package) does not.
This starts a private redis-server, stores the workload users' MovieLens histories, spawns
``clickrank serve`` and the two echo floors (``loadtests/echo_app.py``: same FastAPI, uvicorn and pydantic
request models, no model, no Redis; ``echo`` serialises its answers as the service does, ``echo-pydantic``
builds them as pydantic objects that FastAPI validates), and runs ``wrk`` at rising connection counts, the
servers taking turns at every step so that all see the same machine. Per route it reports the best rate with
p99 within the bound, no error and no degraded answer, for each server, and the service's ratio to each
echo; ``report.json`` and ``report.md`` are written to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from loadtests.common import log
from loadtests.report import default_out_dir, machine_info, parse_metrics, utc_stamp, write_tables
from loadtests.server import REPO, SpawnedServer, Variant, cpu_seconds, free_port, thread_cpu_seconds
from loadtests.workload import ROUTES, Workload, load_histories
from models.data import default_data_dir
from models.redis_process import RedisProcess

BODIES = 256
"""Pre-serialised bodies per route, cycled by the wrk script."""
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class WrkRun:
    """What one ``wrk --latency`` run printed."""

    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int


def _latency_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not match:
        raise ValueError(f"no {percentile}% latency in the wrk output")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(text: str) -> WrkRun:
    """The figures of ``wrk --latency`` output; ValueError if it is not one."""
    requests = re.search(r"^\s+(\d+) requests in ", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not (requests and rps):
        raise ValueError(f"not wrk --latency output: {text[:200]!r}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return WrkRun(
        requests=int(requests.group(1)),
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(text, "50"),
        p99_ms=_latency_ms(text, "99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sockets.groups()) if sockets else 0,
    )


def wrk_script(bodies: list[bytes], path: str) -> str:
    """A wrk Lua script that POSTs ``bodies`` to ``path`` in turn."""
    quoted = ",\n".join("[==[" + body.decode() + "]==]" for body in bodies)
    return (
        f"local bodies = {{\n{quoted}\n}}\nlocal i = 0\n"
        "request = function()\n  i = i % #bodies + 1\n"
        f'  return wrk.format("POST", "{path}", {{["Content-Type"] = "application/json"}}, bodies[i])\n'
        "end\n"
    )


def write_wrk_script(workload: Workload, route: str, out: Path) -> Path:
    """``out/<route>.lua``: a wrk script that POSTs ``BODIES`` of the workload's ``route`` bodies in turn."""
    body = {"predict": workload.predict_body, "recommend": workload.recommend_body}[route]
    script = out / f"{route}.lua"
    script.write_text(wrk_script([body() for _ in range(BODIES)], ROUTES[route]))
    return script


def metrics_text(url: str) -> str:
    """The service's ``/metrics`` page."""
    return httpx.get(f"{url}/metrics", timeout=5.0, trust_env=False).text


def metric_sum(text: str, metric: str) -> float:
    """Every sample of ``metric`` (all labels) in a ``/metrics`` page, summed."""
    return sum(v for (name, _), v in parse_metrics(text).items() if name == metric)


def route_sum(text: str, metric: str, route: str) -> float:
    """The samples of ``metric`` labelled with ``route`` (any other labels) in a ``/metrics`` page, summed."""
    samples = parse_metrics(text).items()
    return sum(v for (name, labels), v in samples if name == metric and ("route", route) in labels)


def metric_total(url: str, metric: str) -> float:
    """Every sample of ``metric`` (all labels) summed, from the service's ``/metrics``."""
    return metric_sum(metrics_text(url), metric)


DEGRADED = "clickrank_degraded_total"
"""Answers computed without the stored history, by route."""


def degraded_total(url: str) -> float:
    """``clickrank_degraded_total`` over all routes."""
    return metric_total(url, DEGRADED)


def run_wrk(wrk: str, url: str, script: Path, connections: int, duration_s: float) -> WrkRun:
    command = [wrk, "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration_s + 60)
    return parse_wrk(out.stdout)


ECHOES = {"echo": "loadtests.echo_app:app", "echo-pydantic": "loadtests.echo_app:pydantic_app"}
"""The echo floors by server name: answers serialised as the service does, and built as pydantic objects."""


class EchoServer:
    """An echo floor (``app``, a uvicorn app path) under uvicorn on a free loopback port."""

    def __init__(self, app: str, log_path: Path) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> EchoServer:
        command = [sys.executable, "-m", "uvicorn", self.app, "--port", str(self.port),
                   "--log-level", "warning", "--no-access-log"]  # fmt: skip
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                if httpx.get(f"{self.url}/openapi.json", timeout=1.0, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.__exit__()
        raise ConnectionError(f"the echo app did not start; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds used so far: by each thread of one server, by redis-server, and by this process's reaped
    children (only ``wrk`` is reaped while the servers run)."""

    threads: dict[int, float]
    redis_s: float
    wrk_s: float


def read_cpu(server_pid: int, redis_pid: int) -> CpuReading:
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_s = reaped.ru_utime + reaped.ru_stime
    return CpuReading(thread_cpu_seconds(server_pid), cpu_seconds(redis_pid), wrk_s)


def cpu_split(before: CpuReading, after: CpuReading, loop_tid: int, requests: int) -> dict[str, float]:
    """µs of CPU a request between two readings: the server's event-loop thread (``loop_tid``), its other
    threads (the inference thread, ONNX Runtime's pool), redis-server and ``wrk``. A thread that ended in
    between is not counted."""
    threads = {tid: s - before.threads.get(tid, 0.0) for tid, s in after.threads.items()}
    per_request = 1e6 / max(requests, 1)
    loop = threads.pop(loop_tid, 0.0)
    split = {
        "loop": loop,
        "other_threads": sum(threads.values()),
        "redis": after.redis_s - before.redis_s,
        "wrk": after.wrk_s - before.wrk_s,
    }
    return {part: round(seconds * per_request, 1) for part, seconds in split.items()}


TARGET_RATIO = 0.5
"""Issue 11's target: the service's best rate at least this share of ``echo-pydantic``'s."""


def cpu_budget(row: dict, nproc: int) -> dict | None:
    """Whether the machine's cores could carry the service at ``TARGET_RATIO`` × ``echo-pydantic``, from the
    CPU a request cost at each server's best step: the target leaves ``nproc`` cores ÷ the target rate a
    request (and one core ÷ the rate for the event loop). ``floor_us`` is what a request would still cost if
    the service's event loop did only the lean ``echo``'s whole work (the HTTP any answer pays) while its
    other threads, Redis and ``wrk`` cost what they cost at its best step; ``ceiling_rps`` is the rate those
    cores allow at that cost, an upper bound (the cores are never all busy) that holds as long as those
    costs do not fall at higher rates (larger batches do lower the inference thread's a little)."""
    service, echo, pydantic = row["service"], row["echo"], row["echo-pydantic"]
    if not (service and echo and pydantic and "cpu_us" in service and "cpu_us" in echo):
        return None
    spent, http = service["cpu_us"], echo["cpu_us"]
    target = TARGET_RATIO * pydantic["rps"]
    floor_us = http["loop"] + http["other_threads"] + spent["other_threads"] + spent["redis"] + spent["wrk"]
    ceiling = nproc * 1e6 / floor_us if floor_us > 0 else None
    return {
        "target_rps": round(target, 1),
        "machine_us_at_target": round(nproc * 1e6 / target, 1),
        "loop_us_at_target": round(1e6 / target, 1),
        "service_us": round(sum(spent.values()), 1),
        "echo_http_us": round(http["loop"] + http["other_threads"], 1),
        "floor_us": round(floor_us, 1),
        "ceiling_rps": None if ceiling is None else round(ceiling, 1),
        "ceiling_ratio": None if ceiling is None else round(ceiling / pydantic["rps"], 3),
    }


def best(steps: list[dict], server: str, bound_ms: float, key: str = "server") -> dict | None:
    """The step of ``server`` (named in each step's ``key``) with the highest rate within the bound, without
    errors or degraded answers."""
    fine = [
        s for s in steps
        if s[key] == server and s["p99_ms"] <= bound_ms and s["non_2xx"] == 0
        and s["socket_errors"] == 0 and s.get("degraded", 0) == 0
    ]  # fmt: skip
    return max(fine, key=lambda s: s["rps"], default=None)


def summary(steps: list[dict], routes: list[str], bound_ms: float, nproc: int) -> list[dict]:
    """Per route: each server's best step, the service's rate ÷ each echo's (``ratio`` against ``echo``,
    ``ratio_pydantic`` against ``echo-pydantic``), and the ``cpu_budget`` of the target."""
    rows = []
    for route in routes:
        on_route = [s for s in steps if s["route"] == route]
        row: dict = {
            "route": route,
            **{server: best(on_route, server, bound_ms) for server in ("service", *ECHOES)},
        }
        for echo, key in (("echo", "ratio"), ("echo-pydantic", "ratio_pydantic")):
            service, floor = row["service"], row[echo]
            row[key] = service["rps"] / floor["rps"] if service and floor else None
        row["cpu_budget"] = cpu_budget(row, nproc)
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    bound = report["p99_bound_ms"]
    lines = [f"# Served path against its HTTP floor ({report['created']})", "",
             f"Best rate with p99 ≤ {bound:g} ms, no error, no degraded answer (`wrk -t1`, "
             f"{report['duration_s']:g} s a step).", "",
             "| route | service rps (conns, p99 ms) | echo rps (conns, p99 ms) | ratio | "
             "echo-pydantic rps (conns, p99 ms) | ratio to it |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip

    def cell(step: dict | None) -> str:
        return (
            "none within the bound"
            if step is None
            else (f"{step['rps']:,.0f} ({step['connections']}, {step['p99_ms']:.1f})")
        )

    def times(ratio: float | None) -> str:
        return "n/a" if ratio is None else f"{ratio:.2f}×"

    for row in report["summary"]:
        lines.append(
            f"| {row['route']} | {cell(row['service'])} | {cell(row['echo'])} | {times(row['ratio'])} | "
            f"{cell(row['echo-pydantic'])} | {times(row['ratio_pydantic'])} |"
        )
    lines += ["", f"**CPU budget of the {TARGET_RATIO:g}× target** (µs of CPU a request; `cpu_budget` in "
              "`loadtests/floor.py` says how each figure is made):", "",
              "| route | target rps | machine µs a request at the target | event loop's µs at the target | "
              "service µs (loop, other threads, Redis, wrk) | lean echo's server µs | "
              "if the loop did only the echo's work: µs | ceiling rps (× echo-pydantic) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in report["summary"]:
        budget, spent = row.get("cpu_budget"), (row["service"] or {}).get("cpu_us")
        if budget is None or spent is None:
            lines.append(f"| {row['route']} | n/a | | | | | | |")
            continue
        parts = ", ".join(f"{spent[k]:,.0f}" for k in ("loop", "other_threads", "redis", "wrk"))
        lines.append(f"| {row['route']} | {budget['target_rps']:,.0f} | "
                     f"{budget['machine_us_at_target']:,.0f} | {budget['loop_us_at_target']:,.0f} | "
                     f"{budget['service_us']:,.0f} ({parts}) | "
                     f"{budget['echo_http_us']:,.0f} | {budget['floor_us']:,.0f} | "
                     f"{budget['ceiling_rps']:,.0f} ({times(budget['ceiling_ratio'])}) |")  # fmt: skip
    lines += ["", "| route | server | conns | rps | p50 ms | p99 ms | non-2xx | socket errors | degraded | "
              "CPU µs a request: loop, other threads, Redis, wrk |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for s in report["steps"]:
        cpu = ", ".join(f"{v:,.0f}" for v in s["cpu_us"].values()) if "cpu_us" in s else ""
        lines.append(f"| {s['route']} | {s['server']} | {s['connections']} | {s['rps']:,.0f} | "
                     f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['non_2xx']} | {s['socket_errors']} | "
                     f"{s.get('degraded', '')} | {cpu} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def measure(
    wrk: str,
    servers: dict[str, tuple[str, int]],
    redis_pid: int,
    scripts: dict[str, Path],
    connections: list[int],
    duration_s: float,
) -> list[dict]:
    """Every route at every connection count, the servers (name: url, pid) alternating at each step; each
    step with its ``cpu_split``."""
    steps = []
    for route, script in scripts.items():
        for url, _ in servers.values():  # warm them all: the first requests pay for lazy imports
            run_wrk(wrk, url, script, 2, 2)
        for c in connections:
            for server, (url, pid) in servers.items():
                before = degraded_total(url) if server == "service" else 0.0
                cpu_before = read_cpu(pid, redis_pid)
                result = run_wrk(wrk, url, script, c, duration_s)
                cpu = cpu_split(cpu_before, read_cpu(pid, redis_pid), pid, result.requests)
                step = {"route": route, "server": server, "connections": c, **asdict(result), "cpu_us": cpu}
                if server == "service":
                    step["degraded"] = int(degraded_total(url) - before)
                steps.append(step)
                log(f"floor {route} {server} c={c}: {result.rps:,.0f} rps, p99 {result.p99_ms:.1f} ms, "
                    f"CPU µs a request: {cpu}")  # fmt: skip
    return steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.floor", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("CLICKRANK_MODEL_DIR", "artifacts"))
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="default: CLICKRANK_DATA_DIR")
    parser.add_argument("--routes", default="predict,recommend", help="comma-separated: predict, recommend")
    parser.add_argument("--connections", default="1,2,4,8,16", help="comma-separated wrk connection counts")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=None, help="default: reports/floor-<UTC time>")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("floor: error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not routes or any(r not in ("predict", "recommend") for r in routes):
        print("floor: error: --routes takes predict and/or recommend", file=sys.stderr)
        return 2
    connections = [int(c) for c in args.connections.split(",")]
    now = datetime.now(UTC)
    out = args.out or default_out_dir("floor", now)
    out.mkdir(parents=True, exist_ok=True)
    workload = Workload(args.data_dir or default_data_dir(), "predict")
    scripts = {route: write_wrk_script(workload, route, out) for route in routes}
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp)).running() as redis:
        load_histories(redis.url, workload)
        service = SpawnedServer(
            Variant("service"), model_dir=args.model_dir, redis_url=redis.url, log_path=out / "service.log"
        )
        echoes = {name: EchoServer(app, out / f"{name}.log") for name, app in ECHOES.items()}
        with service, echoes["echo"] as echo, echoes["echo-pydantic"] as echo_pydantic:
            servers = {
                "service": (service.url, service.pid),
                "echo": (echo.url, echo.pid),
                "echo-pydantic": (echo_pydantic.url, echo_pydantic.pid),
            }
            steps = measure(wrk, servers, redis.pid, scripts, connections, args.duration)
    machine = machine_info()
    report = {
        "created": utc_stamp(now),
        "machine": machine,
        "p99_bound_ms": args.p99_ms,
        "duration_s": args.duration,
        "workload": workload.describe(),
        "steps": steps,
        "summary": summary(steps, routes, args.p99_ms, machine["nproc"]),
    }
    write_tables(out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
