"""sim/bench.py: the engine-level benchmark (`kriallm bench --preset kv260 --model-preset qwen2.5-0.5b`).

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


def test_bench_args_coexist_with_the_device_bench_parser():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--json", action="store_true")
    add_bench_args(p)          # must not clash with the existing --json
    a = p.parse_args(["--preset", "kv260", "--model-preset", "qwen2.5-0.5b", "--layers", "1", "--json"])
    assert (a.preset, a.model_preset, a.layers, a.json, a.lm_head_rows, a.tokens) == \
        ("kv260", "qwen2.5-0.5b", 1, True, 4096, 1)


def test_bench_tiny_model_on_the_reduced_kv260(tmp_path, capsys):
    args = _args(tmp_path, config=LITE, preset="kv260-lite", model_preset="tiny", lm_head_rows=4096)
    rep = bench_report(args)
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
    args = _args(tmp_path, preset="kv260", model_preset="qwen2.5-0.5b")
    rep = bench_report(args)
    print_table(rep)
    print(capsys.readouterr().out)
    assert rep["verified_bit_exact"] is True
    assert rep["acceptance"]["utilization_min"] >= ACCEPT_UTILIZATION
    assert rep["per_token"]["ratio_to_roofline"] <= ACCEPT_ROOFLINE_RATIO
    assert rep["acceptance"]["passed"]
    assert rep["simulation"]["layer_linears_wall_s"] < 120
