"""`kriallm --help` explains itself: every option of every subcommand has help text, and a
value option's default is visible in it (docs: README "What you can do").

The test walks the real parser of sw.cli (every subparser, every action) and the parsers of
the scripts that share its options. Hidden options (help=SUPPRESS) must be on HIDDEN: internal
test hooks and deprecated spellings only.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from sw.cli import build_parser

REPO = Path(__file__).resolve().parent.parent

# (command path, option): hidden on purpose.
HIDDEN = {
    ("generate", "--sysfs-root"), ("generate", "--dev-root"),       # the kv260 backend's test roots
    ("bench", "--sysfs-root"), ("bench", "--dev-root"),
    ("generate", "--firmware-root"), ("bench", "--firmware-root"),   # where apps' manifests live (tests)
    ("synth-model", "--preset"),                                     # deprecated: --model-preset
    ("quantize", "--tile-rows"),                                     # deprecated: --hw-config
    ("bench-engine", "--preset"),                                    # deprecated: --hw-config
    *((cmd, opt) for cmd in ("elaborate", "resources", "build")     # deprecated: --hw-config
      for opt in ("--preset", "--config")),
}
SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the parser and every subparser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def shown_forms(default) -> set[str]:
    forms = {str(default)}
    if isinstance(default, (list, tuple)):
        forms.add(",".join(map(str, default)))
    return forms


def problems(parser: argparse.ArgumentParser) -> tuple[list[str], int]:
    """Every action without help, every default the help does not show, every unlisted hidden
    option; and the number of actions looked at."""
    bad, seen = [], 0
    for path, p in walk(parser):
        cmd = " ".join(path) or "(top)"
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                bad += [f"{cmd} {c.dest}: subcommand without help" for c in a._choices_actions if not c.help]
            if isinstance(a, SKIP):
                continue
            seen += 1
            name = a.option_strings[-1] if a.option_strings else a.metavar or a.dest
            if a.help == argparse.SUPPRESS:
                if not any((" ".join(path), o) in HIDDEN for o in a.option_strings):
                    bad.append(f"{cmd} {name}: hidden (help=SUPPRESS) but not on the HIDDEN list")
                continue
            if not a.help or not a.help.strip():
                bad.append(f"{cmd} {name}: no help text")
                continue
            takes_value = a.nargs != 0          # flags (store_true & co.) default to their absence
            if takes_value and a.default is not None and a.default is not argparse.SUPPRESS:
                text = fmt._expand_help(a)
                if "default" not in text.lower() or not any(f in text for f in shown_forms(a.default)):
                    bad.append(f"{cmd} {name}: default {a.default!r} not shown in {text!r}")
    return bad, seen


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_help_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_kriallm_option_has_help_with_its_default():
    bad, seen = problems(build_parser())
    assert not bad, f"{len(bad)} option(s) of kriallm do not explain themselves:\n  " + "\n  ".join(bad)
    assert seen > 100                        # the walk reached every subcommand's options


def test_every_subcommand_is_walked():
    cmds = {path[0] for path, _ in walk(build_parser()) if path}
    assert {"synth-model", "quantize", "generate", "bench", "bench-engine", "eval", "info", "elaborate",
            "resources", "build"} <= cmds


@pytest.mark.parametrize("parser", ["bench_board", "sim.bench"])
def test_script_options_have_help_with_their_default(parser):
    if parser == "sim.bench":
        from sim.bench import add_bench_args
        p = argparse.ArgumentParser()             # `python -m sim.bench`: the plain formatter
        add_bench_args(p)
        hidden = {"--preset"}                      # deprecated: --hw-config
    else:
        p = load_script("bench_board").build_parser()
        hidden = {"--sysfs-root", "--dev-root", "--firmware-root"}    # the kv260 backend's test roots
    bad, _ = problems(p)
    bad = [b for b in bad if not any(f" {h}: hidden" in b for h in hidden)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_missing_help_and_a_hidden_default():
    """The check itself: a parser with the two faults is reported, a clean one is not."""
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    s = sub.add_parser("x", help="x")
    s.add_argument("--a", type=int, default=3)
    s.add_argument("--b", type=int, default=7, help="something")
    s.add_argument("--c", type=int, default=7, help="something (default: %(default)s)")
    s.add_argument("--d", action="store_true", help="a flag")
    bad, seen = problems(p)
    assert seen == 4
    assert len(bad) == 2 and "x --a: no help text" in bad[0] and "x --b: default 7 not shown" in bad[1]
