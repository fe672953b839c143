"""The ranker alone: ONNX Runtime against PyTorch eager on the *same* module, by batch size.

Each request is a full history (``--history-length`` events, 50 by default) and ``--candidates``
candidates (100). Backends:

- ``torch``: ``models.ranker.SequenceRanker`` in eager mode under ``torch.inference_mode()``;
- ``ort``: a raw ``onnxruntime.InferenceSession`` of the exported ``ranker.onnx``, with the service's
  own session options (``service.runtime.session_options``), inputs already padded;
- ``ort-nospin``: the same with ``session.intra_op.allow_spinning=0`` (``--ort-no-spin``);
- ``service``: ``service.runtime.OnnxModels.rank`` of a model directory, i.e. what the batcher calls,
  including building the padded arrays and the candidate bucket (100 → 128); only with ``--model-dir``.

Weights: ``ranker.pt`` (a ``SequenceRanker`` state dict) and ``ranker.onnx`` from ``--model-dir`` when
the export saved one; otherwise a freshly initialised ``SequenceRanker`` (fixed seed) exported here with
``models.export.export_ranker``, which is what matters for speed: ORT against eager of one module.
Every figure is the median over ``--repeats`` repeats, each a loop of at least ``--min-time`` seconds;
torch and ORT use the same number of intra-op threads (inter-op: 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.common import int_list, run_main
from loadtests.report import (
    default_out_dir,
    gpu_label,
    load_average,
    machine_info,
    pyplot,
    save_figure,
    utc_stamp,
)
from models.features import RANKER_INPUTS as INPUTS

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Shape:
    dim: int
    history_length: int
    heads: int
    layers: int


def model_shape(model_dir: Path | None, default: Shape) -> Shape:
    if model_dir is None:
        return default
    manifest = json.loads((model_dir / "manifest.json").read_text())
    config = manifest["config"]
    return Shape(config["dim"], config["history_length"], config.get("heads", 2), config.get("layers", 2))


def build_ranker(shape: Shape, model_dir: Path | None, seed: int, workdir: Path) -> tuple[Any, Path, str]:
    """(SequenceRanker in eval mode, its ranker.onnx, where the weights came from)."""
    import torch

    from models.export import export_ranker
    from models.ranker import RankerConfig, SequenceRanker, load_ranker

    weights = model_dir / "ranker.pt" if model_dir else None
    if model_dir is not None and weights is not None and weights.is_file():
        return (
            load_ranker(weights),
            model_dir / "ranker.onnx",
            f"trained weights: {weights} and its ranker.onnx",
        )
    torch.manual_seed(seed)
    ranker = SequenceRanker(
        RankerConfig(shape.dim, shape.history_length, heads=shape.heads, layers=shape.layers)
    )
    for emb in (ranker.type_embedding, ranker.value_embedding, ranker.gap_embedding):
        torch.nn.init.normal_(emb.weight, std=0.02)  # zero-initialised for training; random here
    ranker.eval()
    path = workdir / "ranker.onnx"
    started = time.perf_counter()
    export_ranker(ranker, path)
    return (
        ranker,
        path,
        (
            f"fresh SequenceRanker(seed={seed}) exported here with models.export.export_ranker "
            f"in {time.perf_counter() - started:.0f} s"
            + (f" (no ranker.pt in {model_dir})" if model_dir else "")
        ),
    )


def make_inputs(batch: int, shape: Shape, candidates: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Full histories (every slot a real event) and random candidates, as the ranker's numpy inputs."""
    b, length, d = batch, shape.history_length, shape.dim
    return {
        "history_vectors": rng.standard_normal((b, length, d), dtype=np.float32),
        "history_types": rng.integers(1, 6, (b, length), dtype=np.int64),
        "history_values": rng.integers(1, 6, (b, length), dtype=np.int64),
        "history_gaps": rng.integers(0, 8, (b, length), dtype=np.int64),
        "history_mask": np.ones((b, length), dtype=np.float32),
        "candidate_vectors": rng.standard_normal((b, candidates, d), dtype=np.float32),
    }


