"""The item encoder (BERT) alone, through the service's own ``OnnxModels.encode_texts``, on each device.

The texts are the model's catalog (``items.json``: what ``clickrank load-items`` and a model reload
encode); every device encodes all of them, ``--repeats`` times, and the report gives items per second
and the largest |Δ| of each device's vectors from the first device's (the CUDA graph must give the CPU
graph's vectors, not merely run). ``python -m loadtests.encoder_bench --model-dir DIR --devices cpu,cuda``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.common import run_main
from loadtests.report import default_out_dir, machine_info, utc_stamp


def encode_all(model_dir: Path, device: str, texts: list[str], repeats: int) -> tuple[np.ndarray, dict]:
    """(vectors of ``texts`` on ``device``, its timing row); the first pass warms up and is not timed."""
    from models.model_dir import ModelDir
    from service.runtime import OnnxModels

    models = OnnxModels(ModelDir(model_dir).load(), device=device)
    vectors = models.encode_texts(texts)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        models.encode_texts(texts)
        seconds.append(time.perf_counter() - started)
    median = float(np.median(seconds))
    return vectors, {
        "device": device,
        "providers": models.providers,
        "items": len(texts),
        "median_s": round(median, 4),
        "items_per_s": round(len(texts) / median, 1),
        "repeats_s": [round(s, 4) for s in seconds],
    }


def run(argv: Sequence[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu, cuda, auto")
    parser.add_argument("--items", type=int, default=None, help="only the catalog's first N texts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default reports/encoder-bench-<timestamp>")
    args = parser.parse_args(list(argv))
    texts = [item["text"] for item in json.loads((args.model_dir / "items.json").read_text())][: args.items]
    rows, reference = [], None
    for device in args.devices.split(","):
        vectors, row = encode_all(args.model_dir, device, texts, args.repeats)
        reference = vectors if reference is None else reference
        row["max_abs_diff_from_first"] = float(np.abs(vectors - reference).max())
        rows.append(row)
        print(f"encoder-bench: {device} {row['providers'][0]}: {row['items_per_s']:,.0f} items/s", flush=True)
    result = {
        "meta": {
            "created": utc_stamp(datetime.now(UTC)),
            "machine": machine_info(),
            "command": "python -m loadtests.encoder_bench " + " ".join(argv),
            "timing": f"median of {args.repeats} passes over the catalog's texts, after one warm-up pass",
        },
        "results": rows,
    }
    out = args.out or default_out_dir("encoder-bench", datetime.now(UTC))
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_bench.json").write_text(json.dumps(result, indent=2))
    (out / "encoder_bench.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| device | provider | items | items/s | median s per pass | max \\|Δ\\| from the first row |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['device']} | {r['providers'][0]} | {r['items']} | {r['items_per_s']:,.0f} | "
            f"{r['median_s']:.3f} | {r['max_abs_diff_from_first']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("encoder-bench", run, argv)


if __name__ == "__main__":
    sys.exit(main())
