"""loadtests.floor: the wrk output it reads, the script it writes, the echo floor it compares against;
loadtests.variants, two configurations on the same steps; and the context switches loadtests.trees counts."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from loadtests import variants
from loadtests.echo_app import app, pydantic_app
from loadtests.floor import CpuReading, best, cpu_budget, cpu_split, parse_wrk, route_sum, summary, wrk_script
from loadtests.server import context_switches, switch_deltas, thread_cpu_seconds
from service.schemas.ranking import PredictResponse, RecommendResponse

WRK_OUTPUT = """Running 8s test @ http://127.0.0.1:8791
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.21ms    3.02ms  41.88ms   81.20%
    Req/Sec   490.12     40.51   560.00     72.00%
  Latency Distribution
     50%    7.66ms
     75%    9.12ms
     90%   11.70ms
     99%    1.02s
  3921 requests in 8.00s, 5.81MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:    490.05
Transfer/sec:    743.61KB
"""


def test_wrk_output_is_read_with_units_and_errors() -> None:
    run = parse_wrk(WRK_OUTPUT)
    assert (run.requests, run.rps, run.p50_ms, run.p99_ms) == (3921, 490.05, 7.66, 1020.0)
    assert (run.non_2xx, run.socket_errors) == (7, 3)
    clean = WRK_OUTPUT.replace("  Socket errors: connect 0, read 2, write 0, timeout 1\n", "").replace(
        "  Non-2xx or 3xx responses: 7\n", ""
    )
    assert (parse_wrk(clean).non_2xx, parse_wrk(clean).socket_errors) == (0, 0)
    with pytest.raises(ValueError, match="not wrk"):
        parse_wrk("wrk: command not found")


def test_the_best_step_is_within_the_bound_and_clean() -> None:
    steps = [
        {"server": "service", "rps": 900.0, "p99_ms": 80.0, "non_2xx": 0, "socket_errors": 0, "degraded": 0},
        {"server": "service", "rps": 700.0, "p99_ms": 30.0, "non_2xx": 0, "socket_errors": 0, "degraded": 2},
        {"server": "service", "rps": 600.0, "p99_ms": 30.0, "non_2xx": 0, "socket_errors": 0, "degraded": 0},
        {"server": "echo", "rps": 650.0, "p99_ms": 10.0, "non_2xx": 1, "socket_errors": 0},
    ]
    assert best(steps, "service", 50.0)["rps"] == 600.0
    assert best(steps, "echo", 50.0) is None


def test_the_wrk_script_cycles_the_bodies() -> None:
    script = wrk_script([b'{"user_id": "1"}', b'{"user_id": "2"}'], "/v1/predict")
    assert script.count("[==[") == 2 and '"/v1/predict"' in script and "i % #bodies + 1" in script


def test_the_summary_rates_the_service_against_each_echo() -> None:
    def step(server: str, rps: float) -> dict:
        return {
            "route": "predict",
            "server": server,
            "rps": rps,
            "p99_ms": 10.0,
            "non_2xx": 0,
            "socket_errors": 0,
        }

    (row,) = summary(
        [step("service", 500.0), step("echo", 2000.0), step("echo-pydantic", 1000.0)], ["predict"], 50, 2
    )
    assert (row["ratio"], row["ratio_pydantic"]) == (0.25, 0.5)
    assert row["cpu_budget"] is None  # steps without CPU figures


def test_a_steps_cpu_is_split_by_thread_redis_and_wrk_per_request() -> None:
    before = CpuReading(threads={100: 1.0, 101: 2.0}, redis_s=5.0, wrk_s=0.5)
    after = CpuReading(threads={100: 1.4, 101: 2.1, 102: 0.1}, redis_s=5.05, wrk_s=0.6)  # 102 started between
    assert cpu_split(before, after, loop_tid=100, requests=1000) == {
        "loop": 400.0, "other_threads": 200.0, "redis": 50.0, "wrk": 100.0
    }  # fmt: skip


def test_the_cpu_budget_sets_the_echos_http_work_beside_what_the_service_cannot_shed() -> None:
    """At 0.5 × 4,000 rps, 2 cores give 1,000 µs a request. A loop doing only the lean echo's 150 µs, with
    the service's 500 µs of other threads, 50 of Redis and 100 of wrk, costs 800 µs: 2,500 rps at most."""

    def spent(loop: float, other: float, redis: float, wrk: float) -> dict[str, float]:
        return {"loop": loop, "other_threads": other, "redis": redis, "wrk": wrk}

    row = {
        "service": {"rps": 1000.0, "cpu_us": spent(900.0, 500.0, 50.0, 100.0)},
        "echo": {"rps": 6000.0, "cpu_us": spent(140.0, 10.0, 0.0, 80.0)},
        "echo-pydantic": {"rps": 4000.0, "cpu_us": spent(200.0, 0.0, 0.0, 90.0)},
    }
    budget = cpu_budget(row, nproc=2)
    assert budget is not None
    assert (budget["target_rps"], budget["machine_us_at_target"], budget["loop_us_at_target"]) == (
        2000.0, 1000.0, 500.0
    )  # fmt: skip
    assert (budget["service_us"], budget["echo_http_us"], budget["floor_us"]) == (1550.0, 150.0, 800.0)
    assert (budget["ceiling_rps"], budget["ceiling_ratio"]) == (2500.0, 0.625)
    assert cpu_budget({**row, "echo": None}, nproc=2) is None


