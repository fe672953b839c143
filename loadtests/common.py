"""Small helpers shared by the benchmark tools: the progress log, comma-separated lists and ``main``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

Number = TypeVar("Number", int, float)


def log(message: str) -> None:
    """A ``clickrank bench`` progress line on stderr (stdout may be piped)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _positive_list(text: str, cast: Callable[[str], Number], noun: str) -> list[Number]:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {noun}, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive {noun}, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    """Argument type: ``"50,100,200"`` → ``[50.0, 100.0, 200.0]``, every value positive."""
    return _positive_list(text, float, "numbers")


def int_list(text: str) -> list[int]:
    """Argument type: ``"1,8,32"`` → ``[1, 8, 32]``, every value a positive integer."""
    return _positive_list(text, int, "integers")


def run_main(tool: str, run: Callable[[Sequence[str]], object], argv: Sequence[str] | None) -> int:
    """A benchmark tool's ``main``: ``run`` on the arguments; a bad option or file is one line on stderr
    and status 2, not a traceback."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError) as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 2
    return 0
