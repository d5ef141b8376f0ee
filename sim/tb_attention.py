"""cocotb bench for rtl.attention.AttentionUnit.

The pytest side (tests/test_attention.py) writes ATTN_SPEC (an .npz) with the unit's
geometry, a list of commands (n, s_q, q8 and the n cache rows' K/V codes and scales) and
the stall probabilities. This bench offers the six input streams with random gaps (junk
payloads while not valid), takes the out stream with random ready, checks the out
protocol (valid and payload held until taken) and that every input beat was taken, and
writes the outputs (fp32 bit patterns, [command][G*D]) and per-command cycle counts
(cmd taken, last out beat taken) to ATTN_RESULTS for the pytest side to compare with
sw.contract.fabric_ops.
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


def _beats128(codes: np.ndarray) -> list[int]:
    b = np.ascontiguousarray(codes, np.int8).view(np.uint8).reshape(-1, 16)
    return [int.from_bytes(row.tobytes(), "little") for row in b]


def _stream_beats(spec):
    G, nbits = int(spec["group"]), int(spec["n_bits"])
    ns = [int(x) for x in spec["n"]]
    cmd = [n | sum(int(s) << (nbits + 32 * g) for g, s in enumerate(sq)) for n, sq in zip(ns, spec["s_q"])]
    beats = {"cmd": cmd, "q": _beats128(spec["q8"]), "k": _beats128(spec["k8"]),
             "k_scale": [int(x) for x in spec["s_k"]], "v_scale": [int(x) for x in spec["s_v"]],
             "v": _beats128(spec["v8"])}
    widths = {"cmd": nbits + 32 * G, "q": 128, "k": 128, "k_scale": 32, "v_scale": 32, "v": 128}
    return beats, widths


@cocotb.test(skip=not os.environ.get("ATTN_SPEC"))
async def attention_commands(dut):
    spec = np.load(os.environ["ATTN_SPEC"])
    G, D = int(spec["group"]), int(spec["head_dim"])
    n_cmds = len(spec["n"])
    rng = random.Random(int(spec["seed"]))
    beats, widths = _stream_beats(spec)
    p_valid = {k: float(spec[f"p_valid_{k}"]) for k in beats}
    p_ready = float(spec["p_ready"])
    max_cycles = int(spec["max_cycles"])
    per_cmd = G * D // 4

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
    done_cycles: list[int] = []
    held = None
    cycle = 0
    while len(outputs) < n_cmds * per_cmd:
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
            if ready:
                outputs.append(payload)
                held = None
                if len(outputs) % per_cmd == 0:
                    done_cycles.append(cycle)
            else:
                held = payload
        cycle += 1
        assert cycle < max_cycles, (f"timeout after {cycle} cycles: {len(outputs)} of {n_cmds * per_cmd} out "
                                    "beats, " + ", ".join(f"{s.name} {s.sent}/{len(s.beats)}" for s in streams))
    for _ in range(20):                       # nothing more may be taken or sent
        await FallingEdge(dut.clk)
        for s in streams:
            s.valid.value = 0
        dut.out__ready.value = 1
        await ReadOnly()
        assert not int(dut.out__valid.value), "an out beat beyond the commands' outputs"
    for s in streams:
        assert s.sent == len(s.beats), f"{s.name}: {s.sent} of {len(s.beats)} beats taken"
    clock.stop()
    words = np.array([[(b >> (32 * i)) & 0xFFFFFFFF for i in range(4)] for b in outputs], np.uint32)
    np.savez(os.environ["ATTN_RESULTS"], out=words.reshape(n_cmds, G * D),
             cmd_cycles=np.array(streams[0].handshakes), done_cycles=np.array(done_cycles))
