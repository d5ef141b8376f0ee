"""Runner self-test: the counter test passes, fails (SELFTEST_EXPECT) or is skipped (SELFTEST_SKIP),
so pytest can check that sim.runner tells the three apart."""

import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge


@cocotb.test(skip=os.environ.get("SELFTEST_SKIP") == "1")
async def counter_counts(dut):
    cocotb.start_soon(Clock(dut.clk, 4, unit="ns").start())
    dut.rst.value = 1
    dut.en.value = 0
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    dut.en.value = 1
    for _ in range(10):
        await FallingEdge(dut.clk)
    expected = int(os.environ.get("SELFTEST_EXPECT", "10"))
    assert int(dut.q.value) == expected, f"counter at {int(dut.q.value)}, expected {expected}"
