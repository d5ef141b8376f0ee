"""Command-line helpers: argument types that check a number when it is parsed (finite, in range),
and the one-line-error main of the `python -m ...` entry points.

`--timeout nan` would poll forever and `--temperature nan` would sample garbage; with these, argparse
refuses them in one line (exit status 2) before any work starts.
"""

from __future__ import annotations

import argparse
import math
import sys


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


class HelpFormatter(argparse.HelpFormatter):
    """Shows a value option's default: appends "(default: X)" unless the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.nargs != 0 and action.default is not None and action.default is not argparse.SUPPRESS
                and (action.option_strings or action.nargs in ("?", "*")) and "default" not in text.lower()):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, defaults in the help, and old spellings that still work.

    renamed: {old option: new option}; an old spelling is rewritten to the new one with a note on
    stderr (the old spelling is not in the help). moved: {option: sentence}; the option is refused
    with that sentence and exit status 2 before anything else is parsed.
    """

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)
        self.renamed: dict[str, str] = {}
        self.moved: dict[str, str] = {}

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and (self.renamed or self.moved):
            args = list(args)
            for i, arg in enumerate(args):
                if arg == "--":
                    break
                opt, eq, value = arg.partition("=")
                if opt in self.moved:
                    self.exit(2, f"{self.prog}: error: {self.moved[opt]}\n")
                if opt in self.renamed:
                    print(f"{self.prog}: note: {opt} is deprecated; use {self.renamed[opt]}", file=sys.stderr)
                    args[i] = self.renamed[opt] + eq + value
        return super().parse_known_args(args, namespace)


class DeprecatedOption(argparse.Action):
    """A hidden old option kept for scripts: stores its value and says what replaces it."""

    def __init__(self, option_strings, dest, use: str = "", **kw):
        self.use = use
        kw["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated; use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def run_cli(prog: str, description: str, add_args, run, argv: list[str] | None = None) -> int:
    """`python -m X` / scripts: parse, run, and print the project's errors as one line (exit status 2)."""
    from .contract.errors import KriaError
    parser = Parser(prog=prog, description=description)
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KriaError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