def test_thread_cpu_is_read_per_thread() -> None:
    """A thread that spins for 0.3 s of CPU shows at least 0.2 s more under its own id, while the main thread
    (id = pid), sleeping meanwhile, shows less than 0.1 s more: each figure is its thread's own, not its
    process's."""
    done = threading.Event()
    spun: list[int] = []

    def spin() -> None:
        start = time.thread_time()
        while time.thread_time() - start < 0.3:
            pass
        spun.append(threading.get_native_id())
        done.wait()

    before = thread_cpu_seconds(os.getpid())
    thread = threading.Thread(target=spin)
    thread.start()
    while not spun:
        time.sleep(0.01)
    after = thread_cpu_seconds(os.getpid())
    done.set()
    thread.join()
    assert spun[0] not in before and after[spun[0]] >= 0.2
    assert after[os.getpid()] - before[os.getpid()] < 0.1


def test_route_sum_counts_one_route_over_every_method_and_status() -> None:
    registry = CollectorRegistry()
    requests = Counter(
        "clickrank_requests", "HTTP requests", ["route", "method", "status"], registry=registry
    )
    requests.labels("/v1/predict", "POST", "200").inc(7)
    requests.labels("/v1/predict", "POST", "503").inc(2)
    requests.labels("/v1/recommend", "POST", "200").inc(5)
    text = generate_latest(registry).decode()
    assert route_sum(text, "clickrank_requests_total", "/v1/predict") == 9
    assert route_sum(text, "clickrank_requests_total", "/v1/items") == 0


def test_the_variants_summary_rates_the_second_against_the_first_and_checks_the_metrics_count() -> None:
    def step(tree: str, connections: int, rps: float, p99_ms: float, counted: int) -> dict:
        return {
            "tree": tree, "connections": connections, "rps": rps, "p99_ms": p99_ms, "requests": int(rps * 10),
            "metrics_requests": counted, "non_2xx": 0, "socket_errors": 0, "degraded": 0,
            "server_cpu_ms_per_request": 1.0,
        }  # fmt: skip

    steps = [
        step("one", 8, 1000.0, 20.0, 10_000),
        step("two", 8, 1300.0, 18.0, 13_004),
        step("one", 16, 1050.0, 60.0, 10_500),  # past the bound
        step("two", 16, 1500.0, 40.0, 7_000),  # /metrics saw about half: one worker's share
    ]
    result = variants.summary(steps, ("one", "two"), 50.0)
    assert (result["best"]["one"]["rps"], result["best"]["two"]["rps"]) == (1000.0, 1500.0)
    assert result["ratio"] == 1.5
    assert result["metrics_shortfall_max"] == 8_000
    report = {"summary": result, "p99_bound_ms": 50.0, "created": "now", "route": "/v1/predict"}
    table = variants.markdown({**report, "duration_s": 10.0, "steps": steps})
    assert "| 1,000 (8, 20.0) | 1,500 (16, 40.0) | 1.50× |" in table


@pytest.mark.anyio
@pytest.mark.parametrize("echo", [app, pydantic_app], ids=["json", "pydantic"])
async def test_the_echo_floor_answers_the_served_shapes(echo) -> None:
    transport = httpx.ASGITransport(app=echo)
    async with httpx.AsyncClient(transport=transport, base_url="http://echo.test") as client:
        predicted = await client.post("/v1/predict", json={"user_id": "7", "candidates": ["1", "2", "3"]})
        recommended = await client.post("/v1/recommend", json={"user_id": "7", "top_k": 5})
        refused = await client.post("/v1/predict", json={"user_id": "7", "candidates": []})
    answer = PredictResponse.model_validate(predicted.json())
    assert [p.item_id for p in answer.predictions] == ["1", "2", "3"] and answer.predictions[0].rank == 1
    assert len(RecommendResponse.model_validate(recommended.json()).items) == 5
    assert refused.status_code == 422  # the same request validation as the service


@pytest.mark.parametrize(
    "given",
    [
        ["--variant", "only-one"],
        ["--variant", "a", "--variant", "a"],
        ["--variant", "a:=1", "--variant", "b"],
    ],
)
def test_the_variants_tool_wants_two_distinct_well_formed_variants(given: list[str], tmp_path) -> None:
    with pytest.raises(SystemExit) as refused:
        variants.main(["--model-dir", str(tmp_path), "--out", str(tmp_path / "out"), *given])
    assert refused.value.code == 2 and not (tmp_path / "out").exists()


def test_context_switches_count_each_thread_that_sleeps() -> None:
    """A thread that sleeps five times switches out at least five times; it started after the first
    reading, so its delta counts from 0; the main thread (id = pid) is read too."""
    slept, done = threading.Event(), threading.Event()

    def sleeper() -> None:
        for _ in range(5):
            time.sleep(0.002)
        slept.set()
        done.wait()

    before = context_switches(os.getpid())
    thread = threading.Thread(target=sleeper)
    thread.start()
    slept.wait()
    after = context_switches(os.getpid())  # the thread still runs: its /proc entry is there
    done.set()
    thread.join()
    deltas = switch_deltas(before, after)
    assert os.getpid() in before and os.getpid() in deltas
    assert thread.native_id not in before and deltas[thread.native_id] >= 5
