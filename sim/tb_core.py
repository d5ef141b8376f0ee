"""cocotb bench for LinearCore (MacArray + DequantUnit), end to end in fp32.

The pytest side (tests/test_core.py) cuts a quantized linear into the core's
streams with sw.contract.layout.pack_linear (so the layout is exercised too) and writes
CORE_VECTORS, an .npz holding per scenario the payload bytes of `beats`,
`meta`, `act` and `bias`, their valid probabilities and the `y` ready
probability. This bench plays them with random stalls on every stream,
captures every `y` beat into CORE_RESULTS/<scenario>.npz and reports cycles
against the ideal (one beat per cycle plus the core's fill latency). The fp32
bits are compared with sw.contract.numerics.golden_linear on the pytest side.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

import cocotb
from cocotb.clock import Clock

from tb_array import StreamSink, StreamSource, reset, rows_to_ints, run_streams, save_results

IN_STREAMS = ("beats", "meta", "act", "bias")


async def _scenario(dut, name: str) -> None:
    spec = np.load(os.environ["CORE_VECTORS"])
    latency = int(spec["latency"])
    out_bytes = int(spec["out_bytes"])
    n_out = int(spec[f"{name}__n_out"])
    rng = random.Random(int(spec["seed"]) * 104729 + sum(map(ord, name)))

    await reset(dut)
    sources = [StreamSource(dut, s, rows_to_ints(spec[f"{name}__{s}"]), float(spec[f"{name}__p_{s}"]), rng)
               for s in IN_STREAMS]
    sink = StreamSink(dut, "y", float(spec[f"{name}__p_y"]), rng)
    beats = sources[0]
    n = len(beats.items)
    slowest = min([float(spec[f"{name}__p_{s}"]) for s in IN_STREAMS] + [float(spec[f"{name}__p_y"])])
    per_group = int(spec["cycles_per_group"]) / int(spec["beats_per_group"])
    budget = int(n * max(per_group, 1.0) / max(slowest, 0.05) * 3) + 20 * latency + 1000
    cycles = await run_streams(dut, sources, [sink], {sink: n_out}, budget)

    span = sink.cycles[-1] - beats.accept_cycles[0] + 1
    ideal = n + latency
    dut._log.info(f"{name}: {n} beats, {n_out} y beats, first beat to last y {span} cycles, "
                  f"ideal {ideal} ({span / ideal:.4f}x), {cycles} cycles run")
    save_results(Path(os.environ["CORE_RESULTS"]) / f"{name}.npz", sink, out_bytes,
                 span=np.int64(span), beats=np.int64(n), ideal=np.int64(ideal),
                 beat_cycles=np.array(beats.accept_cycles, dtype=np.int64))


def _tests():
    spec = np.load(os.environ["CORE_VECTORS"])
    return [str(s) for s in spec["scenarios"]]


@cocotb.test()
async def scenarios(dut):
    """Every scenario of CORE_VECTORS in order, each after its own reset."""
    Clock(dut.clk, 10, unit="ns").start()
    for name in _tests():
        await _scenario(dut, name)
