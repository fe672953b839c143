"""The benchmark tools, for real: the load generator against `clickrank serve` spawned on loopback (real
Redis, real exported model), its figures checked for consistency with the service's own /metrics; the
model and item-encoder benchmarks on a real export; and the pure parts (arrivals, step figures, metric
deltas)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from loadtests import bench, encoder_bench, model_bench, retrieval_accuracy
from loadtests.bench import parse_variant
from loadtests.client import ProtocolError, RawHttpClient, Sample, StepRun, arrival_offsets, send, summarize
from loadtests.report import server_delta
from loadtests.server import check_loopback

PNG = b"\x89PNG\r\n\x1a\n"


def assert_consistent(step: dict) -> None:
    assert step["scheduled"] > 0
    assert step["ok"] + sum(step["errors"].values()) == step["scheduled"]
    assert 0 < step["achieved_rps"] <= step["offered_rps"]
    lat = step["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    server = step["server"]
    # Every predict answer went through the batcher exactly once, and the service counted each request.
    assert server["batched_requests"] == step["ok"]
    assert server["requests"].get("/v1/predict 200", 0) == step["ok"]
    assert sum(server["batch_size_histogram"].values()) == server["batches"]
    assert 1.0 <= server["mean_batch_size"] <= 64


def test_bench_run_against_a_spawned_service(redis_url: str, model_dir: Path, data_dir: Path, tmp_path: Path):
    out = bench.run(
        [
            "--spawn", "--model-dir", str(model_dir), "--redis-url", redis_url, "--data-dir", str(data_dir),
            "--load-history", "--users", "20",
            "--variant", "batched", "--variant", "unbatched:MAX_BATCH_SIZE=1",
            "--rates", "6,12", "--duration", "1.5", "--warmup", "0.5", "--cooldown", "0.1", "--refine", "0",
            "--soak", "3", "--rate", "8", "--rss-interval", "0.5", "--soak-window", "1",
            # Consistency, not speed: the CI box is shared, so generous latency bounds.
            "--p99-bound-ms", "2000", "--env", "REDIS_TIMEOUT_MS=1000",
            "--out", str(tmp_path / "report"),
        ]
    )  # fmt: skip
    for name in ("report.json", "summary.md"):
        assert (out / name).stat().st_size > 0
    for name in ("latency_vs_load.png", "batch_sizes.png", "soak.png"):
        assert (out / name).read_bytes()[:8] == PNG
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["machine"]["nproc"] >= 1
    batched, unbatched = report["variants"]
    assert (batched["name"], unbatched["name"]) == ("batched", "unbatched")
    assert batched["model"]["batching"]["max_batch_size"] == 64
    assert unbatched["model"]["batching"]["max_batch_size"] == 1
    assert unbatched["env"] == {"CLICKRANK_REDIS_TIMEOUT_MS": "1000", "CLICKRANK_MAX_BATCH_SIZE": "1"}
    for variant in (batched, unbatched):
        assert [s["target_rps"] for s in variant["steps"]] == [6.0, 12.0]
        for step in variant["steps"]:
            assert step["errors"] == {}, step["errors"]
            assert step["passed"]
            assert_consistent(step)
            assert step["server_cpu_pct"] is not None and step["server_cpu_pct"] > 0
            cpu_ms = step["server_cpu_pct"] * 10 * step["elapsed_s"] / step["ok"]
            assert step["server_cpu_ms_per_request"] == pytest.approx(cpu_ms, rel=0.05)
        assert variant["sustainable_rps"] == 12.0
    for step in unbatched["steps"]:
        assert step["server"]["mean_batch_size"] == 1.0
        assert step["server"]["batches"] == step["ok"]
    assert report["comparison"] == {"reference": "batched", "ratios": {"unbatched": 1.0}}

    soak = report["soak"]
    assert_consistent(soak["step"])
    assert sum(w["requests"] for w in soak["windows"]) == soak["step"]["scheduled"]
    rss = soak["rss"]
    assert len(rss["samples"]) >= 5 and all(mib > 50 for _, mib in rss["samples"])
    assert rss["baseline_at_s"] == 1.5
    assert rss["growth_pct"] == pytest.approx(100 * (rss["end_mib"] / rss["baseline_mib"] - 1), abs=0.01)
    summary = (out / "summary.md").read_text()
    assert "sustainable rate" in summary and "Soak" in summary


def test_encoder_bench_encodes_the_catalog_on_each_device_with_the_same_vectors(
    model_dir: Path, tmp_path: Path
) -> None:
    result = encoder_bench.run(
        ["--model-dir", str(model_dir), "--devices", "cpu,auto", "--items", "40", "--repeats", "2",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert json.loads((tmp_path / "encoder_bench.json").read_text()) == result
    cpu, auto = result["results"]
    assert (cpu["device"], cpu["providers"][0], cpu["items"]) == ("cpu", "CPUExecutionProvider", 40)
    assert cpu["max_abs_diff_from_first"] == 0.0
    assert auto["max_abs_diff_from_first"] < 1e-3  # CUDA where offered: the same vectors, not merely a run
    for row in result["results"]:
        assert len(row["repeats_s"]) == 2
        assert row["items_per_s"] == pytest.approx(40 / row["median_s"], rel=1e-2)
    assert "| cpu | CPUExecutionProvider | 40 |" in (tmp_path / "encoder_bench.md").read_text()


def test_model_bench_compares_ort_and_eager_on_the_same_weights(model_dir: Path, tmp_path: Path):
    out = model_bench.run(
        ["--model-dir", str(model_dir), "--batch-sizes", "1,4", "--threads", "1", "--repeats", "1",
         "--min-time", "0.02", "--out", str(tmp_path)]
    )  # fmt: skip
    result = json.loads((out / "model_bench.json").read_text())
    assert (out / "model_bench.png").read_bytes()[:8] == PNG
    assert "ORT ÷ torch" in (out / "model_bench.md").read_text()
    assert result["meta"]["parity_max_abs_logit_diff"] < 1e-3  # the same module on both sides
    assert "ranker.pt" in result["meta"]["weights"]
    rows = {(r["backend"], r["batch"]): r for r in result["results"]}
    assert set(rows) == {(b, n) for b in ("torch", "ort", "service") for n in (1, 4)}
    for (_, batch), row in rows.items():
        assert row["candidates_per_s"] == pytest.approx(batch * 100 / (row["ms_per_call"] / 1000), rel=1e-3)
    ratios = result["ratios"]["1"]
    for batch in ("1", "4"):
        expected = (
            rows[("ort", int(batch))]["candidates_per_s"] / rows[("torch", int(batch))]["candidates_per_s"]
        )
        assert ratios[batch] == pytest.approx(expected, abs=0.01)


def test_retrieval_accuracy_measures_the_service_retrieval_against_exact_search():
    """Every list scanned, the service's approximate retrieval is exact: the tool must say so; one list
    scanned, it must report the recall and partition error it lost."""
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((12_000, 16)) * 0.3 + 0.1).astype(np.float32)
    queries = vectors[:8] * 4
    exhaustive = retrieval_accuracy.measure(vectors, queries, nprobe=10**6)
    assert exhaustive["recall_at_300"] == 1.0 and exhaustive["log_partition_error_max"] < 1e-4
    one_list = retrieval_accuracy.measure(vectors, queries, nprobe=1)
    assert one_list["recall_at_300"] < 1.0 and one_list["log_partition_error_mean"] > 1e-4
    assert one_list["query_ms_p50_warm"] > 0 and one_list["build_s"] < 60


def test_poisson_and_uniform_arrivals_are_bounded():
    rng = np.random.default_rng(1)
    offsets, window = arrival_offsets(200.0, 5.0, 10_000, "poisson", rng)
    assert window == 5.0 and np.all(np.diff(offsets) >= 0) and offsets.max() < 5.0
    assert abs(len(offsets) - 1000) < 5 * math.sqrt(1000)
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.15)  # exponential: CV = 1
    capped, capped_window = arrival_offsets(200.0, 5.0, 50, "poisson", rng)
    assert len(capped) == 50 and capped_window < 5.0
    uniform, uniform_window = arrival_offsets(100.0, 2.0, 10_000, "uniform")
    assert len(uniform) == 200 and uniform_window == 2.0
    assert np.allclose(np.diff(uniform), 0.01)
    with pytest.raises(ValueError, match="poisson or uniform"):
        arrival_offsets(1.0, 1.0, 10, "bursty")


def test_step_figures_count_every_outcome_and_fail_on_errors():
    samples = [Sample("predict", i / 100, 0.001 * (i + 1), 0.0, "200") for i in range(98)]
    samples += [Sample("predict", 0.98, 0.5, 0.0, "503"), Sample("predict", 0.99, 0.01, 0.0, "degraded")]
    step = summarize(StepRun(samples, 100, 1.0, 1.25, 0.1), mode="open", bound_ms=200, target_rps=100)
    assert step["errors"] == {"503": 1, "degraded": 1}
    assert step["ok"] == 98 and step["error_rate"] == 0.02
    assert step["offered_rps"] == 100.0 and step["achieved_rps"] == pytest.approx(98 / 1.25, abs=0.01)
    assert step["latency_ms"]["max"] == pytest.approx(98.0) and step["latency_ms"]["p50"] == pytest.approx(
        49.5
    )
    assert not step["passed"]  # p99 is within the bound, but two requests failed
    clean = summarize(StepRun(samples[:98], 98, 1.0, 1.0, 0.1), mode="open", bound_ms=200, target_rps=98)
    assert clean["passed"]
    slow = summarize(StepRun(samples[:98], 98, 1.0, 1.0, 0.1), mode="open", bound_ms=50, target_rps=98)
    assert not slow["passed"]


def test_server_delta_reads_real_prometheus_text():
    registry = CollectorRegistry()
    sizes = Histogram("clickrank_batch_size", "", buckets=(1, 2, 4, 8), registry=registry)
    wait = Histogram("clickrank_queue_wait_seconds", "", buckets=(0.001, 0.002, 0.005), registry=registry)
    requests = Counter("clickrank_requests_total", "", ["route", "method", "status"], registry=registry)
    sizes.observe(1)
    requests.labels("/v1/predict", "POST", "200").inc()
    before = generate_latest(registry).decode()
    for size in (1, 3, 3, 8):
        sizes.observe(size)
    for seconds in (0.0005, 0.0015, 0.0015, 0.004):
        wait.observe(seconds)
    requests.labels("/v1/predict", "POST", "200").inc(15)
    requests.labels("/v1/predict", "POST", "503").inc(2)
    delta = server_delta(before, generate_latest(registry).decode())
    assert delta["batches"] == 4 and delta["batched_requests"] == 15
    assert delta["mean_batch_size"] == 3.75
    assert delta["batch_size_histogram"] == {"1": 1, "2": 0, "3-4": 2, "5-8": 1, ">8": 0}
    assert delta["queue_wait_ms"]["mean"] == pytest.approx(1.875)
    assert delta["queue_wait_ms"]["p50_le"] == 2.0 and delta["queue_wait_ms"]["p99_le"] == 5.0
    assert delta["requests"] == {"/v1/predict 200": 15, "/v1/predict 503": 2}


def test_options_are_checked():
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    for url in ("http://10.1.2.3:8000", "https://127.0.0.1:8000", "http://example.com"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(url)
    variant = parse_variant("unbatched:MAX_BATCH_SIZE=1,clickrank_intra_op_threads=1,workers=2", 1)
    assert variant.env == {"CLICKRANK_MAX_BATCH_SIZE": "1", "CLICKRANK_INTRA_OP_THREADS": "1"}
    assert variant.workers == 2
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_variant("bad:MAX_BATCH_SIZE", 1)
    with pytest.raises(ValueError, match="exactly one of"):
        bench.run(["--rates", "10"])
    with pytest.raises(ValueError, match="--soak needs"):
        bench.run(["--url", "http://127.0.0.1:9", "--soak", "10"])


async def _echo_server(answer: bytes | None) -> tuple[asyncio.Server, list[int]]:
    """A real TCP server answering each request on a connection with ``answer`` (or with an echo of the
    body when None) and then closing the connection, as a server whose keep-alive expired does."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head).group(1))
        body = await reader.readexactly(length)
        writer.write(answer or b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), connections


