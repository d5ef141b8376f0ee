"""sim/bench.py: the engine-level benchmark (`kriallm bench-engine --hw-config kv260 --model-preset qwen2.5-0.5b`).

The fast test runs the whole bench path (build, one command list, bit-exact
check, report, table, chart) on the reduced kv260 of tests/test_top.py (two
engines, two token lanes; the same Verilator build) with the `tiny` model's
shapes. The slow test is the real one: kv260, Qwen2.5-0.5B, and the issue's
acceptance numbers.
"""

from __future__ import annotations

import argparse
import json

import pytest

from sim.bench import ACCEPT_ROOFLINE_RATIO, ACCEPT_UTILIZATION, add_bench_args, bench_report, print_table
from tests.test_top import LITE

pytestmark = pytest.mark.sim


def _args(tmp_path, **kw):
    p = add_bench_args(argparse.ArgumentParser())
    args = p.parse_args(["--out", str(tmp_path / "bench")])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_bench_args_take_the_hw_config_and_the_old_preset_spelling(capsys):
    p = add_bench_args(argparse.ArgumentParser(prog="python -m sim.bench"))
    a = p.parse_args(["--hw-config", "kv260", "--model-preset", "qwen2.5-0.5b", "--layers", "1", "--json"])
    assert (a.hw_config, a.model_preset, a.layers, a.json, a.lm_head_rows, a.tokens) == \
        ("kv260", "qwen2.5-0.5b", 1, True, 4096, 1)
    assert p.parse_args([]).hw_config == "kv260"
    capsys.readouterr()
    assert p.parse_args(["--preset", "kv260-nopack"]).hw_config == "kv260-nopack"
    assert capsys.readouterr().err.strip() == "python -m sim.bench: note: --preset is deprecated; use --hw-config"


def test_bench_tiny_model_on_the_reduced_kv260(tmp_path, capsys, monkeypatch):
    # run from elsewhere with a relative --out, as a user would: it used to resolve from the simulator's
    # build directory and fail; nothing may land in the source tree
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    before = {p.name for p in repo.iterdir()}
    monkeypatch.chdir(tmp_path)
    args = _args(tmp_path, config=LITE, hw_config="kv260-lite", model_preset="tiny", lm_head_rows=4096)
    args.out = Path("bench")
    rep = bench_report(args)
    assert {p.name for p in repo.iterdir()} == before
    assert rep["verified_bit_exact"] is True
    names = [p["name"] for p in rep["linears"]]
    assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head_slice"]
    assert rep["linears"][-1]["n"] == 512                     # the tiny vocabulary, whole
    for p in rep["linears"]:
        assert p["cycles"] > 0 and 0 < p["utilization"] < 1.2
        assert p["cap_bytes_per_cycle"] == 64.0
    pt = rep["per_token"]
    assert pt["kind"] == "modeled" and pt["layers"] == 2 and pt["ratio_to_roofline"] > 1.0
    assert rep["ddr_model"]["read_latency_cycles"] == 30 and "modeled" in rep["ddr_model"]["model"]
    assert rep["simulation"]["sim_cycles_per_s"] > 0
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["per_token"] == pt
    assert (tmp_path / "bench" / "utilization.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print_table(rep)
    out = capsys.readouterr().out
    assert "modeled DDR: 2 x 128-bit HP ports" in out and "roofline" in out and "cycles/s" in out


@pytest.mark.slow
def test_bench_kv260_qwen_acceptance(tmp_path, capsys):
    """The issue's acceptance: every linear >= 90 % of the modeled bandwidth, linears + LM head per
    token <= 1.15x the roofline, one layer's linears simulated in < 2 minutes."""
    args = _args(tmp_path, hw_config="kv260", model_preset="qwen2.5-0.5b")
    rep = bench_report(args)
    print_table(rep)
    print(capsys.readouterr().out)
    assert rep["verified_bit_exact"] is True
    assert rep["acceptance"]["utilization_min"] >= ACCEPT_UTILIZATION
    assert rep["per_token"]["ratio_to_roofline"] <= ACCEPT_ROOFLINE_RATIO
    assert rep["acceptance"]["passed"]
    assert rep["simulation"]["layer_linears_wall_s"] < 120
