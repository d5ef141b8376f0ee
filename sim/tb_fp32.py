"""cocotb bench for free-running units: streams test vectors through a bank of pipelines.

The toplevel is a sim/unit_bank.py ``UnitBank`` (tests/test_fp32.py, tests/test_fpfunc.py):
for every op a few lanes of the unit (at different latencies, padded to one common
latency), all fed in the same cycle. The pytest side writes FP32_VECTORS (an .npz)
with, per port, the lane values of every cycle and the lane width; this bench drives one row per cycle
(with random idle cycles, which a free-running pipeline must not care about),
checks that o_valid follows i_valid by exactly ``latency`` cycles on every lane,
and writes the captured outputs to FP32_RESULTS for the pytest side to compare
with its golden model.
"""

from __future__ import annotations

import os
import random

import numpy as np

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly


def _pack(rows: np.ndarray, bits: int) -> list[int]:
    mask = (1 << bits) - 1
    out = []
    for row in rows.tolist():
        v = 0
        for k, x in enumerate(row):
            v |= (int(x) & mask) << (bits * k)
        out.append(v)
    return out


def _unpack(values: list[int], bits: int, lanes: int) -> np.ndarray:
    mask = (1 << bits) - 1
    return np.array([[(v >> (bits * k)) & mask for k in range(lanes)] for v in values], dtype=np.uint64)


@cocotb.test()
async def stream_vectors(dut):
    spec = np.load(os.environ["FP32_VECTORS"])
    latency = int(spec["latency"])
    in_ports = [str(p) for p in spec["in_ports"]]
    out_ports = [str(p) for p in spec["out_ports"]]
    lanes = int(spec["lanes"])
    rows = {p: _pack(spec[f"in_{p}"], int(spec[f"bits_{p}"])) for p in in_ports}
    n = len(rows[in_ports[0]])
    rng = random.Random(int(spec["seed"]))

    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    dut.i_valid.value = 0
    for _ in range(3):
        await FallingEdge(dut.clk)
    dut.rst.value = 0

    handles_in = {p: getattr(dut, p) for p in in_ports}
    handles_out = {p: getattr(dut, p) for p in out_ports}
    valid_width = len(dut.o_valid)
    all_valid = (1 << valid_width) - 1
    history: list[int] = []          # i_valid driven in each cycle
    captured = {p: [] for p in out_ports}
    sent = 0
    cycle = 0
    while len(captured[out_ports[0]]) < n:
        await FallingEdge(dut.clk)
        drive = sent < n and rng.random() < 0.9
        dut.i_valid.value = int(drive)
        if drive:
            for p in in_ports:
                handles_in[p].value = rows[p][sent]
            sent += 1
        history.append(int(drive))
        await ReadOnly()
        ov = dut.o_valid.value.to_unsigned()
        expect = history[cycle - latency] if cycle >= latency else 0
        assert ov == (all_valid if expect else 0), \
            f"cycle {cycle}: o_valid lanes {ov:#x}, expected {'all' if expect else 'none'}"
        if expect:
            for p in out_ports:
                captured[p].append(handles_out[p].value.to_unsigned())
        cycle += 1
        assert cycle < 4 * n + 100, "timeout: outputs stopped arriving"

    np.savez(os.environ["FP32_RESULTS"],
             **{f"out_{p}": _unpack(captured[p], int(spec[f"bits_{p}"]), lanes) for p in out_ports})
