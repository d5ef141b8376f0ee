"""Fixtures shared by the test modules, and the tool hiding of the fast tier.

Tiers (markers in pyproject.toml; `make test` runs the first two, `make test-slow` the third):

* fast: no marker. Pure Python: NumPy, the golden model, Amaranth's own simulator.
  `make test-fast` runs it with KRIALLM_HIDE_TOOLS=sim,synth (tests/hide_tools), so a test
  there that reaches for Verilator, cocotb or Yosys fails instead of quietly needing them.
* sim / synth: needs Verilator and cocotb / needs Yosys.
* slow: full-size shapes and long simulations.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

HIDE_TOOLS_DIR = Path(__file__).resolve().parent / "hide_tools"


def _hide_tools() -> list[str]:
    """Honour KRIALLM_HIDE_TOOLS here and in every process the tests start."""
    spec = importlib.util.spec_from_file_location("kriallm_hide_tools", HIDE_TOOLS_DIR / "sitecustomize.py")
    hide = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hide)               # blocks the modules in this process
    kinds = hide.hidden_kinds()
    if kinds and "KRIALLM_HIDDEN_TOOLS_BIN" not in os.environ:     # once: pytest-xdist workers inherit it
        stubs = tempfile.mkdtemp(prefix="kriallm-hidden-tools-")
        atexit.register(shutil.rmtree, stubs, True)
        hide.write_program_stubs(stubs, kinds)
        os.environ["KRIALLM_HIDDEN_TOOLS_BIN"] = stubs
        os.environ["PATH"] = stubs + os.pathsep + os.environ.get("PATH", "")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(HIDE_TOOLS_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return kinds


HIDDEN_TOOLS = _hide_tools()


def pytest_report_header(config):
    if HIDDEN_TOOLS:
        return f"hidden tools (KRIALLM_HIDE_TOOLS): {', '.join(HIDDEN_TOOLS)}"
