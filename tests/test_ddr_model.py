"""hp_ddr_model: config and image helpers (pure Python), then the model in
Verilator against cocotbext-axi's AxiMaster (sim/tb_ddr_model.py).

The four-port throughput tests (cap, shared HP1/HP2 port, latency-bound
single outstanding read) drive the model with our read masters and live in
tests/test_axi.py next to the other DdrReadBench runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sim.ddr import KV260, DdrModelConfig, image_lines, read_dump, write_image
from sw.contract.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_kv260_defaults_and_describe():
    d = KV260.describe()
    assert d["cap_gbytes_per_second"] == 16.0 and d["cap_bytes_per_cycle"] == 64
    assert d["ports"] == 4 and d["port_width_bits"] == 128 and d["max_burst_beats"] == 16
    assert d["read_latency_ns"] == 120.0 and d["outstanding_per_port"] == 8
    assert d["model"].startswith("hp_ddr_model (modeled")
    assert "16 GB/s" in KV260.describe_text() and "modeled" in KV260.describe_text()
    json.dumps(d)
    assert KV260.peak_bytes_per_cycle == 64
    assert KV260.replace(shared_hp12=True).peak_bytes_per_cycle == 48
    assert KV260.replace(cap_bytes_per_cycle=40).peak_bytes_per_cycle == 40
    # Little's law: 1 outstanding 16-beat burst over 30 cycles of latency
    assert KV260.replace(outstanding=1).latency_bound_bytes_per_cycle() == pytest.approx(256 / 46)
    assert KV260.latency_bound_bytes_per_cycle() == 16


def test_config_roundtrip_and_checks():
    cfg = KV260.replace(ports=2, cap_bytes_per_cycle=12.5, slverr_window=(0x1000, 0x2000))
    again = DdrModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert cfg.cap_q == 200
    for bad in [dict(ports=0), dict(mem_bytes=3 << 20), dict(outstanding=17), dict(cap_bytes_per_cycle=0),
                dict(gap_rate=1.0), dict(decerr_window=(5, 4)), dict(mem_base=0x1000)]:
        with pytest.raises(ConfigError):
            KV260.replace(**bad)
    with pytest.raises(ConfigError):
        DdrModelConfig.from_json('{"portz": 3}')
    p = cfg.verilog_parameters()
    assert p["CAP_Q"] == 200 and p["PORTS"] == 2 and p["MEM_WORDS_LOG2"] == 22


def test_image_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 100, dtype=np.uint8)
    lines = image_lines([(0x20, a)], KV260)
    assert lines[0] == "@2" and len(lines) == 1 + 7
    # little-endian words, most significant byte printed first
    assert lines[1] == a[:16][::-1].tobytes().hex()
    path = write_image(tmp_path / "img.hex", [(0x20, a)], KV260)
    back = read_dump(path, cfg=KV260)
    assert back[:100] == a.tobytes() and back[100:] == bytes(12)
    with pytest.raises(ConfigError):
        image_lines([(0x21, a)], KV260)
    with pytest.raises(ConfigError):
        image_lines([(0x0, a), (0x40, a)], KV260)
    with pytest.raises(ConfigError):
        image_lines([(KV260.mem_bytes - 16, a)], KV260)


# ---------------------------------------------------------------------------
# Verilator + cocotbext-axi
# ---------------------------------------------------------------------------

MODEL_TESTS = ["read_write_exact", "image_load_and_dump", "error_windows", "latency_is_as_set",
               "cap_limits_one_port", "protocol_errors_are_flagged"]


@pytest.mark.sim
@pytest.mark.parametrize("name", MODEL_TESTS)
def test_model_against_axi_master(name, tmp_path):
    from sim.axi_tops import ddr_wrapper_sources, run_top
    cfg = KV260.replace(ports=1, mem_bytes=16 << 20)
    sources, build = ddr_wrapper_sources(cfg)
    run_top(sources=sources, build_name=build, toplevel="ddr_top", test_module="tb_ddr_model",
            test_filter=f"{name}$", extra_env={"DDR_CONFIG": cfg.to_json(), "DDR_WORKDIR": str(tmp_path)})


@pytest.mark.sim
def test_plusarg_init_and_final_dump(tmp_path):
    """+ddr_init loads an image at time 0 and +ddr_dump writes a region at $finish (no testbench help)."""
    from cocotb_tools.runner import get_runner

    from sim.axi_tops import _build_lock, ddr_wrapper_sources
    from sim.runner import BUILD_ROOT, VERILATOR_BUILD_ARGS, _check_results
    from sim.toolchain import setup_simulator

    cfg = KV260.replace(ports=1, mem_bytes=16 << 20)
    a = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    write_image(tmp_path / "init.hex", [(0x1000, a)], cfg)
    sources, build = ddr_wrapper_sources(cfg)
    setup_simulator("verilator")
    runner = get_runner("verilator")
    build_dir = BUILD_ROOT / f"{build}-verilator"
    with _build_lock(build):
        runner.build(sources=[str(s) for s in sources], hdl_toplevel="ddr_top", build_dir=str(build_dir),
                     build_args=list(VERILATOR_BUILD_ARGS), always=False, timescale=("1ns", "1ps"))
        results = runner.test(hdl_toplevel="ddr_top", test_module="tb_ddr_model", build_dir=str(build_dir),
                              test_dir=str(REPO / "sim"), test_filter="idle_for_plusargs$",
                              plusargs=[f"+ddr_init={tmp_path / 'init.hex'}", f"+ddr_dump={tmp_path / 'out.hex'}",
                                        "+ddr_dump_lo=100", "+ddr_dump_hi=1ff"],
                              results_xml=str(tmp_path / "results.xml"))
    _check_results(Path(results))
    assert read_dump(tmp_path / "out.hex", cfg=cfg) == a.tobytes()
