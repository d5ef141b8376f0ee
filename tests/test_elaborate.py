"""Elaboration: the one accelerator top's Verilog + manifest, the CLI, and Verilator -Wall lint with the waivers.

`kriallm elaborate` and `kriallm build` build the same top (rtl.top.build_top) and write one manifest
schema: checked here by running both as a user would, in a subprocess. The default set uses a small
preset (seconds); the kv260 preset itself is ``slow``. Expected values come from the config and the
top's Amaranth signature, never copied.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from boards.elaborate import (DEFAULT_HW_CONFIG, LINT_WAIVERS, MANIFEST_KEYS, MANIFEST_SCHEMA, add_elaborate_args,
                              config_from_args, elaborate, lint_verilog, step)
from sw.contract.commands import CSR_ADDR_WIDTH, DEFAULT_ADDR_BITS
from sw.contract.config import ArrayConfig, preset

pytestmark = pytest.mark.synth

REPO = Path(__file__).resolve().parent.parent
SMALL_NAME = "test-4x4-g32"          # a preset the accelerator top takes, elaborated in seconds
DTC = shutil.which("dtc")


def signature_ports(config: ArrayConfig) -> dict[str, tuple[str, int]]:
    """Verilog port name -> (direction, width), from the Amaranth signature of rtl.top.build_top's top."""
    from amaranth.hdl import Shape
    from amaranth.lib import wiring

    from rtl.top import build_top
    top = build_top(config)
    ports = {"clk": ("input", 1), "rst": ("input", 1)}
    for path, member, _ in top.signature.flatten(top):
        ports["__".join(map(str, path))] = ("input" if member.flow == wiring.In else "output",
                                            Shape.cast(member.shape).width)
    return ports


def verilog_ports(text: str, module: str) -> dict[str, tuple[str, int]]:
    """The port list of `module` in Amaranth-generated Verilog: name -> (direction, width)."""
    m = re.search(rf"^module {re.escape(module)}\((.*?)\);(.*?)^endmodule", text, re.S | re.M)
    assert m, f"no module {module}"
    names = [n.strip() for n in m.group(1).replace("\n", " ").split(",") if n.strip()]
    decl = {d.group(3): (d.group(1), int(d.group(2)) + 1 if d.group(2) else 1)
            for d in re.finditer(r"^\s*(input|output)\s+(?:\[(\d+):0\]\s+)?(\w+)\s*;", m.group(2), re.M)}
    assert sorted(names) == sorted(decl), set(names) ^ set(decl)
    return decl


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    cfg = preset(SMALL_NAME).replace(engines=2)
    out = tmp_path_factory.mktemp("elab")
    return cfg, out, elaborate(cfg, out, preset_name=f"{SMALL_NAME}+2engines")


def test_manifest_describes_the_verilog(small_build):
    cfg, out, m = small_build
    text = (out / "kriallm_top.v").read_text()
    assert text.count("module kriallm_top(") == 1
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m and tuple(m) == MANIFEST_KEYS and m["schema"] == MANIFEST_SCHEMA
    assert ArrayConfig.from_dict(m["config"]) == cfg and m["config_hash"] == cfg.config_hash
    # The real top: the Verilog ports are the signature's, and the manifest lists them.
    want = signature_ports(cfg)
    assert verilog_ports(text, "kriallm_top") == want
    assert {p["name"]: (p["direction"], p["width"]) for p in m["top"]["ports"]} == want
    assert m["top"]["class"] == "rtl.top.Accelerator" and m["top"]["module"] == "kriallm_top"
    assert want["csr__awaddr"] == ("input", CSR_ADDR_WIDTH) and want["irq"] == ("output", 1)
    for e in range(cfg.engines):
        assert want[f"hp{e}__rdata"] == ("input", cfg.port_bits)
        assert want[f"hp{e}__araddr"] == ("output", DEFAULT_ADDR_BITS)
    assert f"hp{cfg.engines}__rdata" not in want
    assert m["top"]["parameters"]["config_hash"] == cfg.config_hash
    assert m["top"]["parameters"]["addr_width"] == DEFAULT_ADDR_BITS
    assert m["latency"]["array"] == cfg.array_latency
    assert m["tools"]["amaranth"] == "0.5.10" and m["kriallm_version"]
    assert m["derived"]["acc_width"] == cfg.acc_width
    assert m["files"] == [{"path": "kriallm_top.v", "bytes": len(text.encode()), "sha256": m["files"][0]["sha256"]}]
    assert m["exit_status"] == 0 and step(m, "lint")["status"] == "skipped"
    # The board's keys are the build's; elaborate leaves them empty.
    assert m["board"] is None and m["board_facts"] is None and m["command"] == "elaborate"


def _waived_rules(text: str) -> list[str]:
    return sorted(re.findall(r"^lint_off -rule (\w+)", text, re.M))


@pytest.mark.sim
def test_lint_clean_with_documented_waivers(small_build):
    """The top elaborate writes lints clean with boards/lint.vlt, whose rules are those the board build
    waives for the same top (boards/kv260.py, Kv260Design.lint_waivers)."""
    from boards import kv260
    from rtl.top import build_top
    cfg, out, _ = small_build
    rep = lint_verilog(out / "kriallm_top.v")
    assert rep["clean"], rep["messages"]
    design = kv260.Kv260Design(cfg, kv260.TopPorts.from_component(build_top(cfg), cfg), "kriallm-lint")
    assert _waived_rules(LINT_WAIVERS.read_text()) == _waived_rules(design.lint_waivers())


