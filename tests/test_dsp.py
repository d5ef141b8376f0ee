"""rtl/dsp.py: the DSP48E2 multiply-accumulate slice, its two forms and the array built on it.

* The Amaranth form against a cycle model of the slice written here from UG579's
  description (A2/B2, M and P registers, each under its clock enable; P loads RND or
  accumulates), in Amaranth's simulator.
* The synthesis form as the flows write it: one DSP48E2 per MAC lane of a one-column
  array, configured as the slice, with the pack bias in RND; a multi-column array keeps
  its adder tree and has none.
* The two forms side by side against Xilinx's own DSP48E2 simulation model in Verilator
  (needs KRIALLM_UNISIM, the XilinxUnisimLibrary's verilog/src: not shipped here).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from pathlib import Path

import pytest
from amaranth.back import verilog
from amaranth.sim import Simulator

from rtl.array import MacArray
from rtl.dsp import DSP48E2_PORTS, OPMODE_ACCUMULATE, OPMODE_LOAD, dsp48e2_stub_verilog, xilinx_primitives
from sim.dsp_tops import MADD_A_BITS, MADD_P_BITS, SLICE_P_BITS, SLICE_RND, MaddDut, SliceDut, dsp_check_sources
from sw.contract.config import preset


def _wrap(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _drive(dut, steps: list[dict]) -> list[int]:
    """P before each clock edge, with each step's inputs applied, in Amaranth's simulator."""
    got = []

    async def bench(ctx):
        for s in steps:
            for k, v in s.items():
                ctx.set(getattr(dut, k), v)
            got.append(ctx.get(dut.p))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return got


def test_amaranth_slice_is_the_dsp48e2_register_pipeline():
    rng = random.Random(7)
    steps = []
    for i in range(3000):
        burst = (i // 200) % 3 == 2
        steps.append(dict(a=rng.randrange(-(1 << 22), 1 << 22), b=rng.randrange(-128, 128),
                          ce_ab=int(burst or rng.random() < 0.7), ce_m=int(burst or rng.random() < 0.7),
                          ce_p=int(burst or rng.random() < 0.6), load=int(rng.random() < 0.1)))
    # the model: registers update on the edge from the values before it
    a2 = b2 = m = 0
    p = 0
    want = []
    for s in steps:
        want.append(p)
        n_a2, n_b2 = (s["a"], s["b"]) if s["ce_ab"] else (a2, b2)
        n_m = a2 * b2 if s["ce_m"] else m
        n_p = _wrap((SLICE_RND if s["load"] else p) + m, SLICE_P_BITS) if s["ce_p"] else p
        a2, b2, m, p = n_a2, n_b2, n_m, n_p
    got = _drive(SliceDut(), steps)
    # P is undefined (0 in Amaranth) until the first load reaches it; compare from there
    first = next(i for i, s in enumerate(steps) if s["load"] and s["ce_p"]) + 1
    assert got[first:] == want[first:]
    assert len(set(got[first:])) > 100          # it did accumulate


def test_amaranth_madd_slice_is_the_dsp48e2_multiply_add():
    """P <= (use_c ? C : 0) + (use_m ? X2*B2 : 0), X2 = use_d ? D2 : A2, A2/B2/D2 under ce_ab, no M
    register; as a ring through C it accumulates."""
    rng = random.Random(11)
    steps = []
    for i in range(3000):
        ring = (i // 300) % 2 == 1           # C = P two cycles ago: an accumulator ring of two
        steps.append(dict(a=rng.randrange(0, 1 << (MADD_A_BITS - 1)), b=rng.randrange(-127, 128),
                          c=None if ring else rng.randrange(-(1 << 42), 1 << 42), d=rng.randrange(-128, 128),
                          ce_ab=int(rng.random() < 0.8), ce_p=int(rng.random() < 0.8),
                          use_c=int(rng.random() < 0.9), use_m=int(rng.random() < 0.85),
                          use_d=int(rng.random() < 0.3)))
    a2 = b2 = d2 = 0
    hist = [0, 0]
    p = 0
    want = []
    for s in steps:
        if s["c"] is None:
            s["c"] = hist[-2]
        want.append(p)
        n_a2, n_b2, n_d2 = (s["a"], s["b"], s["d"]) if s["ce_ab"] else (a2, b2, d2)
        x2 = d2 if s["use_d"] else a2
        n_p = _wrap((s["c"] if s["use_c"] else 0) + (x2 * b2 if s["use_m"] else 0), MADD_P_BITS) \
            if s["ce_p"] else p
        a2, b2, d2, p = n_a2, n_b2, n_d2, n_p
        hist.append(p)
    got = _drive(MaddDut(), steps)
    assert got[2:] == want[2:]
    assert max(abs(v) for v in got) > 1 << 40 and len(set(got)) > 2000


def _instances(text: str) -> list[str]:
    return re.findall(r"DSP48E2 #\((.*?)\) \w+ \(", text, re.S)


@pytest.mark.synth
def test_one_column_array_synthesizes_to_one_dsp48e2_per_lane():
    cfg = dataclasses.replace(preset("kv260"), engines=1)
    with xilinx_primitives():
        text = verilog.convert(MacArray(cfg), name="mac_array")
    inst = _instances(text)
    assert len(inst) == cfg.tokens * cfg.rows // 2 == 128       # packed: two rows per DSP
    params = inst[0]
    for name, value in (("AREG", "32'd1"), ("BREG", "32'd1"), ("MREG", "32'd1"), ("PREG", "32'd1"),
                        ("OPMODEREG", "32'd0"), ("USE_MULT", '"MULTIPLY"'),
                        ("RND", f"48'h{1 << (cfg.pack_shift - 1):012x}")):
        assert re.search(rf"\.{name}\({re.escape(value)}\)", params), (name, params[:400])
    # OPMODE: RND (W=10) on a group's first beat, else P (W=01); X = Y = M, Z = 0
    assert OPMODE_LOAD == 0b100000101 and OPMODE_ACCUMULATE == 0b010000101
    # the simulation form of the same array has no instance
    assert _instances(verilog.convert(MacArray(cfg), name="mac_array")) == []


@pytest.mark.synth
def test_multi_column_array_keeps_its_adder_tree_in_fabric():
    with xilinx_primitives():
        text = verilog.convert(MacArray(preset("test-4x4-g32")), name="mac_array")
    assert _instances(text) == []


def test_the_lint_stub_declares_every_port_the_instance_ties():
    stub = dsp48e2_stub_verilog()
    for port, width in DSP48E2_PORTS.items():
        decl = f"input {port}" if width == 1 else f"input [{width - 1}:0] {port}"
        assert decl in stub, port
    assert "output [47:0] P" in stub


@pytest.mark.sim
@pytest.mark.parametrize("kind", ["mac", "madd"])
def test_slice_matches_xilinx_dsp48e2_model(kind):
    src = os.environ.get("KRIALLM_UNISIM")
    if not src:
        pytest.skip("KRIALLM_UNISIM (XilinxUnisimLibrary verilog/src) is not set: the DSP48E2 model is not here")
    from sim.runner import run_cocotb
    sources, build, top = dsp_check_sources(Path(src), kind)
    run_cocotb(sources=sources, toplevel=top, test_module="sim.tb_dsp", build_name=build,
               extra_env={"DSP_CYCLES": "20000", "DSP_SEED": "3", "DSP_KIND": kind},
               build_args=["--timing", "-CFLAGS", "-fcoroutines"])   # the model waits #1 at time 0
