"""Figures of a benchmark run: latency statistics, ``/metrics`` deltas, and the report folder.

The load generator (``clickrank bench``) produces raw samples (``loadtests.client``) and two
``/metrics`` scrapes per step (``loadtests.measure``); this module turns them into the numbers of
``report.json``, the tables of ``summary.md`` and the PNG plots. Histogram-based server figures (queue
wait percentiles) are bucket upper bounds, as Prometheus would report them, not exact values. The
machine description, timestamps, default report folder and figure saving are shared with
``loadtests.model_bench``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0}

MetricKey = tuple[str, tuple[tuple[str, str], ...]]


# ------------------------------------------------------------------------------------------ statistics


def latency_summary(latencies_s: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p90/p95/p99/max/mean in milliseconds (None when there is no sample)."""
    values = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    keys = [*PERCENTILES, "max", "mean"]
    if values.size == 0:
        return dict.fromkeys(keys)
    out: dict[str, float | None] = {
        name: round(float(np.percentile(values, q)), 3) for name, q in PERCENTILES.items()
    }
    out["max"] = round(float(values.max()), 3)
    out["mean"] = round(float(values.mean()), 3)
    return out


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: how busy the (shared) machine was around a run."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name and memory (``nvidia-smi``), or None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    try:
        found = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return found.splitlines()[0].strip() if found.strip() else None


def gpu_label(machine: Mapping[str, Any]) -> str:
    """``GPU <name>`` or ``no GPU``, for a report header from ``machine_info``."""
    return f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU"


def machine_info() -> dict[str, Any]:
    """nproc, CPU model and memory of this machine (Linux /proc), for the report header."""
    cpu = platform.processor() or "unknown"
    memory_gib: float | None = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "gpu": gpu_name(),
        "loadavg_at_start": load_average(),
    }


# ------------------------------------------------------------------------------------ /metrics deltas