def test_raw_client_replaces_connections_the_server_closed():
    async def scenario() -> None:
        server, connections = await _echo_server(None)
        port = server.sockets[0].getsockname()[1]
        client = RawHttpClient(f"http://127.0.0.1:{port}", max_connections=2, timeout_s=2.0, headers={})
        assert await client.post("/v1/predict", b"one") == (200, b"one")
        assert await client.post("/v1/predict", b"two") == (200, b"two")
        await asyncio.sleep(0.05)
        assert await client.post("/v1/predict", b"three") == (200, b"three")
        assert len(connections) == 3
        await client.aclose()
        server.close()

    asyncio.run(scenario())


def test_raw_client_failures_become_outcomes():
    async def scenario() -> None:
        chunked, _ = await _echo_server(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        port = chunked.sockets[0].getsockname()[1]
        client = RawHttpClient(f"http://127.0.0.1:{port}", max_connections=1, timeout_s=2.0, headers={})
        with pytest.raises(ProtocolError, match="content-length"):
            await client.post("/v1/predict", b"{}")
        assert await send(client, "predict", "/v1/predict", b"{}") == "ProtocolError"
        chunked.close()

        silent = await asyncio.start_server(lambda r, w: asyncio.sleep(5), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        client = RawHttpClient(f"http://127.0.0.1:{port}", max_connections=1, timeout_s=0.2, headers={})
        assert await send(client, "predict", "/v1/predict", b"{}") == "client_timeout"
        silent.close()

        degraded, _ = await _echo_server(None)
        port = degraded.sockets[0].getsockname()[1]
        client = RawHttpClient(f"http://127.0.0.1:{port}", max_connections=1, timeout_s=2.0, headers={})
        assert await send(client, "predict", "/v1/predict", b'{"degraded":true}') == "degraded"
        assert await send(client, "predict", "/v1/predict", b'{"degraded":false}') == "200"
        degraded.close()
        closed_port = port
        client = RawHttpClient(
            f"http://127.0.0.1:{closed_port}", max_connections=1, timeout_s=2.0, headers={}
        )
        await asyncio.sleep(0.05)
        assert await send(client, "predict", "/v1/predict", b"{}") == "ConnectionRefusedError"

    asyncio.run(scenario())