def per_call(fn: Callable[[], object], min_time_s: float) -> tuple[float, float]:
    """(wall s, process CPU s) per call, over a loop of at least ``min_time_s`` after one warm call."""
    fn()
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        calls += 1
        wall = time.perf_counter() - wall0
        if wall >= min_time_s:
            return wall / calls, (time.process_time() - cpu0) / calls


def ort_session(path: Path, threads: int, spinning: bool):
    import onnxruntime as ort

    from service.runtime import session_options

    options = session_options(threads)
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def backends(
    ranker: Any, onnx_path: Path, model_dir: Path | None, threads: int, no_spin: bool, device: str = "cpu"
) -> dict[str, Callable[[dict[str, np.ndarray]], Callable[[], object]]]:
    """Backend name → (inputs → a no-argument call that scores them)."""
    import torch

    torch.set_num_threads(threads)
    session = ort_session(onnx_path, threads, spinning=True)

    def torch_call(feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        tensors = [torch.from_numpy(feeds[name]) for name in INPUTS]

        def call() -> object:
            with torch.inference_mode():
                return ranker(*tensors)

        return call

    def ort_call(sess: Any) -> Callable[[dict[str, np.ndarray]], Callable[[], object]]:
        return lambda feeds: lambda: sess.run(["logits", "attention", "user_vectors"], feeds)

    found: dict[str, Callable[[dict[str, np.ndarray]], Callable[[], object]]] = {
        "torch": torch_call,
        "ort": ort_call(session),
    }
    if no_spin:
        found["ort-nospin"] = ort_call(ort_session(onnx_path, threads, spinning=False))
    if model_dir is not None:
        from models.model_dir import ModelDir
        from service.runtime import History, OnnxModels, RankRequest

        models = OnnxModels(ModelDir(model_dir).load(), device=device, intra_op_threads=threads)

        def service_call(feeds: dict[str, np.ndarray]) -> Callable[[], object]:
            requests = [
                RankRequest(
                    History(
                        feeds["history_vectors"][i],
                        feeds["history_types"][i],
                        feeds["history_values"][i],
                        feeds["history_gaps"][i],
                    ),
                    feeds["candidate_vectors"][i],
                )
                for i in range(len(feeds["history_mask"]))
            ]
            return lambda: models.rank(requests)

        found["service"] = service_call
    return found


def parity(ranker: Any, onnx_path: Path, shape: Shape, candidates: int) -> float:
    """Max |Δ logit| between eager and ORT on one random batch: proof that both run the same module."""
    import torch

    feeds = make_inputs(4, shape, candidates, np.random.default_rng(7))
    with torch.inference_mode():
        expected = ranker(*(torch.from_numpy(feeds[n]) for n in INPUTS))[0].numpy()
    got = ort_session(onnx_path, 1, spinning=True).run(["logits"], feeds)[0]
    return float(np.abs(got - expected).max())


def run_bench(
    *,
    shape: Shape,
    model_dir: Path | None,
    candidates: int,
    batch_sizes: Sequence[int],
    threads: Sequence[int],
    repeats: int,
    min_time_s: float,
    seed: int,
    no_spin: bool,
    device: str = "cpu",
) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    machine = machine_info()
    with suppress(RuntimeError):  # raises once torch has started parallel work; the setting then stays
        torch.set_num_interop_threads(1)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="model-bench-") as workdir:
        ranker, onnx_path, source = build_ranker(shape, model_dir, seed, Path(workdir))
        max_diff = parity(ranker, onnx_path, shape, candidates)
        rows = []
        for n_threads in threads:
            calls = backends(ranker, onnx_path, model_dir, n_threads, no_spin, device)
            for batch in batch_sizes:
                feeds = make_inputs(batch, shape, candidates, rng)
                prepared = {name: make(feeds) for name, make in calls.items()}
                timings: dict[str, list[tuple[float, float]]] = {name: [] for name in prepared}
                for _ in range(repeats):  # interleaved: a noisy moment hits every backend alike
                    for name, call in prepared.items():
                        timings[name].append(per_call(call, min_time_s))
                for name, runs in timings.items():
                    wall = float(np.median([w for w, _ in runs]))
                    cpu = float(np.median([c for _, c in runs]))
                    rows.append(
                        {
                            "threads": n_threads,
                            "batch": batch,
                            "backend": name,
                            "ms_per_call": round(wall * 1000, 4),
                            "cpu_ms_per_call": round(cpu * 1000, 4),
                            "candidates_per_s": round(batch * candidates / wall, 1),
                            "repeats_ms": [round(w * 1000, 4) for w, _ in runs],
                        }
                    )
                line = ", ".join(
                    f"{r['backend']} {r['candidates_per_s']:,.0f}/s"
                    for r in rows
                    if r["threads"] == n_threads and r["batch"] == batch
                )
                print(f"model-bench: threads {n_threads} batch {batch}: {line}", file=sys.stderr, flush=True)
    return {
        "meta": {
            "created": utc_stamp(datetime.now(UTC)),
            "machine": {**machine, "loadavg_at_end": load_average()},
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "service_device": device if model_dir is not None else None,
            "shape": shape.__dict__,
            "candidates": candidates,
            "weights": source,
            "parity_max_abs_logit_diff": max_diff,
            "repeats": repeats,
            "min_time_s": min_time_s,
            "timing": "median over repeats of (wall time / calls) in a loop of at least min_time_s",
        },
        "results": rows,
        "ratios": ratios(rows),
    }