def parse_metrics(text: str) -> dict[MetricKey, float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    samples: dict[MetricKey, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


def _delta(before: Mapping[MetricKey, float], after: Mapping[MetricKey, float], name: str) -> dict:
    """{labels: after − before} for every sample called ``name``."""
    return {labels: value - before.get((n, labels), 0.0) for (n, labels), value in after.items() if n == name}


def _histogram(
    before: Mapping[MetricKey, float], after: Mapping[MetricKey, float], name: str, **match: str
) -> tuple[list[tuple[float, float]], float, float]:
    """(non-cumulative [(upper bound, count)], count, sum) of one histogram's delta."""
    wanted = set(match.items())

    def pick(suffix: str) -> dict:
        return {
            labels: v for labels, v in _delta(before, after, name + suffix).items() if wanted <= set(labels)
        }

    cumulative = sorted(
        (float(dict(labels)["le"]), value) for labels, value in pick("_bucket").items()
    )  # +Inf parses as inf and sorts last
    buckets, previous = [], 0.0
    for bound, value in cumulative:
        buckets.append((bound, value - previous))
        previous = value
    return buckets, sum(pick("_count").values()), sum(pick("_sum").values())


def _bucket_quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (what a dashboard's histogram_quantile bounds)."""
    if count <= 0:
        return None
    seen = 0.0
    for bound, n in buckets:
        seen += n
        if seen >= q * count:
            return bound
    return buckets[-1][0] if buckets else None


def _label(bound: float, previous: float) -> str:
    if math.isinf(bound):
        return f">{previous:g}"
    low = math.floor(previous) + 1
    return f"{bound:g}" if low >= bound else f"{low:g}-{bound:g}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def server_delta(before_text: str, after_text: str) -> dict[str, Any]:
    """The service's own view of one step, from two ``/metrics`` scrapes: batch sizes, queue wait,
    ranker inference time, requests by route and status, queue rejections, degraded answers."""
    before, after = parse_metrics(before_text), parse_metrics(after_text)
    batches, n_batches, batched_requests = _histogram(before, after, "clickrank_batch_size")
    histogram, previous = {}, 0.0
    for bound, n in batches:
        histogram[_label(bound, previous)] = round(n)
        previous = bound
    wait, n_wait, wait_sum = _histogram(before, after, "clickrank_queue_wait_seconds")
    _, n_infer, infer_sum = _histogram(before, after, "clickrank_inference_seconds", graph="ranker")
    requests = {
        f"{dict(labels).get('route')} {dict(labels).get('status')}": round(v)
        for labels, v in _delta(before, after, "clickrank_requests_total").items()
        if v > 0 and dict(labels).get("route") not in ("/metrics", "/readyz", "/healthz")
    }

    return {
        "batches": round(n_batches),
        "batched_requests": round(batched_requests),
        "mean_batch_size": round(batched_requests / n_batches, 2) if n_batches else None,
        "batch_size_histogram": histogram,
        "queue_wait_ms": {
            "mean": _ms(wait_sum / n_wait) if n_wait else None,
            "p50_le": _ms(_bucket_quantile(wait, n_wait, 0.50)),
            "p99_le": _ms(_bucket_quantile(wait, n_wait, 0.99)),
        },
        "ranker_inference_ms": {
            "calls": round(n_infer),
            "mean": _ms(infer_sum / n_infer) if n_infer else None,
        },
        "requests": dict(sorted(requests.items())),
        "queue_rejected": round(sum(_delta(before, after, "clickrank_queue_rejected_total").values())),
        "degraded": round(sum(_delta(before, after, "clickrank_degraded_total").values())),
    }


ADMISSION_KEYS = (
    "shed",
    "shed_within_5ms",
    "shed_p99_le_ms",
    "admitted",
    "admitted_p50_le_ms",
    "admitted_p99_le_ms",
)


def admission_delta(before_text: str, after_text: str, route: str) -> dict[str, Any]:
    """One route's requests split by the admission control, from two ``/metrics`` scrapes: how many were
    shed and how fast the server answered them, and the admitted requests' latency (``request_seconds``
    minus ``shed_seconds``, bucket by bucket; quantiles are the bounds of their buckets)."""
    if "# TYPE clickrank_shed_seconds histogram" not in after_text:
        return dict.fromkeys(ADMISSION_KEYS)  # a tree from before this histogram: refusals not timed apart
    before, after = parse_metrics(before_text), parse_metrics(after_text)
    every, n_every, _ = _histogram(before, after, "clickrank_request_seconds", route=route)
    shed, n_shed, _ = _histogram(before, after, "clickrank_shed_seconds", route=route)
    shed_by_bound = dict(shed)
    admitted = [(bound, n - shed_by_bound.get(bound, 0.0)) for bound, n in every]
    n_admitted = n_every - n_shed

    return {
        "shed": round(n_shed),
        "shed_within_5ms": (
            round(sum(n for bound, n in shed if bound <= 0.005) / n_shed, 4) if n_shed else None
        ),
        "shed_p99_le_ms": _ms(_bucket_quantile(shed, n_shed, 0.99)),
        "admitted": round(n_admitted),
        "admitted_p50_le_ms": _ms(_bucket_quantile(admitted, n_admitted, 0.50)),
        "admitted_p99_le_ms": _ms(_bucket_quantile(admitted, n_admitted, 0.99)),
    }


# ------------------------------------------------------------------------------------------- outputs


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _errors(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"


def step_table(steps: Iterable[Mapping[str, Any]]) -> list[str]:
    """Markdown rows of the per-step figures."""
    rows = [
        "| mode | target | offered rps | achieved rps | p50 ms | p95 ms | p99 ms | max ms | errors "
        "| mean batch | queue wait ms (mean) | ranker call ms (mean) | CPU server / client % "
        "| server CPU ms / request | pass |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---|",
    ]
    for s in steps:
        lat, srv = s["latency_ms"], s.get("server") or {}
        target = s["target_rps"] if s["mode"] == "open" else f"c={s['concurrency']}"
        cpu = f"{_fmt(s.get('server_cpu_pct'), 0)} / {_fmt(s.get('client_cpu_pct'), 0)}"
        rows.append(
            f"| {s['mode']} | {_fmt(target)} | {_fmt(s['offered_rps'])} | {_fmt(s['achieved_rps'])} "
            f"| {_fmt(lat['p50'])} | {_fmt(lat['p95'])} | {_fmt(lat['p99'])} | {_fmt(lat['max'])} "
            f"| {_errors(s['errors'])} | {_fmt(srv.get('mean_batch_size'))} "
            f"| {_fmt((srv.get('queue_wait_ms') or {}).get('mean'), 2)} "
            f"| {_fmt((srv.get('ranker_inference_ms') or {}).get('mean'), 2)} | {cpu} "
            f"| {_fmt(s.get('server_cpu_ms_per_request'), 2)} | {'yes' if s['passed'] else 'no'} |"
        )
    return rows


def summary_markdown(report: Mapping[str, Any]) -> str:
    meta, machine = report["meta"], report["meta"]["machine"]
    lines = [
        f"# clickrank benchmark, {meta['created']}",
        "",
        f"- machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
        f"{gpu_label(machine)}; "
        f"load average at start {machine.get('loadavg_at_start')}, at end {meta.get('loadavg_at_end')}",
        f"- command: `{meta['command']}`",
        f"- scenario: {meta['scenario']} ({meta['workload']}), arrivals: {meta['arrivals']}",
        f"- pass = p99 ≤ {meta['p99_bound_ms']:g} ms, no error (non-200, client timeout, degraded answer) "
        "and every scheduled request answered",
        "- latency is measured from the *scheduled* send time (open loop: no coordinated omission)",
    ]
    for variant in report["variants"]:
        model = variant.get("model") or {}
        lines += [
            "",
            f"## {variant['name']}",
            "",
            f"- env: `{' '.join(f'{k}={v}' for k, v in variant['env'].items()) or '(defaults)'}`, "
            f"workers: {variant['workers'] or 'n/a (external service)'}, model {model.get('version')}, "
            f"batching {model.get('batching')}, providers {model.get('providers')}",
            "- sustainable rate (highest passing open-loop step): "
            f"**{_fmt(variant['sustainable_rps'])} rps**",
            "",
            *step_table(variant["steps"]),
        ]
        if variant["workers"] > 1:
            lines += [
                "",
                f"Server figures (batch, queue wait) come from one of the {variant['workers']} workers.",
            ]
    comparison = report.get("comparison")
    if comparison:
        lines += ["", "## Comparison", ""]
        for name, ratio in comparison["ratios"].items():
            lines.append(
                f"- sustainable rate of {comparison['reference']} / {name}: **{_fmt(ratio, 2)}×** "
                f"(same p99 bound {meta['p99_bound_ms']:g} ms)"
            )
    soak = report.get("soak")
    if soak:
        rss = soak["rss"]
        lines += [
            "",
            f"## Soak: {soak['duration_s']:g} s at {soak['target_rps']:g} rps ({soak['variant']})",
            "",
            f"- requests: {soak['step']['scheduled']}, errors: {_errors(soak['step']['errors'])}, "
            f"p50/p99/max: {_fmt(soak['step']['latency_ms']['p50'])} / "
            f"{_fmt(soak['step']['latency_ms']['p99'])} / {_fmt(soak['step']['latency_ms']['max'])} ms",
            f"- RSS at {rss['baseline_at_s']:g} s: {_fmt(rss['baseline_mib'])} MiB, at the end: "
            f"{_fmt(rss['end_mib'])} MiB, growth {_fmt(rss['growth_pct'], 2)} % "
            f"(target ≤ {rss['target_pct']:g} %: {'met' if rss['within_target'] else 'NOT met'})",
            "",
            "| window start s | requests | p50 ms | p99 ms | errors |",
            "|---:|---:|---:|---:|---|",
            *(
                f"| {w['start_s']:g} | {w['requests']} | {_fmt(w['latency_ms']['p50'])} "
                f"| {_fmt(w['latency_ms']['p99'])} | {_errors(w['errors'])} |"
                for w in soak["windows"]
            ),
        ]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report.get("plots", [])), ""]
    return "\n".join(lines)


def utc_stamp(moment: datetime) -> str:
    """The ``created`` field of a report: ISO 8601 to the second, ``Z`` for UTC."""
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def default_out_dir(tool: str, moment: datetime) -> Path:
    """``reports/<tool>-<UTC timestamp>``: where a run's files go without ``--out``."""
    return Path("reports") / f"{tool}-{moment:%Y%m%dT%H%M%SZ}"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display on a benchmark box)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_latency(report: Mapping[str, Any], path: Path) -> None:
    """p50/p95/p99 against offered load, one colour per variant, with the p99 bound."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, variant in enumerate(report["variants"]):
        steps = sorted(
            (s for s in variant["steps"] if s["latency_ms"]["p99"] is not None),
            key=lambda s: s["offered_rps"],
        )
        if not steps:
            continue
        x = [s["offered_rps"] for s in steps]
        colour = f"C{i}"
        for name, style in (("p50", ":"), ("p95", "--"), ("p99", "-")):
            ax.plot(
                x,
                [s["latency_ms"][name] for s in steps],
                style,
                color=colour,
                marker="o",
                ms=3,
                label=f"{variant['name']} {name}",
            )
    ax.axhline(report["meta"]["p99_bound_ms"], color="grey", lw=1, label="p99 bound")
    ax.set(
        xlabel="offered load (requests/s)",
        ylabel="latency (ms, from scheduled send)",
        yscale="log",
        title=f"latency vs offered load ({report['meta']['scenario']})",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_batches(report: Mapping[str, Any], path: Path) -> None:
    """Left: mean batch size against offered load. Right: batch-size distribution at each variant's
    highest passing step (share of requests served in batches of each size)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    variants = report["variants"]
    width = 0.8 / max(1, len(variants))
    labels: list[str] = []
    for i, variant in enumerate(variants):
        steps = [s for s in variant["steps"] if (s.get("server") or {}).get("mean_batch_size")]
        steps.sort(key=lambda s: s["offered_rps"])
        left.plot(
            [s["offered_rps"] for s in steps],
            [s["server"]["mean_batch_size"] for s in steps],
            marker="o",
            color=f"C{i}",
            label=variant["name"],
        )
        passing = [s for s in steps if s["passed"]] or steps
        if not passing:
            continue
        step = max(passing, key=lambda s: s["offered_rps"])
        histogram = step["server"]["batch_size_histogram"]
        labels = labels or list(histogram)
        sizes = [_bucket_mid(k) for k in histogram]
        weighted = np.array([n * m for n, m in zip(histogram.values(), sizes, strict=True)], dtype=float)
        share = weighted / weighted.sum() if weighted.sum() else weighted
        right.bar(
            np.arange(len(histogram)) + i * width,
            share,
            width=width,
            color=f"C{i}",
            label=f"{variant['name']} @ {step['offered_rps']:.0f} rps",
        )
    left.set(
        xlabel="offered load (requests/s)", ylabel="mean requests per ONNX call", title="mean batch size"
    )
    right.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=45)
    right.set(xlabel="batch size", ylabel="share of requests (approx.)", title="batch-size distribution")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _bucket_mid(label: str) -> float:
    """A representative size of a batch-size bucket label ("1", "3-4", ">256")."""
    if label.startswith(">"):
        return float(label[1:])
    parts = [float(p) for p in label.split("-")]
    return sum(parts) / len(parts)


