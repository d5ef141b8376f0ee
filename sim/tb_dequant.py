"""cocotb bench for rtl.dequant.DequantUnit.

The pytest side (tests/test_dequant.py) writes one .npz per scenario with the
unit's parameters, the beats of every stream (group by group, tile by tile) and
the stall probabilities; this bench drives the five streams with those random
valid/ready stalls (junk payloads while not valid), checks the out stream's
protocol (valid and payload held until taken), records every handshake cycle
and writes the received out beats to a results .npz that the pytest side
compares, bit for bit, with sw.contract.numerics.dequant_accumulate.

Scenarios: DEQUANT_STALLS (random stalls on every stream) and DEQUANT_STREAM
(no stalls: throughput and fill latency). Each is optional; a test whose
variable is unset is skipped.
"""

from __future__ import annotations

import os
import random

import numpy as np

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly

try:                    # inside the simulator, sim/ is the test directory
    from stream_driver import Stream
except ImportError:     # imported as sim.<module>
    from sim.stream_driver import Stream


def _pack(values, bits: int) -> int:
    mask = (1 << bits) - 1
    v = 0
    for k, x in enumerate(np.asarray(values).tolist()):
        v |= (int(x) & mask) << (bits * k)
    return v


def _unpack(value: int, bits: int, count: int) -> list[int]:
    mask = (1 << bits) - 1
    return [(value >> (bits * k)) & mask for k in range(count)]


def _stream_beats(spec):
    R, T = int(spec["rows"]), int(spec["tokens"])
    aw, qw, zb = int(spec["acc_width"]), int(spec["qsum_width"]), int(spec["zero_bits"])
    partials = [_pack(a, aw) | int(f) << (aw * T * R) | int(l) << (aw * T * R + 1)
                for a, f, l in zip(spec["acc"], spec["first"], spec["last"])]
    meta = [_pack(s, 16) | _pack(z, zb) << (16 * R) for s, z in zip(spec["wscale"], spec["zero"])]
    act = [_pack(s, 32) | _pack(q, qw) << (32 * T) for s, q in zip(spec["ascale"], spec["qsum"])]
    bias = [_pack(b, 32) for b in spec["bias"]]
    widths = {"partials": aw * T * R + 2, "meta": (16 + zb) * R, "act": (32 + qw) * T, "bias": 32 * R}
    return {"partials": partials, "meta": meta, "act": act, "bias": bias}, widths


async def _run(dut, spec_path: str, results_path: str):
    spec = np.load(spec_path)
    R, T = int(spec["rows"]), int(spec["tokens"])
    n_tiles = len(spec["bias"])
    rng = random.Random(int(spec["seed"]))
    beats, widths = _stream_beats(spec)
    p_valid = {k: float(spec[f"p_valid_{k}"]) for k in beats}
    p_ready = float(spec["p_ready"])
    max_cycles = int(spec["max_cycles"])
    # With beat_bits the unit sends a tile's y as out_beats beats (beat b = bits b*beat_bits...).
    out_beats = int(spec["out_beats"]) if "out_beats" in spec else 1
    beat_bits = 32 * T * R // out_beats

    clock = Clock(dut.clk, 10, unit="ns")
    clock.start()
    dut.rst.value = 1
    for name in beats:
        getattr(dut, f"{name}__valid").value = 0
    dut.out__ready.value = 0
    for _ in range(3):
        await FallingEdge(dut.clk)
    dut.rst.value = 0

    streams = [Stream(dut, k, beats[k], widths[k], p_valid[k], rng) for k in beats]
    outputs: list[int] = []
    out_rise: list[int] = []       # cycles in which a tile's first out beat first shows valid
    held = None                    # an out payload shown but not taken in the previous cycle
    cycle = 0
    while len(outputs) < n_tiles * out_beats:
        await FallingEdge(dut.clk)
        for s in streams:
            s.drive()
        ready = rng.random() < p_ready
        dut.out__ready.value = int(ready)
        await ReadOnly()
        for s in streams:
            s.sample(cycle)
        valid = int(dut.out__valid.value)
        if held is not None:
            assert valid, f"cycle {cycle}: out.valid dropped before the beat was taken"
            assert dut.out__payload.value.to_unsigned() == held, \
                f"cycle {cycle}: out.payload changed while waiting for ready"
        if valid:
            payload = dut.out__payload.value.to_unsigned()
            if held is None and len(outputs) % out_beats == 0:
                out_rise.append(cycle)
            if ready:
                outputs.append(payload)
                held = None
            else:
                held = payload
        cycle += 1
        assert cycle < max_cycles, (f"timeout after {cycle} cycles: {len(outputs)} of {n_tiles} out beats, "
                                    + ", ".join(f"{s.name} {s.sent}/{len(s.beats)}" for s in streams))
    # The unit must not take beats that belong to no tile, nor hold back any.
    for s in streams:
        assert s.sent == len(s.beats), f"{s.name}: {s.sent} of {len(s.beats)} beats taken"
    clock.stop()
    np.savez(results_path,
             y=np.array([_unpack(sum(outputs[i * out_beats + b] << (b * beat_bits) for b in range(out_beats)),
                                 32, T * R) for i in range(n_tiles)], dtype=np.uint32),
             out_rise=np.array(out_rise),
             **{f"hs_{s.name}": np.array(s.handshakes) for s in streams})


@cocotb.test(skip=not os.environ.get("DEQUANT_STALLS"))
async def random_stalls(dut):
    await _run(dut, os.environ["DEQUANT_STALLS"], os.environ["DEQUANT_STALLS_RESULTS"])


@cocotb.test(skip=not os.environ.get("DEQUANT_STREAM"))
async def no_stalls(dut):
    await _run(dut, os.environ["DEQUANT_STREAM"], os.environ["DEQUANT_STREAM_RESULTS"])