def ratios(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{threads: {batch: ORT candidates/s ÷ torch candidates/s}}."""
    speed = {(r["threads"], r["batch"], r["backend"]): r["candidates_per_s"] for r in rows}
    out: dict[str, dict[str, float]] = {}
    for (threads, batch, backend), value in speed.items():
        if backend == "ort" and (threads, batch, "torch") in speed:
            out.setdefault(str(threads), {})[str(batch)] = round(value / speed[(threads, batch, "torch")], 2)
    return out


def markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["results"]
    names = list(dict.fromkeys(r["backend"] for r in rows))
    lines = [
        "# Ranker alone: ONNX Runtime vs PyTorch eager",
        "",
        f"- machine: {meta['machine']['nproc']} CPUs ({meta['machine']['cpu_model']}), "
        f"{gpu_label(meta['machine'])}; "
        f"torch and ort on the CPU, service on {meta.get('service_device') or '–'}; "
        f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}; load average at start "
        f"{meta['machine']['loadavg_at_start']}, at end {meta['machine']['loadavg_at_end']}",
        f"- shape: dim {meta['shape']['dim']}, {meta['shape']['history_length']}-event histories, "
        f"{meta['candidates']} candidates, {meta['shape']['layers']} layers, {meta['shape']['heads']} heads",
        f"- weights: {meta['weights']}; ORT vs eager max |Δ logit| = {meta['parity_max_abs_logit_diff']:.1e}",
        f"- {meta['timing']} ({meta['repeats']} repeats, {meta['min_time_s']} s)",
        "",
    ]
    for threads in sorted({r["threads"] for r in rows}):
        lines += [
            f"## {threads} thread{'s' if threads > 1 else ''} (torch and ORT intra-op)",
            "",
            "| batch | "
            + " | ".join(f"{n} cand/s (ms/call, CPU ms/call)" for n in names)
            + " | ORT ÷ torch |",
            "|---:|" + "---:|" * (len(names) + 1),
        ]
        for batch in sorted({r["batch"] for r in rows}):
            cells = []
            for name in names:
                r = next(
                    (r for r in rows if (r["threads"], r["batch"], r["backend"]) == (threads, batch, name)),
                    None,
                )
                cells.append(
                    "–"
                    if r is None
                    else f"{r['candidates_per_s']:,.0f} ({r['ms_per_call']:.2f}, {r['cpu_ms_per_call']:.2f})"
                )
            ratio = result["ratios"].get(str(threads), {}).get(str(batch))
            lines.append(f"| {batch} | " + " | ".join(cells) + f" | {ratio if ratio is not None else '–'} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = result["results"]
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {1: "-", 2: "--", 4: ":", 8: "-."}
    for i, name in enumerate(dict.fromkeys(r["backend"] for r in rows)):
        for threads in sorted({r["threads"] for r in rows}):
            mine = sorted(
                (r for r in rows if r["backend"] == name and r["threads"] == threads),
                key=lambda r: r["batch"],
            )
            ax.plot(
                [r["batch"] for r in mine],
                [r["candidates_per_s"] for r in mine],
                styles.get(threads, "-"),
                color=f"C{i}",
                marker="o",
                ms=3,
                label=f"{name}, {threads} thr",
            )
    shape = result["meta"]["shape"]
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size (requests per call)",
        ylabel="candidates scored per second",
        title=f"ranker: dim {shape['dim']}, L={shape['history_length']}, C={result['meta']['candidates']}",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.model_bench",
        description="The ranker alone: ONNX Runtime vs PyTorch eager of the same module, by batch size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a model export: its shape, its ranker.pt if saved, and the `service` backend",
    )
    parser.add_argument("--dim", type=int, default=64, help="without --model-dir")
    parser.add_argument("--history-length", type=int, default=50, help="without --model-dir")
    parser.add_argument("--heads", type=int, default=2, help="without --model-dir")
    parser.add_argument("--layers", type=int, default=2, help="without --model-dir")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--batch-sizes", type=int_list, default=list(BATCH_SIZES))
    parser.add_argument(
        "--threads",
        type=int_list,
        default=sorted({1, os.cpu_count() or 1}),
        help="intra-op threads of both torch and ORT (one full table per value)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per repeat")
    parser.add_argument("--ort-no-spin", action="store_true", help="also ORT with allow_spinning=0")
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu", help="the service backend's device"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default reports/model-bench-<timestamp>")
    return parser


def run(argv: Sequence[str]) -> Path:
    """Run the model benchmark; writes model_bench.json, model_bench.md and model_bench.png."""
    args = build_parser().parse_args(list(argv))
    if args.model_dir is not None and not (args.model_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{args.model_dir}/manifest.json not found (--model-dir)")
    if args.repeats < 1 or args.min_time <= 0 or args.candidates < 1:
        raise ValueError("--repeats, --min-time and --candidates must be positive")
    shape = model_shape(args.model_dir, Shape(args.dim, args.history_length, args.heads, args.layers))
    result = run_bench(
        shape=shape,
        model_dir=args.model_dir,
        candidates=args.candidates,
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        repeats=args.repeats,
        min_time_s=args.min_time,
        seed=args.seed,
        no_spin=args.ort_no_spin,
        device=args.device,
    )
    result["meta"]["command"] = "python -m loadtests.model_bench " + " ".join(argv)
    out = args.out or default_out_dir("model-bench", datetime.now(UTC))
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_bench.json").write_text(json.dumps(result, indent=2))
    (out / "model_bench.md").write_text(markdown(result))
    plot(result, out / "model_bench.png")
    for threads, by_batch in result["ratios"].items():
        picks = ", ".join(f"batch {b}: {by_batch[b]}×" for b in ("1", "64") if b in by_batch)
        print(f"model-bench: ORT ÷ torch eager, {threads} thread(s): {picks or by_batch}")
    print(f"model-bench: report: {out}/model_bench.md")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("model-bench", run, argv)


if __name__ == "__main__":
    sys.exit(main())
