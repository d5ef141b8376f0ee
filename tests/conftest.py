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


# ---------------------------------------------------------------------------
# The tiny synthetic model, made once per pytest process and shared by the modules
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_tensors() -> dict:
    """sw.synth.synthesize(tiny, seed=0): float32 tensors by HF name. Read-only, since every module
    shares them: a quantizer or runner that wrote into its input would fail here."""
    from sw.config import preset
    from sw.synth import synthesize
    tensors = synthesize(preset("tiny"), seed=0)
    for value in tensors.values():
        value.setflags(write=False)
    return tensors


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny model (seed 0) as an HF checkpoint directory (BF16 safetensors), as
    `kriallm synth-model --model-preset tiny --seed 0` writes it. Read it, do not write into it."""
    from sw.synth import write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("shared") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def make_tiny_kq(tiny_checkpoint, tmp_path_factory):
    """make_tiny_kq(lm_head="int4") -> tiny-<lm_head>.kq: `kriallm quantize --method rtn --group-size 64`
    of tiny_checkpoint, made on first use."""
    from sw.cli import main
    made: dict[str, Path] = {}

    def make(lm_head: str = "int4") -> Path:
        if lm_head not in made:
            out = tmp_path_factory.mktemp(f"kq-{lm_head}") / f"tiny-{lm_head}.kq"
            assert main(["quantize", str(tiny_checkpoint), "--method", "rtn", "--group-size", "64",
                         "--lm-head", lm_head, "--quiet", "--out", str(out)]) == 0
            made[lm_head] = out
        return made[lm_head]
    return make


@pytest.fixture(scope="session")
def full_kq(tmp_path_factory) -> Path:
    """The full-size synthetic Qwen2.5-0.5B (seed 0), RTN INT4 g64 with an INT4 LM head, for the slow
    simulations: made here (a few minutes) unless KRIALLM_FULL_KQ names one."""
    import os
    given = os.environ.get("KRIALLM_FULL_KQ")
    if given:
        return Path(given)
    from sw.cli import main
    d = tmp_path_factory.mktemp("full")
    assert main(["synth-model", "--model-preset", "qwen2.5-0.5b", "--seed", "0", "--out", str(d / "ckpt")]) == 0
    kq = d / "q05.kq"
    assert main(["quantize", str(d / "ckpt"), "--method", "rtn", "--group-size", "64", "--lm-head", "int4",
                 "--quiet", "--out", str(kq)]) == 0
    return kq


# ---------------------------------------------------------------------------
# Amaranth
# ---------------------------------------------------------------------------

@pytest.fixture
def collect_unelaborated():
    """For tests that build components only to read their facts: collect them quietly afterwards
    (use with the filterwarnings mark for UnusedElaboratable)."""
    yield
    import gc
    import warnings

    from amaranth.hdl._ir import UnusedElaboratable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        gc.collect()
