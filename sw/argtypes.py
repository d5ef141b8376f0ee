"""Argument types that check a number when the command line is parsed: finite, in range.

`--timeout nan` would poll forever and `--temperature nan` would sample garbage; with these, argparse
refuses them in one line (exit status 2) before any work starts.
"""

from __future__ import annotations

import argparse
import math


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def int_range(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound). Accepts 0x... too."""
    def parse(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            where = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
            raise argparse.ArgumentTypeError(f"expected an integer {where}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def float_range(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in [lo, hi] (or with open ends)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
            left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
            raise argparse.ArgumentTypeError(f"expected a number in {left}{_fmt(lo)}, {_fmt(hi)}{right}, got {_fmt(v)}")
        return v
    parse.__name__ = "number"
    return parse
