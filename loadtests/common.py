"""Small helpers shared by the benchmark tools: the progress log and comma-separated list options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
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