def plot_soak(soak: Mapping[str, Any], path: Path) -> None:
    """Server RSS over time and the p99 latency of each window."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    samples = soak["rss"]["samples"]
    top.plot([t for t, _ in samples], [m for _, m in samples], marker=".", color="C0")
    top.axvline(soak["rss"]["baseline_at_s"], color="grey", lw=1)
    top.set(ylabel="server RSS (MiB)", title=f"soak at {soak['target_rps']:g} rps")
    windows = [w for w in soak["windows"] if w["latency_ms"]["p99"] is not None]
    for key, color in (("p99", "C3"), ("p50", "C2")):
        bottom.plot(
            [w["start_s"] for w in windows],
            [w["latency_ms"][key] for w in windows],
            marker=".",
            color=color,
            label=key,
        )
    bottom.set(xlabel="time since start (s)", ylabel="latency (ms)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    bottom.legend()
    save_figure(fig, path)


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``report.json``, ``summary.md`` and the plots into ``out_dir``; returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    if any(v["steps"] for v in report["variants"]):
        plot_latency(report, out_dir / "latency_vs_load.png")
        plot_batches(report, out_dir / "batch_sizes.png")
        plots += ["latency_vs_load.png", "batch_sizes.png"]
    if report.get("soak"):
        plot_soak(report["soak"], out_dir / "soak.png")
        plots.append("soak.png")
    report["plots"] = plots
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out_dir / "summary.md").write_text(summary_markdown(report))
    return out_dir


def write_tables(out_dir: Path, report: Any, markdown: str) -> None:
    """``report.json`` and ``report.md`` (``markdown``) into ``out_dir``, made if missing; the Markdown
    printed too. For the tools that report one table rather than ``write_report``'s sweep."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out_dir / "report.md").write_text(markdown)
    print(markdown)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
