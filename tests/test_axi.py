"""rtl/axi.py: signatures and burst splitting in Python, then the masters in
cocotb + Verilator against cocotbext-axi's AxiRam (a third-party slave) and
against our hp_ddr_model (exact data, errors, throughput under the cap).
"""

from __future__ import annotations

import json
import re

import pytest

from amaranth.back import verilog
from amaranth.hdl import Shape

from rtl.axi import (AXI_PAGE_BYTES, AxiReadMaster, AxiWriteMaster, axi4_read_signature, axi4_signature,
                     split_bursts)
from sim.ddr import KV260
from sw.contract.errors import ConfigError

# ---------------------------------------------------------------------------
# Python level
# ---------------------------------------------------------------------------


@pytest.mark.synth
def test_signature_members_and_verilog_names():
    sig = axi4_signature(addr_width=49)
    for name in ("araddr", "arlen", "arsize", "arburst", "arid", "arvalid", "arready", "rdata", "rresp", "rlast",
                 "rid", "rvalid", "rready", "awaddr", "awlen", "awsize", "awburst", "awid", "awvalid", "awready",
                 "wdata", "wstrb", "wlast", "wvalid", "wready", "bresp", "bid", "bvalid", "bready",
                 "arcache", "arprot", "awcache", "awprot"):
        assert name in sig.members
    assert Shape.cast(sig.members["araddr"].shape).width == 49
    assert Shape.cast(sig.members["wstrb"].shape).width == 16
    assert sig == axi4_signature(addr_width=49) and sig != axi4_signature()
    assert set(axi4_read_signature().members.keys()) < set(sig.members.keys())
    text = verilog.convert(AxiReadMaster(addr_width=49), name="rm")
    ports = set(re.findall(r"^\s*(?:input|output)\s+(?:\[\d+:0\]\s+)?(\S+);", text, re.M))
    assert {"bus__araddr", "bus__rdata", "bus__arcache", "cmd__payload", "data__payload", "error_addr"} <= ports
    assert re.search(r"output \[48:0\] bus__araddr;", text)


@pytest.mark.parametrize("addr,beats,expect", [
    (0x0, 16, [(0x0, 16)]),
    (0x0, 17, [(0x0, 16), (0x100, 1)]),
    (0xFF0, 3, [(0xFF0, 1), (0x1000, 2)]),
    (0xF80, 40, [(0xF80, 8), (0x1000, 16), (0x1100, 16)]),
    (0x1000, 0, []),
])
def test_split_bursts(addr, beats, expect):
    assert split_bursts(addr, beats) == expect


def test_split_bursts_properties():
    import random
    rng = random.Random(1)
    for _ in range(500):
        addr = 16 * rng.randrange(0, 1 << 16)
        beats = rng.randrange(1, 2000)
        bursts = split_bursts(addr, beats)
        assert sum(n for _, n in bursts) == beats and bursts[0][0] == addr
        for (a, n), (b, _) in zip(bursts, bursts[1:]):
            assert b == a + 16 * n
        for a, n in bursts:
            assert 1 <= n <= 16 and a // AXI_PAGE_BYTES == (a + 16 * n - 1) // AXI_PAGE_BYTES


@pytest.mark.parametrize("kw", [dict(max_burst=12), dict(max_burst=512), dict(max_outstanding=0),
                                dict(data_width=100), dict(addr_width=8), dict(data_width=1024, max_burst=64)])
def test_bad_parameters(kw):
    with pytest.raises(ConfigError):
        AxiReadMaster(**kw)
    with pytest.raises(ConfigError):
        AxiWriteMaster(**kw)


def test_derived_facts():
    rm = AxiReadMaster(max_outstanding=12)
    assert rm.buffer_beats == 192 and rm.data_bytes == 16
    assert AxiWriteMaster().buffer_beats == 32
    with pytest.raises(ConfigError):
        AxiWriteMaster(buffer_beats=8)


# ---------------------------------------------------------------------------
# cocotb + Verilator: AxiRam
# ---------------------------------------------------------------------------

RAM_POINTS = {
    "default": dict(read={}, write={}),
    "out2-burst4": dict(read=dict(max_outstanding=2, max_burst=4), write=dict(max_outstanding=2, max_burst=4)),
}


def _run_masters(point: str, test: str, tmp_path, **extra):
    from sim.axi_tops import masters_top_sources, run_top
    spec = RAM_POINTS[point]
    sources, build = masters_top_sources(read=spec["read"], write=spec["write"])
    p = {"max_outstanding": spec["read"].get("max_outstanding", 8), "max_burst": spec["read"].get("max_burst", 16),
         **extra}
    run_top(sources=sources, build_name=build, toplevel="axi_masters_top", test_module="tb_axi",
            test_filter=f"{test}$", extra_env={"AXI_PARAMS": json.dumps(p), "AXI_WORKDIR": str(tmp_path)})


@pytest.mark.sim
@pytest.mark.parametrize("test", ["ram_read_random", "ram_write_random", "ram_read_slverr", "ram_write_slverr"])
def test_masters_against_axiram(test, tmp_path):
    _run_masters("default", test, tmp_path)


@pytest.mark.sim
@pytest.mark.parametrize("test", ["ram_read_random", "ram_write_random"])
def test_masters_against_axiram_small_point(test, tmp_path):
    """Two bursts in flight, 4-beat bursts, heavy pauses: the credit and split logic at a second point."""
    _run_masters("out2-burst4", test, tmp_path, pause=0.5, seed=3, commands=30, max_beats=120)


@pytest.mark.sim
@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_masters_against_axiram_long(seed, tmp_path):
    _run_masters("default", "ram_read_random", tmp_path, seed=seed, commands=300, max_beats=1000)
    _run_masters("default", "ram_write_random", tmp_path, seed=seed, commands=200, max_beats=600)


