"""Elaboration: Verilog + manifest, the CLI wrapper, and Verilator -Wall lint with the waivers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sw.contract.config import ArrayConfig, preset
from boards.elaborate import LINT_WAIVERS, add_elaborate_args, elaborate, lint_verilog

pytestmark = pytest.mark.synth

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    cfg = dataclasses.replace(preset("test-4x4-g32"), engines=2).validate()
    out = tmp_path_factory.mktemp("elab")
    return cfg, out, elaborate(cfg, out, preset_name="test-4x4-g32+2engines")


def test_manifest_describes_the_verilog(small_build):
    from rtl.core import core_beat_layout
    cfg, out, m = small_build
    assert (out / "kriallm_top.v").read_text().count("module kriallm_top(") == 1
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    assert ArrayConfig.from_dict(m["config"]) == cfg and m["config_hash"] == cfg.config_hash
    ports = {p["name"]: p for p in m["ports"]}
    assert ports["clk"]["direction"] == "input" and ports["rst"]["direction"] == "input"
    for e in range(2):
        beats = ports[f"e{e}_beats__payload"]
        assert beats["direction"] == "input" and beats["width"] == core_beat_layout(cfg).size
        assert beats["fields"]["w"] == {"offset": 0, "count": 16, "elem_bits": 4, "signed": False}
        assert beats["fields"]["a"]["signed"] and beats["fields"]["a"]["count"] == 8
        assert ports[f"e{e}_y__valid"]["direction"] == "output"
        assert ports[f"e{e}_y__ready"]["direction"] == "input"
        assert ports[f"e{e}_y__payload"]["width"] == 32 * cfg.tokens * cfg.rows
    assert m["latency"]["array"] == cfg.array_latency
    assert m["latency"]["core"] == m["latency"]["array"] + m["latency"]["dequant"]
    assert m["tools"]["amaranth"] == "0.5.10" and m["kriallm_version"]
    assert m["derived"]["acc_width"] == cfg.acc_width


@pytest.mark.sim
def test_lint_clean_with_documented_waivers(small_build):
    cfg, out, _ = small_build
    rep = lint_verilog(out / "kriallm_top.v")
    assert rep["clean"], rep["messages"]
    rules = [line.split()[2] for line in LINT_WAIVERS.read_text().splitlines() if line.startswith("lint_off")]
    assert sorted(rules) == ["DECLFILENAME", "PROCASSINIT", "UNUSEDSIGNAL", "WIDTHEXPAND", "WIDTHTRUNC"]


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
    m = elaborate(preset("kv260"), tmp_path, preset_name="kv260", lint=True)
    assert m["lint"]["clean"], m["lint"]["messages"]
    assert len([p for p in m["ports"] if p["name"].endswith("_beats__payload")]) == 4


def test_cli_args_and_script(tmp_path):
    p = argparse.ArgumentParser()
    add_elaborate_args(p)
    a = p.parse_args(["--preset", "kv260", "--out", str(tmp_path)])
    assert a.preset == "kv260" and not a.lint
    with pytest.raises(SystemExit):
        p.parse_args(["--preset", "kv260", "--config", "x.json", "--out", "d"])

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": 32, "cols": 1, "tokens": 1, "acc_bits": 10}))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "elaborate.py"), "--config", str(bad),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "too narrow" in r.stderr

    good = tmp_path / "good.json"
    good.write_text(preset("test-4x4-g32").to_json())
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "elaborate.py"), "--config", str(good),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["config_hash"] == \
        preset("test-4x4-g32").config_hash
