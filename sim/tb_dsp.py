"""cocotb: rtl/dsp.py's slice, Amaranth form against the DSP48E2 instance on Xilinx's model.

Random operands every cycle and random clock enables and loads (each high with its own
probability, sometimes all high for long runs), compared on every cycle after the
model's first defined output. Inputs are driven and outputs sampled on the falling edge.
"""

from __future__ import annotations

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge

CYCLES = int(os.environ.get("DSP_CYCLES", "20000"))


@cocotb.test()
async def slices_agree(dut):
    cocotb.start_soon(Clock(dut.clk, 4, unit="ns").start())
    rng = random.Random(int(os.environ.get("DSP_SEED", "1")))
    a_bits, b_bits = len(dut.a), len(dut.b)
    madd = os.environ.get("DSP_KIND", "mac") == "madd"     # madd_slice: C, use_c, use_m; no M register
    dut.rst.value = 0
    p_ce = ({"ce_ab": 0.8, "ce_p": 0.7, "use_c": 0.7, "use_m": 0.8, "use_d": 0.5} if madd else
            {"ce_ab": 0.8, "ce_m": 0.8, "ce_p": 0.7, "load": 0.1})
    for s in p_ce:
        getattr(dut, s).value = 1
    dut.a.value = 0
    dut.b.value = 0
    if madd:
        dut.use_c.value = 0
        dut.c.value = 0
        dut.d.value = 0
    # Prime every register with defined values: 4 cycles with every enable (and load) high.
    for _ in range(4):
        await FallingEdge(dut.clk)
    compared = mismatches = 0
    for cyc in range(CYCLES):
        await FallingEdge(dut.clk)
        prim, beh = dut.p_prim.value, dut.p_beh.value
        if prim.to_signed() != beh.to_signed():
            mismatches += 1
            assert mismatches < 5, f"cycle {cyc}: DSP48E2 {prim.to_signed()} != Amaranth {beh.to_signed()}"
        compared += 1
        burst = (cyc // 500) % 4 == 3          # every fourth stretch: everything enabled (a group streaming)
        dut.a.value = rng.randrange(-(1 << (a_bits - 1)), 1 << (a_bits - 1))
        dut.b.value = rng.randrange(-(1 << (b_bits - 1)), 1 << (b_bits - 1))
        if madd:        # C: near P's range so that sums carry into the top bits, both signs
            c_bits = len(dut.c)
            dut.c.value = rng.randrange(-(1 << (c_bits - 2)), 1 << (c_bits - 2))
            d_bits = len(dut.d)
            dut.d.value = rng.randrange(-(1 << (d_bits - 1)), 1 << (d_bits - 1))
        for s, p in p_ce.items():
            getattr(dut, s).value = int(rng.random() < (p if s in ("load", "use_c", "use_d") or not burst else 1.0))
    assert mismatches == 0, f"{mismatches} of {compared} cycles differ"
    dut._log.info("DSP48E2 model and Amaranth slice agree on %d cycles", compared)