@pytest.mark.sim
def test_lint_still_catches_other_warnings(tmp_path):
    """The waivers are specific rules, not a blanket: a real defect still fails."""
    bad = tmp_path / "kriallm_top.v"
    bad.write_text("module kriallm_top(input clk, input [1:0] s, output reg y);\n"
                   "  always @* case (s) 2'd0: y = 1'b0; 2'd1: y = 1'b1; endcase\n"   # latch, incomplete case
                   "endmodule\n")
    rep = lint_verilog(bad)
    assert not rep["clean"] and rep["message_count"] > 0


@pytest.mark.slow
@pytest.mark.sim
def test_kv260_elaborates_and_lints(tmp_path):
    cfg = preset("kv260")
    m = elaborate(cfg, tmp_path, preset_name="kv260", lint=True)
    lint = step(m, "lint")
    assert lint["clean"], lint["messages"]
    assert {p["name"] for p in m["top"]["ports"] if re.fullmatch(r"hp\d+__rdata", p["name"])} == \
        {f"hp{e}__rdata" for e in range(cfg.engines)}


# ---------------------------------------------------------------------------
# --hw-config PRESET|FILE
# ---------------------------------------------------------------------------

def test_hw_config_option(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_elaborate_args(p)
    a = p.parse_args(["--out", str(tmp_path)])
    assert config_from_args(a) == (preset(DEFAULT_HW_CONFIG), DEFAULT_HW_CONFIG) and not a.lint
    assert f"(default: {DEFAULT_HW_CONFIG})" in " ".join(p.format_help().split())
    assert "--preset" not in p.format_help() and "--config" not in p.format_help()
    a = p.parse_args(["--hw-config", SMALL_NAME, "--out", "d"])
    assert config_from_args(a) == (preset(SMALL_NAME), SMALL_NAME)
    assert capsys.readouterr().err == ""
    # The deprecated spelling still works, with a one-line note.
    a = p.parse_args(["--preset", SMALL_NAME, "--out", "d"])
    assert config_from_args(a) == (preset(SMALL_NAME), SMALL_NAME)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--preset is deprecated" in err and "--hw-config" in err
    with pytest.raises(SystemExit):
        p.parse_args(["--preset", "kv260", "--hw-config", "x.json", "--out", "d"])
    # A file: an ArrayConfig JSON or a manifest.json.
    cfg = preset(SMALL_NAME).replace(engines=2)
    f = tmp_path / "c.json"
    f.write_text(cfg.to_json())
    assert config_from_args(p.parse_args(["--hw-config", str(f), "--out", "d"])) == (cfg, None)
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps({"schema": MANIFEST_SCHEMA, "config": cfg.to_dict(), "config_hash": cfg.config_hash}))
    assert config_from_args(p.parse_args(["--hw-config", str(man), "--out", "d"])) == (cfg, None)


def test_cli_script_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": 32, "cols": 1, "tokens": 1, "acc_bits": 10}))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "elaborate.py"), "--hw-config", str(bad),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "too narrow" in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "elaborate.py"), "--hw-config", "no-such-preset",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "neither a preset" in r.stderr


# ---------------------------------------------------------------------------
# elaborate and build: one top, one manifest schema (run as a user runs them)
# ---------------------------------------------------------------------------

def kriallm(*argv, cwd: Path) -> subprocess.CompletedProcess:
    """`kriallm ARGS` (the console script is sw.cli:main) on this checkout, without Vivado."""
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "vivado").exists()]
    env = dict(os.environ, PATH=os.pathsep.join(path),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "sw.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=1800)


@pytest.mark.skipif(DTC is None, reason="dtc not installed (apt-get install device-tree-compiler)")
@pytest.mark.parametrize("name", [SMALL_NAME, pytest.param("kv260", marks=pytest.mark.slow)])
def test_elaborate_writes_the_top_build_uses(tmp_path, name):
    cfg = preset(name)
    r = kriallm("elaborate", "--hw-config", name, "--out", "elab", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = kriallm("build", "--board", "kv260", "--hw-config", name, "--out", "board", "--no-lint", "--generate-only",
                cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr          # generated; the Vivado steps are left to do
    e = json.loads((tmp_path / "elab" / "manifest.json").read_text())
    b = json.loads((tmp_path / "board" / "manifest.json").read_text())
    # One schema: the same keys, schema id, config and hash, top class and parameters.
    assert list(e) == list(b) == list(MANIFEST_KEYS)
    assert e["schema"] == b["schema"] == MANIFEST_SCHEMA
    assert e["config"] == b["config"] == cfg.to_dict() and e["config_hash"] == b["config_hash"] == cfg.config_hash
    assert list(e["top"]) == list(b["top"])
    assert e["top"]["class"] == b["top"]["class"] and e["top"]["parameters"] == b["top"]["parameters"]
    assert e["top"]["ports"] == b["top"]["ports"]
    assert (e["command"], b["command"]) == ("elaborate", "build") and e["preset"] == b["preset"] == name
    # One top: the Verilog modules have the same ports, the signature's, csr and hp0..hp{E-1} among them.
    want = signature_ports(cfg)
    elab_v = (tmp_path / "elab" / e["files"][0]["path"]).read_text()
    board_v = (tmp_path / "board" / "hw" / f"{b['design']}.v").read_text()
    assert verilog_ports(elab_v, e["top"]["module"]) == verilog_ports(board_v, b["top"]["module"]) == want
    assert {"csr__awaddr", "irq"} | {f"hp{k}__araddr" for k in range(cfg.engines)} <= set(want)
    # The deprecated spelling builds the same.
    r = kriallm("elaborate", "--preset", name, "--out", "old", cwd=tmp_path)
    assert r.returncode == 0 and "--preset is deprecated" in r.stderr
    assert (tmp_path / "old" / "kriallm_top.v").read_text() == elab_v