# ---------------------------------------------------------------------------
# cocotb + Verilator: hp_ddr_model
# ---------------------------------------------------------------------------

BENCH_DDR = KV260.replace(mem_bytes=32 << 20, mem_base=0x7000_0000)


def _run_bench(test: str, tmp_path, **extra):
    from sim.axi_tops import ddr_bench_sources, run_top
    sources, build = ddr_bench_sources(BENCH_DDR)
    p = {"ddr": BENCH_DDR.to_json(), **extra}
    results = tmp_path / "results.json"
    run_top(sources=sources, build_name=build, toplevel="ddr_read_bench", test_module="tb_axi",
            test_filter=f"{test}$", extra_env={"AXI_PARAMS": json.dumps(p), "AXI_WORKDIR": str(tmp_path),
                                                "AXI_RESULTS": str(results)})
    return json.loads(results.read_text()) if results.exists() else None


@pytest.mark.sim
@pytest.mark.parametrize("test", ["ddr_read_exact", "ddr_read_errors", "ddr_write_and_dump", "ddr_write_error"])
def test_masters_against_ddr_model(test, tmp_path):
    _run_bench(test, tmp_path)


@pytest.mark.sim
def test_throughput_with_ddr_model(tmp_path):
    """Steady-state rates against the cap, the shared HP1/HP2 port and Little's law."""
    r = _run_bench("ddr_throughput", tmp_path, beats=8192)
    print(json.dumps({k: round(v["bytes_per_cycle"], 2) for k, v in r.items()}))
    one, four = r["one_port"], r["four_ports"]
    assert one["bytes_per_cycle"] >= 0.97 * 16                        # one beat per cycle on one port
    assert four["bytes_per_cycle"] >= 0.95 * 64                       # >= 95 % of the 16 GB/s cap
    assert four["bytes_per_cycle"] <= 64 * 1.01
    assert r["four_ports_latency100"]["bytes_per_cycle"] >= 0.95 * 64  # 8 x 16 beats in flight hide 400 ns
    # One outstanding burst per port: latency bound, far below the cap, near Little's law.
    o1 = r["four_ports_outstanding1"]
    assert o1["bytes_per_cycle"] < 0.5 * 64
    assert 0.8 * o1["latency_bound_bytes_per_cycle"] <= o1["bytes_per_cycle"] <= 1.02 * o1["latency_bound_bytes_per_cycle"]
    # HP1 + HP2 share 16 B/cycle: HP0 and HP3 keep a beat per cycle, HP1 and HP2 get half each,
    # 48 B/cycle in all while every port runs; equal transfers therefore take twice as long.
    sh = r["four_ports_shared_hp12"]
    assert sh["peak_bytes_per_cycle"] == 48
    rates = [pp["bytes_per_cycle"] for pp in sh["per_port"]]
    assert min(rates[0], rates[3]) >= 0.97 * 16 and max(rates[1], rates[2]) <= 8 * 1.01
    assert 0.95 * 48 <= sh["sum_of_port_rates"] <= 48 * 1.01
    assert sh["bytes_per_cycle"] <= 0.51 * 64
    c40 = r["four_ports_cap40"]                                       # 2.5 beats/cycle: a fractional cap
    assert 0.95 * 40 <= c40["bytes_per_cycle"] <= 40 * 1.01
    spread = [pp["cycles"] for pp in c40["per_port"]]
    assert max(spread) - min(spread) <= 0.02 * max(spread)             # round-robin is fair
    for name, res in r.items():
        assert res["ddr"]["model"].startswith("hp_ddr_model (modeled")


def test_write_select_gives_the_port_to_one_manager():
    """AxiWriteSelect in Amaranth's simulator: the selected manager's AW/W reach the port and its
    B comes back; the others see no ready and no response, whatever they drive."""
    from amaranth.sim import Simulator

    from rtl.readmux import AxiWriteSelect

    dut = AxiWriteSelect(3, addr_width=32)
    mgrs = [getattr(dut, f"m{i}") for i in range(3)]

    async def tb(ctx):
        ctx.set(dut.bus.awready, 1)
        ctx.set(dut.bus.wready, 1)
        ctx.set(dut.bus.bvalid, 1)
        ctx.set(dut.bus.bid, 5)
        for i, mg in enumerate(mgrs):
            ctx.set(mg.awvalid, 1)
            ctx.set(mg.awaddr, 0x1000 * (i + 1))
            ctx.set(mg.wvalid, 1)
            ctx.set(mg.wdata, 0xA0 + i)
            ctx.set(mg.wstrb, 0x0F0F + i)
            ctx.set(mg.wlast, i & 1)
            ctx.set(mg.bready, 1)
        for sel in (0, 2, 1):
            ctx.set(dut.sel, sel)
            assert ctx.get(dut.bus.awaddr) == 0x1000 * (sel + 1)
            assert ctx.get(dut.bus.wdata) == 0xA0 + sel
            assert ctx.get(dut.bus.wstrb) == 0x0F0F + sel
            assert ctx.get(dut.bus.wlast) == sel & 1
            for i, mg in enumerate(mgrs):
                mine = int(i == sel)
                assert (ctx.get(mg.awready), ctx.get(mg.wready), ctx.get(mg.bvalid)) == (mine,) * 3, (sel, i)
                assert ctx.get(mg.bid) == 5
        ctx.set(mgrs[1].awvalid, 0)
        assert ctx.get(dut.bus.awvalid) == 0          # sel is 1
        ctx.set(dut.sel, 0)
        assert ctx.get(dut.bus.awvalid) == 1

    sim = Simulator(dut)
    sim.add_testbench(tb)
    sim.run()
