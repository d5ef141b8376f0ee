"""A bank of free-running pipelines (rtl/fp32.py, rtl/fpfunc.py) streamed with vectors.

`UnitBank` puts a few lanes of every op side by side (each lane a unit at its own
latency, padded to one common latency) so that sim/tb_fp32.py sees a single pipeline;
`run_bank` builds it with Verilator, streams one row of vectors per cycle (with random
idle cycles) and returns the outputs. `run_pysim` feeds a few vectors to one unit in
Amaranth's simulator (easy to debug).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from amaranth.hdl import Fragment, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

__all__ = ["BankOp", "UnitBank", "run_bank", "run_pysim"]


@dataclass(frozen=True)
class BankOp:
    """One op of a bank: ``make(latency)`` builds a unit with ports i_valid, the operands, o_valid, o.

    ``latencies`` are the lanes' latencies in turn (None: the default); without them the
    lanes take the default, the maximum, 0, 1, 2, ...
    """

    make: Callable
    max_latency: int
    operands: tuple[str, ...]
    width: int = 32                 # operand lane width
    out_width: int = 32
    latencies: tuple | None = None

    def lane_latency(self, k: int):
        if self.latencies is not None:
            return self.latencies[k % len(self.latencies)]
        default = self.make(None)
        Fragment.get(default, None)   # elaborate, so that Amaranth does not warn about an unused unit
        order = [default.latency, self.max_latency] + [n for n in range(self.max_latency) if n != default.latency]
        return order[k % len(order)]


class UnitBank(wiring.Component):
    """`lanes` copies of every op side by side at different latencies, each delayed to one
    common latency so the bench sees a single pipeline. A maximum-latency lane registers
    every step boundary, so a value that skips a boundary shows up as a mismatch there."""

    def __init__(self, ops: dict[str, BankOp], lanes: int):
        self.ops = ops
        self.lanes = lanes
        self._units = {op: [spec.make(spec.lane_latency(k)) for k in range(lanes)] for op, spec in ops.items()}
        self.latency = max(u.latency for units in self._units.values() for u in units)
        ports = {"i_valid": In(1), "o_valid": Out(lanes * len(ops))}
        for op, spec in ops.items():
            for name in spec.operands:
                ports[f"{op}_{name}"] = In(spec.width * lanes)
            ports[f"{op}_o"] = Out(spec.out_width * lanes)
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        valid_bits = []
        for op, spec in self.ops.items():
            w, ow = spec.width, spec.out_width
            for k, unit in enumerate(self._units[op]):
                m.submodules[f"{op}{k}"] = unit
                m.d.comb += unit.i_valid.eq(self.i_valid)
                for name in spec.operands:
                    m.d.comb += getattr(unit, name).eq(getattr(self, f"{op}_{name}")[k * w:(k + 1) * w])
                o, v = unit.o, unit.o_valid
                for stage in range(self.latency - unit.latency):
                    o2, v2 = Signal(ow, name=f"{op}{k}_pad{stage}"), Signal(name=f"{op}{k}_padv{stage}")
                    m.d.sync += [o2.eq(o), v2.eq(v)]
                    o, v = o2, v2
                m.d.comb += getattr(self, f"{op}_o")[k * ow:(k + 1) * ow].eq(o)
                valid_bits.append(v)
        for i, v in enumerate(valid_bits):
            m.d.comb += self.o_valid[i].eq(v)
        return m


def run_bank(bank: UnitBank, vectors: dict[str, dict[str, np.ndarray]], tmp_path: Path, name: str,
             seed: int) -> dict[str, np.ndarray]:
    """Stream `vectors` (op -> operand -> values) through a Verilator build of `bank`;
    returns op -> the outputs (uint64, one per vector, in order)."""
    from amaranth.back import verilog

    from .runner import run_cocotb, write_verilog

    src = write_verilog(verilog.convert(bank, name=name), name)
    lanes = bank.lanes
    cycles = max(-(-len(next(iter(v.values()))) // lanes) for v in vectors.values())
    spec = {"latency": bank.latency, "lanes": lanes, "seed": seed}
    in_ports, out_ports = [], []
    for op, ops in vectors.items():
        for port_name, vals in ops.items():
            port = f"{op}_{port_name}"
            padded = np.zeros(cycles * lanes, dtype=np.int64)
            padded[:len(vals)] = np.asarray(vals).astype(np.int64)
            spec[f"in_{port}"] = padded.reshape(cycles, lanes)
            spec[f"bits_{port}"] = bank.ops[op].width
            in_ports.append(port)
        spec[f"bits_{op}_o"] = bank.ops[op].out_width
        out_ports.append(f"{op}_o")
    spec["in_ports"] = np.array(in_ports)
    spec["out_ports"] = np.array(out_ports)
    vec_path, res_path = tmp_path / "vectors.npz", tmp_path / "results.npz"
    np.savez(vec_path, **spec)
    run_cocotb(sources=[src], toplevel=name, test_module="tb_fp32", build_name=name,
               extra_env={"FP32_VECTORS": str(vec_path), "FP32_RESULTS": str(res_path)},
               test_dir=Path(__file__).resolve().parent)
    res = np.load(res_path)
    return {op: res[f"out_{op}_o"].reshape(-1)[:len(next(iter(ops.values())))] for op, ops in vectors.items()}


def run_pysim(unit, inputs: dict[str, list[int]]) -> np.ndarray:
    """Feed one vector per cycle to a free-running unit in Amaranth's simulator; return the
    outputs (uint64, as unsigned bit patterns) in order, checking the latency."""
    n = len(next(iter(inputs.values())))
    mask = (1 << len(unit.o)) - 1
    outs = []

    async def bench(ctx):
        for cycle in range(n + unit.latency):
            if cycle < n:
                for port, vals in inputs.items():
                    ctx.set(getattr(unit, port), vals[cycle])
            ctx.set(unit.i_valid, int(cycle < n))
            await ctx.delay(1e-9)
            if cycle >= unit.latency:
                assert ctx.get(unit.o_valid) == 1
                outs.append(ctx.get(unit.o) & mask)
            else:
                assert ctx.get(unit.o_valid) == 0
            if unit.latency:
                await ctx.tick()
            else:
                await ctx.delay(1e-6)   # a combinational unit has no clock domain

    sim = Simulator(unit)
    if unit.latency:
        sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return np.array(outs, dtype=np.uint64)
