"""cocotb bench for rtl.argmax.ArgmaxUnit.

The pytest side (tests/test_argmax.py) writes ARGMAX_VECTORS, an .npz with the input
beats as little-endian payload bytes, the number of vectors and the stall
probabilities; this bench offers the beats with random idle cycles, pulls the results
with random back-pressure (one beat per cycle when neither stalls, which it checks),
and writes the received payloads to ARGMAX_RESULTS for the pytest side to compare
with sw.contract.fabric_ops.argmax_first.
"""

from __future__ import annotations

import os
import random

import numpy as np

import cocotb
from cocotb.clock import Clock

from tb_array import StreamSink, StreamSource, reset, rows_to_ints, run_streams, save_results


@cocotb.test()
async def stream_vectors(dut):
    spec = np.load(os.environ["ARGMAX_VECTORS"])
    p_valid, p_ready = float(spec["p_valid"]), float(spec["p_ready"])
    n_out = int(spec["n_out"])
    rng = random.Random(int(spec["seed"]))
    Clock(dut.clk, 10, unit="ns").start()
    await reset(dut)
    src = StreamSource(dut, "inp", rows_to_ints(spec["inp"]), p_valid, rng)
    sink = StreamSink(dut, "out", p_ready, rng)
    n = len(src.items)
    budget = int(n / max(min(p_valid, p_ready), 0.05) * 3) + 4 * n_out + 200
    await run_streams(dut, [src], [sink], {sink: n_out}, budget)
    if p_valid >= 1.0 and p_ready >= 1.0:
        first = src.accept_cycles[0]
        assert src.accept_cycles == list(range(first, first + n)), "argmax did not take one beat per cycle"
    save_results(os.environ["ARGMAX_RESULTS"], sink, int(spec["out_bytes"]))
