"""cocotb bench for rtl.vector.VectorUnit.

The pytest side (tests/test_vector.py) writes VECTOR_VECTORS, an .npz holding per
scenario the beats of every input stream (``cmd``, ``a``..``d``) as little-endian
payload bytes, their valid probabilities, the ready probability of every output
stream (``out``, ``codes``, ``stats``) and how many beats each output must deliver.
This bench plays each scenario after its own reset with the shared stream models of
sim/tb_array.py (random input gaps, random output back-pressure, the valid/payload
hold rule checked on every output), then writes what every output delivered, with
the handshake cycles, to VECTOR_RESULTS/<scenario>_<stream>.npz. The bits are
compared with sw.contract.fabric_ops / numerics on the pytest side.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

import cocotb
from cocotb.clock import Clock

from tb_array import StreamSink, StreamSource, reset, rows_to_ints, run_streams, save_results

IN_STREAMS = ("cmd", "a", "b", "c", "d")
OUT_STREAMS = ("out", "codes", "stats")


async def _scenario(dut, spec, name: str) -> None:
    rng = random.Random(int(spec["seed"]) * 7919 + sum(map(ord, name)))
    await reset(dut)
    sources = [StreamSource(dut, s, rows_to_ints(spec[f"{name}__{s}"]), float(spec[f"{name}__p_{s}"]), rng)
               for s in IN_STREAMS]
    sinks = {s: StreamSink(dut, s, float(spec[f"{name}__p_{s}"]), rng, check_hold=True) for s in OUT_STREAMS}
    expected = {sinks[s]: int(spec[f"{name}__n_{s}"]) for s in OUT_STREAMS}
    budget = int(spec[f"{name}__max_cycles"])
    cycles = await run_streams(dut, sources, list(sinks.values()), expected, budget)
    first = min((s.accept_cycles[0] for s in sources[1:] if s.accept_cycles), default=0)
    dut._log.info(f"{name}: {cycles} cycles, " + ", ".join(f"{s}: {len(k.items)} beats" for s, k in sinks.items()))
    out_dir = Path(os.environ["VECTOR_RESULTS"])
    for s, sink in sinks.items():
        save_results(out_dir / f"{name}_{s}.npz", sink, int(spec[f"{s}_bytes"]), first_input=np.int64(first),
                     cmd_cycles=np.array(sources[0].accept_cycles, dtype=np.int64))


@cocotb.test()
async def scenarios(dut):
    """Every scenario of VECTOR_VECTORS in order, each after its own reset."""
    spec = np.load(os.environ["VECTOR_VECTORS"])
    Clock(dut.clk, 10, unit="ns").start()
    for name in [str(s) for s in spec["scenarios"]]:
        await _scenario(dut, spec, name)
