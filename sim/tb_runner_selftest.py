"""Runner self-test: one passing and one failing test, so pytest can check both are seen."""

import os

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge


@cocotb.test()
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
